"""A compile cache that cannot raise a score: torch.compile's inductor and Triton caches,
kept by ar between runs and handed to each job read-only.

On CUDA the template compiles its model and optimizer, and from an empty cache that
takes 47-104 s of every run (H100); inductor and Triton look compiled graphs and kernels
up by a hash of what they compile, so a cache filled by an earlier run makes the same
compile take seconds. A cache is also a way for one run to hand code to another: an entry
is pickled Python, generated source and compiled kernels that a later compile loads and
runs. So ar keeps the caches itself, in layers, and no job ever writes one:

    STORE/<key>/<layer>/...       the files, written only by ar (harvest, build)
    STORE/<key>/<layer>.json      their manifest: relative path -> sha256 and size

  key       the torch and Python versions, the machine and the device (a GPU's model):
            entries of another build would only miss
  template  built by a trusted warm-up: the workspace's untouched template, run confined
            for its warm-up steps by ar (build_template), then harvested
  lineage-<sha>  what a run of commit <sha> compiled that it was not handed: harvested by
            ar from the run's private cache after the run ended, checked (regular files
            only, no links, bounded count and size), then handed to runs of <sha>'s children

Hand-off (hand_off): ar copies the layers a run may read (the template, then its
lineage, nearest last) into the job's private cache directory in its tmp, checking every
file against its manifest (a layer changed behind ar's back is refused whole and noted),
and points TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR there. The job may change its copy
as it likes: nothing it writes reaches a store but through harvest, into its own commit's
lineage layer, after the run.

What a hostile run can do with it, and why that cannot raise a score or harm a rival:
- Its entries are handed only to runs of its own descendants, which carry its code
  anyway; never to another lineage, never into the template layer, and never to the
  trusted scorer or its model workers, which run with no compile cache at all: nothing
  in a cache can change how saved weights are scored.
- A planted entry runs only inside a confined training job, with that job's confinement
  (sandbox/confine.py): it can do what the parent's code could do there, no more.
- It can change how a descendant trains (slower, faster, or wrongly), so that the
  descendant's score owes something to its parent's artifacts rather than to its own
  diff. The score is still the trusted scorer's measure of the weights it got;
  RunCaches.record says which layers each run was handed (for result.json), so such a
  run can be re-measured with the template layer alone. This is the residual risk, and
  the reason the lineage layers must not be turned on before that re-measure exists.
- It cannot fill the disk or point ar elsewhere: harvest takes regular files beneath the
  cache only, at most MAX_FILES of them and MAX_BYTES in all.
What needs a GPU to verify: that inductor and Triton hit these entries (the compile time
of a warm run), which docs/internals.md's device check measures; the layering, checks and
hand-off are the same on CPU and are tested there.

Not yet in the run path: run_experiment gives every job an empty private cache in its
tmp (cache_env). RunCaches is what it will call, before the job (seed) and after the
score (harvest), once the research layer names a run's commit, its parents and the
rendered template, and a GPU has shown the entries hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MAX_FILES = 20_000  # in one harvested layer
MAX_BYTES = 2 << 30  # in one harvested layer
TEMPLATE = "template"
CACHE_DIRS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


@dataclass(frozen=True)
class CompileCache:
    """The compile caches a run reads and feeds."""

    store: str  # ar's store of cache layers (.ar/cache/compile): written by ar alone
    commit: str | None = None  # this run's commit: what it compiles becomes its lineage layer
    parents: tuple[str, ...] = ()  # commits whose lineage layers it reads, farthest first
    template_code: str | None = None  # the untouched template, the template layer's source


@dataclass(frozen=True)
class Handed:
    """What a job was given: the layers copied in, and those refused (with why)."""

    layers: dict[str, str]  # layer -> its manifest's digest
    refused: dict[str, str]  # layer -> why it was not handed
    files: dict[str, str]  # relative path -> sha256 of every file handed


def store_key(device: str, gpu_name: str | None = None) -> str:
    """What the cache's entries depend on beyond their own hashes."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    parts = [torch_version, platform.python_version(), platform.machine(), device,
             gpu_name or ""]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def lineage(sha: str) -> str:
    return f"lineage-{sha}"


