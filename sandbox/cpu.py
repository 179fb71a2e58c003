"""CPU settings for a job, chosen by measurement: threads, OpenMP wait policy, precision.

plan_cpu() runs on the trusted side before each job. Threads come from what the machine
offers at that moment (cores not busy with other work), so that a competing process
costs the job a proportional share rather than a collapse: OpenMP threads that spin
while they wait for a descheduled sibling waste whole time slices. Precision comes from
a once-per-machine measurement of bf16 autocast against fp32 (bf16 is faster only where
the CPU has bf16 instructions, and ~16x slower elsewhere), cached under ~/.cache/ar/.
The job itself only reads the environment variables of the plan (prepare.py reads
AR_CPU_PRECISION and AR_MUON_PRECISION); it cannot write the cache.

    python -m sandbox.cpu          # print the plan for this machine, measuring if needed

Importing this module does not import torch; only a measurement does, in a subprocess.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sandbox.files import write_json_atomic

PRECISION_MARGIN = 1.15  # bf16 must beat fp32 by this much: it costs accuracy, timings are noisy
BUSY_SAMPLE_SECONDS = 0.5  # window over which other processes' CPU use is measured
BUSY_CORE_SHARE = 0.5  # a core counts as taken when other processes keep it this busy
# Idle at the start: spinning threads are fastest (2 cores: ACTIVE 29.6k tok/s, PASSIVE 21.0k),
# but a competitor that starts mid-run then costs ~90% instead of ~45%. PASSIVE trades the
# first for the second.
QUIET_WAIT_POLICY = "ACTIVE"
MEASURE_TIMEOUT_SECONDS = 120  # the precision measurement subprocess (torch import included)
MEASURE_ROUNDS = 8  # rounds of each variant; the best counts (noise only slows a step down)
CACHE_VERSION = 1  # bump when the measurement changes, so old results are not reused
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512/AMX, Arm "bf16" feature
# Set by users (or tests) to restrict which instructions oneDNN and ATen use: part of the cache key
ISA_ENV_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


@dataclass(frozen=True)
class CpuPlan:
    threads: int  # OpenMP/MKL threads of the job
    wait_policy: str  # OMP_WAIT_POLICY: ACTIVE on an idle machine, PASSIVE when cores are shared
    precision: str  # autocast on CPU: "bf16" or "fp32"
    muon_precision: str  # dtype of the Muon step's orthogonalisation
    reason: str  # one line: why this precision and these threads
    env: dict[str, str] = field(default_factory=dict)  # for the training job and the model worker
    measured: dict | None = None  # the precision measurement (seconds per step), when one was used

    def as_record(self) -> dict:
        """The plan as result.json records it (under "cpu")."""
        return asdict(self)


# ---------------------------------------------------------------------------
# Threads


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cores(sample_seconds: float = BUSY_SAMPLE_SECONDS) -> float:
    """How many cores other processes keep busy now, measured over `sample_seconds`.

    This process is idle while it samples, so what it sees is the competition.
    """
    import psutil

    per_cpu = psutil.cpu_percent(interval=sample_seconds, percpu=True)
    try:
        allowed = os.sched_getaffinity(0)
        per_cpu = [share for cpu, share in enumerate(per_cpu) if cpu in allowed] or per_cpu
    except AttributeError:
        pass
    return sum(per_cpu) / 100.0


def choose_threads(cores: int, busy: float) -> tuple[int, str]:
    """(threads, OMP_WAIT_POLICY) for a job on `cores` cores of which `busy` are taken.

    Idle: one thread per core, QUIET_WAIT_POLICY (spinning: the fastest when nothing competes).
    Busy: one thread per free core (at least one), and PASSIVE, because a thread that
    spins while its sibling is descheduled burns the slice the sibling needed.
    """
    taken = int(busy + 1 - BUSY_CORE_SHARE)  # a core counts as taken from BUSY_CORE_SHARE up
    threads = max(1, cores - taken)
    return threads, QUIET_WAIT_POLICY if taken == 0 else "PASSIVE"


# ---------------------------------------------------------------------------
# Precision


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def cache_key() -> dict[str, str]:
    """What a precision measurement depends on: the CPU, torch, and ISA restrictions."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    isa = {name: os.environ[name] for name in ISA_ENV_VARS if os.environ.get(name)}
    return {
        "version": str(CACHE_VERSION),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "bf16_flags": ",".join(sorted(f for f in BF16_CPU_FLAGS if f in cpu_flags())),
        "torch": torch_version,
        "isa": json.dumps(isa, sort_keys=True),
    }


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ar"


