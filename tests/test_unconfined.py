"""Where the kernel cannot confine train.py, ar says so and refuses LLM-written code unless
the user names the risk."""

from __future__ import annotations

from autoresearch_cli.ledger import Ledger


def test_llm_agent_refuses_to_run_unconfined_without_the_flag(micro_ws, cli, monkeypatch):
    monkeypatch.setenv("AR_SANDBOX_LANDLOCK", "0")  # as on a kernel without Landlock
    result = cli("iterate", "--n", "1", "--agent", "llm", "--model", "openai/x")
    assert result.exit_code == 1
    assert "no confinement on this machine" in result.output
    assert "refusing to run LLM-written train.py unconfined" in result.output
    assert "--unsafe-unconfined" in result.output
    with Ledger.for_workspace(micro_ws.root) as ledger:
        assert ledger.experiments() == []  # nothing ran
        assert [event["kind"] for event in ledger.events()] == ["unconfined"]


def test_the_flag_names_the_risk_and_lets_it_through(micro_ws, cli, monkeypatch):
    monkeypatch.setenv("AR_SANDBOX_LANDLOCK", "0")
    # past the confinement check, the next thing the llm agent needs is a model
    result = cli("iterate", "--n", "1", "--agent", "llm", "--unsafe-unconfined")
    assert "refusing to run" not in result.output
    assert "the llm agent needs a model" in result.output