def cache_env(cache_dir: Path) -> dict[str, str]:
    """The variables that point inductor and Triton at a job's private cache."""
    return {name: str(cache_dir / sub) for name, sub in CACHE_DIRS.items()}


def hand_off(store: Path, layers: list[str], cache_dir: Path) -> Handed:
    """Copy `layers` (later ones win) into `cache_dir`, each file checked against its
    manifest; a layer that does not match is refused whole."""
    handed, refused, files = {}, {}, {}
    for layer in layers:
        manifest = _read_manifest(store, layer)
        if manifest is None:
            continue  # never built or harvested: nothing to hand
        why = _verify(store / layer, manifest)
        if why:
            refused[layer] = why
            continue
        for relative in manifest["files"]:
            target = cache_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(store / layer / relative, target)
        handed[layer] = _digest(manifest)
        files.update({path: entry["sha256"] for path, entry in manifest["files"].items()})
    return Handed(handed, refused, files)


def harvest(store: Path, cache_dir: Path, layer: str, handed: dict[str, str]) -> str:
    """Store what a job compiled into `cache_dir` that it was not `handed` (path -> sha256)
    as `layer`, replacing an older one; one line: what was stored, or why not."""
    found, why = _collect(cache_dir, handed)
    if why:
        return f"not stored: {why}"
    if not found:
        return "nothing new to store"
    staging = Path(tempfile.mkdtemp(prefix=f".{layer}-", dir=_mkdir(store)))
    try:
        for relative, source in found.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target, follow_symlinks=False)
        manifest = _manifest(staging)  # of the copies: the job may rewrite its own meanwhile
        _replace(store, layer, staging, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"stored {len(manifest['files'])} file(s) as {layer}"


def _collect(cache_dir: Path, handed: dict[str, str]) -> tuple[dict[str, Path], str | None]:
    """Regular files beneath cache_dir that are new or changed; or why the lot is refused."""
    found: dict[str, Path] = {}
    total = 0
    for root, dirs, names in os.walk(cache_dir):  # os.walk follows no directory link
        for name in names:
            path = Path(root, name)
            if path.is_symlink() or not path.is_file():
                continue  # a link or a device: never followed, never stored
            relative = path.relative_to(cache_dir).as_posix()
            size = path.stat().st_size
            total += size
            if len(found) >= MAX_FILES or total > MAX_BYTES:
                return {}, f"more than {MAX_FILES} files or {MAX_BYTES >> 20} MB"
            if handed.get(relative) != _sha256(path):
                found[relative] = path
        dirs[:] = [d for d in dirs if not Path(root, d).is_symlink()]
    return found, None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _manifest(directory: Path) -> dict:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            relative = path.relative_to(directory).as_posix()
            files[relative] = {"sha256": _sha256(path), "size": path.stat().st_size}
    return {"files": files}


def _replace(store: Path, layer: str, staging: Path, manifest: dict) -> None:
    """Put `staging` in place as `layer` with its manifest: the manifest last, so a reader
    never finds a manifest naming files that are not there yet."""
    (store / f"{layer}.json").unlink(missing_ok=True)
    shutil.rmtree(store / layer, ignore_errors=True)
    os.replace(staging, store / layer)
    tmp = store / f".{layer}.json.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, sort_keys=True))
    os.replace(tmp, store / f"{layer}.json")


def _read_manifest(store: Path, layer: str) -> dict | None:
    try:
        manifest = json.loads((store / f"{layer}.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def _verify(directory: Path, manifest: dict) -> str | None:
    """Why the layer's files are not its manifest's, or None."""
    for relative, entry in manifest["files"].items():
        path = directory / relative
        inside = Path(os.path.normpath(path)).is_relative_to(directory)
        if not inside or path.is_symlink() or not path.is_file():
            return f"{relative} is missing or not a regular file"
        if path.stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256"):
            return f"{relative} changed since ar stored it"
    return None


def _digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ---------------------------------------------------------------------------
# A run's caches


WARMUP_BUDGET_S = 1.0  # the template's warm-up run: its unbilled warm-up steps compile


def device_key(device: str) -> str:
    """store_key for this run's device: on CUDA, with the model of its first visible GPU."""
    if device != "cuda":
        return store_key(device)
    from sandbox.gpu import _select_devices, nvml

    nv, _ = nvml()
    try:
        handles = _select_devices(nv, os.environ.get("CUDA_VISIBLE_DEVICES")) if nv else []
        name = nv.nvmlDeviceGetName(handles[0]) if handles else None
    except Exception:  # noqa: BLE001 (NVML's own error types)
        name = None
    return store_key(device, name.decode() if isinstance(name, bytes) else name)


class RunCaches:
    """One run's compile caches: seeded before its job, harvested once it scored."""

    def __init__(self, cache: CompileCache | None, device: str, compiled: Path) -> None:
        self.cache, self.compiled = cache, compiled
        self.key = device_key(device) if cache is not None else ""
        self.handed = Handed({}, {}, {})
        self.record: dict = {}

    def seed(self, data_dir: Path, env: dict[str, str], limits, python: str, work: Path) -> None:
        """Build the template layer if it is missing, then copy the template layer and the
        run's lineage into its private cache."""
        if self.cache is None:
            return
        built = build_template(self.cache, self.key, data_dir, env, limits, python, work)
        layers = [TEMPLATE, *(lineage(sha) for sha in self.cache.parents)]
        self.handed = hand_off(Path(self.cache.store) / self.key, layers, self.compiled)
        self.record = {"key": self.key, "handed": self.handed.layers,
                       "refused": self.handed.refused, **({"template": built} if built else {})}  # fmt: skip

    def harvest(self) -> None:
        """Store what the run compiled anew as its commit's lineage layer."""
        if self.cache is not None and self.cache.commit:
            store = Path(self.cache.store) / self.key
            self.record["stored"] = harvest(store, self.compiled, lineage(self.cache.commit),
                                            self.handed.files)  # fmt: skip


def build_template(cache: CompileCache, key: str, data_dir: Path, env: dict[str, str], limits,
                   python: str, work: Path) -> str:  # fmt: skip
    """When the store has no template layer yet: run the untouched template (trusted, and
    confined all the same) for its warm-up steps, then store what it compiled as the
    template layer. One line: what happened ("" when there was nothing to do)."""
    from sandbox import confine
    from sandbox.runner import run

    store = Path(cache.store) / key
    if cache.template_code is None or _read_manifest(store, TEMPLATE) is not None:
        return ""
    code = Path(cache.template_code)
    out, tmp, compiled = (_mkdir(work / name) for name in ("out", "tmp", "compile"))
    readable = [data_dir / name for name in ("train.bin", "tokenizer.pkl") if (data_dir / name).exists()]
    confinement = confine.Confinement(
        read=(str(code), *map(str, readable)), write=(str(out), str(tmp), str(compiled)),
        gpu=env.get("AR_DEVICE") == "cuda",
    )  # fmt: skip
    job_env = {**env, **cache_env(compiled), "AR_TIME_BUDGET": str(WARMUP_BUDGET_S),
               "AR_OUTPUT_DIR": str(out), "HOME": str(tmp), "TMPDIR": str(tmp)}  # fmt: skip
    result = run([python, "train.py"], cwd=code, env=job_env, limits=limits,
                 log_path=work / "template.log", confinement=confinement)  # fmt: skip
    if result.reason != "ok":
        return f"the template's warm-up ended {result.reason}: no template layer yet"
    return "template: " + harvest(store, compiled, TEMPLATE, {})
