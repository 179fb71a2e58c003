"""`ar init` works from a non-editable install: the template and program.md ship in the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import REPO_ROOT


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
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(fresh_python), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True,
    )
    # dependencies come from this environment's site-packages, but not the source tree
    fresh_site = subprocess.run(
        [str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    Path(fresh_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

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
