"""The workspace template's train.py, rendered for a profile.

One train.py serves every profile: its hyperparameter block holds the gpu (original)
values, and a profile overrides some of those constants so the model fits its budget.
"""

from __future__ import annotations

import ast

from autoresearch_cli.resources import template_dir

# Profile -> {CONSTANT_NAME: Python literal}. The gpu profile is the template as written.
TRAIN_OVERRIDES: dict[str, dict[str, str]] = {
    "gpu": {},
    # Tuned on 2 CPU cores for a 60 s budget, where a few hundred small steps beat any
    # larger model: depth 2 and width 128 with 2048-token steps.
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

    `values` maps a constant's name to the Python literal text of its new value. Raises
    ValueError when a name is not assigned exactly once on one line at module level, or
    when a value is not a valid expression.
    """
    tree = ast.parse(source)
    targets: dict[str, list[ast.Assign]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            targets.setdefault(node.targets[0].id, []).append(node)
    lines = source.splitlines(keepends=True)
    for name, literal in values.items():
        try:
            ast.parse(literal, mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"value for {name} is not a Python expression: {literal!r}") from exc
        nodes = targets.get(name, [])
        if len(nodes) != 1:
            raise ValueError(f"train.py assigns {name} {len(nodes)} times at module level; expected once")
        value = nodes[0].value
        if value.lineno != value.end_lineno:
            raise ValueError(f"the value of {name} spans several lines")
        line = lines[value.lineno - 1].encode()  # ast offsets count UTF-8 bytes
        new_line = line[: value.col_offset] + literal.encode() + line[value.end_col_offset :]
        lines[value.lineno - 1] = new_line.decode()
    return "".join(lines)


def render_train_py(profile: str) -> str:
    """The template train.py with the constants of `profile` in place."""
    if profile not in TRAIN_OVERRIDES:
        raise ValueError(f"no train.py overrides for profile {profile!r}; known: {', '.join(TRAIN_OVERRIDES)}")
    return set_constants(template_train_py(), TRAIN_OVERRIDES[profile])
