"""Scoring what the model workers return: the bits per byte of the scored rows, and every
twin compared with its reference (sandbox/probes.py says what that comparison catches).

Each batch's logits are read once, from the copy this process made of them (a worker's
collect()); nothing is read from a buffer a worker can still write. From that copy come
the per-position cross-entropies of every row at its reference's targets: a scored row
adds them to its split, and a reference or a twin keeps them (T numbers, not its logits)
until all batches are in.

Tolerance. At each compared position a twin's score must equal its reference's to within
TOLERANCE of that score (of one nat, if the score is smaller). Relative to the score, not
to the logits: a constant added to every logit changes no score, and cannot widen it. A
look-ahead small enough to pass gains at most that share of the loss where it looks.
Honest models give identical numbers on CPU (fp32, batches of one shape, measured: a
difference of exactly 0) and nearly identical ones under bf16 autocast on CUDA.

Imported once the workers are starting (it imports torch; see sandbox/evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sandbox.errors import InvalidModel
from sandbox.probes import DECOY, SCORE, TWIN, Job, Plan, SplitRows

TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}  # of a position's score, in twins against references


class ModelWorker(Protocol):
    """What the scorer asks of a model worker (sandbox/modelworker.py; tests' fakes)."""

    def submit(self, batch: torch.Tensor) -> None:
        """Start computing the logits of input rows [B, T]."""

    def collect(self, deadline: float) -> torch.Tensor:
        """The logits [B, T, V] of the last submit(), in memory of this process that the
        worker cannot write; valid until the next collect()."""


@dataclass
class Tally:
    nats: dict[str, float]  # per split, over scored targets of at least one byte
    target_bytes: dict[str, int]
    kept: dict[tuple[str, int], torch.Tensor]  # per-position nats [T] of each reference
    twins: list[tuple[Job, torch.Tensor]]  # per-position nats [T] at the reference's targets


def token_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in nats [B, T] from float32 logits [B, T, V]."""
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    if not bool(torch.isfinite(nats).all()):
        raise InvalidModel("the model returned NaN or Inf logits (the loss is not finite)")
    return nats.view(targets.shape)


def run_plan(plan: Plan, workers: list[ModelWorker], splits: dict[str, SplitRows],
             token_bytes: torch.Tensor, deadline: float) -> Tally:  # fmt: skip
    """Both workers compute at once; the scorer scores one's batch while the other runs."""
    tally = Tally({s: 0.0 for s in splits}, {s: 0 for s in splits}, {}, [])
    queues = [[jobs for w, jobs in plan.batches if w == index] for index in range(len(workers))]
    running: dict[int, list[Job]] = {}

    def start(index: int) -> None:
        running[index] = queues[index].pop(0)
        workers[index].submit(_stack([job.tokens for job in running[index]]))

    for index, queue in enumerate(queues):
        if queue:
            start(index)
    while running:
        for index in list(running):
            jobs = running.pop(index)
            logits = workers[index].collect(deadline)
            _tally_batch(tally, jobs, logits, splits, token_bytes.to(logits.device),
                         plan.references)  # fmt: skip
            if queues[index]:
                start(index)
    return tally


def _stack(rows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _tally_batch(tally: Tally, jobs: list[Job], logits: torch.Tensor,
                 splits: dict[str, SplitRows], token_bytes: torch.Tensor,
                 references: frozenset[tuple[str, int]]) -> None:  # fmt: skip
    targets = _stack([splits[job.split].targets(job.row) for job in jobs]).to(logits.device)
    nats = token_nats(logits, targets)
    for split in splits:
        scored = [i for i, job in enumerate(jobs) if job.kind == SCORE and job.split == split]
        if scored:
            target_bytes = token_bytes[targets[scored]]
            tally.nats[split] += float((nats[scored].double() * (target_bytes > 0)).sum())
            tally.target_bytes[split] += int(target_bytes.sum())
    for i, job in enumerate(jobs):
        if job.kind == TWIN:
            tally.twins.append((job, nats[i].clone()))
        elif job.kind in (SCORE, DECOY) and (job.split, job.row) in references:
            tally.kept[(job.split, job.row)] = nats[i].clone()


@dataclass(frozen=True)
class Comparison:
    max_move: float  # the largest move of a compared score, as a share of that score
    reason: str | None  # why the model is invalid; None when every move is within tolerance


def compare_twins(tally: Tally, device: str) -> Comparison:
    """Every twin against its reference, at the positions before its cut."""
    if not tally.twins:
        return Comparison(0.0, None)
    twins = [job for job, _ in tally.twins]
    answered = torch.stack([nats for _, nats in tally.twins])
    reference = torch.stack([tally.kept[(job.split, job.row)] for job in twins])
    cuts = torch.tensor([job.cut for job in twins], device=answered.device)
    seq_len = answered.shape[1]
    compared = torch.arange(seq_len, device=answered.device)[None, :] < cuts[:, None]
    move = ((answered - reference).abs() / reference.abs().clamp_min(1.0)) * compared
    tolerance = TOLERANCE[device]
    copies = (cuts == seq_len).tolist()
    # A copy that moved (no token changed) says more than a cut twin that moved: test those first.
    for kind_is_copy in (True, False):
        rows = [i for i, is_copy in enumerate(copies) if is_copy == kind_is_copy]
        if not rows or float(move[rows].max()) <= tolerance:
            continue
        worst = int(move[rows].argmax())
        row, position = rows[worst // seq_len], worst % seq_len
        return Comparison(float(move.max()), _reason(twins[row], position, seq_len,
                                                     float(move[row, position]), tolerance))  # fmt: skip
    return Comparison(float(move.max()), None)


def _reason(twin: Job, position: int, seq_len: int, moved: float, tolerance: float) -> str:
    where = f"its score at position {position} of {seq_len} moved by {moved:.3g} of itself"
    if twin.cut == seq_len:
        return (
            f"the same row was scored again, in another batch by the other worker, and {where} "
            f"(tolerance {tolerance:g}): the model mixes batch rows, keeps state between calls "
            "(stateful), or is nondeterministic"
        )
    return (
        f"the model looks ahead: the tokens of a row from position {twin.cut} on were replaced "
        f"by other text, and {where} (tolerance {tolerance:g})"
    )
