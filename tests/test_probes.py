"""The scorer's probes as pure code: the plan's guarantees, its power, and the comparison
with in-process models (a bigram table that looks ahead at fixed positions; the honest
template). The real scorer, with real workers, is in test_scorer_trust.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sandbox import probes
from sandbox.evaluate import split_rows
from sandbox.probes import DECOY, FILL, SCORE, TWIN, make_plan, probe_power, probes_needed
from sandbox.scoring import TOLERANCE, compare_twins, run_plan

VOCAB = 60000  # random tokens this varied never share a prefix by chance


def splits_of(scored: int, spare: int, seq_len: int, vocab: int = VOCAB, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = (scored + spare) * seq_len + 2
    return {name: split_rows(rng.integers(0, vocab, size).astype(np.uint16), scored * seq_len,
                             seq_len, vocab, name, spare)
            for name in ("val", "holdout")}  # fmt: skip


def all_jobs(plan):
    return [(worker, job) for worker, jobs in plan.batches for job in jobs]


def test_the_power_is_the_chance_that_no_uniform_cut_falls_on_a_look_ahead():
    assert probe_power(1, 4, 1) == pytest.approx(0.25)
    assert probe_power(3, 256, 0) == 0.0
    assert probe_power(300, 256, 1) == 1.0
    for seq_len, wanted in ((64, 96), (256, 391), (2048, 3142)):  # micro, cpu, gpu
        assert probes_needed(3, 0.99, seq_len) == wanted
        assert probe_power(3, seq_len, wanted) >= 0.99 > probe_power(3, seq_len, wanted - 1)
        assert probe_power(10, seq_len, wanted) > 0.9999
    assert probes_needed(3, 0.0, 256) == 0


def test_every_scored_row_is_computed_once_and_each_twin_by_the_other_worker():
    splits = splits_of(scored=40, spare=100, seq_len=16)
    plan = make_plan(splits, 8, np.random.default_rng(1), wanted=30)
    jobs = all_jobs(plan)
    owner = {}
    for worker, job in jobs:
        if job.kind in (SCORE, DECOY):
            assert (job.split, job.row) not in owner
            owner[(job.split, job.row)] = worker
    assert {key for key, _ in owner.items() if key[1] < 40} == {
        (split, row) for split in splits for row in range(40)
    }
    twins = [(worker, job) for worker, job in jobs if job.kind == TWIN]
    references = [(job.split, job.row) for _, job in twins]
    assert len(references) == len(set(references)) == 30 + 2 * probes.COPIES_PER_SPLIT
    assert all(owner[(job.split, job.row)] != worker for worker, job in twins)
    assert plan.probes == 30 and plan.references == frozenset(references)


def test_a_twin_is_its_reference_up_to_the_cut_then_other_text_that_differs_at_the_cut():
    splits = splits_of(scored=40, spare=100, seq_len=16, vocab=50)  # a small vocabulary
    plan = make_plan(splits, 8, np.random.default_rng(2), wanted=60)
    donors = []
    for twin in plan.twins:
        rows = splits[twin.split]
        reference = rows.inputs(twin.row)
        assert np.array_equal(twin.tokens[: twin.cut], reference[: twin.cut])
        if twin.cut < rows.seq_len:
            assert twin.tokens[twin.cut] != reference[twin.cut]
            if twin.cut > rows.seq_len - 4:
                continue  # a suffix this short may be found in other rows by chance
            donor = [row for row in range(len(rows.windows))
                     if np.array_equal(rows.inputs(row)[twin.cut :], twin.tokens[twin.cut :])]  # fmt: skip
            assert donor and (twin.split, donor[0]) not in plan.references
            donors.append((twin.split, donor[0]))
    assert len(donors) == len(set(donors)) > 30  # each used once


def test_no_worker_sees_two_rows_that_share_a_prefix_or_the_text_after_a_cut():
    # Seeing both would tell a worker where the cut is and what the reference holds there.
    splits = splits_of(scored=64, spare=200, seq_len=16)
    for seed in range(5):
        plan = make_plan(splits, 8, np.random.default_rng(seed), wanted=100)
        for worker in range(probes.WORKERS):
            seen = np.stack([job.tokens for w, job in all_jobs(plan) if w == worker and job.kind != FILL])
            for twin in (job for w, job in all_jobs(plan) if w == worker and job.kind == TWIN):
                same_prefix = (seen[:, : twin.cut] == twin.tokens[: twin.cut]).all(1)
                same_suffix = (seen[:, twin.cut :] == twin.tokens[twin.cut :]).all(1)
                assert same_prefix.sum() == 1
                assert twin.cut == 16 or same_suffix.sum() == 1


def test_scored_rows_too_few_for_the_probes_are_helped_out_by_decoys():
    splits = splits_of(scored=16, spare=200, seq_len=16)
    plan = make_plan(splits, 8, np.random.default_rng(3), wanted=80)
    decoys = [(worker, job) for worker, job in all_jobs(plan) if job.kind == DECOY]
    assert plan.probes == 80 and len(decoys) == 80 - 2 * (16 - probes.COPIES_PER_SPLIT)
    assert all(job.row >= 16 for _, job in decoys)
    twin_worker = {(job.split, job.row): worker for worker, job in all_jobs(plan) if job.kind == TWIN}
    assert all(twin_worker[(job.split, job.row)] != worker for worker, job in decoys)
    assert plan.extra_rows == len(plan.twins) + len(decoys)


def test_splits_with_too_little_text_get_fewer_probes_and_the_power_says_so():
    splits = splits_of(scored=20, spare=0, seq_len=16)
    plan = make_plan(splits, 8, np.random.default_rng(4), wanted=50)
    assert 0 < plan.probes <= 2 * ((20 - probes.COPIES_PER_SPLIT) // 2)  # two splits
    assert plan.power(3) == probe_power(3, 16, plan.probes) < 0.99


def test_batches_have_one_shape_and_fillers_repeat_the_workers_own_rows():
    plan = make_plan(splits_of(scored=37, spare=60, seq_len=16), 10, np.random.default_rng(5),
                     wanted=25)  # fmt: skip
    assert {len(jobs) for _, jobs in plan.batches} == {len(plan.batches[0][1])}
    assert len(plan.batches[0][1]) <= 10
    for worker in range(probes.WORKERS):
        own = {job.tokens.tobytes() for w, job in all_jobs(plan) if w == worker and job.kind != FILL}
        fills = [job for w, job in all_jobs(plan) if w == worker and job.kind == FILL]
        assert all(job.tokens.tobytes() in own for job in fills)


def test_cuts_fall_uniformly_on_every_position_of_a_row():
    seq_len, plans, wanted = 8, 200, 20
    splits = splits_of(scored=40, spare=80, seq_len=seq_len)
    counts = np.zeros(seq_len + 1, dtype=int)
    for seed in range(plans):
        plan = make_plan(splits, 8, np.random.default_rng(seed), wanted)
        assert len(plan.twins) == wanted + 2 * probes.COPIES_PER_SPLIT
        counts += np.bincount([job.cut for job in plan.twins], minlength=seq_len + 1)
    counts[seq_len] -= plans * 2 * probes.COPIES_PER_SPLIT  # the copies added on top
    expected = plans * wanted / seq_len
    assert counts[0] == 0 and counts.sum() == plans * wanted
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # 7 degrees of freedom: p = 0.001


# ---------------------------------------------------------------------------
# Through the comparison, with in-process models


class LocalWorker:
    """A model worker in this process (scoring.ModelWorker): for simulations only."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def submit(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def collect(self, deadline: float) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(self.batch).float()


