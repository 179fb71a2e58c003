"""Every git call ar makes goes through this module.

Commits use a fixed `ar` identity and ignore the user's hooks and signing settings, so a
workspace behaves the same on every machine whatever the user's git config says.
"""

from __future__ import annotations

import os
from pathlib import Path

from autoresearch_cli.errors import GitError

AR_NAME = "ar"
AR_EMAIL = "ar@localhost"
DISCARDED_PREFIX = "refs/ar/discarded/"

_CONFIG = (
    "-c", f"user.name={AR_NAME}",
    "-c", f"user.email={AR_EMAIL}",
    "-c", "commit.gpgsign=false",
    "-c", "core.hooksPath=/dev/null",
    "-c", "advice.detachedHead=false",
)  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_AUTHOR_NAME=AR_NAME,
        GIT_AUTHOR_EMAIL=AR_EMAIL,
        GIT_COMMITTER_NAME=AR_NAME,
        GIT_COMMITTER_EMAIL=AR_EMAIL,
        GIT_TERMINAL_PROMPT="0",
    )
    return env


def git(cwd: Path, *args: str, check: bool = True) -> str:
    """Run one git command in `cwd` and return its stdout, stripped."""
    import git as gitpython  # lazy: importing GitPython costs ~0.1 s

    try:
        return gitpython.Git(str(cwd)).execute(
            ["git", *_CONFIG, *args], env=_env(), strip_newline_in_stdout=True
        )
    except gitpython.GitCommandError as exc:
        if not check:
            return ""
        detail = (exc.stderr or "").strip().replace("\n", " ")
        raise GitError(f"git {' '.join(args[:2])} failed: {detail or exc}") from None


def init(path: Path, branch: str) -> None:
    git(path, "init", "--quiet", "--initial-branch", branch)


def commit_all(repo: Path, message: str) -> str:
    """Stage everything tracked or new (respecting .gitignore), commit, return the sha."""
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return rev_parse(repo, "HEAD")


def commit_file(repo: Path, relpath: str, message: str) -> str:
    git(repo, "add", "--", relpath)
    git(repo, "commit", "--quiet", "-m", message)
    return rev_parse(repo, "HEAD")


def rev_parse(repo: Path, rev: str) -> str:
    return git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")


def try_rev_parse(repo: Path, rev: str) -> str | None:
    out = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    return out or None


def current_branch(repo: Path) -> str | None:
    out = git(repo, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    return out or None


def checkout_new_branch(repo: Path, branch: str) -> None:
    git(repo, "checkout", "--quiet", "-b", branch)


def update_ref(repo: Path, ref: str, new_sha: str, expected_old: str | None) -> None:
    """Move `ref` to `new_sha` only if it still points at `expected_old` (compare-and-swap)."""
    args = ["update-ref", "-m", "ar", ref, new_sha]
    if expected_old is not None:
        args.append(expected_old)
    git(repo, *args)


def show_file(repo: Path, sha: str, relpath: str) -> bytes | None:
    """The bytes of `relpath` at commit `sha`, or None if it is not there."""
    import git as gitpython

    try:
        return gitpython.Git(str(repo)).execute(
            ["git", "show", f"{sha}:{relpath}"], env=_env(), stdout_as_string=False,
            strip_newline_in_stdout=False,
        )
    except gitpython.GitCommandError:
        return None


def merge_file(base: str, ours: str, theirs: str) -> tuple[str, int]:
    """Three-way merge of one file's texts: (the merged text, the number of conflicts)."""
    import tempfile

    import git as gitpython

    with tempfile.TemporaryDirectory(prefix="ar-merge-") as tmp:
        paths = []
        for name, text in (("ours", ours), ("base", base), ("theirs", theirs)):
            path = Path(tmp) / name
            path.write_text(text)
            paths.append(str(path))
        status, merged, _ = gitpython.Git(tmp).execute(
            ["git", "merge-file", "-p", "--quiet", *paths], env=_env(),
            with_extended_output=True, with_exceptions=False, strip_newline_in_stdout=False)
    if status < 0:
        raise GitError(f"git merge-file failed with status {status}")
    return merged, status


def diff(repo: Path, old_sha: str, new_sha: str, relpath: str = "train.py") -> str:
    """The unified diff of `relpath` from `old_sha` to `new_sha` (empty when the same)."""
    return git(repo, "diff", "--no-color", "--no-ext-diff", old_sha, new_sha, "--", relpath)


COMMIT_MARK = "@@ar-commit "  # starts each commit's part of `git show`'s output below


def own_diffs(repo: Path, shas: list[str], relpath: str = "train.py") -> dict[str, tuple[str, str]]:
    """Each commit's diff of `relpath` against its first parent, in one git call:
    {sha: (parent sha, diff)} (a root commit has parent "")."""
    if not shas:
        return {}
    out = git(repo, "show", "--no-color", "--no-ext-diff", "--first-parent", "-p",
              f"--format={COMMIT_MARK}%H %P", *shas, "--", relpath)
    found = {}
    for part in out.split(COMMIT_MARK)[1:]:
        head, _, body = part.partition("\n")
        sha, *parents = head.split()
        found[sha] = (parents[0] if parents else "", body.strip("\n"))
    return found


def changed_files(repo: Path, old_sha: str, new_sha: str) -> list[str]:
    out = git(repo, "diff", "--name-only", old_sha, new_sha)
    return [line for line in out.splitlines() if line]


def short(sha: str | None) -> str:
    return (sha or "")[:7]


def worktree_add(repo: Path, path: Path, sha: str) -> None:
    git(repo, "worktree", "add", "--detach", "--quiet", str(path), sha)


def worktree_remove(repo: Path, path: Path) -> None:
    """Remove a worktree; tolerate one that is half gone (a killed run)."""
    git(repo, "worktree", "remove", "--force", str(path), check=False)
    if path.exists():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    git(repo, "worktree", "prune", check=False)


def refs(repo: Path, prefix: str) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", prefix)
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def delete_ref(repo: Path, ref: str) -> None:
    git(repo, "update-ref", "-d", ref, check=False)


def sync_checkout(repo: Path, branch: str, old_sha: str, new_sha: str) -> bool:
    """After `branch` moved from old_sha to new_sha, bring the workspace's own checkout
    along if it is on that branch. A file the user changed by hand is left alone (the
    fast-forward of the index and files is refused); returns whether it synced."""
    if current_branch(repo) != branch:
        return False
    try:
        git(repo, "read-tree", "-m", "-u", old_sha, new_sha)
    except GitError:
        return False
    return True
