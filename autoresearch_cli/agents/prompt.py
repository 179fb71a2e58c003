"""The messages an llm agent sends: program.md, the reply format, train.py, the history,
and the follow-ups when a reply cannot be used (agents/llm.py)."""

from __future__ import annotations

import re
from typing import Any

from autoresearch_cli.agents import memory
from autoresearch_cli.agents.base import History, HistoryItem

REPLY_FORMAT = """\
# How to reply

You change train.py, the only file you may edit; prepare.py, program.md and ar.toml are
fixed. Each reply is one experiment: one idea, trained for the fixed time budget and kept
only if val_bpb (lower is better) beats the best so far.

Reply with one line

Description: <what you change and why, in under 100 characters>

followed by either SEARCH/REPLACE blocks (preferred: short and exact)

train.py
<<<<<<< SEARCH
lines copied from the current train.py, exactly, indentation and comments included
=======
the lines that replace them
>>>>>>> REPLACE

or the complete new train.py in one ```python fenced block.

Rules for SEARCH/REPLACE blocks:
- The SEARCH lines must match exactly one place in train.py; include a few neighbouring
  lines when a line occurs more than once.
- Keep blocks small: only the lines that change plus enough context to be unique.
- Blocks are applied in order; use several blocks for changes in several places.
- Never leave code out with "..." in a whole-file reply.
"""

REPAIR_ADVICE = "Fix it if it is something simple, otherwise try something else."
ELIDED_TEXT = "... {count} experiments elided ..."
FAILURE_TAIL_CHARS = 4000
DESCRIPTION_CHARS = 120
KEEP_FIRST = 3
KEEP_BEST = 5
GROUP_AFTER = 12  # experiments: beyond this the prompt groups them, and lists the latest
RECENT = 6  # rows listed one by one under the groups
# A reply that says the research is over, instead of proposing the next experiment.
FINISHED = re.compile(r"\b(?:i am|i'm|we are|we're|research is|work is|all)\s+(?:done|finished|"
                      r"complete)\b|\bno (?:further|more) (?:experiments?|changes?|ideas?)\b|"
                      r"\bnothing (?:more|else) to (?:try|do|change)\b|\b(?:stop|end) (?:here|now)\b",
                      re.IGNORECASE)
NOT_FINISHED = ("The research does not end until the human stops it: there is no finished "
                "state to reach, and every reply must be the next experiment. Propose one now: "
                "a Description line and your edits to train.py as shown above. If small "
                "tweaks stopped paying, try a larger change.")


def build_messages(program_md: str, train_py: str, history: History,
                   failure: str | None, max_history_chars: int = 6000) -> list[dict[str, str]]:
    """The chat messages for one proposal: system = instructions, user = the state.

    The order matters for prompt caching: the system message is the same for every
    proposal (until the human edits program.md), so it comes first and whole."""
    system = program_md.rstrip() + "\n\n" + REPLY_FORMAT
    parts = [line for line in (memory.parent_line(history),) if line]
    parts.append(f"The current train.py:\n\n```python\n{train_py.rstrip()}\n```")
    parts.append(history_section(history, max_history_chars))
    if failure:
        parts.append(failure_section(failure))
    else:
        parts.append("Propose the next experiment.")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def mark_cacheable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with the system message (program.md and the reply rules: the part that
    is the same for every proposal) as a text block marked for the provider's prompt cache,
    in the content-block form Anthropic takes and litellm passes on."""
    marked = []
    for message in messages:
        if message["role"] == "system" and isinstance(message["content"], str):
            message = {**message, "content": [{"type": "text", "text": message["content"],
                                               "cache_control": {"type": "ephemeral"}}]}
        marked.append(message)
    return marked


def message_text(message: dict[str, Any]) -> str:
    """A message's text, whether its content is a string or a list of text blocks."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if isinstance(block, dict))


def sounds_finished(reply: str) -> bool:
    """Whether a reply says the research is over instead of proposing an experiment."""
    return bool(FINISHED.search(reply or ""))


def retry_message(problem: str) -> str:
    return (f"Your reply could not be used: {problem}\n\n"
            "None of its edits were applied. Reply again with the Description line and all "
            "of your edits, made against train.py as shown above.")


def repeat_followup(problem: str) -> str:
    return (f"Your proposal was turned back before any training: {problem}.\n\n"
            "None of its edits were applied. Propose a different experiment, one that was not "
            "tried: a Description line and your edits, made against train.py as shown above.")


def failure_section(failure: str) -> str:
    tail = failure.strip()
    if len(tail) > FAILURE_TAIL_CHARS:
        tail = "...\n" + tail[-FAILURE_TAIL_CHARS:]
    return f"The last proposal failed:\n\n```\n{tail}\n```\n\n{REPAIR_ADVICE}"


