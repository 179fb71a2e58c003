"""The compile cache (sandbox/compilecache.py): layers written by ar alone, handed to a job
as a copy, checked against their manifests, harvested only from a scored run into its own
commit's lineage, and never seen by the scorer. One property per test, on CPU (the
compilers' use of the entries needs a GPU: docs/internals.md)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from sandbox import compilecache
from sandbox.compilecache import CompileCache, RunCaches, hand_off, harvest, lineage
from sandbox.confine import Confinement
from sandbox.experiment import scorer_env
from sandbox.modelworker import WORKER_ENV
from sandbox.runner import Limits, job_env, run


def compiled(directory: Path, files: dict[str, str]) -> Path:
    """A private cache as a compiler leaves it."""
    for relative, text in files.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    return directory


def test_a_job_changing_its_copy_changes_nothing_ar_keeps(tmp_path):
    store = tmp_path / "store"
    source = compiled(tmp_path / "built", {"inductor/fx/graph.py": "honest kernel"})
    assert harvest(store, source, "template", {}) == "stored 1 file(s) as template"
    job_cache = tmp_path / "job"
    assert list(hand_off(store, ["template"], job_cache).layers) == ["template"]
    (job_cache / "inductor/fx/graph.py").write_text("poisoned kernel")
    again = hand_off(store, ["template"], tmp_path / "next")
    assert again.refused == {} and (tmp_path / "next/inductor/fx/graph.py").read_text() == "honest kernel"


def test_a_layer_changed_behind_ars_back_is_refused_whole(tmp_path):
    store = tmp_path / "store"
    harvest(store, compiled(tmp_path / "built", {"a.py": "one", "b.py": "two"}), "template", {})
    (store / "template" / "b.py").write_text("tampered")
    handed = hand_off(store, ["template"], tmp_path / "job")
    assert handed.layers == {} and "b.py changed since ar stored it" in handed.refused["template"]
    assert not (tmp_path / "job").exists()  # not even the untouched a.py


def test_harvest_takes_new_regular_files_only_never_a_link_out(tmp_path):
    secret = tmp_path / "val.bin"
    secret.write_text("the evaluation text")
    cache = compiled(tmp_path / "job", {"inductor/old.py": "handed", "inductor/new.py": "compiled"})
    (cache / "inductor" / "leak.py").symlink_to(secret)
    (cache / "linked").symlink_to(tmp_path, target_is_directory=True)
    handed = {"inductor/old.py": compilecache._sha256(cache / "inductor/old.py")}
    store = tmp_path / "store"
    assert harvest(store, cache, lineage("abc"), handed) == "stored 1 file(s) as lineage-abc"
    kept = sorted(p.relative_to(store / "lineage-abc").as_posix()
                  for p in (store / "lineage-abc").rglob("*") if p.is_file())  # fmt: skip
    assert kept == ["inductor/new.py"]


def test_a_cache_too_big_is_not_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(compilecache, "MAX_FILES", 3)
    cache = compiled(tmp_path / "job", {f"k{i}.py": "x" for i in range(5)})
    assert harvest(tmp_path / "store", cache, lineage("abc"), {}).startswith("not stored: more than 3")
    assert not (tmp_path / "store" / "lineage-abc.json").exists()


def test_a_runs_entries_reach_its_children_only_never_a_rival(tmp_path):
    store = tmp_path / "store"
    parent_run = RunCaches(CompileCache(str(store), commit="aaa"), "cpu", tmp_path / "run1")
    parent_run.seed(tmp_path, {}, None, sys.executable, tmp_path / "w1")
    compiled(tmp_path / "run1", {"inductor/planted.py": "the parent's"})
    parent_run.harvest()
    assert parent_run.record["stored"] == "stored 1 file(s) as lineage-aaa"
    child = RunCaches(CompileCache(str(store), commit="ccc", parents=("aaa",)), "cpu", tmp_path / "c")
    child.seed(tmp_path, {}, None, sys.executable, tmp_path / "w2")
    rival = RunCaches(CompileCache(str(store), commit="rrr", parents=("bbb",)), "cpu", tmp_path / "r")
    rival.seed(tmp_path, {}, None, sys.executable, tmp_path / "w3")
    assert (tmp_path / "c/inductor/planted.py").is_file() and list(child.record["handed"]) == ["lineage-aaa"]
    assert not (tmp_path / "r").exists() and rival.record["handed"] == {}


def test_the_scorer_and_its_model_workers_get_no_compile_cache(tmp_path):
    env = scorer_env({"OMP_NUM_THREADS": "1"}, tmp_path)
    assert not set(compilecache.CACHE_DIRS) & set(env)
    assert not set(compilecache.CACHE_DIRS) & set(WORKER_ENV)


@pytest.mark.usefixtures("warm_runtime")
def test_a_confined_job_can_rewrite_its_copy_but_never_the_store(tmp_path):
    store = tmp_path / "store"
    harvest(store, compiled(tmp_path / "built", {"inductor/k.py": "honest"}), "template", {})
    job_tmp = tmp_path / "tmp"
    hand_off(store, ["template"], job_tmp / "compile")
    code = textwrap.dedent(f"""
        import os
        copy = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "k.py")
        open(copy, "w").write("poisoned")
        try:
            open({str(store / "template" / "inductor" / "k.py")!r}, "w").write("poisoned")
            print("wrote the store")
        except PermissionError:
            print("store denied")
    """)
    env = job_env(compilecache.cache_env(job_tmp / "compile"))
    result = run([sys.executable, "-c", code], tmp_path, env, Limits(wall_seconds=30),
                 tmp_path / "job.log", confinement=Confinement(write=(str(job_tmp),)))  # fmt: skip
    assert result.reason == "ok" and (tmp_path / "job.log").read_text().strip() == "store denied"
    assert (store / "template" / "inductor" / "k.py").read_text() == "honest"
    assert os.stat(store / "template" / "inductor" / "k.py").st_size == len("honest")
