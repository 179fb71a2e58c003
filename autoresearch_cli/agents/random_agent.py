"""The random agent: no model, it mutates one or two UPPER_CASE hyperparameters.

It is the offline default and the baseline an LLM agent should beat. Given the same seed,
train.py and history it proposes the same change, so a resumed run replays exactly.
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from autoresearch_cli.agents.base import History, Proposal, RecordCall
from autoresearch_cli.agents.novelty import find_repeat
from autoresearch_cli.doors.template import assigned_name, set_constants
from autoresearch_cli.errors import AgentError

FACTORS = (0.5, 0.7, 0.8, 1.25, 1.4, 2.0)
WINDOW_PATTERNS = ("L", "SL", "SSL", "SSSL", "SSLL")
ZERO_RATIO_STARTS = (0.02, 0.05, 0.1)  # a ratio at 0 (no warmup) cannot be scaled
MOMENTUM_RANGE = (0.5, 0.999)
# Names that do not change what is learned (or that are fixed for comparability).
SKIP_WORDS = {"SEED", "EVAL", "STARTUP", "LOG", "PRINT", "SAVE", "CHECKPOINT", "VOCAB", "SEQ",
              "BUDGET"}
DRAWS = 40  # tries at a change whose description is not already in the history
_UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")
_POWER_OF_TWO_SOURCE = re.compile(r"^2\s*\*\*\s*\d+$")


@dataclass(frozen=True)
class Constant:
    name: str
    value: Any  # int | float | str | tuple of numbers
    source: str  # the value as written
    comment: str = ""  # the comment on its line, without the '#'


@dataclass(frozen=True)
class Change:
    name: str
    source: str  # the new value as it will be written


class SeededAgent:
    """An offline agent's seeding: with a seed, its draws for a proposal depend only on the
    seed, the parent's train.py and the history's length, so a run replays exactly."""

    model_backed = False  # its train.py is the parent's with constants changed by ar
    salt = ""  # keeps two agents with one seed from drawing the same numbers

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._unseeded = random.Random()

    def _rng(self, train_py: str, history: History,
             failure: str | None) -> random.Random:
        if self.seed is None:
            return self._unseeded
        digest = hashlib.sha256(train_py.encode()).hexdigest()[:16]
        return random.Random(f"{self.salt}{self.seed}|{len(history)}|{failure is not None}|{digest}")


class RandomAgent(SeededAgent):
    def propose(self, train_py: str, program_md: str, history: History,
                failure: str | None = None, record_call: RecordCall | None = None) -> Proposal:
        constants = find_constants(train_py)
        if not any(mutable(constant, constants) for constant in constants.values()):
            raise AgentError("train.py has no UPPER_CASE hyperparameters the random agent "
                             "can change")
        rng = self._rng(train_py, history, failure)
        tried = {item.description for item in history.items}
        fallback = None
        for _ in range(DRAWS):
            changes = draw_changes(constants, rng)
            if not changes:
                continue
            description = describe(constants, changes)
            new_train_py = apply_changes(train_py, constants, changes)
            fallback = fallback or (description, new_train_py)
            if (description not in tried
                    and find_repeat(train_py, new_train_py, history) is None):
                break
        else:
            description, new_train_py = fallback
        return Proposal(description, new_train_py, "mutation")


# --- reading constants -----------------------------------------------------------------------


def find_constants(train_py: str) -> dict[str, Constant]:
    """Module-level one-line assignments of UPPER_CASE names to numbers, strings or tuples,
    each assigned once (the only ones template.set_constants can rewrite)."""
    try:
        tree = ast.parse(train_py)
    except SyntaxError as exc:
        raise AgentError(f"train.py does not parse (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise AgentError("train.py does not parse (an expression is nested too deeply)") from None
    lines = train_py.splitlines(keepends=True)
    assigned = Counter(assigned_name(node) for node in tree.body)
    constants: dict[str, Constant] = {}
    for node in tree.body:
        target = _single_target(node)
        if (target is None or node.value is None or node.lineno != node.end_lineno
                or assigned[target] != 1):
            continue
        try:
            value = literal_value(node.value)
        except ValueError:
            continue
        raw = lines[node.lineno - 1].encode()
        start, end = node.value.col_offset, node.value.end_col_offset
        source = raw[start:end].decode()
        rest = raw[end:].decode().strip()
        comment = rest[1:].strip() if rest.startswith("#") else ""
        constants[target] = Constant(target, value, source, comment)
    return constants


def _single_target(node: ast.stmt) -> str | None:
    name = assigned_name(node)
    return name if name is not None and _UPPER.match(name) else None


def literal_value(node: ast.expr) -> Any:
    """The value of a number, string, tuple of numbers or arithmetic like 2**19."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _number(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _number(node.left), _number(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        operations = {ast.Add: lambda: left + right, ast.Sub: lambda: left - right,
                      ast.Mult: lambda: left * right, ast.Div: lambda: left / right,
                      ast.FloorDiv: lambda: left // right, ast.Pow: lambda: left**right}
        operation = operations.get(type(node.op))
        if operation is None or (right == 0 and isinstance(node.op, ast.Div | ast.FloorDiv)):
            raise ValueError("unsupported arithmetic")
        return operation()
    if isinstance(node, ast.Tuple) and node.elts:
        return tuple(_number(element) for element in node.elts)
    raise ValueError("not a literal")