class PeekingBigram(torch.nn.Module):
    """A bigram table that, at fixed positions of each row, raises the next token's logit."""

    def __init__(self, vocab: int, positions: tuple[int, ...]):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
        self.positions = positions

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.table[idx]
        for position in self.positions:
            if position + 1 < idx.shape[1]:
                logits[:, position].scatter_add_(
                    1, idx[:, position + 1 :][:, :1], torch.full((len(idx), 1), 5.0)
                )
        return logits


def caught(model: torch.nn.Module, splits, wanted: int, seed: int) -> bool:
    plan = make_plan(splits, 8, np.random.default_rng(seed), wanted)
    workers = [LocalWorker(model) for _ in range(probes.WORKERS)]
    token_bytes = torch.ones(model_vocab(splits), dtype=torch.int64)
    tally = run_plan(plan, workers, splits, token_bytes, math.inf)
    return compare_twins(tally, "cpu").reason is not None


def model_vocab(splits) -> int:
    return 1 + max(int(rows.windows.max()) for rows in splits.values())


@pytest.mark.parametrize("positions", [(0,), (0, 1, 14), (12, 13, 14)], ids=["start", "ends", "last"])
def test_a_fixed_position_look_ahead_is_caught_as_often_as_probe_power_says(positions):
    seq_len, wanted, trials = 16, 12, 300
    splits = splits_of(scored=32, spare=64, seq_len=seq_len, vocab=64)
    model = PeekingBigram(64, positions)
    hits = sum(caught(model, splits, wanted, seed) for seed in range(trials))
    expected = probe_power(len(positions), seq_len, wanted)
    assert abs(hits / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_the_reason_names_the_cut_and_the_position_that_moved():
    splits = splits_of(scored=32, spare=64, seq_len=16, vocab=64)
    plan = make_plan(splits, 8, np.random.default_rng(0), wanted=200)
    model = PeekingBigram(64, (5,))
    tally = run_plan(plan, [LocalWorker(model), LocalWorker(model)], splits, torch.ones(64, dtype=torch.int64), math.inf)
    compared = compare_twins(tally, "cpu")
    assert "looks ahead" in compared.reason
    assert "from position 6 on" in compared.reason and "at position 5 of 16" in compared.reason
    assert compared.max_move > TOLERANCE["cpu"]


def test_a_constant_added_to_every_logit_cannot_widen_the_tolerance():
    # Scores do not change when all logits shift; a tolerance scaled by the logits would.
    splits = splits_of(scored=32, spare=64, seq_len=16, vocab=64)
    model = PeekingBigram(64, (3,))
    model.table += 1e6
    assert all(caught(model, splits, 200, seed) for seed in range(3))


def test_the_honest_template_is_never_flagged_over_many_plans(tmp_path):
    from autoresearch_cli.doors import workspace

    ws = workspace.init(tmp_path / "ws", profile="micro", tag="t")
    model, vocab, seq_len = template_model(ws)
    tokens = np.random.default_rng(0).integers(0, vocab, 8192 * 4).astype(np.uint16)
    splits = {name: split_rows(tokens[i::2], 4096, seq_len, vocab, name, spare=200)
              for i, name in enumerate(("val", "holdout"))}  # fmt: skip
    wanted = probes_needed(probes.TARGET_K, probes.TARGET_POWER, seq_len)
    for seed in range(12):
        plan = make_plan(splits, 64, np.random.default_rng(seed), wanted)
        tally = run_plan(plan, [LocalWorker(model), LocalWorker(model)], splits,
                         torch.ones(vocab, dtype=torch.int64), math.inf)  # fmt: skip
        compared = compare_twins(tally, "cpu")
        assert compared.reason is None and compared.max_move == 0.0


def template_model(ws):
    """The workspace's GPT, freshly initialised, imported in this process (then forgotten)."""
    import importlib.util
    import sys

    profile = vars(ws.settings().profile)
    sys.path.insert(0, str(ws.root))
    try:
        spec = importlib.util.spec_from_file_location("template_train", ws.root / "train.py")
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        config = train.model_config(profile["vocab_size"], profile["max_seq_len"])
        return train.build_model(config).eval(), profile["vocab_size"], profile["max_seq_len"]
    finally:
        sys.path.remove(str(ws.root))
        sys.modules.pop("prepare", None)
