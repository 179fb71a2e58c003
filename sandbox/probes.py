"""The scorer's plan: which rows each model worker computes, and the probes hidden among them.

Every scored row of both splits is computed once, by one of two model workers (half each,
at random). A probe pairs a reference row with a twin that the *other* worker computes:
the same tokens up to a cut c, then (c < T) real text from elsewhere in the split whose
token at c differs from the reference's; at c = T the twin is an exact copy. An honest
causal model gives each position p < c the same score in both (sandbox/scoring.py
compares them, and a twin that moved makes the model invalid).

What a probe catches. A model "looks ahead at position p" when its score there depends on
more than tokens 0..p of its row: on token p+1 or later (p < T-1), or, at the last
position, on other rows of the batch or on state kept between calls. The twin cut at
c = p+1 changes token p+1 (c = T: the batch and the call) and compares position p, so it
catches that model. Cuts are drawn uniformly from 1..T, independently of everything the
model can see, so each probe catches a model that looks ahead at k of the T positions of
its reference row with chance k/T, however the model picks those positions (the same in
every row, per row, from the row's text), and R probes all miss it with chance
(1 - k/T)^R (probe_power). A model that reads further ahead is caught by more cuts; one
that behaves honestly on rows it takes for twins is caught all the same, because the
reference it cheated on is what its twin is compared with.

How many: probes_needed(TARGET_K, TARGET_POWER, T), shared by the splits in proportion
to their rows: 391 for T = 256 (the cpu profile), 3,142 for T = 2048 (gpu), 96 for
T = 64. A few exact copies more (COPIES_PER_SPLIT) tell a model that mixes rows or keeps
state from one that looks ahead.

Why a twin cannot be recognised and answered like its reference. Twins are full rows of
real text in full batches of one shape, shuffled among the scored rows. A worker never
sees two rows that share a prefix: each row has at most one twin, and the text after a
cut comes from rows the twin's worker never sees whole (spare rows past the scored ones,
else scored rows of the reference's own worker that have no twin), each used once, with
the same token before the cut where one can be found, so the join reads naturally. Where
the scored rows cannot carry all the probes (one each), the rest are decoys: unscored
spare rows with a twin, one on each worker. Where the splits hold too little text even
for that, the plan has fewer probes, and Plan.power says what they achieve.

The chances above assume that the two workers cannot talk to each other (the sandbox's
part) and that a worker cannot tell where a twin was joined: one that can, and guesses
the reference's token there, escapes that twin as often as its guess is right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# ---------------------------------------------------------------------------
WORKERS = 2
TARGET_K = 3  # the plan is sized to catch a model that looks ahead at this many positions
TARGET_POWER = 0.99  # of each row, with at least this chance
REPORTED_K = (1, 3, 10)  # eval.json's probe_power holds the chance for each of these
COPIES_PER_SPLIT = 8  # exact copies on top: a moved copy says "mixes rows", not "looks ahead"
SCORE, DECOY, TWIN, FILL = "score", "decoy", "twin", "fill"


def probe_power(k: int, seq_len: int, probes: int) -> float:
    """The chance that `probes` twins, cut uniformly over 1..T, catch a model that looks
    ahead at k of the T = seq_len positions of each row: 1 - (1 - k/T)^probes."""
    if k >= seq_len:
        return 1.0 if probes else 0.0
    return 1.0 - (1.0 - k / seq_len) ** probes


def probes_needed(k: int, power: float, seq_len: int) -> int:
    """The fewest probes R with probe_power(k, seq_len, R) >= power (power < 1)."""
    if not power < 1:
        raise ValueError("no number of probes catches a look-ahead with certainty")
    if power <= 0:
        return 0
    if k >= seq_len:
        return 1
    needed = math.ceil(math.log1p(-power) / math.log1p(-k / seq_len))
    while probe_power(k, seq_len, needed) < power:  # floating-point rounding
        needed += 1
    return needed


# ---------------------------------------------------------------------------
# Rows, jobs, plan


@dataclass(frozen=True)
class SplitRows:
    """A split cut into rows of T inputs: row r reads windows[r, :T] and is scored on
    windows[r, 1:]. The first `scored` rows are scored; the rest are spare text for decoys
    and twins' donors, never scored."""

    windows: np.ndarray  # [rows, T + 1] token ids
    scored: int

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1] - 1

    @property
    def spare(self) -> int:
        return len(self.windows) - self.scored

    def inputs(self, row: int) -> np.ndarray:
        return self.windows[row, :-1]

    def targets(self, row: int) -> np.ndarray:
        return self.windows[row, 1:]


