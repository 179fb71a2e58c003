"""Seeds are ar's alone: which seed each run gets, and proposals that try to pin one.

A commit's k-th run on a hardware class gets the workspace's k-th seed (seed index k), so
a candidate's run k and the best's run k share the initialisation and the data order,
and most of the seed's luck cancels in their difference (research/keeprule.py). The seed
itself is `base + k`, `base` drawn from the research branch's name: the same in every
`ar` process of a workspace, different between workspaces.

A proposal cannot choose the seed: train.py gets it through prepare.SEED (from AR_SEED),
and `pinned_seed` turns back, before any training, a train.py that seeds a generator with
anything but prepare.SEED, assigns SEED or names AR_SEED. A pin that slips past the
check shows in the results (runs on different seeds that score the same): the keep test
discards such a commit and the noise leaves it out (keeprule.pinned).
"""

from __future__ import annotations

import ast
import hashlib

# Calls that seed or set a random generator's state; their arguments must come from SEED.
SEEDING_CALLS = frozenset({
    "manual_seed", "manual_seed_all", "seed", "set_seed", "default_rng", "RandomState",
    "Generator", "SeedSequence", "PCG64", "PCG64DXSM", "Philox", "MT19937", "SFC64",
    "set_rng_state", "set_state", "setstate", "fork_rng",
})
SEED_NAME = "SEED"
SEED_VARIABLE = "AR_SEED"


def seed_base(branch: str) -> int:
    """The workspace's first seed, from its research branch's name."""
    return int(hashlib.sha256(branch.encode()).hexdigest()[:7], 16)


def run_seed(branch: str, index: int) -> int:
    """The seed of a run with seed index `index` in the workspace of `branch`."""
    return seed_base(branch) + index


def _from_seed(node: ast.AST) -> bool:
    """Whether an expression is built from prepare.SEED (SEED + 1 still varies per run)."""
    return any((isinstance(sub, ast.Name) and sub.id == SEED_NAME)
               or (isinstance(sub, ast.Attribute) and sub.attr == SEED_NAME)
               for sub in ast.walk(node))


def _call_name(node: ast.Call) -> str:
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return node.func.id if isinstance(node.func, ast.Name) else ""


def pinned_seed(train_py: str) -> str | None:
    """Why train.py takes the seed out of ar's hands, or None when it does not."""
    try:
        tree = ast.parse(train_py)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        found = _pin(node)
        if found:
            return (f"train.py {found} (line {getattr(node, 'lineno', '?')}): ar gives every "
                    "run its seed through prepare.SEED; a proposal may not choose or pin it")
    return None


def _pin(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and SEED_VARIABLE in node.value:
        return f"names {SEED_VARIABLE}"
    if isinstance(node, ast.Call):
        seeded = [arg for arg in node.args] if _call_name(node) in SEEDING_CALLS else []
        seeded += [kw.value for kw in node.keywords if kw.arg in ("seed", "generator_seed")]
        for value in seeded:
            if not (isinstance(value, ast.Constant) and value.value is None) and not _from_seed(value):
                return f"seeds {_call_name(node) or 'a generator'} with {ast.unparse(value)[:40]}"
    if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Attribute) and sub.attr == SEED_NAME:
                    return f"assigns {ast.unparse(sub)}"
                if isinstance(sub, ast.Name) and sub.id == SEED_NAME and not (
                        isinstance(node, ast.Assign) and _from_seed(node.value)):
                    return f"assigns {SEED_NAME}"
    return None
