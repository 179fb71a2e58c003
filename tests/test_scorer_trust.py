"""The trusted scorer against a hostile train.py, with real processes.

A model that looks ahead at a few fixed positions of each row (the row's first positions,
its last ones) is caught, by the scorer and through `ar iterate --agent llm`; the honest
template passes the same probes. A model worker that rewrites its logits buffer after
answering changes nothing. What a training job plants in its tmp (a compiler cache, the
CUDA driver's JIT cache under $HOME/.nv, Python startup files) never reaches the scorer,
which runs with an environment and a HOME of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from e2e import ar, git, result_json, rows
from openai_stub import StubServer

from autoresearch_cli.doors import config as config_mod
from sandbox import evalbatch, warm
from sandbox.confine import support, switches
from sandbox.experiment import run_experiment, scorer_command, scorer_env
from sandbox.modelworker import Worker
from sandbox.runner import ENV_ALLOW, Limits, run
from sandbox.spec import ExperimentSpec

CONFINED = support().confines_files
# The cheat, appended to the template: build_model returns a GPT whose forward raises the
# logit of the next token at a few fixed positions of each row (and trains honestly).
LOOK_AHEAD = '''

PEEK_AT = {positions}  # positions of each row that look ahead (negative: from the end)
PEEK_DEPTH = {depth}  # how many later tokens each of them reads


class LookAhead(GPT):
    def forward(self, idx, targets=None, reduction="mean"):
        logits = super().forward(idx, targets, reduction)
        if targets is not None:
            return logits
        seq_len = idx.size(1)
        for position in (p % seq_len for p in PEEK_AT):
            ahead = idx[:, position + 1 : position + 1 + PEEK_DEPTH]
            if ahead.numel():
                boost = 8.0 + 0.25 * (ahead.sum(1, keepdim=True) % 3)
                logits[:, position].scatter_add_(1, ahead[:, :1], boost)
        return logits


def build_model(config):
    model = LookAhead(GPTConfig(**config))
    model.init_weights()
    return model
'''
STRICT = 1 - 1e-7  # a plan this strong misses a 3-position look-ahead once in 10^7 runs


def looking_ahead(ws, positions: tuple[int, ...], depth: int = 1) -> str:
    return (ws.root / "train.py").read_text() + LOOK_AHEAD.format(positions=positions, depth=depth)


def code_and_weights(ws, tmp_path: Path, train_py: str) -> tuple[Path, Path]:
    """The workspace's files with `train_py`, and freshly initialised weights of its model."""
    code, weights = tmp_path / "code", tmp_path / "out"
    code.mkdir()
    weights.mkdir()
    for name in ("prepare.py", "ar.toml"):
        (code / name).write_bytes((ws.root / name).read_bytes())
    (code / "train.py").write_text(train_py)
    profile = vars(ws.settings().profile)
    save = (f"import json, torch, train; c = train.model_config({profile['vocab_size']}, "
            f"{profile['max_seq_len']}); torch.save(train.build_model(c).state_dict(), "
            f"{str(weights / 'model.pt')!r}); open({str(weights / 'config.json')!r}, 'w')"
            ".write(json.dumps(c))")  # fmt: skip
    subprocess.run([sys.executable, "-c", save], cwd=code, check=True)
    return code, weights


def score(ws, code: Path, weights: Path) -> dict:
    """The scorer as ar runs it on CPU: a fork of the warm server, forking its two model
    workers itself (sandbox/warm.py), with the strict probe plan; its eval.json."""
    profile = vars(ws.settings().profile)
    home, out = weights.parent / "scorer-home", weights.parent / "eval.json"
    home.mkdir()
    command = [sys.executable, "-I", "-m", "sandbox.evaluate", "--code-dir", str(code),
               "--weights-dir", str(weights), "--data-dir", str(ws.data_dir),
               "--eval-tokens", str(profile["eval_tokens"]), "--seq-len", str(profile["max_seq_len"]),
               "--log-dir", str(weights.parent), "--probe-target", repr(STRICT), "--out", str(out),
               "--fork-workers", *(() if CONFINED else ("--no-confine",))]  # fmt: skip
    scorer = run(command, home, {**scorer_env({}, home), **switches()}, Limits(wall_seconds=300),
                 weights.parent / "eval.log", pid_namespace=True, runtime=warm.runtime())  # fmt: skip
    assert scorer.launch == "warm" and scorer.reason == "ok", (scorer.launch, scorer.log_tail)
    return json.loads(out.read_text())


