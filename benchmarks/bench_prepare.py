"""Time `ar prepare --source stdlib`: a fresh build, then the second (skipped) call.

Run:  python benchmarks/bench_prepare.py [--vocab-size 2048] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoresearch_cli.doors.config import PROFILES  # noqa: E402
from autoresearch_cli.doors.data import prepare_data  # noqa: E402


def one_round(vocab_size: int) -> dict[str, float]:
    marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as folder:
        data_dir = Path(folder) / "data"
        started = time.perf_counter()

        def mark(message: str) -> None:
            if message.startswith("tokenizer trained"):
                marks["tokenizer_s"] = time.perf_counter() - started

        fresh = prepare_data(data_dir, source="stdlib", vocab_size=vocab_size, on_progress=mark)
        marks["fresh_s"] = time.perf_counter() - started
        started = time.perf_counter()
        again = prepare_data(data_dir, source="stdlib", vocab_size=vocab_size)
        marks["skipped_s"] = time.perf_counter() - started
        assert not fresh.skipped and again.skipped
        marks["manifest"] = fresh.manifest
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=PROFILES["cpu"]["vocab_size"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rounds = [one_round(args.vocab_size) for _ in range(args.repeat)]
    manifest = rounds[0]["manifest"]
    splits = manifest["splits"]
    text_mb = sum(entry["text_bytes"] for entry in splits.values()) / 1e6
    print(f"stdlib corpus: {manifest['documents']} documents, {text_mb:.1f} MB of text")
    print(f"  skipped: {manifest['skipped_documents']}")
    for name, entry in splits.items():
        print(
            f"  {name:8s} {entry['documents']:6d} documents {entry['tokens']:>11,d} tokens "
            f"{entry['text_bytes'] / entry['tokens']:.2f} bytes/token"
        )
    print(f"vocab_size {args.vocab_size}, {args.repeat} rounds (median, min, max):")
    for key, label in (
        ("fresh_s", "fresh prepare"),
        ("tokenizer_s", "  of which tokenizer"),
        ("skipped_s", "second call (skipped)"),
    ):
        values = [r[key] for r in rounds]
        print(
            f"  {label:22s} {statistics.median(values):8.3f} s "
            f"{min(values):8.3f} {max(values):8.3f}"
        )


if __name__ == "__main__":
    main()
