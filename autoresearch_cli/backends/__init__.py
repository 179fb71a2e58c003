"""Backends run ExperimentSpecs on slots (backends/base.py's Backend protocol).

    backend = open_backend("local", workers=None, device="auto", data=...)

Each name maps to one module's opener; a new backend (SLURM, Kubernetes) is one module
beside these and one line in BACKENDS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoresearch_cli.backends.base import Backend
from autoresearch_cli.errors import ArError

BACKENDS = {  # name -> "module:opener"
    "local": "autoresearch_cli.backends.local:open_local",
    "ray": "autoresearch_cli.backends.ray:open_ray",
}


@dataclass(frozen=True)
class DataAccess:
    """What a backend may need of the prepared data: where it is, its manifest, and how a
    node prepares its own copy (the data door's prepare_data), handed down from above."""

    data_dir: Path
    manifest: dict[str, Any]
    prepare: Any


def open_backend(name: str, *, workers: int | None, device: str, data: DataAccess,
                 address: str | None = None) -> Backend:
    """The backend called `name`, with `workers` slots (None: its default)."""
    if name not in BACKENDS:
        raise ArError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if address is not None and name != "ray":
        raise ArError("--address names a Ray cluster: use it with --backend ray")
    module, opener = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), opener)(
        workers, device, address=address, data_dir=data.data_dir, manifest=data.manifest,
        prepare=data.prepare)
