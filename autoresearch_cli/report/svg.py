"""The report's progress plot as inline SVG: no script, no network, one element per run.

It draws report/plot.py's `plot_data`, the numbers `ar log --plot` draws: each scored run
a faint dot (`circle.run`, with `data-id` and `data-val`, so a browser test can count and
check them), each commit its mean with its interval (`g.commit`), the kept chain as a step
line ending at the incumbent's mean, a band of two single-run noise deviations around it
(a run inside it differs from the best by luck), and failed runs as red crosses along the
bottom. Every text a model or a run wrote is escaped.
"""

from __future__ import annotations

import math
from html import escape

from autoresearch_cli.report.plot import PlotData

WIDTH, HEIGHT = 960, 380
LEFT, RIGHT, TOP, BOTTOM = 64, 190, 16, 40  # the legend sits right of the axes
COLORS = {"baseline": "#1f77b4", "keep": "#2ca02c", "other": "#9a9a9a"}
Y_TICKS = 6


class Scale:
    """Experiment ids and val_bpb to pixels."""

    def __init__(self, data: PlotData, noise: float | None):
        lows = [value for _, value in data.runs] + [p.mean - (p.half_width or 0) for p in data.commits]
        highs = [value for _, value in data.runs] + [p.mean + (p.half_width or 0) for p in data.commits]
        if data.best_mean is not None and noise:
            lows.append(data.best_mean - 2 * noise)
            highs.append(data.best_mean + 2 * noise)
        low, high = min(lows), max(highs)
        pad = (high - low) * 0.06 or 0.01
        self.low, self.high = low - pad, high + pad
        self.first, self.last = 1, max(data.last_x, 2)

    def x(self, experiment: float) -> float:
        span = WIDTH - LEFT - RIGHT
        return LEFT + span * (experiment - self.first) / max(self.last - self.first, 1)

    def y(self, value: float) -> float:
        span = HEIGHT - TOP - BOTTOM
        return TOP + span * (self.high - value) / (self.high - self.low)


def _f(value: float) -> str:
    return f"{value:.1f}"


def svg(data: PlotData, noise: float | None = None, runs_info: dict[int, str] | None = None) -> str:
    """The plot, or a short note when nothing is scored yet. `runs_info`: a title per run."""
    if not data.runs:
        return '<p class="empty">nothing to plot yet: no run has a val_bpb</p>'
    scale = Scale(data, noise)
    parts = [f'<svg class="progress" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} '
             f'{HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
             f'aria-label="val_bpb over the experiments">']
    parts += _axes(scale)
    parts += _noise_band(data, scale, noise)
    parts += _runs(data, scale, runs_info or {})
    parts += _commits(data, scale)
    parts += _best_line(data, scale)
    parts += _failed(data, scale)
    parts += _legend(noise)
    parts.append("</svg>")
    return "\n".join(parts)


def _axes(scale: Scale) -> list[str]:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<line class="axis" x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#444"/>',
             f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#444"/>']
    for index in range(Y_TICKS):
        value = scale.low + (scale.high - scale.low) * index / (Y_TICKS - 1)
        y = _f(scale.y(value))
        parts.append(f'<line x1="{LEFT}" y1="{y}" x2="{right}" y2="{y}" stroke="#eee"/>'
                     f'<text x="{LEFT - 6}" y="{y}" text-anchor="end" dominant-baseline="middle" '
                     f'font-size="11">{value:.4f}</text>')
    step = max(1, _nice(scale.last / 10))
    for experiment in range(step, scale.last + 1, step):
        x = _f(scale.x(experiment))
        parts.append(f'<text x="{x}" y="{bottom + 16}" text-anchor="middle" font-size="11">'
                     f'{experiment}</text>')
    parts.append(f'<text x="{(LEFT + right) / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle" '
                 f'font-size="12">experiment #</text>')
    parts.append(f'<text x="14" y="{(TOP + bottom) / 2:.0f}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(TOP + bottom) / 2:.0f})">val_bpb (lower is better)</text>')
    return parts


