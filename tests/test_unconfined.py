"""Where the kernel cannot confine train.py, ar says so and refuses LLM-written code unless
the user names the risk."""

from __future__ import annotations

from autoresearch_cli.doors.ledger import Ledger


def test_llm_agent_refuses_to_run_unconfined_without_the_flag(micro_ws, cli, monkeypatch):
    monkeypatch.setenv("AR_SANDBOX_LANDLOCK", "0")  # as on a kernel without Landlock
    result = cli("iterate", "--n", "1", "--agent", "llm", "--model", "openai/x")
    assert result.exit_code == 1
    assert "no confinement on this machine" in result.output
    assert "refusing to run LLM-written train.py unconfined" in result.output
    assert "--unsafe-unconfined" in result.output
    with Ledger.for_workspace(micro_ws.root) as ledger:
        assert ledger.runs() == []  # nothing ran
        assert [event.kind for event in ledger.events()] == ["unconfined"]


def test_the_flag_names_the_risk_and_lets_it_through(micro_ws, cli, monkeypatch):
    monkeypatch.setenv("AR_SANDBOX_LANDLOCK", "0")
    # past the confinement check, the next thing the llm agent needs is a model
    result = cli("iterate", "--n", "1", "--agent", "llm", "--unsafe-unconfined")
    assert "refusing to run" not in result.output
    assert "the llm agent needs a model" in result.output


def _model_wrote_an_experiment(ws, decision: str) -> tuple[int, int]:
    """A scored baseline and an llm agent's experiment on it, kept (the branch moves to it)
    or discarded (the branch stays at the baseline): the two runs' ids."""
    from autoresearch_cli.doors import gitops

    root, base = ws.root, ws.tip()
    with (root / "train.py").open("a") as handle:
        handle.write("# written by a model\n")
    written = gitops.commit_all(root, "a model's change")
    if decision != "keep":
        gitops.git(root, "reset", "--hard", base)
    with Ledger.for_workspace(root) as ledger:
        first = ledger.start_experiment("baseline", base, "baseline", None, status="running")
        ledger.finish(first, "ok", {"status": "ok", "val_bpb": 3.0}, sha=base)
        made = ledger.start_experiment("experiment", base, "a model's change", "llm",
                                       status="running")
        ledger.finish(made, "ok", {"status": "ok", "val_bpb": 2.9}, sha=written)
        ledger.settle(made, decision)
    return first, made


def test_model_written_code_on_the_branch_is_refused_whatever_the_agent(micro_ws, cli,
                                                                           monkeypatch):
    """Trust is a property of the code's origin: a random agent (or `ar baseline`) building
    on a commit an llm agent proposed would run model-written code."""
    monkeypatch.setenv("AR_SANDBOX_LANDLOCK", "0")
    root = micro_ws.root
    first, made = _model_wrote_an_experiment(micro_ws, "keep")
    for args in (("iterate", "--n", "1", "--agent", "random"), ("baseline",)):
        result = cli(*args)
        assert result.exit_code == 1, result.output
        assert "refusing to run LLM-written train.py unconfined" in result.output
    with Ledger.for_workspace(root) as ledger:
        assert [run.id for run in ledger.runs()] == [first, made]  # nothing more ran


def test_a_model_written_candidate_the_search_may_build_on_is_refused_too(micro_ws, cli,
                                                                         monkeypatch):
    """Parents beyond the tip (agents/parents.py): a discarded candidate an llm agent wrote
    may be built on by the random agent, so it counts unless the search builds on the best
    alone ([agent] explore = 0)."""
    monkeypatch.setenv("AR_SANDBOX_LANDLOCK", "0")
    _model_wrote_an_experiment(micro_ws, "discard")
    result = cli("iterate", "--n", "1", "--agent", "random")
    assert result.exit_code == 1, result.output
    assert "refusing to run LLM-written train.py unconfined" in result.output
    from autoresearch_cli.agents import model_backed
    from autoresearch_cli.research import session
    from autoresearch_cli.research.loop import runs_model_code

    with session.session(micro_ws, "test") as current:  # building on the tip alone: clean
        assert runs_model_code(current, False, model_backed, explore=1.0)
        assert not runs_model_code(current, False, model_backed, explore=0.0)
