"""Where the bundled workspace template and default program.md live.

In a wheel they are shipped under autoresearch_cli/_bundled/; in a source checkout
(editable install, tests) they sit at the repository root.
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # autoresearch_cli/


def _locate(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / "_bundled" / name, _PACKAGE_DIR.parent / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"bundled resource {name!r} is missing from this installation")


def template_dir() -> Path:
    """The directory holding train.py and prepare.py for new workspaces."""
    return _locate("workspace_template")


def program_md() -> Path:
    """The default research instructions copied into new workspaces."""
    return _locate("program.md")
