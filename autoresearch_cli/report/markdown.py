"""The report as Markdown, fit for a pull request's description: the same Report
(report/facts.py) as the HTML page, the numbers rounded the same way, no plot.

Text a model or a run wrote is put on one line and its table-breaking characters escaped;
diffs go in fenced blocks whose fence is longer than any run of backticks inside.
"""

from __future__ import annotations

import re

from autoresearch_cli.report.facts import Headline, Report
from autoresearch_cli.research.evidence import Gain


def _text(value: str | None) -> str:
    """One line that cannot break a table or start markup of its own."""
    text = " ".join((value or "").split())
    return re.sub(r"([\\|`*_<>\[\]])", r"\\\1", text)


def _gain(found: Gain | None) -> str:
    if found is None:
        return "-"
    spread = f" ± {found.half_width:.4f}" if found.half_width is not None else ""
    paired = f"{found.paired} seeds paired" if found.paired else "means compared"
    return f"{found.value:+.6f}{spread} ({found.percent:+.2f}%, {paired})"


def _mean(commit) -> str:
    if commit is None or commit.mean is None:
        return "-"
    spread = f" ± {commit.half_width:.4f}" if commit.half_width is not None else ""
    return f"{commit.mean:.6f}{spread} ({commit.n} runs)"


def _headline(line: Headline) -> str:
    return f"| {line.split} | {_mean(line.baseline)} | {_mean(line.best)} | {_gain(line.gain)} |"


def _fenced(text: str, language: str = "diff") -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def markdown(report: Report) -> str:
    facts = report.summary
    lines = [f"## {_text(report.title)}: what the research found", "",
             f"{facts['experiments']} runs: {facts['kept']} kept, {facts['discarded']} discarded, "
             f"{facts['failed']} failed, {facts['invalid']} invalid.", "",
             "| split | baseline | best | paired gain (± 95%) |", "|---|---|---|---|",
             _headline(report.val), _headline(report.holdout), ""]
    if report.optimism is not None:
        lines += [f"The holdout is never used for a decision: the val gain exceeds it by "
                  f"{report.optimism:+.6f} val_bpb (the optimism of selecting on val).", ""]
    lines += [f"_{_text(line)}_" for line in report.noise] + [""]
    lines += _steps(report) + _ablations(report) + _transfers(report) + _failures(report)
    lines += _costs(report)
    if report.whole_diff:
        lines += ["", "<details><summary>The whole change: baseline → best train.py</summary>",
                  "", _fenced(report.whole_diff), "", "</details>"]
    return "\n".join(lines).rstrip() + "\n"


def _steps(report: Report) -> list[str]:
    if not report.steps:
        return ["No kept step: the best is the baseline.", ""]
    lines = ["### Kept steps", "", "| # | commit | mean val_bpb | runs | paired gain | share | description |",
             "|---|---|---|---|---|---|---|"]
    for step in report.steps:
        row = step.row
        spread = f" ± {row['improvement_half_width']:.4f}" if row["improvement_half_width"] else ""
        gain = f"{row['improvement']:+.6f}{spread}" if row["improvement"] is not None else "-"
        share = (f"{100 * step.ablation.share:.1f}%" if step.ablation and step.ablation.share
                 is not None else "-")
        mean = f"{row['val_bpb']:.6f}" if row["val_bpb"] is not None else "-"
        lines.append(f"| #{row['id']} | `{row['commit']}` | {mean} | {row['runs']} | {gain} | "
                     f"{share} | {_text(row['description'])} |")
    return [*lines, ""]


def _ablations(report: Report) -> list[str]:
    if not report.ablations:
        return []
    lines = ["### Which steps carry the gain", "", "| removed step | without it | the step carries | share |",
             "|---|---|---|---|"]
    for found in report.ablations:
        label = f"#{found.step.id} {_text(found.step.description)}"
        if found.carried is None or found.variant is None:
            lines.append(f"| {label} | {_text(found.why_not or 'no scored run yet')} | - | - |")
            continue
        share = f"{100 * found.share:.1f}%" if found.share is not None else "-"
        lines.append(f"| {label} | {_mean(found.variant)} | {_gain(found.carried)} | {share} |")
    return [*lines, ""]


def _transfers(report: Report) -> list[str]:
    if not report.transfers:
        return []
    lines = ["### At another budget", "", "| class | gain there | gain at the profile's budget | verdict |",
             "|---|---|---|---|"]
    for found in report.transfers:
        ratio = f" ({found.ratio:.2f}×)" if found.ratio is not None else ""
        lines.append(f"| {_text(found.slot_class)} | {_gain(found.gain)} | {_gain(found.reference)} | "
                     f"**{found.verdict}**{ratio} |")
    return [*lines, ""]


def _failures(report: Report) -> list[str]:
    if not report.failures:
        return []
    lines = ["### Failures, by reason", "", "| runs | outcome | reason |", "|---|---|---|"]
    lines += [f"| {len(group.ids)} | {group.word} | {_text(group.reason)} |" for group in report.failures]
    return [*lines, ""]


def _costs(report: Report) -> list[str]:
    costs, llm = report.costs, report.costs.llm
    per_usd, per_hour = costs.per_centibit(llm.usd), costs.per_centibit(costs.machine_hours)
    per = (f"; per 0.01 val_bpb gained: ${per_usd:.4f} and {per_hour:.3f} machine hours"
           if per_usd is not None and per_hour is not None else "")
    return ["### Cost", "",
            f"{llm.calls} model calls, {llm.prompt_tokens:,} prompt and {llm.completion_tokens:,} "
            f"completion tokens, ${llm.usd:.4f}" + (f" (+{llm.unpriced} unpriced)" if llm.unpriced else "")
            + f"; {costs.machine_hours:.3f} machine hours ({costs.training_hours:.3f} training){per}."]