@dataclass(frozen=True)
class Job:
    """One row of one batch: a scored row, a decoy, a twin, or a filler."""

    kind: str  # SCORE | DECOY | TWIN | FILL
    split: str
    row: int  # the window whose targets it is scored or compared on (a twin: its reference's)
    tokens: np.ndarray  # [T] what the worker is given
    cut: int = 0  # a twin: positions < cut are compared with its reference (cut = T: all)


@dataclass(frozen=True)
class Plan:
    batches: list[tuple[int, list[Job]]]  # (worker, jobs) in the order they run
    twins: list[Job]
    references: frozenset[tuple[str, int]]  # (split, row) of every row that has a twin
    probes: int  # twins with a uniform cut: the copies added for diagnosis do not count
    seq_len: int

    def power(self, k: int) -> float:
        return probe_power(k, self.seq_len, self.probes)

    @property
    def extra_rows(self) -> int:
        """Rows computed for the probes alone: twins and decoys (fillers not counted)."""
        return sum(1 for _, jobs in self.batches for job in jobs if job.kind in (TWIN, DECOY))


def make_plan(splits: dict[str, SplitRows], batch_size: int, rng: np.random.Generator,
              wanted: int) -> Plan:  # fmt: skip
    """Every scored row once, on a worker chosen at random; `wanted` probes shared by the
    splits (fewer where they hold too little text); each worker's rows shuffled and cut
    into batches of one size, at most `batch_size`, the last padded with its own rows."""
    per_worker: list[list[Job]] = [[] for _ in range(WORKERS)]
    probes = 0
    shares = _share(wanted, [rows.scored for rows in splits.values()],
                    [_capacity(rows) for rows in splits.values()])  # fmt: skip
    for (name, rows), share in zip(splits.items(), shares, strict=True):
        owner = rng.permutation(rows.scored) % WORKERS
        for row in range(rows.scored):
            per_worker[owner[row]].append(Job(SCORE, name, row, rows.inputs(row)))
        jobs, made = _probe_jobs(name, rows, owner, share, rng)
        probes += made
        for worker, job in jobs:
            per_worker[worker].append(job)
    twins = [job for jobs in per_worker for job in jobs if job.kind == TWIN]
    seq_len = next(iter(splits.values())).seq_len
    return Plan(_batches(per_worker, batch_size, rng), twins,
                frozenset((job.split, job.row) for job in twins), probes, seq_len)  # fmt: skip


def _capacity(rows: SplitRows) -> int:
    """Probes a split can carry: each takes a reference and (nearly always) a donor, and no
    row serves twice; the copies take rows of their own."""
    return max(0, rows.scored - min(COPIES_PER_SPLIT, rows.scored) + rows.spare) // 2


