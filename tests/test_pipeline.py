"""The rules of one experiment, as tables: validation (what follows a run: test_decide.py;
the keep rule: test_keeprule.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoresearch_cli.research.pipeline import validate

GOOD = "def build_model(config):\n    pass\n\nprepare.save_for_eval(None, None)\n"


@pytest.mark.parametrize(
    ("train_py", "reason"),
    [
        (GOOD.replace("pass", "return 1"), None),
        (GOOD, "does not change"),
        ("def build_model(:\n", "does not parse: line 1"),
        ("x = 1\n", "must define build_model"),
    ],
)
def test_validation(train_py, reason):
    found = validate(train_py, GOOD)
    assert (found is None) if reason is None else (reason in found)


TEMPLATE = (Path(__file__).resolve().parents[1] / "workspace_template" / "train.py").read_text()


@pytest.mark.parametrize(
    ("old", "new", "research"),
    [
        # ar owns the seed: changing it, or hard-coding one, is luck, not research
        ("torch.manual_seed(prepare.SEED)", "torch.manual_seed(1234)", False),
        ("torch.cuda.manual_seed(prepare.SEED)", "torch.cuda.manual_seed(7)", False),
        # comments and what is printed change nothing a score depends on
        ("# ar gives each run its seed", "# a better comment", False),
        ('print(f"Model config: {config}")', 'print("config", config)', False),
        # a constant of the model or the optimiser is research
        ("MATRIX_LR = ", "MATRIX_LR = 1.5 * ", True),
        ("DEPTH = ", "DEPTH = 1 + ", True),
    ],
)
def test_seed_and_other_non_research_changes_are_rejected(old, new, research):
    assert old in TEMPLATE
    reason = validate(TEMPLATE.replace(old, new, 1), TEMPLATE)
    if research:
        assert reason is None
    else:
        assert "nothing to research" in reason
