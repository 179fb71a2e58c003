"""sandbox.cpu: the job's threads and precision, chosen by measurement on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from sandbox import cpu

NATIVE_FAST = {
    "fp32": 0.030,
    "bf16": 0.015,
    "muon_fp32": 0.018,
    "muon_bf16": 0.009,
}  # measured here, native bf16
EMULATED_SLOW = {
    "fp32": 0.039,
    "bf16": 1.40,
    "muon_fp32": 0.017,
    "muon_bf16": 1.54,
}  # with ONEDNN_MAX_CPU_ISA=AVX2


# ---------------------------------------------------------------------------
# Precision: the decision


def test_bf16_is_chosen_only_where_it_is_native_and_measured_faster():
    assert cpu.decide_precision(NATIVE_FAST, native=True)[:2] == ("bf16", "bf16")
    assert cpu.decide_precision(EMULATED_SLOW, native=True)[:2] == ("fp32", "fp32")
    assert cpu.decide_precision(NATIVE_FAST, native=False)[:2] == ("fp32", "fp32")
    barely = {
        **NATIVE_FAST,
        "bf16": NATIVE_FAST["fp32"] / 1.05,
    }  # within the noise: fp32 is the safe side
    precision, muon, reason = cpu.decide_precision(barely, native=True)
    assert (precision, muon) == ("fp32", "bf16")
    assert "1.05x" in reason and "\n" not in reason


def test_a_cpu_without_bf16_flags_is_never_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(
        cpu, "measure_precision", lambda env=None: pytest.fail("measured a CPU without bf16")
    )
    plan = cpu.plan_cpu("cpu", threads=1, cache_dir=tmp_path)
    assert (plan.precision, plan.muon_precision) == ("fp32", "fp32")
    assert "no native bf16" in plan.reason


def test_the_measurement_is_cached_per_machine_and_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    calls = []

    def fake_measure(env=None):
        calls.append(env)
        return EMULATED_SLOW

    monkeypatch.setattr(cpu, "measure_precision", fake_measure)
    first = cpu.plan_cpu("cpu", threads=1, cache_dir=tmp_path)
    second = cpu.plan_cpu("cpu", threads=1, cache_dir=tmp_path)
    assert len(calls) == 1 and first.precision == second.precision == "fp32"
    assert second.measured == EMULATED_SLOW
    [cached] = tmp_path.glob("cpu-precision-*.json")
    assert json.loads(cached.read_text())["key"]["torch"]
    # Another ISA restriction is another machine, as far as the measurement goes
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cpu.plan_cpu("cpu", threads=1, cache_dir=tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.glob("cpu-precision-*.json"))) == 2


def test_an_unwritable_cache_only_costs_a_measurement(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(cpu, "measure_precision", lambda env=None: NATIVE_FAST)
    blocker = tmp_path / "file"
    blocker.write_text("")
    plan = cpu.plan_cpu("cpu", threads=1, cache_dir=blocker / "ar")
    assert plan.precision == "bf16"


@pytest.mark.skipif(
    not cpu.has_native_bf16(), reason="this CPU has no bf16 instructions to switch off"
)
def test_real_measurement_flips_to_fp32_when_bf16_instructions_are_off(tmp_path, monkeypatch):
    """On this CPU bf16 is native; restricting oneDNN to AVX2 emulates one without it."""
    native = cpu.measure_precision({"OMP_NUM_THREADS": "1"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    plan = cpu.plan_cpu("cpu", threads=1, cache_dir=tmp_path)
    assert plan.measured["bf16"] > 3 * native["bf16"]  # it really is the slow path
    assert (plan.precision, plan.muon_precision) == ("fp32", "fp32")
    assert plan.env["ONEDNN_MAX_CPU_ISA"] == "AVX2"  # the job runs on the machine that was measured
    assert plan.env["AR_CPU_PRECISION"] == "fp32"


# ---------------------------------------------------------------------------
# Threads


def test_choose_threads_leaves_busy_cores_to_their_owner():
    assert cpu.choose_threads(2, 0.1) == (2, "ACTIVE")
    assert cpu.choose_threads(2, 1.0) == (1, "PASSIVE")
    assert cpu.choose_threads(2, 0.6) == (1, "PASSIVE")
    assert cpu.choose_threads(2, 2.0) == (1, "PASSIVE")
    assert cpu.choose_threads(8, 3.2) == (5, "PASSIVE")


def test_a_busy_competitor_reduces_the_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", set)
    cores = cpu.available_cores()
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        plan = cpu.plan_cpu("cpu", cache_dir=tmp_path)
    finally:
        competitor.kill()
        competitor.wait()
    assert plan.threads <= max(1, cores - 1)
    assert plan.env["OMP_NUM_THREADS"] == str(plan.threads)
    if cores > 1:
        assert plan.wait_policy == "PASSIVE" and "busy" in plan.reason


# ---------------------------------------------------------------------------
# The plan as the runner uses it


def test_plan_env_and_record(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", set)
    plan = cpu.plan_cpu("cpu", threads=2, cache_dir=tmp_path)
    assert plan.env == {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "OMP_WAIT_POLICY": plan.wait_policy,
        "AR_CPU_PRECISION": "fp32",
        "AR_MUON_PRECISION": "fp32",
        "AR_CPU_PRECISION_REASON": plan.env["AR_CPU_PRECISION_REASON"],
    }
    record = json.loads(json.dumps(plan.as_record()))
    assert (
        record["threads"] == 2 and record["precision"] == "fp32" and record["reason"] == plan.reason
    )
    gpu = cpu.plan_cpu("cuda", threads=4, cache_dir=tmp_path / "cuda")
    assert gpu.precision == "bf16" and not any(k.startswith("AR_") for k in gpu.env)
    assert not (tmp_path / "cuda").exists()  # nothing measured for CUDA


def test_import_does_not_import_torch():
    code = "import sys, sandbox.cpu; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
