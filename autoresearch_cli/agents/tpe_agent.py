"""The tpe agent: Optuna's TPE sampler over train.py's UPPER_CASE constants, no model.

Each proposal rebuilds the study from the history: every commit that ran is one trial,
its constants read back from its train.py (whoever proposed it: a keep the human made by
hand teaches the sampler too), its value the commit's level, i.e. its mean through its
pairs with the commit it was judged against (agents/base.HistoryItem), so the seeds' luck
they shared cancels. A run that failed (crash, timeout, oom) counts as worse than the
worst that scored; commits still running are running trials, which the sampler avoids
(its constant liar). The agent keeps no state: with `--seed`, the same history gives the
same proposal, and a resumed run replays exactly.

The space (agents/space.py) is inferred once from the baseline's train.py, so it stays
the same while the best moves. Every proposal moves one or two constants of its parent:
the baseline is hand-tuned, and a whole new point of a dozen dimensions lands far from
anything good (on the synthetic objective of tests/test_tpe_agent.py, proposing TPE's
whole points did worse than the random agent). The first STARTUP proposals draw the new
values uniformly within their ranges; from then on TPE proposes a point and one or two of
the constants it moved take its values.
"""

from __future__ import annotations

import ast
import math
import random
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from autoresearch_cli.agents.base import History, Proposal, ProposalError, RecordCall
from autoresearch_cli.agents.novelty import find_repeat
from autoresearch_cli.agents.random_agent import (
    Change,
    Constant,
    SeededAgent,
    describe,
    find_constants,
    literal_value,
)
from autoresearch_cli.agents.space import Dimension, infer_space, named_constants, sources
from autoresearch_cli.doors.template import set_constants
from autoresearch_cli.errors import AgentError

STARTUP = 8  # scored trials (the baseline's included) before TPE takes over
MOVES = (1, 2)  # constants a proposal moves
DRAWS = 30  # tries at a proposal that changes something and repeats nothing
FAILED = ("crash", "timeout", "oom")
FAILED_MARGIN = 0.01  # of the worst level: how much worse than it a failed run counts
# TPE's settings, chosen on the synthetic objective: a quarter of the trials make its
# density of good points (Optuna's default, a tenth, leaves two or three of thirty), and
# more candidates per proposal exploit that density more.
GOOD_SHARE = 0.25
GOOD_MAX = 25
EI_CANDIDATES = 64


@dataclass(frozen=True)
class Trial:
    params: dict[str, Any]
    value: float | None  # the commit's level; None: still running


class TPEAgent(SeededAgent):
    salt = "tpe|"

    def propose(self, train_py: str, program_md: str, history: History,
                failure: str | None = None, record_call: RecordCall | None = None) -> Proposal:
        baseline = next((history.train_py(item.sha) for item in history.items
                         if item.kind == "baseline"), None)
        space = infer_space(baseline or train_py, named_constants(program_md))
        if not space:
            raise AgentError("train.py has no UPPER_CASE hyperparameters the tpe agent can "
                             "search (or none of those program.md names)")
        constants = find_constants(train_py)
        trials = trials_of(space, history)
        rng = self._rng(train_py, history, failure)
        startup = sum(1 for trial in trials if trial.value is not None) < STARTUP
        for _ in range(DRAWS):
            if startup:
                point = local_move(space, constants, rng)
            else:
                point = focus(space, constants, tpe_sample(space, trials, rng.randrange(2**31)), rng)
            proposal = _proposal(train_py, constants, sources(space, point, constants), history)
            if proposal is not None:
                return proposal
        raise ProposalError(f"the tpe agent drew {DRAWS} points of its space and each "
                            "changed nothing or repeated an earlier experiment")


def _proposal(train_py: str, constants: dict[str, Constant], written: dict[str, str],
              history: History) -> Proposal | None:
    """The proposal that writes `written` into train.py; None when no value changes or
    the change repeats an earlier experiment."""
    changes = [Change(name, text) for name, text in written.items()
               if name in constants and not _same_value(text, constants[name])]
    if not changes:
        return None
    new_train_py = set_constants(train_py, {change.name: change.source for change in changes})
    if find_repeat(train_py, new_train_py, history) is not None:
        return None
    return Proposal(describe(constants, changes), new_train_py, "mutation")


def _same_value(text: str, constant: Constant) -> bool:
    """Whether a literal holds the constant's value (`0.2` is `0.20`, `2**11` is `2048`)."""
    try:
        return literal_value(ast.parse(text, mode="eval").body) == constant.value
    except (SyntaxError, ValueError):
        return False


