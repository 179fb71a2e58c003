"""Start-up time of `ar --help` (target <= 0.5 s: torch and litellm are imported lazily)."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.5


def main() -> None:
    ar = Path(sys.executable).with_name("ar")
    ar_cmd = [str(ar)] if ar.exists() else [shutil.which("ar") or "ar"]
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        subprocess.run([*ar_cmd, "--help"], check=True, capture_output=True)
        timings.append(time.perf_counter() - start)
    median = statistics.median(timings)
    verdict = "ok" if median <= TARGET_S else "OVER TARGET"
    print(f"ar --help: median {median:.3f} s over {len(timings)} runs (target <= {TARGET_S} s) {verdict}")


if __name__ == "__main__":
    main()
