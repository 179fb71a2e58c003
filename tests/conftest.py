"""Shared fixtures: isolate git from the user's config and give tests a clean workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def _machine_cache(tmp_path_factory) -> Path:
    """One cache of this machine's measurements for the session (~/.cache/ar: the scorer's
    batch size, sandbox/evalbatch.py), as a user's machine keeps it across runs."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_git(tmp_path_factory, monkeypatch, _machine_cache):
    """A hostile global git config: ar must not depend on (or be broken by) it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_machine_cache))
    home = tmp_path_factory.mktemp("home")
    gitconfig = home / ".gitconfig"
    gitconfig.write_text(
        "[user]\n\tname = Someone Else\n\temail = someone@example.com\n"
        "[commit]\n\tgpgsign = true\n[init]\n\tdefaultBranch = trunk\n"
    )
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(gitconfig))
    monkeypatch.setenv("HOME", str(home))
    yield


@pytest.fixture
def cli():
    """Invoke the `ar` Typer app in-process and return the result."""
    from typer.testing import CliRunner

    from autoresearch_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str, cwd: Path | None = None):
        old = Path.cwd()
        if cwd is not None:
            os.chdir(cwd)
        try:
            return runner.invoke(app, [str(a) for a in args])
        finally:
            os.chdir(old)

    return invoke


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    """A prepared data directory for the micro profile, built once per test session from
    a few hundred KB of the standard library."""
    import shutil
    import sysconfig

    from autoresearch_cli.doors.config import PROFILES
    from autoresearch_cli.doors.data import prepare_data

    corpus = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email", "http", "logging", "urllib", "xml/dom", "concurrent/futures"):
        for source in sorted((stdlib / package).glob("*.py")):
            target = corpus / package.replace("/", "_") / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    data_dir = tmp_path_factory.mktemp("micro") / "data"
    prepare_data(data_dir, source=f"files:{corpus}/**/*.py", vocab_size=PROFILES["micro"]["vocab_size"])
    return data_dir


@pytest.fixture
def micro_ws(tmp_path, micro_data, monkeypatch, request):
    """A fresh micro-profile workspace with its data prepared; the cwd is the workspace.

    Its keep rule is one-run (one run decides) and no run counts as disturbed, so that
    tests of the loop's mechanics run no noise measurements and no reruns on a busy test
    machine; tests marked `sequential` get ar's defaults."""
    import shutil

    from autoresearch_cli.doors import config, gitops, workspace

    ws = workspace.init(tmp_path / "ws", profile="micro", tag="test")
    if request.node.get_closest_marker("sequential") is None:
        settings = config.load_raw(ws.root / config.CONFIG_NAME)
        settings["keep"].update(rule="one-run", min_share=0.0, min_throughput=0.0)
        config.write(ws.root / config.CONFIG_NAME, settings)
        gitops.commit_all(ws.root, "tests: one run decides")
    shutil.copytree(micro_data, ws.data_dir)
    monkeypatch.chdir(ws.root)
    return ws


@pytest.fixture
def warm_runtime():
    """This test process's warm runtime, its server started and ready: runner.run then
    starts every Python job from it (sandbox/warm.py), so the trust tests that use this
    fixture pass through the warm path; a job with another boot environment runs cold.
    Checked before each test (free while it serves): a test before it may have restarted
    the server for another boot environment, and a job would then find it starting."""
    from sandbox import runner, warm

    runtime = warm.runtime()
    runtime.prestart(runner.job_env({}))
    runtime.wait_ready()
    return runtime