def _number(node: ast.expr) -> int | float:
    value = literal_value(node)
    if type(value) not in (int, float):
        raise ValueError("not a number")
    return value


# --- mutating ----------------------------------------------------------------------------------


def draw_changes(constants: dict[str, Constant], rng: random.Random) -> list[Change]:
    """One or two mutations; a batch size that brings its partner along counts as one."""
    mutable_names = [name for name in constants if mutable(constants[name], constants)]
    wanted = 2 if len(mutable_names) > 1 and rng.random() < 0.3 else 1
    changes: list[Change] = []
    mutated = 0
    for name in rng.sample(mutable_names, len(mutable_names)):
        if mutated == wanted:
            break
        changed = {change.name for change in changes}
        if name in changed:
            continue
        choice = rng.choice(_mutations(constants[name], constants))(rng)
        if not choice or any(change.name in changed or change.source == constants[change.name].source
                             for change in choice):
            continue
        changes.extend(choice)
        mutated += 1
    return changes


def mutable(constant: Constant, constants: dict[str, Constant]) -> bool:
    """Whether the constant is a hyperparameter an offline agent may move: it changes what
    is learned, and has a value that can be scaled or chosen (see _mutations)."""
    return bool(_mutations(constant, constants))


def _mutations(constant: Constant, constants: dict[str, Constant]) -> list:
    """Functions rng -> list[Change] | None, one per way this constant may move."""
    name, value = constant.name, constant.value
    if SKIP_WORDS & set(name.split("_")):
        return []
    if isinstance(value, str):
        if "WINDOW" in name and value and set(value.upper()) <= set("SL"):
            return [lambda rng: _window_change(constant, rng)]
        return []
    if isinstance(value, tuple):
        if all(isinstance(v, float) and 0 < v < 1 for v in value):
            return [lambda rng: _momentum_tuple_change(constant, rng)]
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return _int_mutations(constant, constants)
    return _float_mutations(constant)


