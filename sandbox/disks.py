"""Free space on the disks a job writes to: the runner kills a job that fills one."""

from __future__ import annotations

import os
from pathlib import Path

MB = 2**20


def filesystems(paths: list[Path]) -> list[Path]:
    """One path per file system among `paths` (the first of each): each is checked once."""
    seen, unique = set(), []
    for path in paths:
        try:
            device = os.stat(path).st_dev
        except OSError:
            continue
        if device not in seen:
            seen.add(device)
            unique.append(path)
    return unique


def free_mb_at(path: Path) -> float | None:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize / MB
