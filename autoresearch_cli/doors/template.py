"""The workspace template's train.py, rendered for a profile.

One train.py serves every profile: its hyperparameter block holds the gpu (original)
values, and a profile overrides some of those constants so the model fits its budget.
"""

from __future__ import annotations

import ast

from autoresearch_cli.doors.resources import template_dir

# Profile -> {CONSTANT_NAME: Python literal}. The gpu profile is the template as written.
TRAIN_OVERRIDES: dict[str, dict[str, str]] = {
    "gpu": {},
    # Tuned on 2 CPU cores for 60 s (the profile) and 20 s (the demo), where a few hundred
    # small steps beat any larger model: depth 2 and width 128 with 2048-token steps.
    # Re-checked for the fp32 path (a CPU without native bf16, emulated), 2026-11-24, on a
    # shared machine (noisy): width 192 or 256, or depth 3, ran ~2.5x fewer steps and scored
    # worse at 60 s (1.82-1.84 vs 1.57); 1024-token steps lost a back-to-back pair at 60 s
    # (1.91 vs 1.85) and at 20 s; 1.5x the Muon and embedding LRs made no difference.
    "cpu": {
        "DEPTH": "2",
        "ASPECT_RATIO": "64",
        "HEAD_DIM": "64",
        "TOTAL_BATCH_SIZE": "2**11",
        "DEVICE_BATCH_SIZE": "8",
    },
    "micro": {
        "DEPTH": "2",
        "ASPECT_RATIO": "32",
        "HEAD_DIM": "32",
        "TOTAL_BATCH_SIZE": "2**9",
        "DEVICE_BATCH_SIZE": "8",
    },
}


def template_train_py() -> str:
    return (template_dir() / "train.py").read_text()


def set_constants(source: str, values: dict[str, str]) -> str:
    """Replace the values of module-level `NAME = ...` assignments, keeping each line's comment.

    The one constants rewriter: profiles use it to render train.py, the random agent to
    write its mutations. `values` maps a constant's name to the Python literal text of its
    new value. Raises ValueError when a name is not assigned exactly once on one line at
    module level (`NAME = v` or `NAME: T = v`), or when a value is not a valid expression.
    """
    tree = ast.parse(source)
    targets: dict[str, list[ast.expr]] = {}
    for node in tree.body:
        name = assigned_name(node)
        if name is not None and node.value is not None:
            targets.setdefault(name, []).append(node.value)
    lines = source.splitlines(keepends=True)
    for name, literal in values.items():
        try:
            ast.parse(literal, mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"value for {name} is not a Python expression: {literal!r}") from exc
        nodes = targets.get(name, [])
        if len(nodes) != 1:
            raise ValueError(f"train.py assigns {name} {len(nodes)} times at module level; expected once")
        value = nodes[0]
        if value.lineno != value.end_lineno:
            raise ValueError(f"the value of {name} spans several lines")
        line = lines[value.lineno - 1].encode()  # ast offsets count UTF-8 bytes
        new_line = line[: value.col_offset] + literal.encode() + line[value.end_col_offset :]
        lines[value.lineno - 1] = new_line.decode()
    return "".join(lines)


def assigned_name(node: ast.stmt) -> str | None:
    """The one plain name a module-level assignment binds, else None."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
    elif isinstance(node, ast.AnnAssign):
        target = node.target
    else:
        return None
    return target.id if isinstance(target, ast.Name) else None


def render_train_py(profile: str) -> str:
    """The template train.py with the constants of `profile` in place."""
    if profile not in TRAIN_OVERRIDES:
        raise ValueError(f"no train.py overrides for profile {profile!r}; known: {', '.join(TRAIN_OVERRIDES)}")
    return set_constants(template_train_py(), TRAIN_OVERRIDES[profile])