def history_section(history: History, max_chars: int = 6000) -> str:
    """The experiments so far, cut to about `max_chars`, then the failures, a plateau
    line when nothing was kept for a while, and the best.

    Each commit's val_bpb is the mean of its runs, the number the keep test reads; the
    header says how far runs of one commit spread, so that a model can tell a real step
    from a lucky run. Up to GROUP_AFTER experiments they are listed one per line; beyond,
    grouped by what each change touched (agents/memory.py) with the latest RECENT rows.
    """
    if not history.items:
        return "No experiments have run yet."
    summary = _summary(history)
    extra = [text for text in (memory.failures_section(history), memory.plateau_line(history))
             if text]
    budget = max_chars - len(summary) - sum(len(text) + 2 for text in extra)
    if len(history.items) > GROUP_AFTER:
        ideas = memory.ideas_section(history)
        table = _table(history, history.items[-RECENT:], budget - len(ideas),
                       f"The latest {RECENT} experiments, one line per commit")
        body = [ideas, table] if ideas else [table]
    else:
        body = [_table(history, history.items, budget, "Experiments so far, one line per commit")]
    return "\n\n".join([*body, *extra, summary])


def _table(history: History, items: list[HistoryItem], budget: int, title: str) -> str:
    rows = [_row(item) for item in items]
    header = "\n".join([f"{title} (val_bpb: the mean over its runs; vs parent: that mean minus "
                        "its parent's, negative is better; gain: how much lower its runs were "
                        "than those of the best it was judged against, on the same seeds).",
                        _noise_line(history),
                        "id | outcome | val_bpb (runs) | vs parent | gain (pairs) | description | why"])
    chosen = _choose_rows(items, rows, budget - len(header))
    lines = [header]
    previous = -1
    for index in chosen:
        if index > previous + 1:
            lines.append(ELIDED_TEXT.format(count=index - previous - 1))
        lines.append(rows[index])
        previous = index
    if previous < len(rows) - 1:
        lines.append(ELIDED_TEXT.format(count=len(rows) - 1 - previous))
    return "\n".join(lines)


def _noise_line(history: History) -> str:
    if history.noise is None:
        return ("The noise between runs is not measured yet: treat any single difference "
                "with caution.")
    return (f"Runs of one commit with different seeds differ by about {history.noise:.4f} "
            f"val_bpb (measured over {history.noise_df} degrees of freedom): a single-run "
            f"difference smaller than about {2 * history.noise:.4f} is luck, not a result. "
            "A change is kept only when the keep test shows it better over its runs.")


def _row(item: HistoryItem) -> str:
    val_bpb = "-" if item.val_bpb is None else f"{item.val_bpb:.6f} ({item.runs})"
    delta = "-" if item.delta is None else f"{item.delta:+.6f}"
    gain = "-" if item.gain is None else f"{item.gain:+.4f} ({item.pairs or 'unpaired'})"
    return (f"{item.experiment_id} | {item.status} | {val_bpb} | {delta} | {gain} | "
            f"{_clip(item.description)} | {_clip(item.reason or '')}")


def _clip(text: str) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= DESCRIPTION_CHARS else text[:DESCRIPTION_CHARS - 3] + "..."


def _summary(history: History) -> str:
    text = f"{len(history.items)} experiments in all"
    best = history.best
    if best is not None and best.val_bpb is not None:
        text += (f"; the best (the commit every change is judged against) is "
                 f"{best.experiment_id}: {best.val_bpb:.6f} over {best.runs} run"
                 f"{'s' * (best.runs != 1)}")
    return text + "."


def _choose_rows(history: list[HistoryItem], rows: list[str], budget: int) -> list[int]:
    """Indices of the rows to show, in order: all of them when they fit."""
    if sum(len(row) + 1 for row in rows) <= budget:
        return list(range(len(rows)))
    scored = [index for index, item in enumerate(history) if item.val_bpb is not None]
    best = sorted(scored, key=lambda index: history[index].val_bpb)[:KEEP_BEST]
    chosen = set(range(min(KEEP_FIRST, len(rows)))) | set(best) | {len(rows) - 1}
    marker = len(ELIDED_TEXT) + 8
    used = sum(len(rows[index]) + 1 + marker for index in chosen)
    for index in range(len(rows) - 1, -1, -1):
        if index in chosen:
            continue
        cost = len(rows[index]) + 1
        if used + cost > budget:
            break
        chosen.add(index)
        used += cost
    return sorted(chosen)
