"""A hostile train.py through the real pipeline: each attack is stopped and recorded with a
reason a user understands; the honest template still scores.

Each test appends an attack to the micro profile's train.py. Attacks made while training
(`python train.py`) crash the job with the kernel's refusal; attacks made when the scorer's
model worker imports train.py make the evaluation invalid. Neither can touch the score.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
from pathlib import Path

import pytest

import sandbox
from autoresearch_cli.agents import Proposal
from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.research import loop
from autoresearch_cli.research import session as runs
from sandbox.confine import support
from sandbox.evaluate import evaluate
from sandbox.experiment import run_experiment
from sandbox.spec import ExperimentSpec

pytestmark = pytest.mark.skipif(not support().confines_files,
                                reason="this kernel offers no Landlock confinement")

IN_TRAINING = 'if __name__ == "__main__":\n'
IN_WORKER = 'if __name__ != "__main__":\n'  # the model worker imports train.py


def spec_for(ws, code_dir: Path, run_dir: Path) -> ExperimentSpec:
    profile = ws.settings().profile
    return ExperimentSpec(
        code_dir=str(code_dir), run_dir=str(run_dir), data_dir=str(ws.data_dir),
        time_budget=profile.time_budget, startup_allowance=30,
        eval_tokens=profile.eval_tokens, seq_len=profile.max_seq_len, eval_timeout=60,
        device="cpu",
    )


def with_attack(ws, when: str, body: str) -> str:
    """The workspace's train.py with `body` run at the start, in training or in the worker."""
    attack = when + "".join(f"    {line}\n" for line in body.strip().splitlines())
    source = (ws.root / "train.py").read_text()
    marker = "import prepare\n"
    return source.replace(marker, marker + attack, 1)


def run_code(ws, tmp_path: Path, train_py: str):
    code = tmp_path / "code"
    code.mkdir()
    for name in ("prepare.py", "ar.toml", "program.md"):
        (code / name).write_bytes((ws.root / name).read_bytes())
    (code / "train.py").write_text(train_py)
    return run_experiment(spec_for(ws, code, tmp_path / "run")), code


def test_reading_an_evaluation_split_while_training_is_refused(micro_ws, tmp_path):
    attack = f"open({str(micro_ws.data_dir / 'val.bin')!r}, 'rb').read(16)"
    result, _ = run_code(micro_ws, tmp_path, with_attack(micro_ws, IN_TRAINING, attack))
    assert result.status == "crash" and "Permission denied" in result.reason
    assert "val.bin" in result.reason and result.val_bpb is None


@pytest.mark.parametrize("where", ["workspace", "package", "home"])
def test_writing_outside_the_run_is_refused(micro_ws, tmp_path, where):
    import os
    import pwd

    target = {
        "workspace": micro_ws.root / "planted.txt",
        "package": Path(sandbox.__file__).parent / "planted.py",
        "home": Path(pwd.getpwuid(os.getuid()).pw_dir) / "ar-planted.txt",
    }[where]
    attack = f"open({str(target)!r}, 'w').write('x')"
    result, _ = run_code(micro_ws, tmp_path, with_attack(micro_ws, IN_TRAINING, attack))
    assert result.status == "crash" and "Permission denied" in result.reason
    assert not target.exists()


def test_opening_the_ledger_is_refused(micro_ws, tmp_path):
    with Ledger.for_workspace(micro_ws.root):
        pass  # the ledger exists
    ledger = micro_ws.state_dir / "ledger.db"
    attack = (f"import sqlite3\ndb = sqlite3.connect({str(ledger)!r})\n"
              "db.execute('CREATE TABLE forged (x)')\ndb.commit()")
    result, _ = run_code(micro_ws, tmp_path, with_attack(micro_ws, IN_TRAINING, attack))
    assert result.status == "crash" and "unable to open database" in result.reason
    tables = sqlite3.connect(ledger).execute("SELECT name FROM sqlite_master").fetchall()
    assert ("forged",) not in tables