def _nice(raw: float) -> int:
    """A tick step of 1, 2 or 5 times a power of ten, near `raw`."""
    if raw <= 1:
        return 1
    power = 10 ** math.floor(math.log10(raw))
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def _noise_band(data: PlotData, scale: Scale, noise: float | None) -> list[str]:
    if data.best_mean is None or not noise or not data.best_line:
        return []
    top, bottom = scale.y(data.best_mean + 2 * noise), scale.y(data.best_mean - 2 * noise)
    x0 = scale.x(data.best_line[-1][0])
    return [f'<rect class="noise" x="{_f(x0)}" y="{_f(top)}" width="{_f(WIDTH - RIGHT - x0)}" '
            f'height="{_f(bottom - top)}" fill="#2ca02c" fill-opacity="0.08" data-sigma="{noise!r}">'
            f'<title>the best ± 2 × {noise:.4f} (one run\'s noise): a single run in here is luck'
            f'</title></rect>']


def _runs(data: PlotData, scale: Scale, info: dict[int, str]) -> list[str]:
    return [f'<circle class="run" data-id="{run_id}" data-val="{value!r}" cx="{_f(scale.x(run_id))}" '
            f'cy="{_f(scale.y(value))}" r="2.6" fill="#bdbdbd" fill-opacity="0.8">'
            f'<title>#{run_id} {value:.6f} {escape(info.get(run_id, ""))}</title></circle>'
            for run_id, value in data.runs]


def _commits(data: PlotData, scale: Scale) -> list[str]:
    parts = []
    for point in sorted(data.commits, key=lambda p: p.kind != "other"):  # others underneath
        color = COLORS[point.kind]
        x, y = _f(scale.x(point.x)), _f(scale.y(point.mean))
        half = point.half_width or 0.0
        parts.append(
            f'<g class="commit" data-sha="{point.sha}" data-kind="{point.kind}" '
            f'data-mean="{point.mean!r}" data-half-width="{half!r}" data-runs="{point.runs}">'
            f'<line x1="{x}" x2="{x}" y1="{_f(scale.y(point.mean + half))}" '
            f'y2="{_f(scale.y(point.mean - half))}" stroke="{color}" stroke-width="1.5"/>'
            f'<circle cx="{x}" cy="{y}" r="{5 if point.kind != "other" else 3.5}" fill="{color}" '
            f'stroke="{"#222" if point.kind != "other" else color}"/>'
            f'<title>#{point.x} {escape(point.label)}: {point.mean:.6f} ± {half:.4f} '
            f'({point.runs} runs)</title></g>')
    return parts


def _best_line(data: PlotData, scale: Scale) -> list[str]:
    if not data.best_line:
        return []
    points = list(data.best_line) + [(max(data.last_x, data.best_line[-1][0]), data.best_line[-1][1])]
    path = [f"M{_f(scale.x(points[0][0]))},{_f(scale.y(points[0][1]))}"]
    for x, y in points[1:]:  # a step: along to the next kept step, then down to its mean
        path.append(f"H{_f(scale.x(x))}V{_f(scale.y(y))}")
    return [f'<path class="best-line" d="{"".join(path)}" fill="none" stroke="#2ca02c" '
            f'stroke-width="1.6" data-best="{data.best_mean!r}"/>']


def _failed(data: PlotData, scale: Scale) -> list[str]:
    y = HEIGHT - BOTTOM
    return [f'<path class="failed" data-id="{run_id}" d="M{_f(scale.x(run_id) - 4)},{y - 4}'
            f'l8,8m0,-8l-8,8" stroke="#d62728" stroke-width="1.5"><title>#{run_id} failed'
            f'</title></path>' for run_id in data.failed]


def _legend(noise: float | None) -> list[str]:
    x = WIDTH - RIGHT + 16
    items = [("#bdbdbd", "single runs"), (COLORS["baseline"], "baseline (mean ± 95%)"),
             (COLORS["keep"], "kept (mean ± 95%)"), (COLORS["other"], "other commits (mean)"),
             ("#2ca02c", "best: the kept chain"), ("#d62728", "failed runs")]
    if noise:
        items.append(("#cfe8cf", "best ± 2 × noise"))
    parts = []
    for index, (color, label) in enumerate(items):
        y = TOP + 10 + index * 18
        parts.append(f'<rect x="{x}" y="{y - 5}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 16}" y="{y + 4}" font-size="11">{escape(label)}</text>')
    return parts
