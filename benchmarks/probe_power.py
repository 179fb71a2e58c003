"""What the scorer's probes catch, for bench_eval.py: the chance of catching a model that
looks ahead at k of the T positions of each row, computed from each profile's plan, and
measured on the cpu profile by simulation: a model that peeks at k fixed positions, run
through the real plan and the real comparison (sandbox/probes.py, sandbox/scoring.py)
many times, in this process, counting the runs in which it is caught.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sandbox import probes
from sandbox.evaluate import SPARE_ROWS_PER_PROBE, SPLITS, load_data, pick_batch_size, split_rows
from sandbox.scoring import compare_twins, run_plan

KS = probes.REPORTED_K
SIM_VOCAB = 64  # token ids in the simulation (see simulate)


@dataclass(frozen=True)
class Planned:
    profile: str
    seq_len: int
    scored_rows: int
    probes: int
    extra_rows: int
    power: dict[int, float]


def plan_of(profile: str, splits: dict[str, probes.SplitRows], batch_size: int) -> Planned:
    seq_len = next(iter(splits.values())).seq_len
    wanted = probes.probes_needed(probes.TARGET_K, probes.TARGET_POWER, seq_len)
    plan = probes.make_plan(splits, batch_size, np.random.default_rng(0), wanted)
    return Planned(profile, seq_len, sum(rows.scored for rows in splits.values()), plan.probes,
                   plan.extra_rows, {k: plan.power(k) for k in KS})  # fmt: skip


def real_splits(data_dir: Path, eval_tokens: int, seq_len: int) -> dict[str, probes.SplitRows]:
    """A prepared data directory's splits as the scorer reads them."""
    data = load_data(data_dir)
    spare = SPARE_ROWS_PER_PROBE * probes.probes_needed(probes.TARGET_K, probes.TARGET_POWER, seq_len)
    return {name: split_rows(data.splits[name], eval_tokens, seq_len, data.vocab_size, name, spare)
            for name in SPLITS}  # fmt: skip


def nominal_splits(eval_tokens: int, seq_len: int, vocab: int) -> dict[str, probes.SplitRows]:
    """Splits of a profile's eval tokens and the spare text the probes may use (random ids:
    the plan reads no meaning)."""
    rng = np.random.default_rng(0)
    spare = SPARE_ROWS_PER_PROBE * probes.probes_needed(probes.TARGET_K, probes.TARGET_POWER, seq_len)
    size = eval_tokens + 2 + spare * seq_len
    return {name: split_rows(rng.integers(0, vocab, size).astype(np.uint16), eval_tokens,
                             seq_len, vocab, name, spare)
            for name in SPLITS}  # fmt: skip


# ---------------------------------------------------------------------------
# Simulation


class Peeking(torch.nn.Module):
    """Wraps a model: at fixed positions of each row, raises the logit of the next token."""

    def __init__(self, inner: torch.nn.Module, positions: tuple[int, ...]):
        super().__init__()
        self.inner, self.positions = inner, positions

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.inner(idx)
        for position in self.positions:
            logits[:, position].scatter_add_(1, idx[:, position + 1 : position + 2],
                                             torch.full((len(idx), 1), 5.0))  # fmt: skip
        return logits


class Bigram(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


class LocalWorker:
    """A model worker in this process (scoring.ModelWorker), for the simulation only."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def submit(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def collect(self, deadline: float) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(self.batch)


def peek_positions(k: int, seq_len: int) -> tuple[int, ...]:
    """k fixed positions where the old probes never looked: the first ones, the last ones."""
    last = seq_len - 2  # the last position with a later token in its row
    return tuple(range(k // 2)) + tuple(range(last - (k - k // 2) + 1, last + 1))


def simulate(splits: dict[str, probes.SplitRows], runs: int) -> dict[int, int]:
    """For each k: in how many of `runs` plans a model peeking at k fixed positions is caught.

    The splits' tokens are folded onto SIM_VOCAB ids first, so that the simulated model's
    logits cost 1/16 of the cpu profile's: cuts, joins and donors work alike on any ids."""
    splits = {name: probes.SplitRows(rows.windows % SIM_VOCAB, rows.scored)
              for name, rows in splits.items()}  # fmt: skip
    seq_len = next(iter(splits.values())).seq_len
    wanted = probes.probes_needed(probes.TARGET_K, probes.TARGET_POWER, seq_len)
    batch_size = pick_batch_size("cpu", seq_len, SIM_VOCAB)
    models = {k: Peeking(Bigram(SIM_VOCAB), peek_positions(k, seq_len)) for k in KS}
    token_bytes = torch.ones(SIM_VOCAB, dtype=torch.int64)
    caught = dict.fromkeys(KS, 0)
    for _ in range(runs):  # fresh plans each time, as the scorer's are
        plan = probes.make_plan(splits, batch_size, np.random.default_rng(), wanted)
        for k, model in models.items():
            workers = [LocalWorker(model) for _ in range(probes.WORKERS)]
            tally = run_plan(plan, workers, splits, token_bytes, math.inf)
            caught[k] += compare_twins(tally, "cpu").reason is not None
    return caught


def report(planned: list[Planned], simulated: dict[int, int] | None, runs: int) -> list[str]:
    lines = [f"probes: the chance of catching a model that looks ahead at k of T positions of "
             f"each row (target: k={probes.TARGET_K} at least {probes.TARGET_POWER:.0%})",
             "  profile   T      scored rows  probes  extra rows       "
             + "".join(f"k={k:<7}" for k in KS)]  # fmt: skip
    for row in planned:
        share = row.extra_rows / row.scored_rows
        verdict = "ok" if row.power[probes.TARGET_K] >= probes.TARGET_POWER else "UNDER TARGET"
        lines.append(f"  {row.profile:<9} {row.seq_len:<6} {row.scored_rows:<12} {row.probes:<7} "
                     f"{row.extra_rows:>6} ({share:4.0%})  "
                     + "".join(f"{_percent(row.power[k]):<9}" for k in KS) + verdict)  # fmt: skip
    if simulated is not None:
        cpu = next(row for row in planned if row.profile == "cpu")
        measured = ", ".join(f"k={k}: {simulated[k]}/{runs} ({simulated[k] / runs:.0%}, "
                             f"computed {_percent(cpu.power[k])})" for k in KS)  # fmt: skip
        lines.append(f"  cpu, simulated ({runs} plans; a model peeking at k fixed positions at "
                     f"the row's ends, through the real plan and comparison): {measured}")
    return lines


def _percent(chance: float) -> str:
    return ">99.99%" if 0.9999 < chance < 1 else f"{chance:.2%}"