def test_moving_a_git_ref_is_refused(micro_ws, tmp_path):
    ref = micro_ws.branch_ref()
    before = gitops.rev_parse(micro_ws.root, ref)
    attack = (f"import subprocess\nsubprocess.run(['git', '-C', {str(micro_ws.root)!r}, "
              f"'update-ref', {ref!r}, 'HEAD~0^{{tree}}'], check=True, capture_output=True)")
    result, _ = run_code(micro_ws, tmp_path, with_attack(micro_ws, IN_TRAINING, attack))
    assert result.status == "crash" and "CalledProcessError" in result.reason
    assert gitops.rev_parse(micro_ws.root, ref) == before


def test_a_ref_moved_behind_ars_back_is_put_back_and_named(micro_ws):
    ref = micro_ws.branch_ref()
    before = gitops.refs(micro_ws.root, "refs/")
    tip = gitops.rev_parse(micro_ws.root, ref)
    gitops.git(micro_ws.root, "commit", "--allow-empty", "-q", "-m", "planted")
    gitops.update_ref(micro_ws.root, "refs/heads/planted", tip, None)
    moved = runs.restore_refs(micro_ws.root, before)
    assert moved == [f"git ref {ref}", "git ref refs/heads/planted"]
    assert gitops.refs(micro_ws.root, "refs/") == before


def test_reaching_a_port_on_the_hosts_loopback_is_refused(micro_ws, tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    attack = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)"
    try:
        result, _ = run_code(micro_ws, tmp_path, with_attack(micro_ws, IN_TRAINING, attack))
    finally:
        server.close()
    assert result.status == "crash" and not accepted
    assert "Connection refused" in result.reason or "Permission denied" in result.reason


def test_forging_eval_json_from_the_model_worker_is_refused(micro_ws, tmp_path):
    # What once made a forged 0.0123 the branch tip: rewrite the evaluator's output.
    attack = """
import sys, pathlib
weights = pathlib.Path(sys.argv[sys.argv.index('--weights-dir') + 1])
(weights.parent / 'eval.json').write_text('{"status": "ok", "val_bpb": 0.0123}')
"""
    result, _ = run_code(micro_ws, tmp_path, with_attack(micro_ws, IN_WORKER, attack))
    assert result.status == "invalid" and "Permission denied" in result.reason
    assert "0.0123" not in (tmp_path / "run" / "eval.json").read_text()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["val_bpb"] is None


def test_patching_the_scoring_functions_at_import_changes_nothing(micro_ws, tmp_path):
    # What once halved the reported val_bpb: replace the cross-entropy the scorer uses.
    attack = """
import torch.nn.functional as F
honest = F.cross_entropy
F.cross_entropy = lambda *args, **kwargs: honest(*args, **kwargs) / 2
"""
    result, code = run_code(micro_ws, tmp_path, with_attack(micro_ws, IN_WORKER, attack))
    assert result.status == "ok"
    (code / "train.py").write_text((micro_ws.root / "train.py").read_text())  # honest code
    rescored = evaluate(code, tmp_path / "run" / "out", micro_ws.data_dir,
                        result.eval_tokens, micro_ws.settings().profile.max_seq_len)
    assert rescored["val_bpb"] == pytest.approx(result.val_bpb, rel=1e-6)


def test_a_forged_keep_through_ar_iterate_never_moves_the_branch(micro_ws):
    """The whole loop: a proposal whose worker forges eval.json is invalid, not kept."""

    class Forger:
        model_backed = True

        def propose(self, train_py, program_md, history, failure=None):
            attack = ("import sys, pathlib\n"
                      "w = pathlib.Path(sys.argv[sys.argv.index('--weights-dir') + 1])\n"
                      "(w.parent / 'eval.json').write_text('{\"status\": \"ok\", \"val_bpb\": 0.0123}')")
            return Proposal("forge the score", with_attack(micro_ws, IN_WORKER, attack), "whole_file")

    with runs.session(micro_ws, "test") as current:
        tip = micro_ws.tip()
        loop.iterate(current, Forger(), "llm", 1)
        rows = [vars(run) for run in current.ledger.runs()]
    forged = rows[-1]
    assert forged["status"] == "invalid" and forged["val_bpb"] is None
    assert "Permission denied" in forged["reason"]
    assert micro_ws.tip() == tip
    assert all(row["val_bpb"] != 0.0123 for row in rows)
    assert forged["isolation"] is None or forged["isolation"].startswith("landlock")
    baseline = rows[0]
    assert baseline["isolation"].startswith("landlock") and baseline["status"] == "ok"

