"""The committed lock pins the whole dependency set, and this environment is built from it."""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib

from conftest import REPO_ROOT
from lockfile import frozen, lock_pins, normalize
from packaging.requirements import Requirement


def _torch_closure() -> set[str]:
    """torch and what it pulled in itself (CUDA wheels on a CUDA build): installed outside
    the lock, from TORCH_SPEC."""
    names, todo = set(), ["torch"]
    while todo:
        name = normalize(todo.pop())
        if name in names:
            continue
        names.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [Requirement(r).name for r in requires if "extra ==" not in r]
    return names


def test_this_environment_is_exactly_the_lock():
    pins = lock_pins()
    installed = frozen(sys.executable)
    outside = _torch_closure() - set(pins)
    assert "torch" not in pins, "torch is installed from TORCH_SPEC, never from the lock"
    differing = {name: (installed.get(name), version) for name, version in pins.items()
                 if installed.get(name) != version}
    assert not differing, f"installed vs locked: {differing}; run `make install`"
    unlocked = sorted(set(installed) - set(pins) - outside)
    assert not unlocked, f"installed but not in the lock: {unlocked}; add them via `make lock`"


def test_the_lock_satisfies_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = lock_pins()
    for text in wanted:
        requirement = Requirement(text)
        name = normalize(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{requirement} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement}: run `make lock`")
