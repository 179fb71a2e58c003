"""The search space of an offline agent: train.py's UPPER_CASE constants as dimensions.

Each constant the random agent may move (random_agent.mutable) becomes one dimension, or
one per element of a tuple, with a range and a scale read from its value, its name and
its comment, in this order:

- a range written in the comment (`# ... in [0.01, 0.1]`) is used as written, on a log
  scale when both ends are positive and a decade or more apart;
- a window pattern (a string of S and L): one of the known patterns;
- a momentum or beta in (0, 1): 1 - value on a log scale, from a quarter to four times
  its distance from 1 (0.95 ranges over 0.8 to 0.9875);
- a ratio, fraction or share in [0, 1]: linear from 0 to twice its value (at least
  RATIO_SPAN, at most 1);
- the batch sizes, as a pair: the device batch by powers of two (a quarter to twice), the
  total as the device batch times 2**k, k never below today's (the total must stay a
  multiple of the device batch times the sequence length);
- a layer count: two more or fewer; any other power of two: half to twice (model sizes
  cost the budget quickly); any other positive number: a third to three times, log scale.

`named_constants` reads the constants the human says matter (program.md lines like
`Tune: MATRIX_LR, WARMDOWN_RATIO`); the space is then those alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from autoresearch_cli.agents.random_agent import (
    WINDOW_PATTERNS,
    Constant,
    find_constants,
    mutable,
)

SPAN = 3.0  # a positive number ranges from value / SPAN to value * SPAN (log scale)
RATIO_SPAN = 0.2  # a ratio at 0 ranges up to this
MOMENTUM_SPAN = 4.0  # 1 - momentum ranges over this factor either way
MAX_ONE_MINUS = 0.5  # a momentum stays at 0.5 or above
LAYER_STEPS = 2
RATIO_WORDS = ("RATIO", "FRAC", "SHARE", "FRACTION", "PROPORTION")
_RANGE = re.compile(r"\[\s*(-?\d[\d.eE+-]*)\s*,\s*(-?\d[\d.eE+-]*)\s*\]")
_NAMED_LINE = re.compile(r"^\s*(?:[-*]\s*)?(?:tune|search|constants that matter)\s*:\s*(.+)$",
                         re.IGNORECASE | re.MULTILINE)
_NAME = re.compile(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b")


@dataclass(frozen=True)
class Dimension:
    """One axis of the search: how a constant's value maps to what the sampler sees."""

    param: str  # the sampler's name for it: NAME, or NAME[i] for a tuple's element
    constant: str
    kind: str  # float | int | choice
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    choices: tuple[str, ...] = ()
    # value: as written; one_minus: 1 - value (momenta); log2: a power of two's exponent;
    # accumulation: log2 of the total batch over the device batch
    encoding: str = "value"
    index: int | None = None  # the element of a tuple constant

    def distribution(self) -> Any:
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "choice":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)

    def read(self, constants: dict[str, Constant]) -> Any:
        """The sampler's value for this dimension in a train.py (clipped to the range), or
        None when that train.py has no such value."""
        constant = constants.get(self.constant)
        if constant is None:
            return None
        value = constant.value
        if self.index is not None:
            if not isinstance(value, tuple) or len(value) <= self.index:
                return None
            value = value[self.index]
        if self.kind == "choice":
            return value if value in self.choices else None
        number = self._encode(value, constants)
        if number is None or not math.isfinite(number):
            return None
        number = min(self.high, max(self.low, number))
        return round(number) if self.kind == "int" else number

    def _encode(self, value: Any, constants: dict[str, Constant]) -> float | None:
        if type(value) not in (int, float):
            return None
        if self.encoding == "one_minus":
            return 1 - value
        if self.encoding == "log2":
            return math.log2(value) if value > 0 else None
        if self.encoding == "accumulation":
            device = _partner(constants, "DEVICE")
            if device is None or device.value <= 0 or value <= 0:
                return None
            return math.log2(value / device.value)
        return value


