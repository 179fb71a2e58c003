"""Where `ar prepare` finds its documents: the standard library, local files, or climbmix.

A source turns a spec (`stdlib`, `files:GLOB`, `climbmix[:N]`) into a fingerprint that
changes whenever its documents may have changed, an optional fetch step (downloads), and
a stream of documents, one per file or parquet row.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import os
import shutil
import sysconfig
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Protocol

from autoresearch_cli import __version__
from autoresearch_cli.errors import DataError

Progress = Callable[[str], None]

SOURCE_HELP = "stdlib, files:GLOB or climbmix[:N]"
CLIMBMIX_REPO_PATH = "datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_SHARDS = 6543  # shard_00000 .. shard_06542
CLIMBMIX_DEFAULT_SHARDS = 10  # as the original's default download
CLIMBMIX_CACHE = "climbmix"  # folder under the data directory
BINARY_SNIFF_BYTES = 8192  # a NUL byte in this prefix marks a file as binary
PARQUET_MAGIC = b"PAR1"
USER_AGENT = f"ar/{__version__} (autoresearch_cli prepare)"


class Source(Protocol):
    spec: str

    def fingerprint(self, data_dir: Path) -> str: ...

    def fetch(self, data_dir: Path, progress: Progress) -> None: ...

    def documents(self, data_dir: Path, skipped: Counter[str]) -> Iterator[str]: ...


def parse_source(text: str) -> Source:
    """Turn a source spec into a source object; DataError for a spec it does not know."""
    spec = text.strip()
    if spec == "stdlib":
        return StdlibSource()
    if spec.startswith("files:"):
        pattern = spec.removeprefix("files:").strip()
        if not pattern:
            raise DataError("files: needs a glob pattern, e.g. files:'docs/**/*.md'")
        return FilesSource(pattern)
    if spec == "climbmix" or spec.startswith("climbmix:"):
        count = spec.removeprefix("climbmix").removeprefix(":") or str(CLIMBMIX_DEFAULT_SHARDS)
        if not count.isdigit() or not 1 <= int(count) <= CLIMBMIX_SHARDS:
            raise DataError(
                f"climbmix:N needs a shard count from 1 to {CLIMBMIX_SHARDS}, got {count!r}"
            )
        return ClimbmixSource(int(count))
    raise DataError(f"unknown data source {text!r}; use {SOURCE_HELP}")


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


# ---------------------------------------------------------------------------
# Local files: one document per file


class _FileSource:
    """Documents are files; the fingerprint is their sorted paths, sizes and mtimes."""

    spec = ""

    def __init__(self) -> None:
        self._listing: list[tuple[str, int, int]] | None = None

    def paths(self, data_dir: Path) -> list[str]:
        raise NotImplementedError

    def listing(self, data_dir: Path) -> list[tuple[str, int, int]]:
        if self._listing is None:
            entries = []
            for path in self.paths(data_dir):
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                entries.append((path, stat.st_size, stat.st_mtime_ns))
            self._listing = entries
        return self._listing

    def fingerprint(self, data_dir: Path) -> str:
        return _digest([self.spec, self.listing(data_dir)])

    def fetch(self, data_dir: Path, progress: Progress) -> None:
        return None

    def documents(self, data_dir: Path, skipped: Counter[str]) -> Iterator[str]:
        for path, _size, _mtime in self.listing(data_dir):
            try:
                raw = Path(path).read_bytes()
            except OSError:
                skipped["unreadable"] += 1
                continue
            if b"\0" in raw[:BINARY_SNIFF_BYTES]:
                skipped["binary"] += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                continue
            if not text:
                skipped["empty"] += 1
                continue
            yield text


class StdlibSource(_FileSource):
    """The *.py files of the running Python's standard library: offline, everywhere."""

    spec = "stdlib"
    excluded_dirs = frozenset({"site-packages", "dist-packages", "__pycache__"})

    def __init__(self, root: Path | None = None) -> None:
        super().__init__()
        self.root = Path(root or sysconfig.get_paths()["stdlib"])

    def paths(self, data_dir: Path) -> list[str]:
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [name for name in dirs if name not in self.excluded_dirs]
            found.extend(os.path.join(folder, name) for name in files if name.endswith(".py"))
        if not found:
            raise DataError(f"no *.py files under the standard library at {self.root}")
        return sorted(found)


