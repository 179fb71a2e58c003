"""Evaluation documents that nearly copy a training document, found before they are split.

Documents go to train, val or holdout by a hash of their text, so two near-copies of one
file (a vendored module, a version with a few lines changed) can land on both sides. A
model that happens to train on such a copy late then scores luck on validation. `ar
prepare` drops every val or holdout document that shares at least CONTAINMENT of its
8-word shingles with one training document, and says how many it dropped.

Candidates come from datasketch's LSH Ensemble (MinHash, a containment query: a short
evaluation document inside a long training one is found too); each candidate is then
checked exactly on the shingles. Corpora with more than MAX_DOCUMENTS documents are not
checked (their MinHashes would not fit in memory), and the manifest says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

SHINGLE_WORDS = 8
CONTAINMENT = 0.5  # share of an evaluation document's shingles found in one training doc
NUM_PERM = 64
MAX_DOCUMENTS = 300_000


def document_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def shingles(text: str) -> set[int]:
    """The document's 8-word shingles, as 64-bit hashes (whitespace-separated words)."""
    words = text.split()
    if len(words) < SHINGLE_WORDS:
        return {_hash(" ".join(words))} if words else set()
    return {_hash(" ".join(words[i:i + SHINGLE_WORDS])) for i in range(len(words) - SHINGLE_WORDS + 1)}


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _minhash(values: set[int]):
    from datasketch import MinHash

    sketch = MinHash(num_perm=NUM_PERM, seed=1)
    if values:
        sketch.update_batch(np.fromiter(values, dtype=np.uint64).view(np.uint8).reshape(-1, 8))
    return sketch


@dataclass
class Duplicates:
    dropped: set[str] = field(default_factory=set)  # document keys of evaluation documents
    by_split: dict[str, int] = field(default_factory=dict)
    checked: bool = True
    note: str = ""

    def record(self) -> dict:
        return {"dropped": dict(sorted(self.by_split.items())), "checked": self.checked,
                "containment": CONTAINMENT, "shingle_words": SHINGLE_WORDS, "note": self.note}


def find(documents: Iterable[str], split_of: Callable[[str], str]) -> Duplicates:
    """The evaluation documents to drop: those containing CONTAINMENT of their shingles
    in one training document."""
    from datasketch import MinHashLSHEnsemble

    train: list[tuple[set[int], object]] = []
    evaluation: list[tuple[str, str, set[int], object]] = []
    for count, text in enumerate(documents, start=1):
        if count > MAX_DOCUMENTS:
            return Duplicates(checked=False, note=f"not checked: more than {MAX_DOCUMENTS:,} documents")
        grams = shingles(text)
        if not grams:
            continue
        split = split_of(text)
        if split == "train":
            train.append((grams, _minhash(grams)))
        else:
            evaluation.append((document_key(text), split, grams, _minhash(grams)))
    found = Duplicates(by_split={"val": 0, "holdout": 0})
    if not train or not evaluation:
        return found
    index = MinHashLSHEnsemble(threshold=CONTAINMENT * 0.8, num_perm=NUM_PERM, num_part=8)
    index.index((number, sketch, len(grams)) for number, (grams, sketch) in enumerate(train))
    for key, split, grams, sketch in evaluation:
        for number in index.query(sketch, len(grams)):
            if len(grams & train[number][0]) >= CONTAINMENT * len(grams):
                found.dropped.add(key)
                found.by_split[split] = found.by_split.get(split, 0) + 1
                break
    return found
