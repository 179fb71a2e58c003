"""A fresh venv built from the lock plus the wheel: the template and program.md ship in the
wheel, `ar init` works, and the venv holds exactly what the lock pins (as this one does)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import REPO_ROOT
from lockfile import LOCK, frozen, lock_pins


def test_wheel_install_can_init_a_workspace(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO_ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = dist.glob("ar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for bundled in ("workspace_template/train.py", "workspace_template/prepare.py", "program.md"):
        assert f"autoresearch_cli/_bundled/{bundled}" in names
    assert "sandbox/evaluate.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    fresh_python = venv / "bin" / "python"
    # as `make install` does: everything from the lock, with no resolution of its own
    for what in (["-r", str(LOCK)], [str(wheel)]):
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(fresh_python), "install", "--quiet",
             "--no-deps", *what],
            check=True, capture_output=True,
        )
    fresh = frozen(fresh_python)
    fresh.pop("ar", None)
    assert fresh == lock_pins(), "a venv built from requirements.lock differs from the lock"
    # torch alone is installed outside the lock (TORCH_SPEC): take this environment's
    fresh_site = subprocess.run(
        [str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    Path(fresh_site, "torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(fresh_python), "-c", "import autoresearch_cli; print(autoresearch_cli.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True, env=env,
    ).stdout.strip()
    assert where.startswith(str(venv)), where

    result = subprocess.run(
        [str(venv / "bin" / "ar"), "init", str(tmp_path / "exp"), "--tag", "wheel"],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr
    ws = tmp_path / "exp"
    assert (ws / "train.py").read_text().startswith('"""')
    assert (ws / "program.md").read_text() == (REPO_ROOT / "program.md").read_text()
    assert (ws / "prepare.py").read_bytes() == (REPO_ROOT / "workspace_template" / "prepare.py").read_bytes()
