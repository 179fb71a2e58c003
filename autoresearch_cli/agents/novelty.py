"""Is a proposed change new? Pure functions over train.py texts, no I/O.

Two proposals are the same change when their train.py edits are the same once what
cannot change a run is set aside: whitespace and line breaks, comments, the spelling of
a number (`0.10`, `0.1` and `1e-1` are one value; `2**11` is `2048`) and of a string's
quotes. Each file is parsed and written back by `ast.unparse` (which drops comments and
formatting), with constant arithmetic folded, and the change is the difference of those
normal forms: the lines removed and the lines added, without their position. So the same
edit made to two different parents is one change, and a train.py equal to one that ran
already repeats it, whichever parent it came from.

`touched` names what a change touched (the constants whose value moved, the top-level
functions and classes whose code moved): the prompt groups past experiments by it.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import math
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from autoresearch_cli.agents.base import History, HistoryItem

Hunk = tuple[tuple[str, ...], tuple[str, ...]]  # (lines removed, lines added), normalised
_UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")
MAX_POWER = 64  # larger exponents are left as written (folding them is no use to anyone)
MAX_BITS = 1024  # a folded number never grows beyond this (nor its arithmetic's cost)


@dataclass(frozen=True)
class Repeat:
    """An earlier experiment a proposal repeats, and how."""

    item: HistoryItem
    how: str  # "the same change" | "the same train.py"


# --- normal forms ------------------------------------------------------------------------


@lru_cache(maxsize=512)
def normal_form(train_py: str) -> tuple[str, ...] | None:
    """train.py's lines as `ast.unparse` writes them, constant arithmetic folded; None when
    it does not parse (such a text is never a repeat of anything)."""
    try:
        return tuple(ast.unparse(_Fold().visit(ast.parse(train_py))).splitlines())
    except (SyntaxError, ValueError, RecursionError):  # nested too deeply: not compared
        return None


class _Fold(ast.NodeTransformer):
    """`2**11` -> `2048`, `-0.5` -> a constant: arithmetic on number literals is its value.

    Computed by the operators themselves, never by eval, and only while the numbers stay
    small (MAX_BITS): a text like `1 << 10**12` or a tower of powers is left as written."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        left, right, apply = node.left, node.right, _OPERATORS.get(type(node.op))
        if apply is None or not (_number(left) and _number(right)):
            return node
        a, b = left.value, right.value  # type: ignore[attr-defined]
        if isinstance(node.op, ast.Pow) and (abs(b) > MAX_POWER or _bits(a) * abs(b) > MAX_BITS):
            return node
        try:
            value = apply(a, b)
        except (ArithmeticError, ValueError, TypeError):
            return node
        if _bits(value) > MAX_BITS:
            return node
        return ast.copy_location(ast.Constant(value), node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.USub | ast.UAdd) and _number(node.operand):
            value = node.operand.value  # type: ignore[attr-defined]
            return ast.copy_location(ast.Constant(-value if isinstance(node.op, ast.USub)
                                                  else +value), node)
        return node


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
              ast.Mod: operator.mod, ast.Pow: operator.pow}


def _bits(value: object) -> int:
    """The size of a number, in bits (a float, complex or huge int: what it would take)."""
    if isinstance(value, int):
        return value.bit_length()
    if isinstance(value, float):
        return 0 if not math.isfinite(value) or value == 0 else max(0, math.frexp(value)[1])
    return MAX_BITS + 1  # complex and the rest: left as written