def _int_mutations(constant: Constant, constants: dict[str, Constant]) -> list:
    name, value = constant.name, constant.value
    if value <= 0:
        return []
    if "BATCH" in name:
        return _batch_mutations(constant, constants)
    if "DEPTH" in name or "LAYER" in name or value < 8:
        steps = [1, -1] if value > 1 else [1]
        return [lambda rng, step=step: [_int_change(constant, value + step)] for step in steps]
    if value & (value - 1) == 0:
        return [lambda rng: [_int_change(constant, value * 2)],
                lambda rng: [_int_change(constant, value // 2)]]
    return [lambda rng: [_int_change(constant, max(1, round(value * rng.choice(FACTORS))))]]


def _batch_mutations(constant: Constant, constants: dict[str, Constant]) -> list:
    """Batch sizes double or halve. TOTAL_BATCH_SIZE must stay a multiple of
    DEVICE_BATCH_SIZE times the sequence length, so the moves never lower their ratio:
    total up; total down with device down; device down; device up with total up."""
    total = _partner(constants, "TOTAL")
    device = _partner(constants, "DEVICE")
    value = constant.value
    halvable = value % 2 == 0
    if constant is total and device is not None:
        options = [lambda rng: [_int_change(total, value * 2)]]
        if halvable and device.value % 2 == 0:
            options.append(lambda rng: [_int_change(total, value // 2),
                                        _int_change(device, device.value // 2)])
        return options
    if constant is device and total is not None:
        options = [lambda rng: [_int_change(device, value * 2), _int_change(total, total.value * 2)]]
        if halvable:
            options.append(lambda rng: [_int_change(device, value // 2)])
        return options
    options = [lambda rng: [_int_change(constant, value * 2)]]
    if halvable:
        options.append(lambda rng: [_int_change(constant, value // 2)])
    return options


def _partner(constants: dict[str, Constant], kind: str) -> Constant | None:
    for constant in constants.values():
        if "BATCH" in constant.name and kind in constant.name and type(constant.value) is int:
            return constant
    return None


def _float_mutations(constant: Constant) -> list:
    name, value = constant.name, constant.value
    if ("BETA" in name or "MOMENTUM" in name) and 0 < value < 1:
        return [lambda rng: [Change(name, _float_source(_momentum(value, rng)))]]
    if ("RATIO" in name or "FRAC" in name) and 0 <= value <= 1:
        return [lambda rng: _ratio_change(constant, rng)]
    if value == 0 or not math.isfinite(value):
        return []
    return [lambda rng: [Change(name, _float_source(_significant(value * rng.choice(FACTORS))))]]


def _ratio_change(constant: Constant, rng: random.Random) -> list[Change] | None:
    if constant.value == 0:
        new = rng.choice(ZERO_RATIO_STARTS)
    else:
        new = min(1.0, max(0.0, _significant(constant.value * rng.choice(FACTORS))))
    return None if new == constant.value else [Change(constant.name, _float_source(new))]


def _momentum(value: float, rng: random.Random) -> float:
    """Scale the distance from 1, so 0.95 moves to 0.9 or 0.975 rather than past 1."""
    low, high = MOMENTUM_RANGE
    return round(min(high, max(low, 1 - (1 - value) * rng.choice(FACTORS))), 4)


def _momentum_tuple_change(constant: Constant, rng: random.Random) -> list[Change] | None:
    values = list(constant.value)
    index = rng.randrange(len(values))
    values[index] = _momentum(values[index], rng)
    if tuple(values) == constant.value:
        return None
    return [Change(constant.name, "(" + ", ".join(_float_source(v) for v in values) + ")")]


def _window_change(constant: Constant, rng: random.Random) -> list[Change]:
    choices = [pattern for pattern in WINDOW_PATTERNS if pattern != constant.value.upper()]
    quote = "'" if constant.source.startswith("'") else '"'
    return [Change(constant.name, f"{quote}{rng.choice(choices)}{quote}")]


def _int_change(constant: Constant, new: int) -> Change:
    if _POWER_OF_TWO_SOURCE.match(constant.source) and new > 0 and new & (new - 1) == 0:
        return Change(constant.name, f"2**{new.bit_length() - 1}")
    return Change(constant.name, str(new))


def _significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}")


def _float_source(value: float) -> str:
    return repr(float(value))


# --- writing -----------------------------------------------------------------------------------


def describe(constants: dict[str, Constant], changes: list[Change]) -> str:
    return ", ".join(f"{c.name} {constants[c.name].source} -> {c.source}" for c in changes)


def apply_changes(train_py: str, constants: dict[str, Constant], changes: list[Change]) -> str:
    """train.py with each changed value rewritten in place; comments stay as they were."""
    return set_constants(train_py, {change.name: change.source for change in changes})
