"""`ar init` and workspace discovery, on real git repositories in tmp dirs."""

from __future__ import annotations

import datetime as dt
import subprocess
import tomllib
from pathlib import Path

from autoresearch_cli.doors import workspace


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_init_creates_a_committed_workspace_on_its_branch(tmp_path, cli):
    ws_dir = tmp_path / "exp"
    result = cli("init", ws_dir, "--profile", "cpu", "--tag", "t1", "--budget", "42")
    assert result.exit_code == 0, result.output
    for name in ("train.py", "prepare.py", "program.md", "ar.toml", ".gitignore"):
        assert (ws_dir / name).is_file(), name
    assert (ws_dir / ".ar").is_dir()
    assert git(ws_dir, "rev-parse", "--abbrev-ref", "HEAD") == "autoresearch/t1"
    # the template is committed with ar's identity, whatever the user's git config says
    assert git(ws_dir, "log", "-1", "--format=%an <%ae>") == "ar <ar@localhost>"
    assert git(ws_dir, "status", "--porcelain") == ""
    tracked = set(git(ws_dir, "ls-files").splitlines())
    assert tracked == {"train.py", "prepare.py", "program.md", "ar.toml", ".gitignore"}
    settings = tomllib.loads((ws_dir / "ar.toml").read_text())
    assert settings["profile"]["name"] == "cpu"
    assert settings["profile"]["time_budget"] == 42
    assert settings["workspace"]["branch"] == "autoresearch/t1"
    compile((ws_dir / "train.py").read_text(), "train.py", "exec")


def test_init_default_tag_is_today(tmp_path, cli):
    result = cli("init", tmp_path / "exp")
    assert result.exit_code == 0, result.output
    expected = dt.date.today().strftime("%b%d").lower()
    assert git(tmp_path / "exp", "rev-parse", "--abbrev-ref", "HEAD") == f"autoresearch/{expected}"
    assert workspace.default_tag(dt.date(2026, 3, 5)) == "mar05"


def test_init_refuses_a_non_empty_directory_and_touches_nothing(tmp_path, cli):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    before = snapshot(target)
    result = cli("init", target)
    assert result.exit_code == 1
    assert "not empty" in result.output
    assert snapshot(target) == before
    assert not (target / ".git").exists()


def test_init_refuses_an_existing_workspace(tmp_path, cli):
    target = tmp_path / "exp"
    assert cli("init", target, "--tag", "a").exit_code == 0
    before = snapshot(target)
    result = cli("init", target, "--tag", "b")
    assert result.exit_code == 1
    assert "already an ar workspace" in result.output
    assert snapshot(target) == before


def test_init_rejects_a_bad_profile_without_creating_anything(tmp_path, cli):
    result = cli("init", tmp_path / "exp", "--profile", "tpu")
    assert result.exit_code == 1
    assert "unknown profile 'tpu'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "exp").exists()


def test_init_rejects_a_bad_budget_and_tag(tmp_path, cli):
    assert "budget must be" in cli("init", tmp_path / "a", "--budget", "0").output
    assert "not a valid name" in cli("init", tmp_path / "b", "--tag", "bad tag").output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_commands_find_the_workspace_upward_and_with_dash_c(tmp_path, cli):
    ws_dir = tmp_path / "exp"
    cli("init", ws_dir, "--tag", "t")
    deep = ws_dir / "notes" / "deeper"
    deep.mkdir(parents=True)
    assert workspace.find(deep).root == ws_dir.resolve()
    # from an experiment's worktree, the workspace is the one that owns it
    fake_worktree = ws_dir / ".ar" / "worktrees" / "7"
    fake_worktree.mkdir(parents=True)
    (fake_worktree / "ar.toml").write_text((ws_dir / "ar.toml").read_text())
    (fake_worktree / ".git").write_text("gitdir: elsewhere\n")
    assert workspace.find(fake_worktree).root == ws_dir.resolve()
    outside = tmp_path / "outside"
    outside.mkdir()
    result = cli("prepare", cwd=outside)
    assert result.exit_code == 1
    assert "no ar workspace" in result.output
    result = cli("-C", tmp_path / "missing", "prepare")
    assert result.exit_code == 1
    assert "no such directory" in result.output


def test_help_lists_every_command_and_version(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("init", "prepare", "baseline", "iterate", "log", "revert"):
        assert command in result.output
    assert cli("--version").output.startswith("ar ")
