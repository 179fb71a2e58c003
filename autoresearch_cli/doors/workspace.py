"""A workspace: a git repository holding train.py, prepare.py, program.md and ar.toml.

`ar init` makes one; every other command finds it from the current directory upward,
like git, or from `-C DIR`.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoresearch_cli.doors import config as config_mod
from autoresearch_cli.doors import gitops, resources
from autoresearch_cli.errors import WorkspaceError

TRACKED_FILES = ("train.py", "prepare.py", "program.md", "ar.toml", ".gitignore")
PROTECTED_FILES = ("prepare.py", "program.md", "ar.toml")  # agents may never change these
GITIGNORE = ".ar/\nresults.tsv\n__pycache__/\n"
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def state_dir(self) -> Path:
        return self.root / ".ar"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def worktrees_dir(self) -> Path:
        return self.state_dir / "worktrees"

    @property
    def config_path(self) -> Path:
        return self.root / config_mod.CONFIG_NAME

    @property
    def results_tsv(self) -> Path:
        return self.root / "results.tsv"

    def settings(self) -> config_mod.Settings:
        """ar.toml, checked and typed (read afresh: the human may edit it between runs)."""
        return config_mod.load(self.config_path)

    @property
    def branch(self) -> str:
        return self.settings().branch

    def branch_ref(self) -> str:
        return f"refs/heads/{self.branch}"

    def tip(self) -> str:
        """The sha at the tip of the research branch: always the best evaluated commit."""
        sha = gitops.try_rev_parse(self.root, self.branch_ref())
        if sha is None:
            raise WorkspaceError(f"branch {self.branch} is missing from {self.root}")
        return sha


def default_tag(today: dt.date | None = None) -> str:
    today = today or dt.date.today()
    return today.strftime("%b%d").lower()  # nov23, as the original


def find(start: Path | None = None) -> Workspace:
    """The workspace containing `start` (default: the current directory)."""
    start = (start or Path.cwd()).resolve()
    if not start.exists():
        raise WorkspaceError(f"{start} does not exist")
    for directory in (start, *start.parents):
        if (directory / config_mod.CONFIG_NAME).is_file() and (directory / ".git").exists():
            # an experiment's worktree (.ar/worktrees/<id>) has its own ar.toml: skip it
            if directory.parent.name == "worktrees" and directory.parent.parent.name == ".ar":
                continue
            return Workspace(directory)
    raise WorkspaceError(
        f"no ar workspace at {start} or above it; create one with `ar init DIR`"
    )


def init(directory: Path, profile: str, tag: str | None = None, budget: int | None = None) -> Workspace:
    """Create a workspace in `directory` (created if missing; must be empty)."""
    directory = directory.expanduser().resolve()
    tag = tag or default_tag()
    if not TAG_PATTERN.match(tag):
        raise WorkspaceError(f"tag {tag!r} is not a valid name: use letters, digits, '.', '_' or '-'")
    settings = config_mod.default_config(profile, tag, budget)
    _refuse_existing(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_files(directory, profile, settings)
        gitops.init(directory, "main")
        gitops.commit_all(directory, f"ar init: {profile} profile")
        gitops.checkout_new_branch(directory, settings["workspace"]["branch"])
        (directory / ".ar").mkdir()
    except Exception:
        # leave nothing half-made behind: the directory was empty (or absent) before
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for child in directory.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return Workspace(directory)


def _refuse_existing(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise WorkspaceError(f"{directory} exists and is not a directory")
    if (directory / config_mod.CONFIG_NAME).exists():
        raise WorkspaceError(f"{directory} is already an ar workspace; nothing was changed")
    if directory.exists() and any(directory.iterdir()):
        raise WorkspaceError(f"{directory} is not empty; choose a new or empty directory")


def _write_files(directory: Path, profile: str, settings: dict[str, Any]) -> None:
    from autoresearch_cli.doors.template import render_train_py

    template = resources.template_dir()
    (directory / "train.py").write_text(render_train_py(profile))
    shutil.copyfile(template / "prepare.py", directory / "prepare.py")
    shutil.copyfile(resources.program_md(), directory / "program.md")
    config_mod.write(directory / config_mod.CONFIG_NAME, settings)
    (directory / ".gitignore").write_text(GITIGNORE)