def _share(total: int, weights: list[int], caps: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, none above its cap; what a capped one
    cannot take goes to the others."""
    shares = [min(cap, total * weight // max(1, sum(weights)))
              for weight, cap in zip(weights, caps, strict=True)]  # fmt: skip
    for index, cap in enumerate(caps):
        shares[index] += min(cap - shares[index], total - sum(shares))
    return shares


def _probe_jobs(name: str, rows: SplitRows, owner: np.ndarray, count: int,
                rng: np.random.Generator) -> tuple[list[tuple[int, Job]], int]:  # fmt: skip
    """(worker, job) for the copies, twins and decoys of one split, and how many probes they
    carry: `count`, less any whose cut no donor can change."""
    seq_len = rows.seq_len
    order = rng.permutation(rows.scored)
    copies = order[: min(COPIES_PER_SPLIT, rows.scored)]
    scored_refs = order[len(copies) : len(copies) + count]
    twinless = order[len(copies) + len(scored_refs) :]
    spare = rows.scored + rng.permutation(rows.spare)
    decoys = spare[: count - len(scored_refs)]
    donors = _Donors(rows, spare[len(decoys) :], twinless, owner, rng)
    jobs = [(1 - owner[row], Job(TWIN, name, int(row), rows.inputs(row), seq_len)) for row in copies]
    references = [(int(row), int(owner[row])) for row in scored_refs]
    references += [(int(row), int(rng.integers(WORKERS))) for row in decoys]
    made = 0
    for row, worker in references:
        cut = int(rng.integers(1, seq_len + 1))
        tokens = rows.inputs(row)
        if cut < seq_len:
            donor = donors.take(tokens, cut, worker)
            if donor is None:
                continue
            tokens = np.concatenate([tokens[:cut], rows.inputs(donor)[cut:]])
        if row >= rows.scored:  # a decoy: computed like a scored row, scored by nobody
            jobs.append((worker, Job(DECOY, name, row, rows.inputs(row))))
        jobs.append((1 - worker, Job(TWIN, name, row, tokens, cut)))
        made += 1
    return jobs, made


class _Donors:
    """Rows whose text may follow a cut: ones the twin's worker never sees whole (spare
    rows, then scored rows of the reference's own worker without a twin), each used once."""

    def __init__(self, rows: SplitRows, spare: np.ndarray, twinless: np.ndarray,
                 owner: np.ndarray, rng: np.random.Generator):  # fmt: skip
        self.rows, self.rng = rows, rng
        self.spare = _Pool(spare)
        self.owned = [_Pool(twinless[owner[twinless] == worker]) for worker in range(WORKERS)]

    def take(self, tokens: np.ndarray, cut: int, worker: int) -> int | None:
        """A donor row whose token at `cut` differs from `tokens`' (and whose token before
        it is the same, where one is left) for a reference on `worker`; None if none is."""
        for pool in (self.spare, self.owned[worker]):
            row = pool.take(self.rows.windows, tokens, cut, self.rng)
            if row is not None:
                return row
        return None


class _Pool:
    def __init__(self, rows: np.ndarray):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.free = np.ones(len(self.rows), dtype=bool)

    def take(self, windows: np.ndarray, tokens: np.ndarray, cut: int,
             rng: np.random.Generator) -> int | None:  # fmt: skip
        free = np.flatnonzero(self.free)
        differs = windows[self.rows[free], cut] != tokens[cut]
        joins = differs & (windows[self.rows[free], cut - 1] == tokens[cut - 1])
        chosen = np.flatnonzero(joins if joins.any() else differs)
        if not len(chosen):
            return None
        index = free[chosen[int(rng.integers(len(chosen)))]]
        self.free[index] = False
        return int(self.rows[index])


def _batches(per_worker: list[list[Job]], batch_size: int,
             rng: np.random.Generator) -> list[tuple[int, list[Job]]]:  # fmt: skip
    """Each worker's jobs shuffled and cut into batches of one size (as even as can be),
    the last padded with repeats of the worker's own jobs; all batches in a random order."""
    longest = max(len(jobs) for jobs in per_worker)
    size = math.ceil(longest / math.ceil(longest / batch_size)) if longest else 1
    batches = []
    for worker, jobs in enumerate(per_worker):
        jobs = [jobs[i] for i in rng.permutation(len(jobs))]
        for start in range(0, len(jobs), size):
            batch = jobs[start : start + size]
            repeats = rng.integers(0, len(jobs), size - len(batch))
            batches.append((worker, batch + [replace(jobs[i], kind=FILL) for i in repeats]))
    return [batches[i] for i in rng.permutation(len(batches))]
