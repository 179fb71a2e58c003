"""`ar iterate`, `ar log` and `ar revert` end to end on a micro workspace."""

from __future__ import annotations

import json
import signal

import psutil
from e2e import ar, git, rows, start_and_kill_mid_training, wait_gone


def refs(ws_root, prefix):
    out = git(ws_root, "for-each-ref", "--format=%(refname) %(objectname)", prefix)
    return dict(line.split(" ") for line in out.splitlines() if line)


def test_random_agent_iterates_and_the_branch_moves_only_on_keeps(micro_ws):
    root = micro_ws.root
    done = ar("iterate", "--n", "3", "--agent", "random", "--seed", "1", cwd=root)
    assert done.returncode == 0, done.stderr + done.stdout
    table = rows(root)
    assert table[0]["kind"] == "baseline"  # no baseline yet: the first run is the baseline
    experiments = [r for r in table if r["kind"] != "baseline"]
    assert len(experiments) == 3
    tip = git(root, "rev-parse", "autoresearch/test")
    kept = [r for r in experiments if r["decision"] == "keep"]
    expected_tip = kept[-1]["sha"] if kept else table[0]["sha"]
    assert tip == expected_tip
    discarded = refs(root, "refs/ar/discarded/")
    for row in experiments:
        if row["decision"] != "keep" and row["sha"]:
            assert discarded[f"refs/ar/discarded/{row['id']}"] == row["sha"]
            # the commit is reachable and changed train.py only
            assert git(root, "diff", "--name-only", row["parent_sha"], row["sha"]) == "train.py"
    # every experiment's description says what the random agent changed
    assert all("->" in r["description"] for r in experiments if r["status"] != "invalid")
    # the workspace's own checkout follows the branch (HEAD is the branch; nothing differs)
    assert git(root, "status", "--porcelain") == ""
    tsv = (root / "results.tsv").read_text().splitlines()
    assert tsv[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert all(len(line.split("\t")) == 5 for line in tsv)
    assert not any((root / ".ar" / "worktrees").iterdir())
    # discarded runs keep their logs, not their weights
    for row in experiments:
        run_dir = root / ".ar" / "runs" / str(row["id"])
        if row["decision"] == "discard":
            assert (run_dir / "train.log").exists() and not (run_dir / "out").exists()

    logged = ar("log", "--json", cwd=root)
    assert logged.returncode == 0, logged.stderr
    assert len(json.loads(logged.stdout)) == 4
    best = ar("log", "--best", cwd=root)
    assert best.returncode == 0 and "baseline" in best.stdout
    plotted = ar("log", "--plot", root / "progress.png", cwd=root)
    assert plotted.returncode == 0, plotted.stderr
    assert (root / "progress.png").read_bytes()[:4] == b"\x89PNG"


def test_sigkill_mid_training_then_resume_is_consistent(micro_ws):
    root = micro_ws.root
    assert ar("baseline", cwd=root).returncode == 0
    job_pid, _ = start_and_kill_mid_training(["iterate", "--n", "5", "--agent", "random", "--seed", "2"], root)
    resumed = ar("iterate", "--n", "1", "--agent", "random", "--seed", "4", cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    assert "was interrupted" in resumed.stderr
    assert wait_gone(job_pid)
    table = rows(root)
    assert [r["status"] for r in table].count("interrupted") == 1
    assert all(r["status"] not in ("proposing", "running", "evaluating") for r in table)
    assert not any((root / ".ar" / "worktrees").iterdir())
    assert "worktrees" not in git(root, "worktree", "list")
    strays = [p for p in psutil.process_iter(["cmdline"]) if "train.py" in " ".join(p.info["cmdline"] or [])
              and str(root) in " ".join(p.info["cmdline"] or [])]
    assert strays == []


def test_ctrl_c_finishes_cleanly(micro_ws):
    root = micro_ws.root
    assert ar("baseline", cwd=root).returncode == 0
    job_pid, code = start_and_kill_mid_training(
        ["iterate", "--agent", "random", "--seed", "5"], root, sig=signal.SIGINT)
    assert code == 130
    assert wait_gone(job_pid, timeout=5), "the job outlived Ctrl-C"
    last = rows(root)[-1]
    assert last["status"] == "interrupted" and last["reason"] == "interrupted by the user"
    assert not any((root / ".ar" / "worktrees").iterdir())
    assert git(root, "status", "--porcelain") == ""
    # the interrupted commit stays reachable
    assert git(root, "rev-parse", f"refs/ar/discarded/{last['id']}") == last["sha"]