def infer_space(train_py: str, names: set[str] | None = None) -> list[Dimension]:
    """The dimensions of train.py's constants (only those in `names`, when given), in the
    file's order."""
    constants = find_constants(train_py)
    if names:
        names = set(names) | _batch_partners(constants, names)
    space: list[Dimension] = []
    for constant in constants.values():
        if (names and constant.name not in names) or not mutable(constant, constants):
            continue
        space.extend(dimensions_of(constant, constants))
    return space


def named_constants(program_md: str) -> set[str]:
    """The constants program.md says matter: the UPPER_CASE names on its `Tune:`,
    `Search:` or `Constants that matter:` lines (none: search them all)."""
    found: set[str] = set()
    for line in _NAMED_LINE.findall(program_md or ""):
        found.update(_NAME.findall(line))
    return found


def dimensions_of(constant: Constant, constants: dict[str, Constant]) -> list[Dimension]:
    """The dimensions one constant adds (see the module's docstring for the rules)."""
    name, value, words = constant.name, constant.value, _words(constant)
    written = _written_range(constant)
    if written is not None:
        return [written]
    if isinstance(value, str):
        choices = tuple(dict.fromkeys((value, *WINDOW_PATTERNS)))
        return [Dimension(name, name, "choice", choices=choices)]
    if isinstance(value, tuple):  # momenta: each element in (0, 1); others stay as they are
        return [_momentum(f"{name}[{i}]", name, v, index=i) for i, v in enumerate(value)
                if type(v) is float and 0 < v < 1]  # fmt: skip
    if "BATCH" in name and type(value) is int:
        return _batch(constant, constants)
    if isinstance(value, float) and _momentum_named(words) and 0 < value < 1:
        return [_momentum(name, name, value)]
    if isinstance(value, float) and words & set(RATIO_WORDS) and 0 <= value <= 1:
        return [Dimension(name, name, "float", 0.0, min(1.0, max(RATIO_SPAN, 2 * value)))]
    if value == 0:  # no scale to go by: only a written range (`# in [a, b]`) moves it
        return []
    if type(value) is int:
        return [_integer(constant, words)] if value > 0 else [
            Dimension(name, name, "int", value * SPAN, math.ceil(value / SPAN))]
    if value < 0:  # the same magnitudes as a positive one, on a linear scale
        return [Dimension(name, name, "float", value * SPAN, value / SPAN)]
    return [Dimension(name, name, "float", value / SPAN, value * SPAN, log=True)]


def _words(constant: Constant) -> set[str]:
    """The words of its name and the prose of its comment, upper case: what says what it
    is. A comment's UPPER_CASE words name other constants (`model_dim = DEPTH * ...`), so
    they do not count."""
    prose = re.findall(r"\b[a-z][a-z0-9]*\b", constant.comment)
    return set(constant.name.split("_")) | {word.upper() for word in prose}


def _momentum_named(words: set[str]) -> bool:
    return any(word.startswith(("BETA", "MOMENTUM")) for word in words)


def _written_range(constant: Constant) -> Dimension | None:
    match = _RANGE.search(constant.comment)
    if match is None or type(constant.value) not in (int, float):
        return None
    try:
        low, high = sorted(float(group) for group in match.groups())
    except ValueError:
        return None
    if low == high:
        return None
    if type(constant.value) is int and low.is_integer() and high.is_integer():
        return Dimension(constant.name, constant.name, "int", low, high)
    log = low > 0 and high / low >= 10
    return Dimension(constant.name, constant.name, "float", low, high, log=log)


def _momentum(param: str, name: str, value: float, index: int | None = None) -> Dimension:
    distance = 1 - value
    return Dimension(param, name, "float", distance / MOMENTUM_SPAN,
                     min(MAX_ONE_MINUS, distance * MOMENTUM_SPAN), log=True,
                     encoding="one_minus", index=index)


