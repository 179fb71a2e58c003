"""`make bench`: every benchmark in one go. Each prints its own figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_cli.py", "bench_prepare.py", "bench_sandbox.py", "bench_loop.py", "bench_workers.py",
           "bench_report.py", "bench_ray.py", "bench_eval.py", "bench_train.py", "bench_cpu.py",
           "bench_wall.py"]


def main() -> int:
    failed = []
    for name in BENCHES:
        path = HERE / name
        if not path.exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(path)], cwd=HERE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
