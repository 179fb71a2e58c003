"""`ar prepare`: train a BPE tokenizer on a source and write the token splits.

The data directory holds tokenizer.pkl, token_bytes.npy, train.bin, val.bin, holdout.bin
and manifest.json (formats in docs/internals.md). manifest.json is written last, so a
directory without one is never taken for complete; a prepare that fails or is killed
leaves the previous data as it was, or no manifest at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rustbpe
import tiktoken

from autoresearch_cli.doors import dedup
from autoresearch_cli.doors.sources import Source, parse_source
from autoresearch_cli.errors import DataError

# ---------------------------------------------------------------------------

MANIFEST_FORMAT = 2  # 2: near-copies of training documents dropped from val and holdout
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.pkl"
TOKEN_BYTES = "token_bytes.npy"
SPLITS = ("train", "val", "holdout")
BOS_TOKEN = "<|bos|>"
MAX_VOCAB = 65536  # token ids are stored as uint16
MIN_VOCAB = 257  # the 256 byte tokens plus <|bos|>
# GPT-4 style split, with numbers in groups of at most two digits (as the original).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_SAMPLE_CHARS = 100_000_000  # train the tokenizer on at most this much text
ENCODE_BATCH_CHARS = 4_000_000  # text handed to one batched encode call
# Below these a split cannot train or score a model meaningfully.
MIN_TOKENS = {"train": 16_384, "val": 1_024, "holdout": 1_024}

Progress = Callable[[str], None]


@dataclass
class PrepareReport:
    data_dir: Path
    skipped: bool  # the data already matched the request; nothing was written
    manifest: dict[str, Any]
    seconds: float


def split_of(text: str, val_percent: int, holdout_percent: int) -> str:
    """The split a document belongs to, from its text alone, so it never moves."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < val_percent:
        return "val"
    if bucket < val_percent + holdout_percent:
        return "holdout"
    return "train"


def prepare_data(
    data_dir: Path,
    *,
    source: str | Source,
    vocab_size: int,
    val_percent: int = 5,
    holdout_percent: int = 5,
    force: bool = False,
    on_progress: Progress | None = None,
) -> PrepareReport:
    """Build the data directory from a source, or return at once when it already matches."""
    started = time.monotonic()
    progress = on_progress or (lambda message: None)
    _check_request(vocab_size, val_percent, holdout_percent)
    src = parse_source(source) if isinstance(source, str) else source
    data_dir = Path(data_dir)
    wanted = {
        "format": MANIFEST_FORMAT,
        "source": src.spec,
        "fingerprint": src.fingerprint(data_dir),
        "vocab_size": vocab_size,
        "val_percent": val_percent,
        "holdout_percent": holdout_percent,
    }
    if not force:
        existing = _matching_manifest(data_dir, wanted)
        if existing is not None:
            _remove_leftovers(data_dir)
            return PrepareReport(data_dir, True, existing, time.monotonic() - started)

    data_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(data_dir):
        _remove_temp_files(data_dir)
        try:
            src.fetch(data_dir, progress)
            manifest = _build(data_dir, src, wanted, progress, started)
        finally:
            _remove_temp_files(data_dir)
    return PrepareReport(data_dir, False, manifest, manifest["seconds"])