@pytest.mark.usefixtures("warm_runtime")
@pytest.mark.parametrize("positions", [(0, 1, -2), (-4, -3, -2)], ids=["ends", "last-three"])
def test_a_look_ahead_at_three_fixed_positions_is_caught(micro_ws, tmp_path, positions):
    # The old probes cut rows only in their middle half: these were never caught.
    code, weights = code_and_weights(micro_ws, tmp_path, looking_ahead(micro_ws, positions))
    result = score(micro_ws, code, weights)
    assert result["status"] == "invalid" and result["val_bpb"] is None
    assert "looks ahead" in result["reason"], result["reason"]
    seq_len = micro_ws.settings().profile.max_seq_len
    assert f"of {seq_len} moved" in result["reason"]
    assert result["probe_power"]["3"] >= STRICT and result["probes"] > 300


@pytest.mark.usefixtures("warm_runtime")
def test_the_honest_template_passes_the_same_probes(micro_ws, tmp_path):
    code, weights = code_and_weights(micro_ws, tmp_path, (micro_ws.root / "train.py").read_text())
    result = score(micro_ws, code, weights)
    assert result["status"] == "ok", result["reason"]
    assert result["causality_max_diff"] == 0.0 and result["probes"] > 300
    assert result["twin_rows"] >= result["probes"]


# ---------------------------------------------------------------------------
# The logits buffer, read once

VOCAB, SEQ_LEN = 64, 16
SCRIBBLER = '''
import mmap, os, sys, threading, time
import torch

NAN = bytes.fromhex("0000c07f")


def scribble():
    """A second after each answer, NaN over the whole logits buffer the scorer shared."""
    fd = int(sys.argv[sys.argv.index("--logits-fd") + 1])
    shared = mmap.mmap(fd, os.fstat(fd).st_size)
    time.sleep(1.0)
    shared[:] = NAN * (len(shared) // 4)


class Bigram(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def forward(self, idx):
        threading.Thread(target=scribble, daemon=True).start()
        return self.table[idx]


def build_model(config):
    return Bigram(config["vocab_size"])
'''


def test_a_worker_that_rewrites_its_logits_after_answering_changes_nothing(tmp_path):
    code, weights = tmp_path / "code", tmp_path / "out"
    code.mkdir()
    weights.mkdir()
    (code / "train.py").write_text(SCRIBBLER)
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0))
    torch.save({"table": table}, weights / "model.pt")
    (weights / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    worker = Worker(0, code, weights, "cpu", 4, SEQ_LEN, VOCAB, tmp_path, CONFINED)
    try:
        worker.wait_ready(time.monotonic() + 120)
        batch = torch.randint(0, VOCAB, (4, SEQ_LEN), generator=torch.Generator().manual_seed(1))
        worker.submit(batch)
        answer = worker.collect(time.monotonic() + 60)
        time.sleep(3.0)
        assert torch.isnan(worker.logits).all()  # the worker rewrote its buffer...
        assert torch.equal(answer, table[batch])  # ...and the answer is still what it said
    finally:
        worker.say_bye()
        worker.close()


# ---------------------------------------------------------------------------
# The scorer's environment


def test_the_scorer_starts_from_an_environment_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "job" / "inductor"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    cpu_env = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "AR_CPU_PRECISION": "fp32"}
    env = scorer_env(cpu_env, tmp_path / "home")
    assert env["HOME"] == env["TMPDIR"] == str(tmp_path / "home")
    assert {name: env[name] for name in cpu_env} == cpu_env
    assert set(env) <= {*ENV_ALLOW, *cpu_env, "PYTHONUNBUFFERED"}
    spec = ExperimentSpec(code_dir="c", run_dir="r", data_dir="d", time_budget=1,
                          startup_allowance=1, eval_tokens=1, seq_len=2, eval_timeout=1)  # fmt: skip
    assert scorer_command(spec, tmp_path, "cpu")[1:4] == ["-I", "-m", "sandbox.evaluate"]


PLANT = '''
import os, pathlib, sys
home, tmp = pathlib.Path(os.environ["HOME"]), pathlib.Path(os.environ["TMPDIR"])
marker = pathlib.Path(os.environ["AR_OUTPUT_DIR"]) / "planted-code-ran"
code = f"open({str(marker)!r}, 'a').write(__file__)\\n"
site = home / ".local" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
for path in (home / "sitecustomize.py", home / "usercustomize.py", tmp / "sitecustomize.py",
             site / "sitecustomize.py", site / "usercustomize.py"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(code)
(site / "planted.pth").write_text("import os; " + code)
for cache in (home / ".nv" / "ComputeCache", pathlib.Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]),
              pathlib.Path(os.environ["TRITON_CACHE_DIR"])):
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "index").write_bytes(b"planted")
'''
REPORT = '''
import os
print("worker env:", os.environ["HOME"], os.environ["TMPDIR"],
      os.environ.get("TORCHINDUCTOR_CACHE_DIR"), flush=True)
with open("/proc/self/maps") as maps:  # the scorer's shared buffers this worker can reach
    shared = sorted({ln.split("memfd:")[1].split()[0] for ln in maps if "memfd:ar-" in ln})
print("worker buffers:", *shared, flush=True)
'''