class FilesSource(_FileSource):
    """Files matching a glob (`**` recurses), relative to the current directory or absolute."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern
        self.spec = f"files:{pattern}"

    def paths(self, data_dir: Path) -> list[str]:
        pattern = os.path.expanduser(self.pattern)
        own_data = str(data_dir.resolve()) + os.sep
        found = {
            os.path.abspath(match)
            for match in glob.glob(pattern, recursive=True)
            if os.path.isfile(match)
        }
        found = {path for path in found if not os.path.realpath(path).startswith(own_data)}
        if not found:
            where = "" if os.path.isabs(pattern) else f" (searched from {os.getcwd()})"
            raise DataError(f"{self.spec} matched no files{where}")
        return sorted(found)


# ---------------------------------------------------------------------------
# climbmix: the original's parquet shards, downloaded once into a cache


def climbmix_base_url() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{CLIMBMIX_REPO_PATH}"


def _parquet_module():
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError(
            "the climbmix source needs pyarrow; install it with: pip install 'ar[climbmix]'"
        ) from None
    return parquet


class ClimbmixSource:
    """The first N shards of karpathy/climbmix-400b-shuffle; a document is one row's text."""

    def __init__(
        self,
        num_shards: int = CLIMBMIX_DEFAULT_SHARDS,
        *,
        base_url: str | None = None,
        attempts: int = 5,
        retry_delay: float = 2.0,
        timeout: float = 30.0,
        workers: int = 4,
    ) -> None:
        self.num_shards = num_shards
        self.spec = f"climbmix:{num_shards}"
        self.base_url = (base_url or climbmix_base_url()).rstrip("/")
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.workers = workers

    @property
    def shard_names(self) -> list[str]:
        return [f"shard_{index:05d}.parquet" for index in range(self.num_shards)]

    def fingerprint(self, data_dir: Path) -> str:
        return _digest([self.spec, self.shard_names])

    def fetch(self, data_dir: Path, progress: Progress) -> None:
        _parquet_module()
        cache = data_dir / CLIMBMIX_CACHE
        cache.mkdir(parents=True, exist_ok=True)
        for stale in cache.glob("*.part"):
            stale.unlink()
        missing = [name for name in self.shard_names if not _is_parquet(cache / name)]
        if not missing:
            progress(f"climbmix: all {self.num_shards} shards cached in {cache}")
            return
        progress(f"climbmix: downloading {len(missing)} of {self.num_shards} shards to {cache}")
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(missing)))) as pool:
            futures = {pool.submit(self._download, name, cache / name): name for name in missing}
            try:
                for done, future in enumerate(as_completed(futures), start=1):
                    future.result()
                    progress(f"climbmix: downloaded {futures[future]} ({done}/{len(missing)})")
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _download(self, name: str, dest: Path) -> None:
        url = f"{self.base_url}/{name}"
        part = dest.with_name(dest.name + ".part")
        last_error = ""
        for attempt in range(1, self.attempts + 1):
            try:
                request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    expected = response.headers.get("Content-Length")
                    with open(part, "wb") as out:
                        shutil.copyfileobj(response, out, 1 << 20)
                if expected is not None and part.stat().st_size != int(expected):
                    raise OSError(f"got {part.stat().st_size} of {expected} bytes")
                if not _is_parquet(part):
                    raise OSError("the download is not a parquet file")
                os.replace(part, dest)
                return
            except urllib.error.HTTPError as exc:
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    raise DataError(
                        f"cannot download {url}: HTTP {exc.code} {exc.reason}"
                    ) from None
                last_error = f"HTTP {exc.code} {exc.reason}"
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, FileNotFoundError):
                    raise DataError(f"cannot download {url}: no such file") from None
                last_error = str(exc.reason)
            except (OSError, http.client.HTTPException) as exc:
                last_error = str(exc) or type(exc).__name__
            finally:
                part.unlink(missing_ok=True)
            if attempt < self.attempts:
                time.sleep(self.retry_delay * 2 ** (attempt - 1))
        raise DataError(f"cannot download {url} after {self.attempts} attempts: {last_error}")

    def documents(self, data_dir: Path, skipped: Counter[str]) -> Iterator[str]:
        parquet = _parquet_module()
        import pyarrow

        for name in self.shard_names:
            path = data_dir / CLIMBMIX_CACHE / name
            try:
                shard = parquet.ParquetFile(path)
                if "text" not in shard.schema_arrow.names:
                    raise DataError(f"{path} has no 'text' column")
                for batch in shard.iter_batches(batch_size=1024, columns=["text"]):
                    for text in batch.column(0).to_pylist():
                        if not text:
                            skipped["empty"] += 1
                            continue
                        yield text
            except (OSError, pyarrow.ArrowException) as exc:
                raise DataError(
                    f"cannot read {path} ({exc}); delete it to download it again"
                ) from None


def _is_parquet(path: Path) -> bool:
    """A complete parquet file starts and ends with PAR1; a cut-off download does not."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            return head == PARQUET_MAGIC and handle.read(4) == PARQUET_MAGIC
    except OSError:
        return False