def _check_request(vocab_size: int, val_percent: int, holdout_percent: int) -> None:
    if not isinstance(vocab_size, int):
        raise DataError(f"vocab_size must be a whole number, got {vocab_size!r}")
    if vocab_size > MAX_VOCAB:
        raise DataError(
            f"vocab_size {vocab_size} does not fit uint16 token files (at most {MAX_VOCAB})"
        )
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab_size {vocab_size} is too small: need at least {MIN_VOCAB} (256 bytes + <|bos|>)"
        )
    for name, value in (("val_percent", val_percent), ("holdout_percent", holdout_percent)):
        if not isinstance(value, int) or not 1 <= value <= 49:
            raise DataError(f"{name} must be a whole number from 1 to 49, got {value!r}")
    if val_percent + holdout_percent > 50:
        raise DataError(
            f"val_percent + holdout_percent must leave train at least half, got {val_percent + holdout_percent}"
        )


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """The manifest of a complete data directory; DataError when there is none."""
    try:
        manifest = json.loads((Path(data_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        raise DataError(f"no prepared data in {data_dir}; run `ar prepare` first") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(
            f"{data_dir / MANIFEST} is not a format {MANIFEST_FORMAT} manifest; run `ar prepare --force`"
        )
    return manifest


def _matching_manifest(data_dir: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if it was built from the same request and its files are whole."""
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text())
        if any(manifest.get(key) != value for key, value in wanted.items()):
            return None
        for split in SPLITS:
            entry = manifest["splits"][split]
            if (data_dir / entry["file"]).stat().st_size != entry["bytes"]:
                return None
        if _sha256_file(data_dir / TOKENIZER) != manifest["tokenizer_sha256"]:
            return None
        if not (data_dir / TOKEN_BYTES).is_file():
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


# ---------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """BPE ranks trained by rustbpe (vocab_size - 1 of them) plus <|bos|> as the last id."""
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - 1, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(ranks) < vocab_size - 1:
        raise DataError(
            f"corpus too small to train a {vocab_size}-token vocabulary: its training text "
            f"yields only {len(ranks)} distinct tokens; add text or lower vocab_size"
        )
    return tiktoken.Encoding(
        name=f"ar-bpe-{vocab_size}",
        pat_str=trainer.get_pattern(),
        mergeable_ranks=ranks,
        special_tokens={BOS_TOKEN: vocab_size - 1},
    )


def token_byte_lengths(encoding: tiktoken.Encoding) -> np.ndarray:
    """UTF-8 byte length of every token id; 0 for special tokens (bits per byte skip them)."""
    lengths = np.zeros(encoding.n_vocab, dtype=np.int32)
    for token in encoding.token_byte_values():
        lengths[encoding.encode_single_token(token)] = len(token)
    return lengths


def _training_sample(
    documents: Iterator[str], val_percent: int, holdout_percent: int, stats: dict[str, Any]
) -> Iterator[str]:
    """Train-split documents in source order, up to TOKENIZER_SAMPLE_CHARS of text."""
    for text in documents:
        if split_of(text, val_percent, holdout_percent) != "train":
            continue
        stats["documents"] += 1
        stats["chars"] += len(text)
        yield text
        if stats["chars"] >= TOKENIZER_SAMPLE_CHARS:
            stats["sampled"] = True
            return


# ---------------------------------------------------------------------------
# Building the data directory


class _SplitWriter:
    """One token file being written: counts and hashes what goes in."""

    def __init__(self, data_dir: Path, split: str) -> None:
        self.name = f"{split}.bin"
        self.temp = _temp_path(data_dir, self.name)
        self.handle = open(self.temp, "wb")
        self.sha256 = hashlib.sha256()
        self.tokens = self.documents = self.text_bytes = 0

    def write(self, token_lists: list[list[int]], bos_id: int, text_bytes: int) -> None:
        if not token_lists:
            return
        sizes = np.fromiter(
            (len(ids) + 1 for ids in token_lists), dtype=np.int64, count=len(token_lists)
        )
        block = np.empty(int(sizes.sum()), dtype="<u2")
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        block[starts] = bos_id
        for start, ids in zip(starts.tolist(), token_lists, strict=True):
            block[start + 1 : start + 1 + len(ids)] = ids
        data = block.tobytes()
        self.handle.write(data)
        self.sha256.update(data)
        self.tokens += len(block)
        self.documents += len(token_lists)
        self.text_bytes += text_bytes

    def close(self) -> dict[str, Any]:
        self.handle.close()
        return {
            "file": self.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.tokens * 2,
            "sha256": self.sha256.hexdigest(),
            "text_bytes": self.text_bytes,
        }


def _build(
    data_dir: Path, src: Source, wanted: dict[str, Any], progress: Progress, started: float
) -> dict[str, Any]:
    val_percent, holdout_percent = wanted["val_percent"], wanted["holdout_percent"]
    vocab_size = wanted["vocab_size"]
    progress(f"training a {vocab_size}-token BPE tokenizer on {src.spec}")
    sample: dict[str, Any] = {"documents": 0, "chars": 0, "sampled": False}
    texts = _training_sample(
        src.documents(data_dir, Counter()), val_percent, holdout_percent, sample
    )
    encoding = train_tokenizer(texts, vocab_size)
    sample["max_chars"] = TOKENIZER_SAMPLE_CHARS
    progress(
        f"tokenizer trained on {sample['documents']} documents ({sample['chars'] / 1e6:.1f}M chars)"
    )

    tokenizer_bytes = pickle.dumps(encoding)
    _temp_path(data_dir, TOKENIZER).write_bytes(tokenizer_bytes)
    with open(_temp_path(data_dir, TOKEN_BYTES), "wb") as handle:
        np.save(handle, token_byte_lengths(encoding))

    progress("looking for evaluation documents that nearly copy a training document")
    duplicates = dedup.find(src.documents(data_dir, Counter()),
                            lambda text: split_of(text, val_percent, holdout_percent))
    if duplicates.dropped:
        counts = ", ".join(f"{n} {split}" for split, n in sorted(duplicates.by_split.items()) if n)
        progress(f"dropped {counts} document(s) sharing at least {dedup.CONTAINMENT:.0%} of "
                 "their 8-word shingles with a training document")
    skipped: Counter[str] = Counter()
    splits = _encode_splits(data_dir, src.documents(data_dir, skipped), encoding, wanted, progress,
                            duplicates.dropped)
    _check_split_sizes(splits)
    manifest = {
        **wanted,
        "bos_id": vocab_size - 1,
        "dtype": "uint16",
        "splits": splits,
        "tokenizer_sha256": hashlib.sha256(tokenizer_bytes).hexdigest(),
        "tokenizer_training": sample,
        "documents": sum(entry["documents"] for entry in splits.values()),
        "skipped_documents": dict(sorted(skipped.items())),
        "near_duplicates": duplicates.record(),
        "seconds": 0.0,
    }
    _commit(data_dir, manifest, started)
    progress(f"wrote {data_dir}")
    return manifest


def _encode_splits(
    data_dir: Path,
    documents: Iterator[str],
    encoding: tiktoken.Encoding,
    wanted: dict[str, Any],
    progress: Progress,
    dropped: set[str] = frozenset(),  # type: ignore[assignment]
) -> dict[str, dict[str, Any]]:
    bos_id = wanted["vocab_size"] - 1
    threads = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    writers = {split: _SplitWriter(data_dir, split) for split in SPLITS}
    encoded = 0

    def flush(batch: list[str]) -> None:
        nonlocal encoded
        token_lists = encoding.encode_ordinary_batch(batch, num_threads=threads)
        grouped: dict[str, tuple[list[list[int]], list[int]]] = {
            split: ([], [0]) for split in SPLITS
        }
        for text, ids in zip(batch, token_lists, strict=True):
            split = split_of(text, wanted["val_percent"], wanted["holdout_percent"])
            if split != "train" and dropped and dedup.document_key(text) in dropped:
                continue  # a near-copy of a training document: it would score luck
            lists, text_bytes = grouped[split]
            lists.append(ids)
            text_bytes[0] += len(text.encode("utf-8"))
        for split, (lists, text_bytes) in grouped.items():
            writers[split].write(lists, bos_id, text_bytes[0])
        encoded += len(batch)
        progress(f"encoded {encoded} documents")

    try:
        batch: list[str] = []
        batch_chars = 0
        for text in documents:
            batch.append(text)
            batch_chars += len(text)
            if batch_chars >= ENCODE_BATCH_CHARS:
                flush(batch)
                batch, batch_chars = [], 0
        if batch:
            flush(batch)
    finally:
        results = {split: writer.close() for split, writer in writers.items()}
    return results


def _check_split_sizes(splits: dict[str, dict[str, Any]]) -> None:
    total_documents = sum(entry["documents"] for entry in splits.values())
    total_tokens = sum(entry["tokens"] for entry in splits.values())
    for split in SPLITS:
        entry = splits[split]
        if entry["documents"] == 0 or entry["tokens"] < MIN_TOKENS[split]:
            raise DataError(
                f"corpus too small to split: {split} got {entry['documents']} documents and "
                f"{entry['tokens']} tokens, needs at least 1 document and {MIN_TOKENS[split]} tokens "
                f"({total_documents} documents, {total_tokens} tokens in all); add text"
            )


def _commit(data_dir: Path, manifest: dict[str, Any], started: float) -> None:
    """Move the new files into place, the manifest last: it is what marks the data complete."""
    (data_dir / MANIFEST).unlink(missing_ok=True)
    for name in (TOKENIZER, TOKEN_BYTES, *(f"{split}.bin" for split in SPLITS)):
        os.replace(_temp_path(data_dir, name), data_dir / name)
    manifest["seconds"] = round(time.monotonic() - started, 3)
    temp = _temp_path(data_dir, MANIFEST)
    temp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temp, data_dir / MANIFEST)


def _temp_path(data_dir: Path, name: str) -> Path:
    return data_dir / f".{name}.tmp"


def _remove_leftovers(data_dir: Path) -> None:
    """Delete what a killed prepare left behind, unless a prepare is running now."""
    if any(data_dir.glob(".*.tmp")):
        with suppress(DataError), _exclusive(data_dir):
            _remove_temp_files(data_dir)


def _remove_temp_files(data_dir: Path) -> None:
    for temp in data_dir.glob(".*.tmp"):
        temp.unlink(missing_ok=True)


@contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the data directory; a second prepare fails at once."""
    with open(data_dir / ".prepare.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another ar prepare is writing {data_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
