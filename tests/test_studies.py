"""`ar ablate` and `ar transfer`: planned runs through the scheduler, scripted results
(a backend that trains nothing, tests/test_scheduler.py) and once for real (slow)."""

from __future__ import annotations

import pytest
from test_scheduler import SLOTS, ScriptedAgent, ScriptedWorkers, ok

from autoresearch_cli.backends.base import Slot
from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.records import budget_class, budget_of, hardware_of
from autoresearch_cli.errors import ArError
from autoresearch_cli.research import findings, studies
from autoresearch_cli.research import session as runs
from autoresearch_cli.research.decide import RECORD, Limits, RunEnd, next_action
from autoresearch_cli.research.evidence import Gain
from autoresearch_cli.research.keeprule import Rule
from autoresearch_cli.research.scheduler import Scheduler

ONE = [SLOTS[0]]
RESULTS = {  # the first match wins: both steps, then each alone, then the baseline
    (("MATRIX_LR", 0.05), ("WEIGHT_DECAY", 0.3)): ok(1.8),
    (("MATRIX_LR", 0.05),): ok(1.9),
    (("WEIGHT_DECAY", 0.3),): ok(1.95),
    (("MATRIX_LR", 0.04),): ok(2.0),
}


class SeededWorkers(ScriptedWorkers):
    """Scripted results plus each seed's own luck, shared by every commit run on it (as a
    seed's initialisation and data order are); a longer budget adds `longer` to a run's
    improvement over 2.0."""

    def __init__(self, slots, results, longer=1.0):
        super().__init__(slots, results)
        self.longer = longer

    def start(self, exp_id, slot, spec):
        super().start(exp_id, slot, spec)

    def _result(self, train_py):
        return super()._result(train_py)

    def wait(self, timeout):
        (ended,) = super().wait(timeout)
        spec = self.specs[ended.exp_id]
        result = dict(ended.result)
        if result.get("val_bpb") is not None:
            gained = 2.0 - result["val_bpb"]
            if spec.time_budget > 3:
                gained *= self.longer
            result["val_bpb"] = 2.0 - gained + 0.01 * (spec.seed % 3)
        return [type(ended)(ended.exp_id, ended.slot, result)]


@pytest.fixture
def chain(micro_ws):
    """The baseline on two seeds (2.0), and two kept steps under the one-run rule:
    MATRIX_LR 0.05 (1.9), then WEIGHT_DECAY 0.3 on top (1.8)."""
    with runs.session(micro_ws, "test") as current:
        Scheduler(current, SeededWorkers(ONE, RESULTS), measures=2).run()
        agent = ScriptedAgent([{"MATRIX_LR": 0.05}, {"WEIGHT_DECAY": 0.3}])
        Scheduler(current, SeededWorkers(ONE, RESULTS), agent, "scripted", 2).run()
        kept = [run for run in current.ledger.runs() if run.decision == "keep"]
        assert len(kept) == 2 and current.ws.tip() == kept[-1].sha
        yield current, kept


def test_ablation_pairs_each_variant_with_the_best_and_never_keeps(chain):
    current, (a, b) = chain
    tip = current.ws.tip()
    plan = studies.plan_ablation(current, runs=2)
    assert plan.skipped == []
    assert sorted(t.kind for t in plan.tasks) == ["ablation"] * 4 + ["remeasure"]  # the best: seed 1
    studies.run_plan(current, SeededWorkers(ONE, RESULTS), plan)

    evidence = current.evidence()
    made = [run for run in evidence.runs if run.kind == "ablation"]
    assert len(made) == 4 and all(run.decision is None and run.parent_sha == tip for run in made)
    assert current.ws.tip() == tip  # an ablation that scores well keeps nothing
    found = {ablation.step.id: ablation for ablation in findings.ablations(evidence)}
    assert set(found) == {a.id, b.id}
    # without A the best scores 1.95 on every seed, without B 1.9; the best 1.8: paired,
    # each seed's luck cancels exactly
    assert found[a.id].carried.value == pytest.approx(0.15) and found[a.id].carried.paired == 2
    assert found[a.id].carried.half_width == pytest.approx(0.0, abs=1e-9)
    assert found[b.id].carried.value == pytest.approx(0.10)
    assert found[a.id].share == pytest.approx(0.75) and found[b.id].share == pytest.approx(0.5)
    for ablation in found.values():  # the variants stay reachable
        assert gitops.try_rev_parse(current.ws.root, f"{studies.ABLATION_REFS}{ablation.variant.sha}")
    assert studies.plan_ablation(current, runs=2).tasks == []  # nothing left to run
    shown = _rendered(current)
    assert shown.count('class="ablation"') == 2 and 'data-field="share" data-value="75.0' in shown


def _rendered(current) -> str:
    """The report's page and Markdown, as `ar report` writes them."""
    from autoresearch_cli.report import facts, markdown, page

    built = facts.build(current.evidence(), current.ledger.total_cost(), current.ws.root)
    return page.page(built) + markdown.markdown(built)


