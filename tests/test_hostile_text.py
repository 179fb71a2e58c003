"""Text a model or a run wrote, through `ar iterate --agent llm` (litellm over HTTP to the
test's own server on 127.0.0.1): escape sequences, a NUL, direction overrides and lone
surrogates never reach the terminal, git or the ledger raw, and never crash ar; a crashed
run's log never reaches the model server, only what ar extracted from it."""

from __future__ import annotations

import os
import re

import pytest
from e2e import ar, git, rows
from openai_stub import StubServer
from test_loop_llm import point_workspace_at

pytestmark = pytest.mark.slow

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def test_hostile_text_is_cleaned_and_the_repair_prompt_carries_only_extracts(micro_ws):
    root = micro_ws.root
    with StubServer() as stub:
        point_workspace_at(micro_ws, stub)
        line = next(ln for ln in (root / "train.py").read_text().splitlines()
                    if ln.startswith("MATRIX_LR = "))
        crash = (f"{line}\nif __name__ == \"__main__\":\n    print(\"SEC\" + \"RET-\" + str(6 * 7))\n"
                 f"    raise ValueError(\"boom \" + \"x\" * 2000)")
        stub.reply("Description: \x1b[2J\x1b]0;pwned\x07raise LR\x00 \u202eevil\n\n"
                   f"<<<<<<< SEARCH\n{line}\n=======\n{crash}\n>>>>>>> REPLACE\n")
        # the repair is a change of its own (one restoring the baseline would be a repeat)
        stub.reply("Description: fix \ud800 it\n\n"
                   f"<<<<<<< SEARCH\n{crash}\n=======\n{line}\nREPAIRED = 1\n>>>>>>> REPLACE\n")
        env = {**os.environ, "AR_TEST_KEY": "sk-test"}
        done = ar("iterate", "--n", "1", cwd=root, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and not CONTROL.search(done.stdout + done.stderr)
        repair_prompt = str(stub.requests[1]["json"]["messages"][-1]["content"])
    baseline, crashed, repair = rows(root)
    assert crashed["status"] == "crash" and repair["kind"] == "repair"
    for row in (crashed, repair):
        assert not CONTROL.search(row["description"]) and not CONTROL.search(row["reason"] or "")
    assert "raise LR" in crashed["description"] and "evil" in crashed["description"]
    assert not CONTROL.search(git(root, "log", "--format=%B", "-n", "1", crashed["sha"]))
    # what the repair was told: ar's reason, the frame in train.py, the exception, clipped
    assert "exception: ValueError: boom xxx" in repair_prompt and "train.py line" in repair_prompt
    log = (root / ".ar" / "runs" / str(crashed["id"]) / "train.log").read_text()
    assert "SECRET-42" in log  # the job printed it; it never left
    assert "SECRET-42" not in repair_prompt and "x" * 400 not in repair_prompt
    logged = ar("log", cwd=root)
    assert logged.returncode == 0 and not CONTROL.search(logged.stdout)
