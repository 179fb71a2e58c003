"""`ar log --plot FILE`: val_bpb over the experiments, drawn from the evidence; `plot_data`
is also what the report's inline SVG draws (report/svg.py).

Each run is a faint dot; each commit with a score is its mean with its interval, at the
experiment that made it (kept commits in green, the baseline in blue, others grey); the
best is a step line through the kept chain's means, ending at the incumbent's mean, the
number every decision read; failed runs are red crosses along the bottom. The legend sits
outside the axes, so no point hides under it. Runs at another budget (`ar transfer`) are
not progress and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autoresearch_cli.doors.records import FAILED, NEW_COMMIT_KINDS, at_other_budget
from autoresearch_cli.errors import ArError
from autoresearch_cli.research.evidence import Evidence


@dataclass
class CommitPoint:
    x: int  # the experiment that made the commit (its first baseline run for the baseline)
    sha: str
    mean: float
    half_width: float | None
    runs: int
    kind: str  # baseline | keep | other
    label: str


@dataclass
class PlotData:
    runs: list[tuple[int, float]] = field(default_factory=list)  # every scored run drawn
    commits: list[CommitPoint] = field(default_factory=list)
    best_line: list[tuple[int, float]] = field(default_factory=list)  # (x, mean) steps
    failed: list[int] = field(default_factory=list)
    best_sha: str | None = None
    best_mean: float | None = None
    last_x: int = 0


def plot_data(evidence: Evidence) -> PlotData:
    """What the plot draws, as numbers (tested without drawing)."""
    data = PlotData(last_x=max((run.id for run in evidence.runs), default=0))
    data.runs = [(run.id, run.val_bpb) for run in evidence.runs  # type: ignore[misc]
                 if run.scored and not at_other_budget(run.slot_class)]
    data.failed = [run.id for run in evidence.runs if run.status in FAILED]
    seen: set[str] = set()
    for run in evidence.runs:
        first_baseline = run.kind == "baseline" and run.sha == evidence.baseline_sha
        if not run.scored or run.sha in seen or not (first_baseline or run.kind in NEW_COMMIT_KINDS):
            continue
        seen.add(run.sha)  # type: ignore[arg-type]
        commit = evidence.commit_of(run)
        if commit is None or commit.mean is None:
            continue
        kind = "baseline" if first_baseline else ("keep" if evidence.is_keep(run) else "other")
        data.commits.append(CommitPoint(run.id, commit.sha, commit.mean, commit.half_width,
                                        commit.n, kind, (run.description or "")[:40]))
    for step in evidence.chain():
        made = evidence.proposer(step.sha)
        if made is not None and step.mean is not None:
            data.best_line.append((made.id, step.mean))
    best = evidence.best()
    if best is not None:
        data.best_sha, data.best_mean = best.sha, best.mean
    return data


STYLE = {"baseline": ("#1f77b4", "baseline (mean ± 95%)"),
         "keep": ("#2ca02c", "kept (mean ± 95%)"),
         "other": ("#9a9a9a", "discarded or pending (mean)")}


def plot_progress(evidence: Evidence, path: str | Path) -> Path:
    """Write a PNG (or any format matplotlib knows by the suffix) of the progress."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ArError("plotting needs matplotlib: pip install 'ar[plot]'") from exc
    data = plot_data(evidence)
    if not data.runs:
        raise ArError("nothing to plot yet: no experiment has a val_bpb")
    figure = Figure(figsize=(12, 5.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    _draw(axes, data)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("experiment #")
    axes.set_ylabel("val_bpb (lower is better)")
    kept = sum(1 for point in data.commits if point.kind == "keep")
    best = f"; best {data.best_mean:.4f}" if data.best_mean is not None else ""
    axes.set_title(f"{len(evidence.runs)} runs, {len(data.commits)} commits, {kept} kept{best}")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    figure.tight_layout()
    target = Path(path)
    try:
        figure.savefig(target, dpi=150)
    except (OSError, ValueError) as exc:
        raise ArError(f"cannot write the plot to {target}: {exc}") from exc
    return target


def _draw(axes, data: PlotData) -> None:
    xs, ys = zip(*data.runs, strict=True)
    axes.scatter(xs, ys, s=8, color="#c8c8c8", alpha=0.6, label="single runs", zorder=1)
    for kind, (color, label) in STYLE.items():
        points = [point for point in data.commits if point.kind == kind]
        if not points:
            continue
        errors = [point.half_width or 0.0 for point in points]
        axes.errorbar([p.x for p in points], [p.mean for p in points], yerr=errors, fmt="o",
                      color=color, markersize=6 if kind != "other" else 4, capsize=3,
                      markeredgecolor="black" if kind != "other" else color, label=label,
                      zorder=3 if kind != "other" else 2)
        if kind == "keep":
            for point in points:
                if point.label:
                    axes.annotate(point.label, (point.x, point.mean), fontsize=7,
                                  xytext=(4, 4), textcoords="offset points", rotation=20,
                                  parse_math=False)
    if data.best_line:
        line_x = [x for x, _ in data.best_line] + [max(data.last_x, data.best_line[-1][0])]
        line_y = [y for _, y in data.best_line] + [data.best_line[-1][1]]
        axes.step(line_x, line_y, where="post", color="#2ca02c", linewidth=1.2,
                  label="best (the incumbent's mean)")
    if data.failed:  # on the bottom edge, in axes coordinates: a crash has no val_bpb
        axes.scatter(data.failed, [0.0] * len(data.failed), marker="x", s=24, color="#d62728",
                     label="failed", clip_on=False, transform=axes.get_xaxis_transform())