def trials_of(space: list[Dimension], history: History) -> list[Trial]:
    """The history as the sampler's trials: each commit's constants and level (see the
    module's docstring). Commits whose train.py the history does not hold, or whose
    values fall outside what the space can express, are left out."""
    trials: list[Trial] = []
    failed: list[dict[str, Any]] = []
    for item in history.items:
        source = history.train_py(item.sha)
        if source is None:
            continue
        constants = _constants(source)
        params = {dim.param: dim.read(constants) for dim in space}
        if not constants or any(value is None for value in params.values()):
            continue
        if item.status == "running":
            trials.append(Trial(params, None))
        elif item.level is not None:
            trials.append(Trial(params, item.level))
        elif item.status in FAILED:
            failed.append(params)
    levels = [trial.value for trial in trials if trial.value is not None]
    if levels:
        worst = max(levels)
        trials.extend(Trial(params, worst + FAILED_MARGIN * abs(worst)) for params in failed)
    return trials


@lru_cache(maxsize=512)
def _constants(source: str) -> dict:
    """find_constants, once per text (read-only: the dict is shared)."""
    try:
        return find_constants(source)
    except AgentError:  # a train.py that does not parse teaches nothing
        return {}


def local_move(space: list[Dimension], constants: dict, rng: random.Random) -> dict[str, Any]:
    """One or two of the dimensions the parent has, drawn anew within their ranges (a
    draw may land on the parent's value: the caller draws again); the rest of the parent
    stays as written (see moved)."""
    here = {dim.param: dim.read(constants) for dim in space}
    movable = [dim for dim in space if here[dim.param] is not None]
    drawn = {dim.param: draw(dim, rng)
             for dim in rng.sample(movable, min(len(movable), rng.choice(MOVES)))}  # fmt: skip
    return moved(space, here, drawn)


def moved(space: list[Dimension], here: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The params to write: the `new` values, and with a new device batch the total's
    accumulation as the parent has it (the two move together). Values not moved are not
    written: the parent's literal stays, even where the space would clip or round it."""
    params = dict(new)
    if any(dim.encoding == "log2" and "DEVICE" in dim.constant and dim.param in new
           for dim in space):  # fmt: skip
        for dim in space:
            if dim.encoding == "accumulation" and here.get(dim.param) is not None:
                params.setdefault(dim.param, here[dim.param])
    return params


def draw(dim: Dimension, rng: random.Random) -> Any:
    """A uniform draw from one dimension (on its log scale where it has one)."""
    if dim.kind == "choice":
        return rng.choice(dim.choices)
    if dim.kind == "int":
        return rng.randint(int(dim.low), int(dim.high))
    if dim.log:
        return math.exp(rng.uniform(math.log(dim.low), math.log(dim.high)))
    return rng.uniform(dim.low, dim.high)


def focus(space: list[Dimension], constants: dict, suggested: dict[str, Any],
          rng: random.Random) -> dict[str, Any]:
    """The parent's point with one or two of the dimensions TPE moved set to TPE's values:
    the model picks the values, a small step keeps what the parent got right."""
    here = {dim.param: dim.read(constants) for dim in space}
    changed = [dim.param for dim in space
               if here[dim.param] is not None and dim.param in suggested
               and _differs(dim, here[dim.param], suggested[dim.param])]
    chosen = rng.sample(changed, min(len(changed), rng.choice(MOVES)))
    return moved(space, here, {name: suggested[name] for name in chosen})


MIN_STEP = 0.001  # of a dimension's range: a smaller move is no move


def _differs(dim: Dimension, old: Any, new: Any) -> bool:
    """Whether TPE moved a dimension away from the parent's value."""
    if dim.kind == "choice":
        return old != new
    if dim.log:
        size = abs(math.log(new) - math.log(old)) / (math.log(dim.high) - math.log(dim.low))
    else:
        size = abs(new - old) / ((dim.high - dim.low) or 1)
    return size > MIN_STEP


def _good(trials: int) -> int:
    """How many of the best trials make TPE's density of good points."""
    return max(1, min(GOOD_MAX, math.ceil(GOOD_SHARE * trials)))


def tpe_sample(space: list[Dimension], trials: list[Trial], seed: int) -> dict[str, Any]:
    """The point TPE proposes next, given the trials so far (lower values are better)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the core never prints
    distributions = {dim.param: dim.distribution() for dim in space}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature notices
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=0, multivariate=True,
                                             constant_liar=True, gamma=_good,
                                             n_ei_candidates=EI_CANDIDATES)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        study.add_trials([
            create_trial(params=trial.params, distributions=distributions, value=trial.value,
                         state=TrialState.COMPLETE if trial.value is not None
                         else TrialState.RUNNING)
            for trial in trials])
        return dict(study.ask(distributions).params)
