"""What `ar baseline` and `ar iterate` show while they run.

On a terminal: a live panel (experiment k/N, a training progress bar for every running
experiment, the best as the keep test sees it: the incumbent's mean over its runs with
its interval, and its gain over the baseline's mean; keep/discard/crash counts, cost so
far). Elsewhere: a plain line when an experiment starts training and one when it ends,
and while a model answers a line every few seconds saying how far it has got, so a slow
model is not mistaken for a hung one. The best comes from `standing`, which reads the
evidence (research/evidence.py): the same best `ar log` prints.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from autoresearch_cli.doors.gitops import short
from autoresearch_cli.doors.text import printable

PLAIN_ANSWER_EVERY_S = 5.0  # between plain "model answering" lines


def _fmt_bpb(value: float | None) -> str:
    return f"{value:.6f}" if value is not None else "-"


def answer_line(tokens: int, seconds: float) -> str:
    """How far the model has got with its reply."""
    if tokens == 0:
        return f"  waiting for the model: {seconds:.0f} s, no token yet"
    return f"  model answering: {tokens} token{'s' if tokens != 1 else ''}, {seconds:.0f} s"


# What a run's line says it led to (decide.py's actions), when not its status.
ACTION_WORDS = {"keep": "keep", "discard": "discard", "confirm": "confirm", "rerun": "disturbed",
                "repair": None, "wait": "waiting", "record": "measured", "done": None}


def outcome_line(exp_id: int, result: dict[str, Any], word: str, description: str) -> str:
    bpb = _fmt_bpb(result.get("val_bpb"))
    reason = f"  ({result['reason']})" if result.get("reason") and word != "keep" else ""
    return f"#{exp_id:<4d} {word:9s} val_bpb {bpb:>9s}  {description}{reason}"


def standing_text(standing: tuple[Any, Any]) -> str:
    """`best 1.940000 ± 0.0110 (3 runs), -0.013700 vs baseline 1.953700 (5 runs)`."""
    start, best = standing
    if best is None or best.mean is None:
        return "best -"
    text = f"best {best.describe()}"
    if start is not None and start.mean is not None and start.sha != best.sha:
        text += f", {best.mean - start.mean:+.6f} vs baseline {start.describe()}"
    return text


class Display:
    """Receives the core's events; renders them live on a terminal, plainly otherwise."""

    def __init__(self, live: bool | None = None, cost=None, standing=None):
        self.live = sys.stdout.isatty() if live is None else live
        self.cost = cost or (lambda: None)
        self.standing = standing or (lambda: (None, None))  # (baseline, best) evidence
        self.descriptions: dict[int, str] = {}
        self.counts = {"keep": 0, "discard": 0, "crash": 0, "invalid": 0}
        self.best_text = standing_text(self.standing())
        self.header = ""
        self.answer = ""  # how far the model has got, while it answers
        self._answer_printed_at: float | None = None
        self._answer_tokens_printed = False
        self._progress = None
        self._tasks: dict[int, Any] = {}  # a progress bar per running experiment
        self._live = None

    # --- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Display:
        if self.live:
            from rich.live import Live
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
            )
            self._live = Live(self._render(), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    # --- events ----------------------------------------------------------------------

    def __call__(self, kind: str, **details: Any) -> None:
        getattr(self, f"on_{kind}", lambda **_: None)(**details)
        if self._live is not None:
            self._live.update(self._render())

    def on_note(self, message: str) -> None:
        self._print(message)

    def on_start(self, exp_id: int, index: int, total: int | None, description: str, sha: str) -> None:
        self.descriptions[exp_id] = description
        of = f"/{total}" if total else ""
        self.header = f"experiment {index + 1}{of} (#{exp_id}, parent {short(sha)})"
        self.answer = ""
        self._answer_printed_at = None
        self._answer_tokens_printed = False
        if self._progress is not None:
            self._tasks[exp_id] = self._progress.add_task(f"#{exp_id} {description}", total=100.0,
                                                          loss="-")

    def on_answering(self, tokens: int, seconds: float) -> None:
        """The model's reply so far; plain output gets at most a line every few seconds."""
        self.answer = answer_line(tokens, seconds).strip()
        if self._live is not None:
            return
        now = time.monotonic()
        first_tokens = tokens > 0 and not self._answer_tokens_printed
        due = (self._answer_printed_at is None
               or now - self._answer_printed_at >= PLAIN_ANSWER_EVERY_S)
        if first_tokens or due:
            self._answer_printed_at = now
            self._answer_tokens_printed = self._answer_tokens_printed or tokens > 0
            self._print(answer_line(tokens, seconds))

    def on_proposed(self, exp_id: int, description: str) -> None:
        self.descriptions[exp_id] = description
        self.answer = ""
        if self._progress is not None and exp_id in self._tasks:
            self._progress.update(self._tasks[exp_id], description=f"#{exp_id} {description[:56]}")

    def on_training(self, exp_id: int, budget: float, slot: str = "") -> None:
        """Training began; plain output says so, since several may run at once."""
        if self._live is None:
            where = f" on {slot}" if slot else ""
            self._print(f"#{exp_id:<4d} training{where}  {self.descriptions.get(exp_id, '')}")

    def on_progress(self, exp_id: int, progress: Any) -> None:
        if self._progress is not None and exp_id in self._tasks:
            loss = f"{progress.loss:.4f}" if progress.loss is not None else "-"
            self._progress.update(self._tasks[exp_id], completed=min(progress.percent, 100.0),
                                  loss=loss)

    def on_done(self, exp_id: int, result: dict[str, Any], action: str, judgement: Any = None,
                settled: int | None = None, measure: bool = False, reason: str | None = None) -> None:
        """A run ended and `action` (research/decide.py) followed. A verdict (keep,
        discard) is on experiment `settled`: the run itself, or the candidate a
        confirmation run confirmed, whose outcome then gets a line of its own."""
        self.answer = ""
        if self._progress is not None and exp_id in self._tasks:
            self._progress.remove_task(self._tasks.pop(exp_id))
        status = result.get("status") or "invalid"
        word = ACTION_WORDS.get(action) or status
        if action == "wait" or (action == "done" and status == "ok"):
            word = "waiting" if action == "wait" else "ok"
        if action not in ("keep", "discard") and not measure:
            bucket = "crash" if status in ("crash", "timeout", "oom") else status
            if bucket in self.counts and action != "rerun":
                self.counts[bucket] += 1
        if action in ("keep", "discard"):
            self.counts[action] += 1
        line = outcome_line(exp_id, result, word if settled in (None, exp_id) else status,
                            self.descriptions.get(exp_id, ""))
        if judgement is not None and settled in (None, exp_id):
            line += f"  [{judgement.reason}]"
        elif action == "wait" and reason:
            line += f"  [{reason}]"
        self._print(line)
        if judgement is not None and settled not in (None, exp_id):
            self._print(f"#{settled:<4d} {ACTION_WORDS.get(action) or action:9s} {judgement.reason}")
        self.best_text = standing_text(self.standing())

    # --- rendering -------------------------------------------------------------------

    def _print(self, line: str) -> None:
        line = printable(line)  # descriptions and reasons come from models and runs
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def status_line(self) -> str:
        cost = self.cost()
        cost_text = f"  cost ${cost:.4f}" if cost else ""
        c = self.counts
        return (f"{self.best_text}  keep {c['keep']}  discard {c['discard']}"
                f"  crash {c['crash']}  invalid {c['invalid']}{cost_text}")

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        parts = [Text(self.header or "starting", style="bold"), Text(self.status_line())]
        if self.answer:
            parts.insert(1, Text(self.answer))
        if self._progress is not None:
            parts.insert(1, self._progress)
        return Group(*parts)
