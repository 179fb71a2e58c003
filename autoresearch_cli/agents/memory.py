"""What the llm agent remembers of the research, in a few lines. Pure functions, no I/O.

A model shown forty rows one by one loses the thread: it repeats ideas, forgets why
something failed, and keeps tweaking one constant while the best stands still. Once the
history is long the prompt carries instead:

- the ideas tried, grouped by what each change touched (agents/novelty.touched: the
  constants moved, the functions and classes rewritten), each group with its tries, its
  keeps and its best and latest results, with each one's paired gain over the best it
  was judged against;
- the failures, grouped by how they ended and why;
- a plateau line after PLATEAU_AFTER experiments without a keep, asking for a larger
  change;
- which commit this proposal builds on, when it is not the best.
"""

from __future__ import annotations

from collections import defaultdict

from autoresearch_cli.agents.base import History, HistoryItem
from autoresearch_cli.agents.novelty import touched

PLATEAU_AFTER = 5  # experiments without a keep before the prompt asks for a larger change
GROUP_EXAMPLES = 4  # results shown per group of ideas
FAILURE_KINDS = ("crash", "timeout", "oom", "invalid")
NEW_COMMITS = ("experiment", "repair", "combination")
NOT_RUN = "not run"
TEXT_CHARS = 70


def ideas_section(history: History) -> str:
    """The experiments grouped by what their change touched, biggest group first."""
    groups: dict[str, list[HistoryItem]] = defaultdict(list)
    for item in history.items:
        if item.kind in NEW_COMMITS:
            groups[_group_of(item, history)].append(item)
    if not groups:
        return ""
    lines = ["Ideas tried so far, grouped by what each change touched (val_bpb: the commit's "
             "mean over its runs; gain: how much lower its runs were than the best's it was "
             "judged against, on the same seeds; positive is better):"]
    for name, items in sorted(groups.items(), key=lambda entry: (-len(entry[1]), entry[0])):
        lines.append(_group_line(name, items))
    return "\n".join(lines)


def _group_of(item: HistoryItem, history: History) -> str:
    source, parent = history.train_py(item.sha), history.train_py(item.parent_sha)
    if source is None or parent is None:
        return NOT_RUN
    return ", ".join(touched(parent, source)) or "formatting only"


def _group_line(name: str, items: list[HistoryItem]) -> str:
    kept = sum(1 for item in items if item.status == "keep")
    head = f"- {name}: {len(items)} tr{'ies' if len(items) != 1 else 'y'}"
    head += f", {kept} kept" if kept else ", none kept"
    shown = _examples(items)
    parts = [_example(item) for item in shown]
    if len(items) > len(shown):
        parts.append(f"{len(items) - len(shown)} more")
    return head + ": " + "; ".join(parts)


def _examples(items: list[HistoryItem]) -> list[HistoryItem]:
    """The keeps, then the lowest levels, then the latest, GROUP_EXAMPLES at most, in order."""
    chosen: list[HistoryItem] = [item for item in items if item.status == "keep"]
    scored = sorted((item for item in items if item.level is not None),
                    key=lambda item: item.level)  # type: ignore[arg-type, return-value]
    for item in [*scored, *reversed(items)]:
        if len(chosen) >= GROUP_EXAMPLES:
            break
        if item not in chosen:
            chosen.append(item)
    order = {id(item): index for index, item in enumerate(items)}
    return sorted(chosen[:GROUP_EXAMPLES], key=lambda item: order[id(item)])


def _example(item: HistoryItem) -> str:
    text = f"#{item.experiment_id} {_clip(item.description)}: {item.status}"
    if item.val_bpb is not None:
        text += f" {item.val_bpb:.6f} ({item.runs} run{'s' * (item.runs != 1)}"
        if item.gain is not None:
            spread = f" ± {item.gain_half_width:.4f}" if item.gain_half_width is not None else ""
            text += f", gain {item.gain:+.4f}{spread}"
        text += ")"
    elif item.reason:
        text += f" ({_clip(item.reason)})"
    return text


def failures_section(history: History) -> str:
    """The experiments that failed, grouped by how they ended and why, latest first."""
    groups: dict[tuple[str, str], list[HistoryItem]] = defaultdict(list)
    for item in history.items:
        if item.status in FAILURE_KINDS:
            groups[(item.status, _clip(item.reason or "no reason recorded"))].append(item)
    if not groups:
        return ""
    lines = ["Failures (how each ended, why, and which experiments):"]
    latest = sorted(groups.items(), key=lambda entry: -_order(entry[1][-1]))
    for (status, reason), items in latest:
        ids = ", ".join(f"#{item.experiment_id}" for item in items[-5:])
        more = f" and {len(items) - 5} earlier" if len(items) > 5 else ""
        lines.append(f"- {status} x{len(items)} ({ids}{more}): {reason}")
    return "\n".join(lines)


def _order(item: HistoryItem) -> int:
    value = item.experiment_id
    return value if isinstance(value, int) else int(str(value).lstrip("#") or 0)


def plateau_line(history: History, after: int = PLATEAU_AFTER) -> str:
    """Said once `after` experiments in a row were not kept; empty before."""
    since: HistoryItem | None = None
    count = 0
    for item in history.items:
        if item.status in ("keep", "baseline"):
            since, count = item, 0
        elif item.kind in NEW_COMMITS and item.status != "running":
            count += 1
    if count < after:
        return ""
    where = f" (since #{since.experiment_id})" if since is not None and since.kind != "baseline" else ""
    return (f"No change has been kept in the last {count} experiments{where}: variations of "
            "what was tried are not moving the best. Propose a larger change: a different "
            "mechanism or part of the model, optimiser or schedule than the groups above, "
            "not another small tweak of the same constants.")


def parent_line(history: History) -> str:
    """Which commit the train.py shown is, when ar chose one other than the best."""
    parent, best = history.parent, history.best
    if parent is None or parent.role == "best":
        return ""
    what = {"keep": "an earlier keep", "baseline": "where the research started",
            "candidate": "a candidate that looked better but was not shown so"
            }.get(parent.role, parent.role)
    name = "the baseline" if parent.role == "baseline" else (
        f"#{parent.experiment_id}" if parent.experiment_id is not None else parent.sha[:7])
    level = f", val_bpb {parent.val_bpb:.6f} over {parent.runs} runs" if parent.val_bpb else ""
    best_text = ""
    if best is not None and best.val_bpb is not None:
        best_text = f" (the best is #{best.experiment_id}, {best.val_bpb:.6f})"
    return (f"The train.py below is {name}'s ({what}{level}), not the best's{best_text}: ar "
            "chose it to explore a branch the search has not exhausted. Your change to it is "
            "still judged against the best.")


def _clip(text: str | None, limit: int = TEXT_CHARS) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