@pytest.mark.slow
@pytest.mark.skipif(not CONFINED, reason="this kernel offers no Landlock confinement")
def test_files_the_job_plants_in_its_tmp_never_reach_the_scorer(micro_ws, tmp_path):
    source = (micro_ws.root / "train.py").read_text()
    attack = "".join(f"{when}\n" + "".join(f"    {line}\n" for line in body.strip().splitlines())
                     for when, body in (('if __name__ == "__main__":', PLANT),
                                        ('if __name__ != "__main__":', REPORT)))  # fmt: skip
    code = tmp_path / "code"
    code.mkdir()
    for name in ("prepare.py", "ar.toml"):
        (code / name).write_bytes((micro_ws.root / name).read_bytes())
    (code / "train.py").write_text(source.replace("import prepare\n", "import prepare\n" + attack, 1))
    run_dir = tmp_path / "run"
    profile = vars(micro_ws.settings().profile)
    result = run_experiment(ExperimentSpec(
        code_dir=str(code), run_dir=str(run_dir), data_dir=str(micro_ws.data_dir),
        time_budget=profile["time_budget"], startup_allowance=30,
        eval_tokens=profile["eval_tokens"], seq_len=profile["max_seq_len"], eval_timeout=60,
        device="cpu",
    ))  # fmt: skip
    assert result.status == "ok", result.reason
    assert result.timing["launch"] == {"job": "warm", "scorer": "warm"}  # as ar's own runs start
    scored = json.loads((run_dir / "eval.json").read_text())  # in batches of this machine's size
    assert scored["batch_rows"] == evalbatch.rows_per_batch(profile["max_seq_len"],
                                                            profile["vocab_size"])  # fmt: skip
    assert not (run_dir / "out" / "planted-code-ran").exists()
    line = next(ln for ln in (run_dir / "worker-0.log").read_text().splitlines()
                if ln.startswith("worker env:"))  # fmt: skip
    home, tmp, inductor = line.split()[2:]
    scorer_home = Path(home).parent  # the worker's HOME is made in the scorer's TMPDIR
    assert Path(tmp) == Path(home) and inductor == "None"
    assert scorer_home.name.startswith("ar-score-") and not scorer_home.exists()  # removed after
    assert not Path(home).is_relative_to(run_dir.resolve())
    for index in (0, 1):  # forked from the scorer, a worker maps its own buffers, not its sibling's
        line = next(ln for ln in (run_dir / f"worker-{index}.log").read_text().splitlines()
                    if ln.startswith("worker buffers:"))  # fmt: skip
        names = line.split()[2:]
        assert names and all(name.endswith(f"-{index}") for name in names), line


# ---------------------------------------------------------------------------
# Through `ar iterate --agent llm`


@pytest.mark.slow
@pytest.mark.skipif(not CONFINED, reason="this kernel offers no Landlock confinement")
def test_a_look_ahead_served_through_the_loop_is_invalid_and_never_kept(micro_ws):
    # Reads up to 8 tokens ahead at the row's first two positions and its last one: a
    # default plan (99% for one-token peeks at 3 positions) misses it about once in 10^7.
    root = micro_ws.root
    with StubServer() as stub:
        settings = config_mod.load_raw(micro_ws.config_path)
        settings["agent"].update(name="llm", model="openai/stub-model", api_base=stub.url,
                                 api_key_env="AR_TEST_KEY")  # fmt: skip
        config_mod.write(micro_ws.config_path, settings)
        git(root, "-c", "commit.gpgsign=false", "-c", "user.name=t", "-c", "user.email=t@t.invalid",
            "commit", "-qam", "use the stub model")  # fmt: skip
        cheat = looking_ahead(micro_ws, (0, 1, -2), depth=8)
        stub.reply(f"Description: sharper predictions\n\n```python\n{cheat}```\n")
        done = ar("iterate", "--n", "1", cwd=root, env={**os.environ, "AR_TEST_KEY": "sk-test"})
    assert done.returncode == 0, done.stderr
    baseline, cheater = rows(root)
    assert baseline["status"] == "ok" and cheater["status"] == "invalid"
    assert "looks ahead" in cheater["reason"] and cheater["val_bpb"] is None
    assert git(root, "rev-parse", micro_ws.branch) == baseline["sha"]  # not kept
    power = result_json(root, cheater["id"])["probe_power"]
    assert power["3"] >= 0.99 and power["10"] > 0.9999

