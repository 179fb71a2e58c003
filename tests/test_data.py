"""ar prepare: sources, splits, tokenizer and the data directory, with real rustbpe/tiktoken."""

from __future__ import annotations

import hashlib
import http.server
import json
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from autoresearch_cli.doors import data, sources
from autoresearch_cli.doors.data import prepare_data, read_manifest, split_of
from autoresearch_cli.doors.sources import ClimbmixSource, FilesSource, StdlibSource, parse_source
from autoresearch_cli.errors import DataError

VOCAB = 320  # 63 merges: trains in milliseconds on the small corpora below
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "pa", "ba", "zu", "fo", "gi"]


def document(index: int) -> str:
    """A deterministic text of made-up words, different for every index."""
    rng = random.Random(index)
    words = [
        "".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(rng.randint(60, 120))
    ]
    return f"Document {index}.\n" + " ".join(words) + "\n"


def write_corpus(folder: Path, indexes: range) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in indexes:
        path = folder / f"sub{index % 3}" / f"doc_{index:04d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(document(index))
        paths.append(path)
    return paths


def prepare(data_dir: Path, corpus: Path, **options):
    options.setdefault("vocab_size", VOCAB)
    return prepare_data(data_dir, source=f"files:{corpus}/**/*.txt", **options)


def read_split(data_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(data_dir / f"{split}.bin", dtype="<u2")


def split_documents(data_dir: Path, split: str) -> list[str]:
    """Decode a token file back into its documents, cutting at every <|bos|>."""
    with open(data_dir / "tokenizer.pkl", "rb") as handle:
        encoding = pickle.load(handle)
    bos_id = encoding.n_vocab - 1
    tokens = read_split(data_dir, split).tolist()
    starts = [i for i, token in enumerate(tokens) if token == bos_id] + [len(tokens)]
    return [encoding.decode(tokens[a + 1 : b]) for a, b in zip(starts, starts[1:], strict=False)]


def mtimes(data_dir: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in data_dir.iterdir() if path.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One corpus prepared once, shared by the read-only checks."""
    root = tmp_path_factory.mktemp("built")
    write_corpus(root / "corpus", range(300))
    report = prepare(root / "data", root / "corpus")
    return root, report


# ---------------------------------------------------------------------------
# Splits


def test_split_is_a_function_of_the_text_alone():
    texts = [document(i) for i in range(2000)]
    first = [split_of(text, 5, 5) for text in texts]
    assert first == [split_of(text, 5, 5) for text in texts]
    counts = {split: first.count(split) for split in ("train", "val", "holdout")}
    assert 60 < counts["val"] < 140 and 60 < counts["holdout"] < 140
    bucket = int(hashlib.sha256(texts[0].encode()).hexdigest()[:8], 16) % 100
    expected = "val" if bucket < 5 else "holdout" if bucket < 10 else "train"
    assert first[0] == expected


def test_adding_documents_never_moves_existing_ones(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, range(300))
    prepare(tmp_path / "before", corpus)
    write_corpus(corpus, range(300, 450))
    prepare(tmp_path / "after", corpus)
    for split in ("train", "val", "holdout"):
        before = set(split_documents(tmp_path / "before", split))
        after = set(split_documents(tmp_path / "after", split))
        assert before and before <= after
    everything = set().union(
        *(split_documents(tmp_path / "after", s) for s in ("train", "val", "holdout"))
    )
    assert everything == {document(i) for i in range(450)}


# ---------------------------------------------------------------------------
# The data directory


def test_manifest_matches_the_token_files(built):
    root, report = built
    data_dir, manifest = root / "data", report.manifest
    assert not report.skipped and report.data_dir == data_dir
    assert (
        json.loads((data_dir / "manifest.json").read_text()) == manifest == read_manifest(data_dir)
    )
    assert manifest["format"] == 2 and manifest["dtype"] == "uint16"
    assert manifest["near_duplicates"]["dropped"] == {"holdout": 0, "val": 0}
    assert manifest["vocab_size"] == VOCAB and manifest["bos_id"] == VOCAB - 1
    assert manifest["documents"] == 300
    for split in ("train", "val", "holdout"):
        entry = manifest["splits"][split]
        raw = (data_dir / entry["file"]).read_bytes()
        tokens = np.frombuffer(raw, dtype="<u2")
        assert entry["bytes"] == len(raw) and entry["tokens"] == len(tokens)
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
        assert tokens[0] == VOCAB - 1 and tokens.max() < VOCAB
        assert int((tokens == VOCAB - 1).sum()) == entry["documents"]
    assert (
        manifest["tokenizer_sha256"]
        == hashlib.sha256((data_dir / "tokenizer.pkl").read_bytes()).hexdigest()
    )
    assert sorted(p.name for p in data_dir.iterdir() if not p.name.startswith(".")) == [
        "holdout.bin",
        "manifest.json",
        "token_bytes.npy",
        "tokenizer.pkl",
        "train.bin",
        "val.bin",
    ]


def test_every_document_starts_with_bos_and_decodes_back(built):
    root, _ = built
    decoded = [
        doc
        for split in ("train", "val", "holdout")
        for doc in split_documents(root / "data", split)
    ]
    assert sorted(decoded) == sorted(document(i) for i in range(300))


def test_tokenizer_round_trip_and_token_bytes(built):
    root, _ = built
    with open(root / "data" / "tokenizer.pkl", "rb") as handle:
        encoding = pickle.load(handle)
    assert encoding.n_vocab == VOCAB
    assert encoding.encode_single_token("<|bos|>") == VOCAB - 1
    text = "Document 7.\nkalo mine rutaso 123456 naïve — 你好 \t\r\n  end"
    assert encoding.decode(encoding.encode_ordinary(text)) == text
    assert encoding.encode("<|bos|>x", allowed_special="all")[0] == VOCAB - 1
    token_bytes = np.load(root / "data" / "token_bytes.npy")
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (VOCAB,)
    assert token_bytes[VOCAB - 1] == 0 and token_bytes[:256].tolist() == [1] * 256
    assert token_bytes[encoding.encode_single_token(b"ka")] == 2


def test_second_prepare_is_skipped_fast_and_touches_nothing(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, range(300))
    first = prepare(tmp_path / "data", corpus)
    before = mtimes(tmp_path / "data")
    started = time.monotonic()
    second = prepare(tmp_path / "data", corpus)
    assert second.skipped and time.monotonic() - started < 1.0
    assert second.manifest == first.manifest
    assert mtimes(tmp_path / "data") == before


def test_force_and_changes_rebuild(tmp_path):
    corpus = tmp_path / "corpus"
    paths = write_corpus(corpus, range(300))
    first = prepare(tmp_path / "data", corpus)
    forced = prepare(tmp_path / "data", corpus, force=True)
    assert not forced.skipped and forced.manifest["splits"] == first.manifest["splits"]
    assert not prepare(tmp_path / "data", corpus, vocab_size=VOCAB + 16).skipped
    paths[0].write_text(document(0) + "more words\n")
    changed = prepare(tmp_path / "data", corpus, vocab_size=VOCAB + 16)
    assert not changed.skipped and changed.manifest["fingerprint"] != first.manifest["fingerprint"]
    (tmp_path / "data" / "val.bin").write_bytes(b"\0\0")
    assert not prepare(tmp_path / "data", corpus, vocab_size=VOCAB + 16).skipped


def test_tokenizer_trains_on_a_deterministic_sample_of_train(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TOKENIZER_SAMPLE_CHARS", 30_000)
    corpus = tmp_path / "corpus"
    write_corpus(corpus, range(300))
    first = prepare(tmp_path / "a", corpus).manifest
    second = prepare(tmp_path / "b", corpus).manifest
    sample = first["tokenizer_training"]
    assert sample["sampled"] and 30_000 <= sample["chars"] < 32_000
    assert sample["documents"] < first["splits"]["train"]["documents"]
    assert first["tokenizer_sha256"] == second["tokenizer_sha256"]
    assert first["splits"] == second["splits"]


def test_a_failed_rebuild_leaves_the_old_data_whole(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, range(300))
    prepare(tmp_path / "data", corpus)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}

    def interrupt(message: str) -> None:
        if message.startswith("encoded"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "data", corpus, force=True, on_progress=interrupt)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before
    assert prepare(tmp_path / "data", corpus).skipped


KILLED_PREPARE = """
import os, signal, sys
from pathlib import Path
from autoresearch_cli.doors.data import prepare_data

def die_at(message):
    if message.startswith(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

prepare_data(Path(sys.argv[1]), source=f"files:{sys.argv[2]}/**/*.txt",
             vocab_size=int(sys.argv[4]), force=True, on_progress=die_at)
"""


def test_a_killed_prepare_never_looks_complete(tmp_path):
    corpus, data_dir = tmp_path / "corpus", tmp_path / "data"
    write_corpus(corpus, range(300))

    def killed_at(stage: str) -> None:
        args = [sys.executable, "-c", KILLED_PREPARE, str(data_dir), str(corpus), stage, str(VOCAB)]
        done = subprocess.run(args, cwd=Path(__file__).resolve().parents[1], capture_output=True)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]

    killed_at("encoded")
    assert not (data_dir / "manifest.json").exists() and list(data_dir.glob(".*.tmp"))
    with pytest.raises(DataError):
        read_manifest(data_dir)
    first = prepare(data_dir, corpus)
    assert not first.skipped and not list(data_dir.glob(".*.tmp"))
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    killed_at("encoded")
    assert {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name in before} == before
    assert list(data_dir.glob(".*.tmp"))
    assert prepare(data_dir, corpus).skipped and not list(data_dir.glob(".*.tmp"))


def test_a_second_prepare_on_the_same_directory_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, range(300))
    (tmp_path / "data").mkdir()
    with data._exclusive(tmp_path / "data"):
        with pytest.raises(DataError, match="another ar prepare"):
            prepare(tmp_path / "data", corpus)


# ---------------------------------------------------------------------------
# Sources and errors


def test_files_glob_relative_home_and_unreadable_files(tmp_path, monkeypatch):
    home = Path.home()
    write_corpus(home / "texts", range(300))
    (home / "texts" / "blob.txt").write_bytes(b"\x89PNG\0\0binary")
    (home / "texts" / "latin1.txt").write_bytes("café".encode("latin-1"))
    (home / "texts" / "empty.txt").write_text("")
    report = prepare_data(tmp_path / "a", source="files:~/texts/**/*.txt", vocab_size=VOCAB)
    assert report.manifest["source"] == "files:~/texts/**/*.txt"
    assert report.manifest["documents"] == 300
    assert report.manifest["skipped_documents"] == {"binary": 1, "empty": 1, "undecodable": 1}
    monkeypatch.chdir(home)
    relative = prepare_data(tmp_path / "b", source="files:texts/**/*.txt", vocab_size=VOCAB)
    assert relative.manifest["splits"] == report.manifest["splits"]


def test_files_glob_leaves_out_the_data_directory(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus", range(5))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    paths = FilesSource("**/*").paths(tmp_path / "data")
    assert len(paths) == 5 and all("/data/" not in path for path in paths)


def test_empty_glob_is_an_error(tmp_path):
    with pytest.raises(DataError, match="matched no files"):
        prepare_data(
            tmp_path / "data", source=f"files:{tmp_path}/nothing/**/*.md", vocab_size=VOCAB
        )
    assert not (tmp_path / "data").exists()
    with pytest.raises(DataError, match="run `ar prepare` first"):
        read_manifest(tmp_path / "data")


def test_too_small_corpus_is_an_error(tmp_path):
    write_corpus(tmp_path / "corpus", range(40))
    with pytest.raises(
        DataError, match=r"corpus too small to split: \w+ got \d+ documents and \d+ tokens, needs"
    ):
        prepare(tmp_path / "data", tmp_path / "corpus")
    assert not (tmp_path / "data" / "manifest.json").exists()
    assert not list((tmp_path / "data").glob(".*.tmp"))


def test_too_little_text_for_the_vocabulary_is_an_error(tmp_path):
    write_corpus(tmp_path / "corpus", range(40))
    with pytest.raises(DataError, match="too small to train a 8192-token vocabulary"):
        prepare(tmp_path / "data", tmp_path / "corpus", vocab_size=8192)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("wikipedia", "unknown data source"),
        ("files:", "needs a glob"),
        ("climbmix:0", "shard count"),
        ("climbmix:ten", "shard count"),
        ("climbmix:99999", "shard count"),
    ],
)
def test_bad_source_spec_is_an_error(spec, message):
    with pytest.raises(DataError, match=message):
        parse_source(spec)


def test_source_specs():
    assert parse_source("stdlib").spec == "stdlib"
    assert parse_source("files:docs/*.md").spec == "files:docs/*.md"
    assert parse_source("climbmix").spec == "climbmix:10"
    assert parse_source("climbmix:3").shard_names[-1] == "shard_00002.parquet"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"vocab_size": 70000}, "does not fit uint16"),
        ({"vocab_size": 100}, "too small"),
        ({"vocab_size": 2048.0}, "whole number"),
        ({"vocab_size": VOCAB, "val_percent": 0}, "val_percent"),
        ({"vocab_size": VOCAB, "holdout_percent": 30, "val_percent": 30}, "at least half"),
    ],
)
def test_bad_request_is_an_error(tmp_path, options, message):
    with pytest.raises(DataError, match=message):
        prepare_data(tmp_path / "data", source="stdlib", **options)


def test_stdlib_lists_sorted_python_files_outside_site_packages(tmp_path):
    for name in (
        "os.py",
        "json/__init__.py",
        "site-packages/evil.py",
        "dist-packages/evil.py",
        "__pycache__/x.py",
        "README.txt",
    ):
        (tmp_path / "lib" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "lib" / name).write_text("x = 1\n")
    source = StdlibSource(tmp_path / "lib")
    names = [Path(path).relative_to(tmp_path / "lib").as_posix() for path in source.paths(tmp_path)]
    assert names == ["json/__init__.py", "os.py"]
    real = StdlibSource()
    listing = real.listing(tmp_path)
    assert len(listing) > 500 and [p for p, _, _ in listing] == sorted(p for p, _, _ in listing)
    assert real.fingerprint(tmp_path) == StdlibSource().fingerprint(tmp_path)


# ---------------------------------------------------------------------------
# climbmix, served from 127.0.0.1


def write_shard(path: Path, indexes: range) -> bytes:
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(indexes), "text": [document(i) for i in indexes]})
    parquet.write_table(table, path, row_group_size=40)
    return path.read_bytes()


class ShardServer:
    """Serves {name: bytes}; the first `failures` requests get HTTP 503."""

    def __init__(self, files: dict[str, bytes], failures: int = 0) -> None:
        self.files, self.failures, self.requests, self.agents = files, failures, [], set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                server.agents.add(self.headers["User-Agent"])
                body = server.files.get(self.path.rsplit("/", 1)[-1])
                if len(server.requests) <= server.failures:
                    self.send_error(503)
                elif body is None:
                    self.send_error(404)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resolve/main"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    return {
        "shard_00000.parquet": write_shard(folder / "a.parquet", range(0, 160)),
        "shard_00001.parquet": write_shard(folder / "b.parquet", range(160, 320)),
    }


def test_climbmix_downloads_caches_and_reads_parquet(tmp_path, shards):
    server = ShardServer(shards)
    try:
        source = ClimbmixSource(2, base_url=server.url, retry_delay=0.01)
        report = prepare_data(tmp_path / "data", source=source, vocab_size=VOCAB)
        assert report.manifest["source"] == "climbmix:2" and report.manifest["documents"] == 320
        assert sorted(p.name for p in (tmp_path / "data" / "climbmix").iterdir()) == sorted(shards)
        assert len(server.requests) == 2 and server.agents == {sources.USER_AGENT}
        assert prepare_data(tmp_path / "data", source=source, vocab_size=VOCAB).skipped
        rebuilt = prepare_data(tmp_path / "data", source=source, vocab_size=VOCAB, force=True)
        assert len(server.requests) == 2 and rebuilt.manifest["splits"] == report.manifest["splits"]
        decoded = [
            d for s in ("train", "val", "holdout") for d in split_documents(tmp_path / "data", s)
        ]
        assert sorted(decoded) == sorted(document(i) for i in range(320))
    finally:
        server.close()


def test_climbmix_retries_a_flaky_server(tmp_path, shards):
    server = ShardServer(shards, failures=2)
    try:
        source = ClimbmixSource(1, base_url=server.url, retry_delay=0.01, workers=1)
        source.fetch(tmp_path, lambda message: None)
        assert (tmp_path / "climbmix" / "shard_00000.parquet").read_bytes() == shards[
            "shard_00000.parquet"
        ]
        assert len(server.requests) == 3
    finally:
        server.close()


def test_climbmix_gives_up_with_a_clear_error(tmp_path, shards):
    server = ShardServer(shards, failures=100)
    try:
        with pytest.raises(
            DataError, match=r"cannot download .*shard_00000.parquet after 3 attempts: HTTP 503"
        ):
            ClimbmixSource(1, base_url=server.url, attempts=3, retry_delay=0.01).fetch(
                tmp_path, print
            )
        server.failures = 0
        with pytest.raises(DataError, match="HTTP 404"):
            ClimbmixSource(3, base_url=server.url, retry_delay=0.01).fetch(tmp_path, print)
    finally:
        server.close()
    assert not list((tmp_path / "climbmix").glob("*.part"))


def test_climbmix_from_a_file_url_and_a_truncated_cache(tmp_path, shards):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, body in shards.items():
        (mirror / name).write_bytes(body)
    cache = tmp_path / "data" / "climbmix"
    cache.mkdir(parents=True)
    (cache / "shard_00000.parquet").write_bytes(shards["shard_00000.parquet"][:100])
    ClimbmixSource(2, base_url=mirror.as_uri()).fetch(tmp_path / "data", lambda message: None)
    assert (cache / "shard_00000.parquet").read_bytes() == shards["shard_00000.parquet"]


def test_climbmix_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"pip install 'ar\[climbmix\]'"):
        prepare_data(tmp_path / "data", source="climbmix:1", vocab_size=VOCAB)
    assert not (tmp_path / "data" / "climbmix").exists()


def test_climbmix_base_url_follows_hf_endpoint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local/")
    assert ClimbmixSource(1).base_url == (
        "http://mirror.local/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    )


def test_evaluation_documents_that_nearly_copy_a_training_document_are_dropped(tmp_path):
    """A val document and a longer training document holding most of its text (a file
    vendored twice, a version with a few lines changed): the val copy is dropped, and the
    manifest says so; unrelated val documents stay."""
    write_corpus(tmp_path / "corpus", range(300))
    val = next(i for i in range(300) if split_of(document(i), 5, 5) == "val")
    body = document(val).split("\n", 1)[1]
    for extra in range(1000, 2000):  # a training document holding val's text, and more
        copy = f"Vendored copy {extra}.\n{body}\n" + document(extra)
        if split_of(copy, 5, 5) == "train":
            break
    (tmp_path / "corpus" / "copy.txt").write_text(copy)
    report = prepare(tmp_path / "data", tmp_path / "corpus")
    near = report.manifest["near_duplicates"]
    assert near["checked"] and near["dropped"]["val"] == 1 and near["containment"] == 0.5
    kept = split_documents(tmp_path / "data", "val")
    assert not any(text.startswith(f"Document {val}.") for text in kept)
    assert report.manifest["splits"]["val"]["documents"] == sum(
        1 for i in range(300) if split_of(document(i), 5, 5) == "val") - 1


def test_shingles_and_containment():
    from autoresearch_cli.doors import dedup

    text = " ".join(f"w{i}" for i in range(40))
    assert len(dedup.shingles(text)) == 40 - dedup.SHINGLE_WORDS + 1
    assert dedup.shingles("too short") == dedup.shingles("too  short")
    assert dedup.shingles("") == set()
    found = dedup.find([text, "other " + text, " ".join(f"v{i}" for i in range(40))],
                       lambda t: "val" if t == text else "train")
    assert found.by_split == {"val": 1, "holdout": 0} and dedup.document_key(text) in found.dropped
