"""Runs of commits already on the branch, and the seed every run gets.

The keep test compares a candidate's run k with the best's run k on the same seed (seed
index k). So the best is run on the seeds the candidates need (their partners), the
first baseline on `noise_runs` seeds (the noise, and partners for what follows), and
every run takes the lowest seed index its commit has not run on yet on that hardware. A
disturbed run is run again on its own seed. Every loop that runs work again is bounded:
a commit is measured at most `bound` times on one class, whatever its runs do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autoresearch_cli.research.evidence import Evidence


@dataclass
class Measurements:
    noise_runs: int
    best_runs: int
    max_runs: int
    disturbed_retries: int
    one_run: bool = False
    started: dict[tuple[str, str], int] = field(default_factory=dict)  # (sha, class) -> runs
    per_seed: dict[tuple[str, str, int], int] = field(default_factory=dict)  # partner tries
    in_flight: dict[int, tuple[str, str, int]] = field(default_factory=dict)  # id -> sha, class, seed

    @classmethod
    def from_settings(cls, keep) -> Measurements:
        return cls(keep.noise_runs, keep.best_runs, keep.max_runs, keep.disturbed_retries,
                   keep.rule == "one-run")

    @property
    def bound(self) -> int:
        """Measurements of one commit on one class at most: a run on every seed a keep
        test can ask for, and room for a few disturbed ones. A commit whose runs always
        fail or look disturbed stops being measured there; what waits on it is then
        judged on the pairs it has."""
        return max(self.noise_runs, self.max_runs) + 2 * (1 + self.disturbed_retries)

    def runs_needed(self, evidence: Evidence, slot_class: str) -> int:
        """Scored runs the best needs on `slot_class` before new candidates run there: one
        under the one-run rule; else enough to measure the noise (the first commit measured
        there), then best_runs, so that a candidate's first runs have partners."""
        if self.one_run:
            return 1
        if evidence.noise(slot_class).df < self.noise_runs - 1:
            return self.noise_runs
        return self.best_runs

    def may_measure(self, sha: str, slot_class: str, seed: int | None = None) -> bool:
        """Whether `sha` may run again on `slot_class` (on seed index `seed`: each seed is
        tried 1 + disturbed_retries times at most)."""
        if seed is not None and self.per_seed.get((sha, slot_class, seed), 0) > self.disturbed_retries:
            return False
        return self.started.get((sha, slot_class), 0) < self.bound

    def count(self, sha: str, slot_class: str, seed: int | None = None) -> None:
        self.started[(sha, slot_class)] = self.started.get((sha, slot_class), 0) + 1
        if seed is not None:
            key = (sha, slot_class, seed)
            self.per_seed[key] = self.per_seed.get(key, 0) + 1

    def seeds_taken(self, evidence: Evidence, sha: str, slot_class: str) -> set[int]:
        """Seed indices `sha` ran on (scored) or is running on, on `slot_class`."""
        taken = set(evidence.commit(sha, slot_class).by_seed())
        return taken | {index for commit, cls, index in self.in_flight.values()
                        if commit == sha and cls == slot_class}

    def next_seed(self, evidence: Evidence, sha: str, slot_class: str,
                  reserved: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        """The lowest seed index `sha` has not run on, on `slot_class`."""
        taken = self.seeds_taken(evidence, sha, slot_class) | set(reserved)
        index = 0
        while index in taken:
            index += 1
        return index

    def start(self, exp_id: int, sha: str, slot_class: str, index: int) -> None:
        self.in_flight[exp_id] = (sha, slot_class, index)

    def end(self, exp_id: int) -> int | None:
        """The seed index of a run that ended."""
        ended = self.in_flight.pop(exp_id, None)
        return ended[2] if ended else None
