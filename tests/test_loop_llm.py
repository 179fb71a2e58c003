"""`ar iterate --agent llm` end to end: real litellm over HTTP to a stub on 127.0.0.1."""

from __future__ import annotations

import os
import sqlite3

import pytest
from e2e import ar, git, rows, search_replace_reply
from openai_stub import StubServer, error_body

from autoresearch_cli.doors import config as config_mod
from autoresearch_cli.doors import gitops


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


def point_workspace_at(ws, stub):
    settings = config_mod.load_raw(ws.config_path)
    settings["agent"].update(name="llm", model="openai/stub-model", api_base=stub.url,
                             api_key_env="AR_TEST_KEY")
    config_mod.write(ws.config_path, settings)
    gitops.commit_all(ws.root, "use the stub model")


def test_llm_agent_through_the_loop(micro_ws, stub, monkeypatch):
    root = micro_ws.root
    point_workspace_at(micro_ws, stub)
    train_py = (root / "train.py").read_text()
    stub.reply(search_replace_reply(train_py))
    stub.reply("Description: longer context\n\nprepare.py\n<<<<<<< SEARCH\nimport os\n=======\n"
               "import os, sys\n>>>>>>> REPLACE\n")
    stub.queue(401, error_body("Incorrect API key provided", "invalid_request_error"))
    env = {**os.environ, "AR_TEST_KEY": "sk-test"}

    done = ar("iterate", "--n", "3", cwd=root, env=env)

    assert done.returncode == 1
    assert "AR_TEST_KEY" in done.stderr  # the 401 stops the loop naming the variable to set
    assert "Traceback" not in done.stderr
    table = rows(root)
    baseline, applied, edits_prepare, stopped = table
    assert baseline["kind"] == "baseline" and baseline["status"] == "ok"
    assert applied["description"] == "raise MATRIX_LR by 25%"
    assert applied["status"] == "ok" and applied["val_bpb"] is not None
    assert git(root, "diff", "--name-only", applied["parent_sha"], applied["sha"]) == "train.py"
    assert "MATRIX_LR" in git(root, "diff", applied["parent_sha"], applied["sha"])
    assert edits_prepare["status"] == "invalid" and "prepare.py" in edits_prepare["reason"]
    assert edits_prepare["sha"] is None  # rejected before any commit or training
    assert not (root / ".ar" / "runs" / str(edits_prepare["id"])).exists()
    assert stopped["status"] == "invalid" and "AR_TEST_KEY" in stopped["reason"]
    db = sqlite3.connect(root / ".ar" / "ledger.db")
    calls = db.execute("SELECT experiment_id, prompt_tokens, error FROM llm_calls ORDER BY id").fetchall()
    assert [c[0] for c in calls] == [applied["id"], edits_prepare["id"], stopped["id"]]
    assert calls[0][1] == 100 and calls[2][2]
    # the prompt carried program.md, train.py and the history
    first_prompt = str(stub.requests[0]["json"]["messages"])
    assert "Research program" in first_prompt and "MATRIX_LR" in first_prompt
    assert "baseline" in str(stub.requests[1]["json"]["messages"])
