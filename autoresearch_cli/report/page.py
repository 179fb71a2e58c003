"""The report as one self-contained HTML page: inline CSS and SVG, no network, no script
(the live page adds one small polling script, report/serve.py).

The page is a sequence of sections, each a function of the Report (report/facts.py) to an
HTML fragment with an id; the live page replaces fragments by id when the ledger moves,
so a section is rendered the same way on the static and on the live page. Every number
carries its exact value in a `data-value` attribute beside the rounded text (a test reads
them back and compares them with `ar log --json`). Every text a model or a run wrote is
escaped; a Content-Security-Policy forbids any load from anywhere, in case one is not.
"""

from __future__ import annotations

from html import escape

from autoresearch_cli.doors.records import at_other_budget
from autoresearch_cli.report import svg
from autoresearch_cli.report.facts import Headline, Report
from autoresearch_cli.research.evidence import Gain

STATIC_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 9px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}th{background:#f6f6f6}.r{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.good{color:#1a7f37}.bad{color:#c62828}pre{background:#f7f7f7;padding:8px;
overflow:auto;font-size:12px;max-height:480px}.add{color:#1a7f37}.del{color:#c62828}
details{margin:4px 0}summary{cursor:pointer}.bar{background:#eee;width:120px;height:9px;display:inline-block}
.bar i{background:#2ca02c;height:9px;display:block}
"""


def number(field: str, value: float | None, digits: int = 6, signed: bool = False) -> str:
    """A number as text, its exact value in data-value (for tests and scripts)."""
    if value is None:
        return f'<span class="num muted" data-field="{field}">-</span>'
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return f'<span class="num" data-field="{field}" data-value="{value!r}">{text}</span>'


def _gain(field: str, found: Gain | None) -> str:
    if found is None:
        return '<span class="muted">-</span>'
    tone = "good" if found.value > 0 else "bad"
    spread = f" ± {number(field + '_half_width', found.half_width, 4)}" if found.half_width else ""
    paired = f", {found.paired} seeds paired" if found.paired else ", means compared"
    return (f'<span class="{tone}">{number(field, found.value, 6, signed=True)}</span>{spread} '
            f'<span class="muted">({found.percent:+.2f}%{paired})</span>')


def _headline_row(line: Headline) -> str:
    cells = [f"<th>{line.split}</th>"]
    for which, commit in (("baseline", line.baseline), ("best", line.best)):
        field = f"{line.split}_{which}"
        if commit is None or commit.mean is None:
            cells.append('<td class="muted">-</td>')
            continue
        spread = f" ± {commit.half_width:.4f}" if commit.half_width is not None else ""
        cells.append(f'<td class="r">{number(field, commit.mean)}{spread} '
                     f'<span class="muted">({commit.n} runs)</span></td>')
    cells.append(f'<td>{_gain(line.split + "_gain", line.gain)}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def summary_section(report: Report) -> str:
    facts = report.summary
    optimism = report.optimism
    told = ("" if optimism is None else
            f'<p>The holdout split is scored on every run and never used for a decision: the '
            f'val gain exceeds the holdout gain by {number("optimism", optimism, 6, signed=True)}'
            f' val_bpb, the optimism of selecting on val.</p>')
    best = (f' at <code>{escape((facts["best_sha"] or "")[:7])}</code> (#{facts["best_id"]})'
            if facts["best_sha"] else "")
    return (f'<p>{number("experiments", facts["experiments"], 0)} runs: '
            f'{number("kept", facts["kept"], 0)} kept, {facts["discarded"]} discarded, '
            f'{facts["failed"]} failed, {facts["invalid"]} invalid, {facts["interrupted"]} '
            f'interrupted, {facts["disturbed"]} disturbed{"; best" + best if best else ""}.</p>'
            '<table><tr><th>split</th><th>baseline</th><th>best</th><th>paired gain (± 95%)</th>'
            f'</tr>{_headline_row(report.val)}{_headline_row(report.holdout)}</table>{told}'
            + "".join(f'<p class="muted">{escape(line)}</p>' for line in report.noise))


def plot_section(report: Report) -> str:
    info = {run_id: report.class_names.get(run_id, "") for run_id, _ in report.plot.runs}
    hidden = sum(1 for name in report.class_names.values() if at_other_budget(name))
    note = (f'<p class="muted">{hidden} runs at another budget are not drawn (see Transfer).</p>'
            if hidden else "")
    return svg.svg(report.plot, report.noise_sigma, info) + note


def running_section(report: Report) -> str:
    if not report.running:
        return '<p class="muted">nothing running</p>'
    rows = []
    for run in report.running:
        percent = run.percent if run.percent is not None else 0.0
        loss = f"{run.loss:.4f}" if run.loss is not None else "-"
        rows.append(f'<tr class="running" data-id="{run.id}"><td>#{run.id}</td><td>{run.kind}</td>'
                    f'<td>{escape(run.status)}</td><td><span class="bar"><i style="width:'
                    f'{min(percent, 100):.0f}%"></i></span> {number("percent", run.percent, 1)}%'
                    f'</td><td>loss {loss}</td><td>{escape(run.description)}</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def decisions_section(report: Report) -> str:
    rows = [f'<tr class="decision" data-id="{row["id"]}"><td>#{row["id"]}</td>'
            f'<td>{escape(row["outcome"])}</td><td class="r">{number("val_bpb", row["val_bpb"])}</td>'
            f'<td class="r">{number("delta_bpb", row["delta_bpb"], 6, signed=True)}</td>'
            f'<td>{escape(row["description"])}</td></tr>' for row in report.latest]
    head = "<tr><th>#</th><th>outcome</th><th>val_bpb</th><th>Δ parent mean</th><th>description</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>" if rows else '<p class="muted">no run yet</p>'


def _diff(text: str) -> str:
    if not text:
        return '<p class="muted">no diff</p>'
    lines = []
    for line in text.splitlines():
        tone = "add" if line.startswith("+") and not line.startswith("+++") else (
            "del" if line.startswith("-") and not line.startswith("---") else "")
        lines.append(f'<span class="{tone}">{escape(line)}</span>' if tone else escape(line))
    return "<pre>" + "\n".join(lines) + "</pre>"


def steps_section(report: Report) -> str:
    if not report.steps:
        return '<p class="muted">no kept step yet: the best is the baseline</p>'
    parts = ["<table><tr><th>#</th><th>commit</th><th>mean val_bpb</th><th>runs</th>"
             "<th>keep test</th><th>paired gain over the step before</th><th>share of the gain"
             "</th><th>description</th></tr>"]
    for step in report.steps:
        row = step.row
        share = step.ablation.share if step.ablation else None
        parts.append(
            f'<tr class="step" data-id="{row["id"]}"><td>#{row["id"]}</td><td><code>'
            f'{escape(row["commit"] or "")}</code></td><td class="r">{number("step_mean", row["val_bpb"])}'
            f'{_pm(row["half_width"])}</td><td class="r">{row["runs"]}</td><td>{escape(row["test"])}</td>'
            f'<td class="r">{number("step_gain", row["improvement"], 6, signed=True)}'
            f'{_pm(row["improvement_half_width"])}</td><td class="r">{_share(share)}</td>'
            f'<td>{escape(row["description"])}</td></tr>')
    parts.append("</table>")
    for step in report.steps:
        parts.append(f'<details><summary>#{step.row["id"]} {escape(step.row["description"])}: '
                     f'its diff</summary>{_diff(step.diff)}</details>')
    return "".join(parts)


def _pm(half: float | None) -> str:
    return f' <span class="muted">± {half:.4f}</span>' if half is not None else ""


def _share(share: float | None) -> str:
    if share is None:
        return '<span class="muted">not ablated</span>'
    return number("share", 100 * share, 1) + "%"


def ablation_section(report: Report) -> str:
    if not report.ablations:
        return ('<p class="muted">no ablation yet: <code>ar ablate</code> runs the best without '
                'each kept step, paired on the same seeds, and fills this in</p>')
    rows = ["<tr><th>removed step</th><th>without it</th><th>the step carries (± 95%)</th>"
            "<th>share of the gain</th></tr>"]
    for found in report.ablations:
        label = f'#{found.step.id} {escape(found.step.description or "")}'
        if found.variant is None or found.carried is None:
            why = found.why_not or "no scored run yet"
            rows.append(f'<tr class="ablation" data-id="{found.step.id}"><td>{label}</td>'
                        f'<td colspan="3" class="muted">{escape(why)}</td></tr>')
            continue
        rows.append(f'<tr class="ablation" data-id="{found.step.id}"><td>{label}</td><td class="r">'
                    f'{number("ablated_mean", found.variant.mean)} ({found.variant.n} runs)</td>'
                    f'<td>{_gain("carried", found.carried)}</td><td class="r">{_share(found.share)}'
                    f'</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def transfer_section(report: Report) -> str:
    if not report.transfers:
        return ('<p class="muted">no transfer yet: <code>ar transfer --budget-factor K</code> '
                'runs the baseline and the best at K times the budget</p>')
    rows = ["<tr><th>class</th><th>baseline</th><th>best</th><th>gain there</th>"
            "<th>gain at the profile's budget</th><th>verdict</th></tr>"]
    for found in report.transfers:
        ratio = f" ({found.ratio:.2f}×)" if found.ratio is not None else ""
        rows.append(f'<tr class="transfer"><td>{escape(found.slot_class)}</td>'
                    f'<td class="r">{number("transfer_baseline", found.baseline.mean)} ({found.baseline.n})</td>'
                    f'<td class="r">{number("transfer_best", found.best.mean)} ({found.best.n})</td>'
                    f'<td>{_gain("transfer_gain", found.gain)}</td><td>{_gain("reference_gain", found.reference)}'
                    f'</td><td><b>{found.verdict}</b>{ratio}</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def failures_section(report: Report) -> str:
    if not report.failures:
        return '<p class="muted">no failed run</p>'
    rows = ["<tr><th>runs</th><th>outcome</th><th>reason</th><th>which</th></tr>"]
    for group in report.failures:
        ids = ", ".join(f"#{run_id}" for run_id in group.ids[:12]) + (" …" if len(group.ids) > 12 else "")
        rows.append(f'<tr class="failure"><td class="r">{len(group.ids)}</td><td>{escape(group.word)}'
                    f'</td><td>{escape(group.reason)}</td><td class="muted">{ids}</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def costs_section(report: Report) -> str:
    costs, llm = report.costs, report.costs.llm
    unpriced = f" (+{llm.unpriced} calls of unknown cost)" if llm.unpriced else ""
    per_usd, per_hour = costs.per_centibit(llm.usd), costs.per_centibit(costs.machine_hours)
    return ("<table>"
            f'<tr><th>model calls</th><td class="r">{number("llm_calls", llm.calls, 0)}</td></tr>'
            f'<tr><th>tokens (prompt / completion)</th><td class="r">{llm.prompt_tokens:,} / '
            f'{llm.completion_tokens:,}</td></tr>'
            f'<tr><th>model cost</th><td class="r">${number("cost_usd", llm.usd, 4)}{unpriced}</td></tr>'
            f'<tr><th>machine hours (training and scoring)</th><td class="r">'
            f'{number("machine_hours", costs.machine_hours, 3)} '
            f'<span class="muted">({costs.training_hours:.3f} training)</span></td></tr>'
            f'<tr><th>per 0.01 val_bpb gained</th><td class="r">'
            f'{"-" if per_usd is None else f"${per_usd:.4f}"} and '
            f'{"-" if per_hour is None else f"{per_hour:.3f}"} machine hours</td></tr></table>')


SECTIONS = (  # id, heading, renderer; the live page shows `running` and `decisions` too
    ("summary", "Baseline → best", summary_section),
    ("plot", "Progress", plot_section),
    ("running", "Running now", running_section),
    ("decisions", "Latest decisions", decisions_section),
    ("steps", "Kept steps", steps_section),
    ("ablation", "Which steps carry the gain (ablation)", ablation_section),
    ("transfer", "Does the gain hold with more training (transfer)", transfer_section),
    ("failures", "Failures, by reason", failures_section),
    ("costs", "Cost", costs_section),
    ("diff", "The whole change: baseline → best train.py", lambda report: _diff(report.whole_diff)),
)
LIVE_ONLY = ("running", "decisions")


def sections(report: Report, live: bool = False) -> dict[str, str]:
    """Each section's fragment by id (the live page's JSON carries these)."""
    return {name: render(report) for name, _, render in SECTIONS if live or name not in LIVE_ONLY}


def page(report: Report, live_script: str = "", policy: str = STATIC_POLICY,
         version: str = "", fragments: dict[str, str] | None = None) -> str:
    """The whole page; `live_script` (with its `policy`) makes it the live page.
    `fragments`: the sections already rendered (the live page's), else rendered here."""
    live = bool(live_script)
    fragments = fragments if fragments is not None else sections(report, live)
    body = [f'<section><h2>{heading}</h2><div id="{name}">{fragments[name]}</div></section>'
            for name, heading, _ in SECTIONS if live or name not in LIVE_ONLY]
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            '<link rel="icon" href="data:,">'
            f"<title>{escape(report.title)}: research report</title><style>{STYLE}</style></head>"
            f'<body data-version="{escape(version)}"><h1>{escape(report.title)}: what the research found</h1>'
            f'<p class="muted">generated {report.generated_at} from the ledger by ar '
            f'report{"; live: refreshes while ar iterate runs" if live else ""}</p>'
            + "".join(body) + live_script + "</body></html>")