def test_a_step_that_does_not_revert_cleanly_is_reported(micro_ws):
    """B moved the same line as A: A cannot be taken out of the best; B can."""
    results = {(("MATRIX_LR", 0.06),): ok(1.8), (("MATRIX_LR", 0.05),): ok(1.9),
               (("MATRIX_LR", 0.04),): ok(2.0)}
    with runs.session(micro_ws, "test") as current:
        Scheduler(current, SeededWorkers(ONE, results), measures=1).run()
        Scheduler(current, SeededWorkers(ONE, results), ScriptedAgent([0.05, 0.06]), "scripted", 2).run()
        a, b = [run for run in current.ledger.runs() if run.decision == "keep"]
        plan = studies.plan_ablation(current, runs=2)
        assert [(step.id, why.split(" (")[0]) for step, why in plan.skipped] == [
            (a.id, "its change does not revert cleanly on the best")]
        studies.run_plan(current, SeededWorkers(ONE, results), plan)
        found = findings.ablations(current.evidence())
        assert [(x.step.id, x.variant is None) for x in found] == [(a.id, True), (b.id, False)]
        assert "conflicting hunk" in found[0].why_not
        assert found[1].carried.value == pytest.approx(0.1)


def test_transfer_runs_both_at_k_times_the_budget_on_a_class_of_their_own(chain):
    current, _ = chain
    evidence_before = current.evidence()
    best_before = evidence_before.best()
    plan = studies.plan_transfer(current, factor=2, runs=2)
    slot_class = plan.slot_class
    assert slot_class == budget_class(best_before.slot_class, 6) == "cpu:1@6s"
    assert [task.kind for task in plan.tasks] == ["transfer"] * 4
    pool = SeededWorkers(ONE, RESULTS, longer=0.5)  # the gain halves with twice the training
    studies.run_plan(current, pool, plan)
    assert {spec.time_budget for spec in pool.specs.values() if spec.time_budget != 3} == {6.0}

    evidence = current.evidence()
    made = [run for run in evidence.runs if run.kind == "transfer"]
    assert {run.slot_class for run in made} == {slot_class} and len(made) == 4
    # the profile's evidence is untouched: the best, its mean, its main class
    assert evidence.best().mean == pytest.approx(best_before.mean)
    assert evidence.best().slot_class == best_before.slot_class
    (found,) = findings.transfers(evidence)
    assert found.gain.value == pytest.approx(0.1) and found.gain.paired == 2
    assert found.reference.value == pytest.approx(evidence.gain().value)  # the headline gain
    assert found.ratio == pytest.approx(0.1 / evidence.gain().value)
    shown = _rendered(current)
    assert "cpu:1@6s" in shown and f"**{found.verdict}**" in shown
    assert shown.count('class="run"') == len([r for r in evidence.runs if r.scored]) - 4


def test_study_errors_are_clear(micro_ws):
    with runs.session(micro_ws, "test") as current:
        with pytest.raises(ArError, match="no scored best yet"):
            studies.plan_ablation(current, 2)
        Scheduler(current, SeededWorkers(ONE, RESULTS), measures=1).run()
        with pytest.raises(ArError, match="nothing to ablate"):
            studies.plan_ablation(current, 2)
        with pytest.raises(ArError, match="nothing to transfer"):
            studies.plan_transfer(current, 2, 2)
        with pytest.raises(ArError, match="must be positive"):
            studies.plan_transfer(current, 0, 2)


def test_runs_on_hardware_the_backend_lacks_are_refused(chain):
    current, _ = chain
    plan = studies.plan_ablation(current, runs=2)
    other = [Slot(0, "cuda", gpu="0", slot_class="cuda:H100")]
    with pytest.raises(ArError, match="choose --workers"):
        studies.run_plan(current, SeededWorkers(other, RESULTS), plan)


def test_study_runs_are_recorded_never_judged():
    rule, limits = Rule(), Limits()
    for kind in ("ablation", "transfer"):
        action = next_action(RunEnd(kind, "ok"), None, None, rule, limits)
        assert action.kind == RECORD and action.judgement is None


def _gain(value, half):
    return Gain(None, None, value, half, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("at_budget", "reference", "verdict"), [
    (_gain(0.05, 0.01), _gain(0.05, 0.01), findings.HOLDS),
    (_gain(0.058, 0.01), _gain(0.05, 0.01), findings.HOLDS),  # within the intervals
    (_gain(0.02, 0.01), _gain(0.05, 0.01), findings.SHRINKS),
    (_gain(0.09, 0.01), _gain(0.05, 0.01), findings.GROWS),
    (_gain(0.09, None), _gain(0.05, 0.01), findings.UNKNOWN),  # one pair: no interval
    (None, _gain(0.05, 0.01), findings.UNKNOWN),
])
def test_transfer_verdicts(at_budget, reference, verdict):
    assert findings.transfer_verdict(at_budget, reference) == verdict


def test_budget_classes():
    assert budget_class("cpu:2", 120.0) == "cpu:2@120s" and budget_of("cpu:2@120s") == 120.0
    assert hardware_of("cuda:NVIDIA H100@600s") == "cuda:NVIDIA H100" and budget_of("cpu:2") is None
