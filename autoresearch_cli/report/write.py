"""`ar report`'s core: read the ledger (read-only: safe beside a running ar), build the
report, write the page and its Markdown summary side by side."""

from __future__ import annotations

from pathlib import Path

from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.doors.workspace import Workspace
from autoresearch_cli.report.facts import Report, build
from autoresearch_cli.report.markdown import markdown
from autoresearch_cli.report.page import page
from autoresearch_cli.research.evidence import Evidence
from autoresearch_cli.research.export import write_text_atomic


def read(ws: Workspace, ledger: Ledger | None = None, progress=None) -> Report:
    """The report as the ledger stands now (`ledger`: one already open, read-only)."""
    if ledger is None:
        with Ledger.for_workspace(ws.root, read_only=True) as opened:
            return read(ws, opened, progress)
    evidence = Evidence.load(ledger)
    return build(evidence, ledger.total_cost(), repo=ws.root, title=ws.branch, progress=progress)


def default_out(ws: Workspace) -> Path:
    return ws.state_dir / "report" / "report.html"


def write(ws: Workspace, out: Path | None = None) -> tuple[Path, Path]:
    """Write the page to `out` (default .ar/report/report.html) and the Markdown beside
    it (same name, .md); returns both paths."""
    report = read(ws)
    html_path = Path(out) if out is not None else default_out(ws)
    md_path = html_path.with_suffix(".md")
    for path, text in ((html_path, page(report)), (md_path, markdown(report))):
        write_text_atomic(path, text)
    return html_path, md_path
