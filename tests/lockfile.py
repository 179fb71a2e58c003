"""Reading requirements.lock and comparing an environment with it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import REPO_ROOT

LOCK = REPO_ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line of the lock."""
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins[normalize(match[1])] = match[2]
    return pins


def frozen(python: Path | str) -> dict[str, str]:
    """{normalized name: version} of what `pip freeze --all` lists for an interpreter,
    editable installs (ar itself) left out."""
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True, text=True, check=True,
    ).stdout
    return {normalize(m[1]): m[2] for m in map(PIN.match, out.splitlines()) if m}
