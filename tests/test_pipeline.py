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


LR = "MATRIX_LR = "


@pytest.mark.parametrize(
    "pin",
    [
        "torch.manual_seed(1234)",  # a literal seed, with a research change beside it
        "prepare.SEED = 1234",  # the seed ar gave, overwritten
        "SEED = 7",
        "import os\nos.environ['AR_SEED'] = '3'",
        "import numpy as np\nrng = np.random.default_rng(42)",
        "import random\nrandom.seed(5)",
        "torch.set_rng_state(torch.ByteTensor(5056))",
        "loader = prepare.make_dataloader(None, 1, 8, seed=11)",
    ],
)
def test_a_proposal_cannot_pin_the_seed(pin):
    """The run's seed is ar's alone, whatever else the proposal changes."""
    changed = TEMPLATE.replace(LR, "MATRIX_LR = 1.5 * ", 1) + "\n" + pin + "\n"
    reason = validate(changed, TEMPLATE)
    assert reason is not None and "prepare.SEED" in reason and "line" in reason


@pytest.mark.parametrize(
    "allowed",
    ["torch.manual_seed(prepare.SEED + 1)", "import numpy as np\nrng = np.random.default_rng()",
     "SEED = prepare.SEED", "g = torch.Generator().manual_seed(prepare.SEED)"],
)
def test_seeds_drawn_from_ars_seed_are_allowed(allowed):
    changed = TEMPLATE.replace(LR, "MATRIX_LR = 1.5 * ", 1) + "\n" + allowed + "\n"
    assert validate(changed, TEMPLATE) is None


def test_a_nul_or_a_seed_only_change_is_turned_back():
    assert "does not parse" in validate(TEMPLATE + "\x00", TEMPLATE)
    seed_only = TEMPLATE.replace("torch.manual_seed(prepare.SEED)", "torch.manual_seed(prepare.SEED + 7)")
    assert "nothing to research" in validate(seed_only, TEMPLATE)