def cache_path(cache_dir: Path, key: dict[str, str], name: str = "cpu-precision") -> Path:
    """Where a measurement under `key` is cached: one file per key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{name}-{digest}.json"


def run_measurement(args: list[str], env: dict[str, str], what: str) -> Any:
    """`python -m ARGS` of this package in a fresh subprocess with `env` on top of this
    process's (so the parent's torch settings do not leak in): the JSON of its last line.
    RuntimeError (naming `what`) when it fails; subprocess.TimeoutExpired past the limit."""
    child_env = {**os.environ, **env}
    package = str(Path(__file__).resolve().parents[1])
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package, child_env.get("PYTHONPATH")]))
    completed = subprocess.run([sys.executable, "-m", *args], env=child_env, capture_output=True,
                               text=True, timeout=MEASURE_TIMEOUT_SECONDS)  # fmt: skip
    if completed.returncode != 0:
        raise RuntimeError(f"the {what} failed: {completed.stderr.strip()[-300:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def decide_precision(seconds: dict[str, float], native: bool) -> tuple[str, str, str]:
    """(autocast precision, Muon precision, reason) from measured seconds per step.

    `seconds` holds "fp32", "bf16" (a small model's forward + backward) and "muon_fp32",
    "muon_bf16" (the orthogonalisation). Pure: tests feed it timings.
    """
    if not native:
        return "fp32", "fp32", "fp32: this CPU has no native bf16 instructions"
    if not seconds:
        return "fp32", "fp32", "fp32: bf16 could not be measured on this CPU"
    speedup = seconds["fp32"] / seconds["bf16"]
    muon_speedup = seconds["muon_fp32"] / seconds["muon_bf16"]
    precision = "bf16" if speedup >= PRECISION_MARGIN else "fp32"
    muon = "bf16" if muon_speedup >= PRECISION_MARGIN else "fp32"
    return (
        precision,
        muon,
        (
            f"{precision} autocast: bf16 measured {speedup:.2f}x fp32's speed here; "
            f"Muon {muon}: {muon_speedup:.2f}x"
        ),
    )


def measure_precision(env: dict[str, str] | None = None) -> dict[str, float]:
    """Seconds per step in bf16 and fp32, measured in a fresh subprocess with `env`'s
    threads (the job's), so the parent's torch settings do not leak in."""
    return run_measurement(["sandbox.cpu", "--measure"], env or {}, "precision measurement")


def cached_precision(cache_dir: Path, env: dict[str, str]) -> dict:
    """The precision measurement for this machine: from the cache, or measured and cached.

    A cache that cannot be written (read-only home) only costs a measurement next time.
    """
    key = cache_key()
    path = cache_path(cache_dir, key)
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") == key:
            return entry
    except (OSError, ValueError):
        pass
    native = has_native_bf16()
    try:
        seconds = measure_precision(env) if native else {}
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        # Not cached: the next run measures again. fp32 is never the slow case.
        return {
            "key": key,
            "native_bf16": native,
            "seconds": {},
            "error": str(exc)[:200],
            "date": datetime.date.today().isoformat(),
        }
    entry = {
        "key": key,
        "native_bf16": native,
        "seconds": seconds,
        "date": datetime.date.today().isoformat(),
    }
    try:
        write_json_atomic(path, entry, sort_keys=True)
    except OSError:
        pass
    return entry


# ---------------------------------------------------------------------------
# The plan


def thread_env(threads: int, wait_policy: str) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": wait_policy,
    }


def plan_cpu(device: str, threads: int | None = None, cache_dir: Path | None = None) -> CpuPlan:
    """Threads, wait policy and precision for a job on `device` ("cpu" or "cuda").

    `threads` forces the thread count (no load sampling). On CUDA the plan holds the
    thread settings only; the precision there is bf16, as prepare.py knows.
    """
    cores = available_cores()
    if threads is None:
        busy = busy_cores()
        threads, wait_policy = choose_threads(cores, busy)
        thread_reason = f"{threads} of {cores} cores ({busy:.1f} busy with other work), OMP_WAIT_POLICY={wait_policy}"
    else:
        threads = max(1, int(threads))
        wait_policy = QUIET_WAIT_POLICY if threads >= cores else "PASSIVE"
        thread_reason = f"{threads} threads as asked ({cores} cores), OMP_WAIT_POLICY={wait_policy}"
    env = thread_env(threads, wait_policy)
    # A restriction the measurement ran under must hold for the job too, or it measured another machine
    env.update({name: os.environ[name] for name in ISA_ENV_VARS if os.environ.get(name)})
    if device != "cpu":
        return CpuPlan(
            threads, wait_policy, "bf16", "bf16", f"{device}: bf16; {thread_reason}", env
        )
    # Measured with the job's threads and policy: spinning threads on a busy machine would
    # time the competition, not the precision
    entry = cached_precision(cache_dir or default_cache_dir(), env)
    precision, muon, why = decide_precision(entry["seconds"], entry["native_bf16"])
    reason = f"{why} (measured {entry['date']}); {thread_reason}"
    env.update(AR_CPU_PRECISION=precision, AR_MUON_PRECISION=muon, AR_CPU_PRECISION_REASON=why)
    return CpuPlan(threads, wait_policy, precision, muon, reason, env, entry["seconds"] or None)


def _time_steps() -> dict[str, float]:
    """Seconds per step of bf16 and fp32 work shaped like the cpu template: a small MLP
    block's forward + backward, and the Muon step's Polar Express iterations. Best of
    interleaved rounds, so warm-up and bursts of outside load drop out. Run in a
    subprocess by measure_precision()."""
    import time

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dim, tokens, vocab = 256, 1024, 1024
    x = torch.randn(tokens, dim)
    w_in = torch.randn(dim, 4 * dim, requires_grad=True)
    w_out = torch.randn(4 * dim, dim, requires_grad=True)
    w_head = torch.randn(dim, vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    grads = torch.randn(2, dim, 4 * dim)

    def fwd_bwd(dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            h = F.relu(x @ w_in).square() @ w_out
            loss = F.cross_entropy((h @ w_head).float(), targets)
        loss.backward()

    def polar(dtype):
        X = grads.to(dtype)
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-6)
        for a, b, c in [(3.0, -3.0, 1.0)] * 5:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X

    work = {
        "fp32": lambda: fwd_bwd(torch.float32),
        "bf16": lambda: fwd_bwd(torch.bfloat16),
        "muon_fp32": lambda: polar(torch.float32),
        "muon_bf16": lambda: polar(torch.bfloat16),
    }
    best = {name: float("inf") for name in work}
    for round_ in range(MEASURE_ROUNDS):  # interleaved, so a burst of load hits every variant alike
        for name, step in work.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
        # Emulated (non-native) bf16 is an order of magnitude slower: no need for more rounds
        if (
            round_ >= 1
            and max(best["bf16"] / best["fp32"], best["muon_bf16"] / best["muon_fp32"]) > 4
        ):
            break
    return best


if __name__ == "__main__":
    if sys.argv[1:] == ["--measure"]:
        print(json.dumps(_time_steps()))
    else:
        print(json.dumps(plan_cpu("cpu").as_record(), indent=2))
