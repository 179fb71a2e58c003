"""The scorer's rows per batch on CPU: measured once per machine and shape, then cached."""

from __future__ import annotations

import json

import pytest

from sandbox import evalbatch


def test_the_most_rows_within_the_margin_of_the_fastest_win():
    seconds = {"2": 1.00e-5, "4": 1.02e-5, "8": 1.20e-5, "16": 2.0e-5}
    assert evalbatch.choose(seconds) == 4
    assert evalbatch.choose({"4": 3.0e-5, "64": 1.0e-5}) == 64


def test_a_measurement_is_made_once_then_read_from_the_cache(tmp_path, monkeypatch):
    rows = evalbatch.rows_per_batch(64, 512, cache_dir=tmp_path)  # measured here: a real subprocess
    sizes = {max(1, tokens // 64) for tokens in evalbatch.TOKENS}
    assert rows in sizes
    (entry_path,) = tmp_path.glob("eval-batch-*.json")
    entry = json.loads(entry_path.read_text())
    assert entry["rows"] == rows and set(entry["seconds_per_token"]) == {str(s) for s in sizes}
    assert entry["key"]["seq_len"] == "64" and entry["key"]["threads"] == str(evalbatch.worker_threads())

    def no_measurement(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(evalbatch, "measure", no_measurement)
    assert evalbatch.rows_per_batch(64, 512, cache_dir=tmp_path) == rows
    with pytest.raises(AssertionError, match="measured again"):  # another shape is another entry
        evalbatch.rows_per_batch(128, 512, cache_dir=tmp_path)


def test_a_garbled_cache_is_measured_again_and_a_failed_measurement_is_not_cached(tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(evalbatch, "measure", lambda *args: {"8": 1e-5, "32": 3e-5})
    assert evalbatch.rows_per_batch(64, 512, cache_dir=tmp_path) == 8
    (entry_path,) = tmp_path.glob("eval-batch-*.json")
    entry_path.write_text('{"rows": "many"')
    monkeypatch.setattr(evalbatch, "measure", lambda *args: {"8": 3e-5, "32": 1e-5})
    assert evalbatch.rows_per_batch(64, 512, cache_dir=tmp_path) == 32

    def fails(*args):
        raise RuntimeError("the batch measurement failed: no torch")

    monkeypatch.setattr(evalbatch, "measure", fails)
    assert evalbatch.rows_per_batch(256, 1024, cache_dir=tmp_path) is None
    assert len(list(tmp_path.glob("eval-batch-*.json"))) == 1