def _integer(constant: Constant, words: set[str]) -> Dimension:
    name, value = constant.name, constant.value
    if words & {"DEPTH", "LAYER", "LAYERS"}:
        return Dimension(name, name, "int", max(1, value - LAYER_STEPS), value + LAYER_STEPS)
    if value & (value - 1) == 0:
        exponent = value.bit_length() - 1
        return Dimension(name, name, "int", max(0, exponent - 1), exponent + 1,
                         encoding="log2")
    return Dimension(name, name, "int", max(1, math.floor(value / SPAN)),
                     math.ceil(value * SPAN), log=True)


def _batch(constant: Constant, constants: dict[str, Constant]) -> list[Dimension]:
    """The device batch by its exponent, the total by its accumulation exponent; a batch
    size without a partner (or not a power of two) like any other number."""
    device, total = _partner(constants, "DEVICE"), _partner(constants, "TOTAL")
    if device is None or total is None or not all(_power_of_two(c.value) for c in (device, total)):
        return [_integer(constant, set())]
    if constant is device:
        exponent = device.value.bit_length() - 1
        return [Dimension(device.name, device.name, "int", max(0, exponent - 2), exponent + 1,
                          encoding="log2")]
    accumulation = total.value.bit_length() - device.value.bit_length()
    return [Dimension(total.name, total.name, "int", accumulation, accumulation + 2,
                      encoding="accumulation")]


def _partner(constants: dict[str, Constant], kind: str) -> Constant | None:
    for constant in constants.values():
        if "BATCH" in constant.name and kind in constant.name and type(constant.value) is int:
            return constant
    return None


def _batch_partners(constants: dict[str, Constant], names: set[str]) -> set[str]:
    """A batch size named alone brings its partner: they move together."""
    batch = {c.name for c in (_partner(constants, "DEVICE"), _partner(constants, "TOTAL")) if c}
    return batch if batch & names else set()


def _power_of_two(value: Any) -> bool:
    return type(value) is int and value > 0 and value & (value - 1) == 0


# --- writing ---------------------------------------------------------------------------------


def sources(space: list[Dimension], params: dict[str, Any],
            constants: dict[str, Constant]) -> dict[str, str]:
    """The new literal of every constant the params set, as train.py will hold it."""
    written: dict[str, str] = {}
    tuples: dict[str, list[Any]] = {}
    device = next((d for d in space if d.encoding == "log2" and "DEVICE" in d.constant), None)
    for dim in space:
        if dim.param not in params or dim.constant not in constants:
            continue
        value = params[dim.param]
        if dim.index is not None:
            elements = tuples.setdefault(dim.constant, list(constants[dim.constant].value))
            elements[dim.index] = _one_minus(value) if dim.encoding == "one_minus" else _float(value)
        elif dim.kind == "choice":
            quote = "'" if constants[dim.constant].source.startswith("'") else '"'
            written[dim.constant] = f"{quote}{value}{quote}"
        elif dim.encoding == "accumulation":
            exponent = params.get(device.param) if device else None
            partner = _partner(constants, "DEVICE")
            if exponent is None and partner is None:
                continue  # no device batch to accumulate over
            base = 2 ** int(exponent) if exponent is not None else partner.value  # type: ignore[union-attr]
            written[dim.constant] = _power(base * 2 ** int(value), constants[dim.constant])
        elif dim.encoding == "log2":
            written[dim.constant] = _power(2 ** int(value), constants[dim.constant])
        elif dim.encoding == "one_minus":
            written[dim.constant] = repr(_one_minus(value))
        elif dim.kind == "int":
            written[dim.constant] = str(int(value))
        else:
            written[dim.constant] = repr(_float(value))
    for name, elements in tuples.items():
        written[name] = "(" + ", ".join(repr(element) for element in elements) + ")"
    return written


def _float(value: float) -> float:
    """Three significant digits: finer steps are below what a run can tell apart."""
    return float(f"{float(value):.3g}")


def _one_minus(distance: float) -> float:
    """A momentum from its distance to 1, the distance to three significant digits."""
    return round(1 - _float(distance), 10)


def _power(value: int, constant: Constant) -> str:
    if re.match(r"^2\s*\*\*\s*\d+$", constant.source):
        return f"2**{value.bit_length() - 1}"
    return str(value)