def _number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def change_of(parent_py: str, new_py: str) -> tuple[Hunk, ...] | None:
    """The change from `parent_py` to `new_py`, in normal form: each run of lines removed
    and added, in order, without line numbers. None when either does not parse; () when
    they differ only in what the normal form sets aside."""
    old, new = normal_form(parent_py), normal_form(new_py)
    if old is None or new is None:
        return None
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    return tuple((old[i1:i2], new[j1:j2])
                 for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal")


# --- repeats -----------------------------------------------------------------------------


def find_repeat(parent_py: str, new_py: str, history: History) -> Repeat | None:
    """The earliest experiment in `history` that `new_py` (a change to `parent_py`)
    repeats: the same change to any parent, or a train.py that ran already. History items
    whose train.py the history does not hold (proposals that never became a commit) are
    not compared."""
    change = change_of(parent_py, new_py)
    text = normal_form(new_py)
    if change is None or text is None:
        return None
    digest = _digest(text)
    for item in history.items:
        known = _commit(history, item)
        if known is None:
            continue
        if known[0] == digest:
            return Repeat(item, "the same train.py")
        if change and known[1] == change:
            return Repeat(item, "the same change")
    return None


MAX_COMMITS = 20_000  # commits whose normal form and change are kept between proposals
_commits: dict[tuple, tuple[str | None, tuple[Hunk, ...] | None]] = {}


def _commit(history: History, item: HistoryItem) -> tuple[str | None, tuple[Hunk, ...] | None] | None:
    """(digest of its normal form, its change from its parent) of an item's commit; None
    when the history does not hold its train.py. A commit never changes: each is worked
    out once per process, not once per draw of every proposal (an agent draws dozens)."""
    source = history.train_py(item.sha)
    if source is None:
        return None
    parent = history.train_py(item.parent_sha)
    key = (str(item.sha), item.parent_sha, hash(source), hash(parent))  # the texts' own hashes:
    known = _commits.get(key)  # a name a caller made up may hold another text elsewhere
    if known is None:
        text = normal_form(source)
        known = (None if text is None else _digest(text),
                 None if parent is None else change_of(parent, source))
        if len(_commits) >= MAX_COMMITS:
            _commits.clear()
        _commits[key] = known
    return known


def _digest(lines: tuple[str, ...]) -> str:
    """A normal form's fingerprint (keeping the forms would keep whole files)."""
    return hashlib.blake2b("\n".join(lines).encode(), digest_size=16).hexdigest()


def repeat_message(repeat: Repeat) -> str:
    """What the model (and the ledger) is told of a proposal that repeats an experiment."""
    item = repeat.item
    if item.status == "baseline":
        earlier = "the baseline"
    else:
        earlier = f"experiment #{item.experiment_id} ({_clip(item.description)})"
    what = ("the same change to train.py" if repeat.how == "the same change"
            else "a train.py identical to that one")
    return (f"it repeats {earlier}: {what}, once whitespace, comments and number formatting "
            f"are set aside; that one {outcome_text(item)}")


def outcome_text(item: HistoryItem) -> str:
    """`scored 1.951200 over 3 runs (discard: ...)`: how an earlier experiment ended."""
    if item.status in ("running", "proposing", "evaluating"):
        return "is running now"
    if item.val_bpb is None:
        reason = f": {_clip(item.reason)}" if item.reason else ""
        return f"ended {item.status}{reason}"
    runs = f"{item.runs} run{'s' * (item.runs != 1)}"
    text = f"scored {item.val_bpb:.6f} over {runs} ({item.status}"
    if item.gain is not None:
        text += f", {-item.gain:+.4f} against the best it was judged against"
    return text + ")"


def _clip(text: str | None, limit: int = 100) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- what a change touched -----------------------------------------------------------------


def touched(parent_py: str, new_py: str) -> tuple[str, ...]:
    """The names a change touched, sorted: UPPER_CASE constants whose value moved, then
    top-level functions and classes whose code moved; `module code` for anything else at
    module level. () when either file does not parse or nothing moved."""
    old, new = _top_level(parent_py), _top_level(new_py)
    if old is None or new is None:
        return ()
    names = [name for name in old.keys() | new.keys() if old.get(name) != new.get(name)]
    constants = sorted(name for name in names if _UPPER.match(name))
    code = sorted(name for name in names if not _UPPER.match(name) and name != "")
    if "" in names:
        code.append("module code")
    return tuple(constants + code)


@lru_cache(maxsize=512)
def _top_level(train_py: str) -> dict[str, str] | None:
    """Each top-level definition's normal form by name; what has no name under ''."""
    try:
        tree = ast.parse(train_py)
        named: dict[str, list[str]] = {}
        for node in tree.body:
            node = _Fold().visit(node)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # the module docstring
            named.setdefault(_name_of(node), []).append(ast.unparse(node))
    except (SyntaxError, ValueError, RecursionError):
        return None
    return {name: "\n".join(parts) for name, parts in named.items()}


def _name_of(node: ast.stmt) -> str:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name
    targets: Iterable[ast.expr] = ()
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        targets = node.targets
    elif isinstance(node, ast.AnnAssign):
        targets = (node.target,)
    for target in targets:
        if isinstance(target, ast.Name) and _UPPER.match(target.id):
            return target.id
    return ""
