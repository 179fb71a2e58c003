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


# --- the search's mechanisms, end to end ----------------------------------------------------

LR_LINES = ("EMBEDDING_LR = {e}  # token and value embeddings (AdamW)\n"
            "UNEMBEDDING_LR = {u}  # lm_head (AdamW)\n"
            "MATRIX_LR = {m}  # attention and MLP matrices (Muon)\n"
            "SCALAR_LR = {s}  # per-layer residual scalars (AdamW)")
NORMAL = dict(e="0.6", u="0.004", m="0.04", s="0.5")
POOR = dict(e="0.0006", u="4e-06", m="4e-05", s="0.0005")  # a thousandth: it barely learns
ZERO = dict(e="0.0", u="0.0", m="0.0", s="0.0")
ZERO_AGAIN = ("EMBEDDING_LR = 0.  # nothing learns\nUNEMBEDDING_LR = 0e0\n"
              "MATRIX_LR = .0   # Muon off\nSCALAR_LR = 0.00")


def edit_reply(description: str, search: str, replace: str) -> str:
    return (f"I propose this change.\n\nDescription: {description}\n\ntrain.py\n<<<<<<< SEARCH\n"
            f"{search}\n=======\n{replace}\n>>>>>>> REPLACE\n")


def messages_of(stub, index: int) -> str:
    return str(stub.requests[index]["json"]["messages"])


def last_message(stub, index: int) -> str:
    return stub.requests[index]["json"]["messages"][-1]["content"]


@pytest.mark.slow
def test_the_llm_agent_searches_remembers_and_never_repeats(micro_ws, stub):
    """A scripted model drives `ar iterate`: a good change (kept), a reply saying it is done
    (asked again) then a bad change (discarded), a repeat of the bad one in other
    formatting (turned back before training, with its result) then one that crashes, and,
    the best having been tried most, a change to the baseline (a parent beyond the tip)."""
    root = micro_ws.root
    settings = config_mod.load_raw(micro_ws.config_path)
    settings["agent"].update(name="llm", model="openai/stub-model", api_base=stub.url,
                             api_key_env="AR_TEST_KEY", repair_attempts=0, explore=1e6)
    settings["profile"]["time_budget"] = 1  # a thousandth of the LRs is far behind even so
    config_mod.write(micro_ws.config_path, settings)
    train_py = (root / "train.py").read_text()
    assert LR_LINES.format(**NORMAL) in train_py
    (root / "train.py").write_text(train_py.replace(LR_LINES.format(**NORMAL), LR_LINES.format(**POOR)))
    gitops.commit_all(root, "a poor start: the learning rates a thousandth of the template's")

    stub.reply(edit_reply("restore the learning rates", LR_LINES.format(**POOR),
                          LR_LINES.format(**NORMAL)))
    stub.reply("The research is complete: I'm done. No further experiments are needed.")
    stub.reply(edit_reply("switch every learning rate off", LR_LINES.format(**NORMAL),
                          LR_LINES.format(**ZERO)))
    stub.reply(edit_reply("freeze the model", LR_LINES.format(**NORMAL), ZERO_AGAIN))
    stub.reply(edit_reply("assert at import", "DEPTH = 2  # transformer layers",
                          'DEPTH = 2  # transformer layers\nassert DEPTH > 5, "too shallow"'))
    stub.reply(edit_reply("half the learning rates, from the baseline", LR_LINES.format(**POOR),
                          LR_LINES.format(e="0.3", u="0.002", m="0.02", s="0.25")))
    env = {**os.environ, "AR_TEST_KEY": "sk-test"}

    done = ar("iterate", "--n", "4", "--hours", "2", cwd=root, env=env)

    assert done.returncode == 0, done.stderr
    baseline, good, bad, crashed, branch = rows(root)
    base = baseline["sha"]
    assert (good["parent_sha"], good["decision"]) == (base, "keep")
    # "done" was not an end: the model was asked for the next experiment, in the same one
    assert "does not end until the human stops it" in last_message(stub, 2)
    assert (bad["parent_sha"], bad["description"], bad["decision"]) == (
        good["sha"], "switch every learning rate off", "discard")
    # the repeat: turned back before any training, with the earlier result; 1 of 1
    turned_back = last_message(stub, 4)
    assert turned_back.startswith(f"Your proposal was turned back before any training: it "
                                  f"repeats experiment #{bad['id']} (switch every learning rate off)")
    assert f"scored {bad['val_bpb']:.6f} over 1 run (discard" in turned_back
    assert [r["description"] for r in rows(root)].count("freeze the model") == 0
    assert (crashed["parent_sha"], crashed["status"]) == (good["sha"], "crash")
    assert "too shallow" in crashed["reason"]
    # the best was tried twice, the baseline once: the fourth builds on the baseline
    assert branch["parent_sha"] == base and branch["status"] == "ok"
    fourth = messages_of(stub, 5)
    assert "The train.py below is the baseline" in fourth and "not the best" in fourth
    assert "crash x1" in fourth and "too shallow" in fourth  # the failures' reasons
    assert "switch every learning rate off" in fourth  # what was tried, and what it did
    assert len(stub.requests) == 6  # four experiments, a follow-up for "done" and the repeat

    tree = ar("log", "--tree", cwd=root).stdout.splitlines()
    assert tree[0].startswith("baseline")
    assert tree[1].startswith(f"├── #{good['id']} keep") and tree[1].endswith("<- best")
    assert tree[2].startswith(f"│   ├── #{bad['id']} discard")
    assert tree[3].startswith(f"│   └── #{crashed['id']} crash")
    assert tree[4].startswith(f"└── #{branch['id']} ")
