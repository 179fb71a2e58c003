"""Repeats: a change is the same once whitespace, comments and number formatting are set
aside, whichever parent it was made to; and what a change touched, for the prompt."""

from __future__ import annotations

import pytest

from autoresearch_cli.agents.base import History, HistoryItem
from autoresearch_cli.agents.novelty import (
    change_of,
    find_repeat,
    normal_form,
    repeat_message,
    touched,
)

BASE = '''\
"""A train.py."""

DEPTH = 2  # layers
MATRIX_LR = 0.04  # Muon
TOTAL_BATCH_SIZE = 2**11  # tokens per step
WINDOW = "L"


def lr(step):
    return MATRIX_LR * min(1.0, step / 10)
'''


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("spelling", ["0.1", "0.10", "1e-1", "0.1000  # a new comment",
                                      "(0.1)", "  0.1", "1E-1"])
def test_number_spellings_and_comments_are_one_change(spelling):
    ours = edit(BASE, "MATRIX_LR = 0.04  # Muon", "MATRIX_LR = 0.1  # Muon")
    theirs = edit(BASE, "MATRIX_LR = 0.04  # Muon", f"MATRIX_LR = {spelling}")
    assert change_of(BASE, ours) == change_of(BASE, theirs) != ()


def test_arithmetic_quotes_and_blank_lines_are_set_aside():
    assert normal_form(BASE) == normal_form(edit(BASE, "2**11", "2048"))
    assert normal_form(BASE) == normal_form(edit(BASE, '"L"', "'L'"))
    assert normal_form(BASE) == normal_form(BASE.replace("\n\n\ndef", "\n\n\n\n# note\ndef"))
    assert normal_form("def f(:\n") is None


def test_different_values_and_code_are_different_changes():
    a = edit(BASE, "0.04", "0.05")
    b = edit(BASE, "0.04", "0.06")
    c = edit(BASE, "step / 10", "step / 20")
    assert len({change_of(BASE, x) for x in (a, b, c)}) == 3


def item(exp_id, sha, parent, status="discard", val_bpb=2.0, description="x"):
    return HistoryItem(exp_id, description, val_bpb, status, None, runs=2, sha=sha,
                       parent_sha=parent, kind="baseline" if parent is None else "experiment")


def test_the_same_change_to_another_parent_is_a_repeat():
    kept = edit(BASE, "DEPTH = 2", "DEPTH = 3")
    tried = edit(BASE, "0.04", "0.05")
    history = History([item(1, "base", None, "baseline"), item(2, "kept", "base", "keep"),
                       item(3, "tried", "base", description="MATRIX_LR 0.04 -> 0.05")],
                      sources={"base": BASE, "kept": kept, "tried": tried})
    again = edit(kept, "MATRIX_LR = 0.04  # Muon", "MATRIX_LR = 5e-2   # bumped")
    repeat = find_repeat(kept, again, history)
    assert repeat is not None and repeat.item.experiment_id == 3 and repeat.how == "the same change"
    message = repeat_message(repeat)
    assert "experiment #3 (MATRIX_LR 0.04 -> 0.05)" in message and "2.000000 over 2 runs" in message
    # a new value is new; a train.py identical to one that ran (the baseline) is not
    assert find_repeat(kept, edit(kept, "0.04", "0.07"), history) is None
    back = find_repeat(kept, BASE.replace("# layers", "# back to two"), history)
    assert back is not None and back.how == "the same train.py" and back.item.status == "baseline"


def test_touched_names_constants_then_code():
    changed = edit(edit(BASE, "0.04", "0.05"), "step / 10", "step / 20")
    assert touched(BASE, changed) == ("MATRIX_LR", "lr")
    assert touched(BASE, edit(BASE, "0.04", "4e-2")) == ()
    assert touched(BASE, BASE + "\nprint('hi')\n") == ("module code",)


def test_folding_hostile_arithmetic_stays_cheap_and_is_never_evaluated():
    """A train.py that writes enormous numbers is compared in a few milliseconds: what
    would grow past MAX_BITS stays as written, and nothing is run."""
    import time

    hostile = ("A = 1 << 10**12\nB = ((2**64)**64)**64\nC = 9**9**9\n"
               "D = __import__('os').getpid() * 2\nE = 2**10\n")
    began = time.monotonic()
    lines = normal_form(hostile)
    assert time.monotonic() - began < 1.0
    assert lines is not None
    assert "A = 1 << 1000000000000" in lines and "C = 9 ** 387420489" in lines
    assert "B = (18446744073709551616 ** 64) ** 64" in lines
    assert "D = __import__('os').getpid() * 2" in lines and "E = 1024" in lines


def test_a_train_py_nested_too_deeply_is_never_a_repeat_and_never_an_error():
    deep = BASE + "X = " + "-" * 5000 + "1\n"
    assert normal_form(deep) is None and change_of(BASE, deep) is None
    assert touched(BASE, deep) == ()
    assert find_repeat(BASE, deep, History()) is None
