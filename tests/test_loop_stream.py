"""`ar iterate` with a model that never stops writing: the proposal is cut at its time
limit, the experiment ends invalid with the reason, and the loop goes on."""

from __future__ import annotations

import os
import re
import sqlite3

import pytest
from e2e import ar, rows, search_replace_reply
from openai_stub import Streamed, StubServer, endless_tokens

from autoresearch_cli.doors import config as config_mod
from autoresearch_cli.doors import gitops

CALL_TIMEOUT_S = 2
PROPOSAL_TIMEOUT_S = 3
SLACK_S = 5  # the target: invalid within the proposal time plus 5 s


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


def test_an_endless_model_makes_one_invalid_experiment_and_the_loop_goes_on(micro_ws, stub):
    root = micro_ws.root
    settings = config_mod.load_raw(micro_ws.config_path)
    settings["agent"].update(name="llm", model="openai/stub-model", api_base=stub.url,
                             api_key_env="AR_TEST_KEY", call_timeout_s=CALL_TIMEOUT_S,
                             proposal_timeout_s=PROPOSAL_TIMEOUT_S)
    config_mod.write(micro_ws.config_path, settings)
    gitops.commit_all(root, "use the stub model")
    stub.stream(Streamed(endless_tokens, delay_s=0.05))
    stub.stream(Streamed(endless_tokens, delay_s=0.05))
    stub.reply(search_replace_reply((root / "train.py").read_text()))

    done = ar("iterate", "--n", "2", cwd=root, env={**os.environ, "AR_TEST_KEY": "sk-test"})

    assert done.returncode == 0, done.stderr
    baseline, endless, applied = rows(root)
    assert baseline["kind"] == "baseline" and baseline["status"] == "ok"
    assert endless["status"] == "invalid" and endless["sha"] is None
    assert f"proposal time limit of {PROPOSAL_TIMEOUT_S} s" in endless["reason"]
    assert applied["status"] == "ok" and applied["description"] == "raise MATRIX_LR by 25%"

    # the endless proposal ended, and the server saw it hang up, within the target
    assert len(stub.disconnects) == 2
    assert stub.disconnects[1] - stub.requests[0]["at"] < PROPOSAL_TIMEOUT_S + SLACK_S
    db = sqlite3.connect(root / ".ar" / "ledger.db")
    calls = db.execute("SELECT experiment_id, ended_by, length(reply) FROM llm_calls "
                       "ORDER BY id").fetchall()
    assert [(c[0], c[1]) for c in calls] == [(endless["id"], "call_timeout"),
                                            (endless["id"], "proposal_timeout"),
                                            (applied["id"], "stop")]
    assert calls[0][2] > 0 and calls[1][2] > 0  # the partial replies are kept

    # the plain output showed the model answering
    assert re.search(r"^  model answering: \d+ tokens?, \d+ s$", done.stdout, re.MULTILINE)
    assert "invalid" in done.stdout
