"""The Ray backend on a real local cluster: a head and two worker nodes started by the test
(`ray start` processes, one core each), micro-profile experiments in the real sandbox. Two
at once, a cluster with no free CPU, a node whose data differs, the driver killed and a new
one picking its run up, a node killed mid-run. Ray not starting is a failure, not a skip."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from autoresearch_cli.backends import ray as ray_backend
from autoresearch_cli.backends import ray_node
from autoresearch_cli.backends.base import WORKER_COMMAND, Backend, Ended, Progressed
from autoresearch_cli.backends.ray import Node, plan_cluster
from autoresearch_cli.doors.data import prepare_data, read_manifest
from autoresearch_cli.errors import ArError
from autoresearch_cli.research import session as runs

RAY = Path(sys.executable).parent / "ray"
# Token authentication with the token in the environment of every process of the test
# cluster, not in ~/.ray/auth_token. Set at import: Ray reads it when first imported.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 150


class Cluster:
    """`ray start --block` processes on this machine; each node's processes descend from it."""

    def __init__(self, root: Path):
        self.root = root
        self.nodes: dict[str, tuple[subprocess.Popen, str]] = {}  # name -> (process, node id)
        self.address = ""

    def _start(self, name: str, args: list[str], core: int | None, env: dict[str, str],
               ready: str) -> str:
        log = self.root / f"{name}.log"
        (self.root / f"tmp-{name}").mkdir()  # the node's run dirs: gone with the cluster
        full_env = {**os.environ, "XDG_CACHE_HOME": str(self.root / f"cache-{name}"),
                    "TMPDIR": str(self.root / f"tmp-{name}"), **env}
        process = subprocess.Popen(
            [str(RAY), "start", *args, "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             "--object-store-memory=100000000", "--block"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while ready not in log.read_text(errors="replace"):
            assert process.poll() is None, f"ray start failed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start hung:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        self.nodes[name] = (process, "")
        return log.read_text()

    def start_head(self) -> None:
        # a lost node is noticed in about 2 s rather than Ray's default 30 s
        out = self._start("head", ["--head", "--port=0", "--num-cpus=0", f"--temp-dir={self.root}",
                                   "--include-dashboard=false"], None,
                          {"RAY_health_check_period_ms": "500",
                           "RAY_health_check_failure_threshold": "4"}, "Ray runtime started")
        self.address = re.search(r"ray start --address='([^']+)'", out)[1]

    def add_node(self, name: str, core: int, env: dict[str, str] | None = None) -> str:
        import ray

        before = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        self._start(name, [f"--address={self.address}", "--num-cpus=1"], core, env or {},
                    "Ray runtime started")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (new := {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before):
            assert time.monotonic() < deadline, "the node never joined"
            time.sleep(0.2)
        self.nodes[name] = (self.nodes[name][0], new.pop())
        return self.nodes[name][1]

    def processes(self, name: str) -> list[psutil.Process]:
        root = psutil.Process(self.nodes[name][0].pid)
        return [root, *root.children(recursive=True)]

    def kill_node(self, name: str) -> list[psutil.Process]:
        """SIGKILL every process of the node at once, as when its machine dies."""
        victims = self.processes(name)
        for process in victims:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        return victims

    def stop_node(self, name: str) -> None:
        import ray

        process, node_id = self.nodes.pop(name)
        process.send_signal(signal.SIGTERM)  # `ray start --block` stops its node
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            assert time.monotonic() < deadline, "the stopped node stays alive"
            time.sleep(0.2)

    def close(self) -> None:
        for name in list(self.nodes):
            try:
                psutil.wait_procs(self.kill_node(name), timeout=10)
            except psutil.NoSuchProcess:
                continue


@pytest.fixture(scope="module")
def cluster():
    import ray

    root = Path(tempfile.mkdtemp(prefix="ar-ray-", dir="/tmp"))  # Ray's socket paths are short
    nodes = Cluster(root)
    try:
        nodes.start_head()
        ray.init(address=nodes.address, namespace=ray_backend.NAMESPACE, log_to_driver=False)
        nodes.add_node("a", core=0)
        nodes.add_node("b", core=min(1, os.cpu_count() - 1))
        yield nodes
    finally:
        ray.shutdown()
        nodes.close()
        shutil.rmtree(root, ignore_errors=True)


def specs(ws, count: int, first_id: int = 1) -> list:
    with runs.session(ws, "test") as current:
        return [runs.experiment_spec(current, ws.runs_dir / str(exp_id), ws.root, seed=exp_id)
                for exp_id in range(first_id, first_id + count)]


def connect(cluster, ws, workers=None):
    pool = ray_backend.connect(cluster.address, workers, "cpu", read_manifest(ws.data_dir),
                               ws.data_dir, prepare=prepare_data)
    assert isinstance(pool, Backend)
    return pool


def training_job(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The training job's processes among a node's: started cold, its command names
    train.py; forked warm (sandbox/warm.py), its command line is the warm server's, but
    it runs in a PID namespace of its own, which no process of the node shares."""
    def pid_namespace(process: psutil.Process) -> str | None:
        try:
            return os.readlink(f"/proc/{process.pid}/ns/pid")
        except OSError:
            return None

    node = pid_namespace(processes[0])
    found = []
    for process in processes:
        try:
            cold = "train.py" in " ".join(process.cmdline())
        except psutil.Error:
            continue
        space = pid_namespace(process)
        if cold or (space is not None and node is not None and space != node):
            found.append(process)
    return found


def run_until_ended(pool, count: int, timeout: float = RUN_TIMEOUT_S):
    """(Ended by exp id, exp ids that reported progress before the first end)."""
    ended, progressed = {}, set()
    deadline = time.monotonic() + timeout
    while len(ended) < count:
        assert time.monotonic() < deadline, f"runs did not end: {sorted(pool.running)}"
        for event in pool.wait(0.5):
            if isinstance(event, Ended):
                ended[event.exp_id] = event
            elif not ended:
                progressed.add(event.exp_id)
    return ended, progressed


def wait_for_progress(pool, exp_id: int, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = pool.wait(0.5)
        assert not any(isinstance(e, Ended) for e in events), events
        if any(isinstance(e, Progressed) and e.exp_id == exp_id for e in events):
            return
    raise AssertionError("the run never reported progress")


def worker_processes(cluster) -> list[psutil.Process]:
    found = []
    for name in list(cluster.nodes):
        for process in cluster.processes(name):
            try:
                if " ".join(WORKER_COMMAND) in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
    return found


# --- planning (no cluster) -------------------------------------------------------------------


def test_slots_follow_the_nodes_hardware():
    h100 = Node("n1", "gpu-a", "10.0.0.1", 32, 2, tuple(range(32)), ("NVIDIA H100 80GB HBM3",) * 2)
    h200 = Node("n2", "gpu-b", "10.0.0.2", 32, 1, tuple(range(32)), ("NVIDIA H200",))
    planned = plan_cluster([h100, h200], None, "auto")
    assert [(slot.slot_class, node) for slot, node in planned] == [
        ("cuda:NVIDIA H100 80GB HBM3", "n1"), ("cuda:NVIDIA H200", "n2"),
        ("cuda:NVIDIA H100 80GB HBM3", "n1")]
    assert {slot.device for slot, _ in planned} == {"cuda"}
    with pytest.raises(ArError, match="3 GPU"):
        plan_cluster([h100, h200], 4, "cuda")
    cpu_nodes = [Node("c1", "a", "", 8, 0, tuple(range(8))), Node("c2", "b", "", 4, 0, (0, 1, 2, 3))]
    planned = plan_cluster(cpu_nodes, 3, "cpu")
    assert [slot.slot_class for slot, _ in planned] == ["cpu:4"] * 3
    assert [slot.cpus for slot, _ in planned] == [(0, 1, 2, 3), (0, 1, 2, 3), (4, 5, 6, 7)]
    assert [slot.slot_class for slot, _ in plan_cluster(cpu_nodes, None, "auto")] == ["cpu:4"] * 2
    with pytest.raises(ArError, match="at most one worker per CPU"):
        plan_cluster(cpu_nodes, 13, "cpu")


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ArError, match=r"pip install 'ar\[ray\]'"):
        ray_backend.connect("127.0.0.1:1", None, "cpu", {}, tmp_path)


def test_an_unreachable_address_is_a_clear_error(tmp_path):
    started = time.monotonic()
    with pytest.raises(ArError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        ray_backend.connect("127.0.0.1:1", None, "cpu", {}, tmp_path)
    assert time.monotonic() - started < 10


def test_a_node_without_the_data_prepares_its_own_copy_and_checks_it(micro_data, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("AR_RAY_DATA_DIR", raising=False)
    manifest = read_manifest(micro_data)
    hashes = ray_backend.data_hashes(manifest, micro_data)
    copy = ray_node.node_data_dir(tmp_path / "not-on-this-node", manifest, prepare_data)
    assert copy.is_relative_to(tmp_path / "cache")
    assert ray_node.verify_data(copy, hashes, manifest) is None
    (copy / "token_bytes.npy").write_bytes(b"other")
    assert "token_bytes.npy sha256" in ray_node.verify_data(copy, hashes, manifest)


def test_the_ray_extra_is_locked():
    import tomllib

    from conftest import REPO_ROOT
    from lockfile import lock_pins
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (wanted,) = map(Requirement, project["optional-dependencies"]["ray"])
    assert wanted.specifier.contains(lock_pins()["ray"]), "run `make lock`"


# --- on the cluster --------------------------------------------------------------------------


def test_two_experiments_at_once_on_two_nodes(cluster, micro_ws):
    pool = connect(cluster, micro_ws, workers=2)
    assert [slot.slot_class for slot in pool.slots] == ["cpu:1", "cpu:1"]
    assert len(set(pool.placement.values())) == 2  # one slot on each worker node
    with pytest.raises(ArError, match="at most one worker per CPU"):
        connect(cluster, micro_ws, workers=3)
    task_ids = [pool.start(exp_id, slot, spec)
                for exp_id, (slot, spec) in enumerate(zip(pool.slots, specs(micro_ws, 2), strict=True), 1)]
    assert len(set(task_ids)) == 2 and pool.free_slots() == []
    ended, progressed = run_until_ended(pool, 2)
    assert progressed == {1, 2}, "both trained at the same time"
    assert pool.running == {} and pool.waiting_reason() is None
    for exp_id, event in ended.items():
        result = event.result
        assert result["status"] == "ok", result.get("reason")
        assert isinstance(result["val_bpb"], float) and result["node"]
        assert result["seed"] == exp_id and result["cpu"]["threads"] == 1
        run_dir = micro_ws.runs_dir / str(exp_id)
        written = json.loads((run_dir / "result.json").read_text())
        assert written["val_bpb"] == result["val_bpb"]
        assert set(written) <= set(result)
        assert "step " in (run_dir / "train.log").read_text()
        assert (run_dir / "out" / "model.pt").stat().st_size > 0
        assert not (run_dir / "job.pid").exists()  # a node's pid means nothing here
    assert {event.slot.index for event in ended.values()} == {0, 1}
    pool.close()


def test_no_free_cpu_waits_with_a_reason_and_stop_all_ends_the_jobs(cluster, micro_ws):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pool = connect(cluster, micro_ws, workers=2)
    first, second = specs(micro_ws, 2)
    # another job of the cluster's (here an idle slot of another ar) holds the second CPU
    holder = ray.remote(ray_node.SlotActor).options(num_cpus=1, scheduling_strategy=(
        NodeAffinitySchedulingStrategy(pool.placement[1], soft=False))).remote()
    ray.get(holder.info.remote())
    try:
        pool.start(1, pool.slots[0], first)
        pool.start(2, pool.slots[1], second)  # its node's CPU is taken: it waits
        deadline = time.monotonic() + 60
        while not worker_processes(cluster):
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.2)
        assert pool.waiting_reason() == "no free CPU in the cluster: 0 of 2 free (1 pending tasks)"
        assert sorted(pool.stop_all()) == [1, 2]
        assert pool.running == {}
    finally:  # a failure here must not leave the cluster's CPUs taken for the next test
        pool.stop_all()
        ray.kill(holder)
    deadline = time.monotonic() + 20
    while worker_processes(cluster):
        assert time.monotonic() < deadline, "a worker process outlived stop_all"
        time.sleep(0.2)


def test_a_node_whose_data_differs_scores_nothing(cluster, micro_ws, tmp_path):
    bad = tmp_path / "bad-data"
    shutil.copytree(micro_ws.data_dir, bad)
    train = bad / "train.bin"
    train.chmod(0o644)
    data = bytearray(train.read_bytes())
    data[100] ^= 1
    train.write_bytes(bytes(data))
    node_id = cluster.add_node("bad", core=0, env={"AR_RAY_DATA_DIR": str(bad)})
    try:
        pool = connect(cluster, micro_ws)
        slot = next(s for s in pool.slots if pool.placement[s.index] == node_id)
        pool.start(1, slot, specs(micro_ws, 1)[0])
        ended, _ = run_until_ended(pool, 1, timeout=60)
        pool.close()
    finally:
        cluster.stop_node("bad")
    result = ended[1].result
    assert result["status"] == "invalid" and result["val_bpb"] is None
    assert result["reason"].startswith("data on node ")
    assert "differs from the driver's: train.bin sha256" in result["reason"]
    assert not (micro_ws.runs_dir / "1" / "result.json").exists()


DRIVER = """
import json, sys, time
from pathlib import Path
from autoresearch_cli.backends import ray as ray_backend
from autoresearch_cli.doors.data import read_manifest
from autoresearch_cli.backends.base import Ended, Progressed
from sandbox.spec import ExperimentSpec

spec = ExperimentSpec.from_json(Path(sys.argv[2]).read_text())
data = Path(spec.data_dir)
pool = ray_backend.connect(sys.argv[1], None, "cpu", read_manifest(data), data)  # no prepare: the node has the data
slot = pool.free_slots()[0]
task = pool.start(1, slot, spec)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    events = pool.wait(0.5)
    if any(isinstance(event, (Progressed, Ended)) for event in events):
        break
print(json.dumps({"task": task, "slot_class": slot.slot_class,
                  "ended": any(isinstance(event, Ended) for event in events)}), flush=True)
time.sleep(600)
"""


def test_a_restarted_driver_picks_up_its_run(cluster, micro_ws, tmp_path):
    spec = specs(micro_ws, 1)[0]
    (tmp_path / "spec.json").write_text(spec.to_json())
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address,
                               str(tmp_path / "spec.json")], stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()  # the driver gives up after 120 s
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies while its run trains
        driver.wait()
    assert line, "the driver printed nothing"
    started = json.loads(line)
    assert not started["ended"], "the run ended before it reported progress"
    pool = connect(cluster, micro_ws)
    assert not pool.reattach(9, "ar-000000000000-9", "cpu:1", micro_ws.runs_dir / "9")
    assert pool.reattach(1, started["task"], started["slot_class"], Path(spec.run_dir))
    assert pool.running[1].slot.slot_class == started["slot_class"]
    ended, _ = run_until_ended(pool, 1)
    result = ended[1].result
    assert result["status"] == "ok" and isinstance(result["val_bpb"], float)
    assert json.loads((micro_ws.runs_dir / "1" / "result.json").read_text())["status"] == "ok"
    pool.close()


def _ledger_rows(root: Path) -> list[dict]:
    import sqlite3

    if not (root / ".ar" / "ledger.db").exists():
        return []
    db = sqlite3.connect(f"file:{root / '.ar' / 'ledger.db'}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute("SELECT * FROM experiments ORDER BY id")]
    finally:
        db.close()


def test_ar_iterate_on_the_cluster_and_a_killed_ar_picks_its_run_up(cluster, micro_ws):
    """Through the CLI: ar is SIGKILLed while its experiment trains on a node; the next
    `ar iterate --backend ray` finds the run by its task id and judges it."""
    root = micro_ws.root
    args = [str(Path(sys.executable).with_name("ar")), "iterate", "--backend", "ray",
            "--address", cluster.address, "--agent", "random", "--seed", "2"]
    first = subprocess.Popen([*args, "--n", "1"], cwd=root, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    running = []
    while not running:
        assert first.poll() is None, "ar ended before its experiment trained on the cluster"
        assert time.monotonic() < deadline, "no experiment ever ran on the cluster"
        running = [row for row in _ledger_rows(root) if row["kind"] == "experiment"
                   and row["status"] == "running" and row["backend_task"]]
        time.sleep(0.5)
    time.sleep(1.0)
    first.kill()
    first.wait()
    again = subprocess.run([*args, "--n", "1"], cwd=root, capture_output=True, text=True,
                           timeout=2 * RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-2000:] + again.stdout[-2000:]
    assert "picked up again on the cluster" in again.stdout
    rows = {row["id"]: row for row in _ledger_rows(root)}
    resumed = rows[running[0]["id"]]
    assert resumed["status"] in ("ok", "crash", "invalid"), resumed["reason"]
    assert resumed["backend_task"] == running[0]["backend_task"] and resumed["node"]
    cluster_runs = [row for row in rows.values() if row["backend_task"]]
    assert len(cluster_runs) >= 2 and all(row["node"] for row in cluster_runs)
    assert not [row for row in rows.values() if row["status"] in ("running", "interrupted")]


def test_ar_baseline_runs_through_the_cluster(cluster, micro_ws):
    """Nothing trains in-process: `ar baseline --backend ray` runs the tip on a node."""
    done = subprocess.run([str(Path(sys.executable).with_name("ar")), "baseline", "--backend",
                           "ray", "--address", cluster.address], cwd=micro_ws.root,
                          capture_output=True, text=True, timeout=2 * RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    (row,) = _ledger_rows(micro_ws.root)
    assert (row["kind"], row["status"]) == ("baseline", "ok") and row["node"]
    assert row["backend_task"] and "baseline val_bpb" in done.stdout


def test_a_node_killed_mid_run_interrupts_and_requeues(cluster, micro_ws):
    """Last: it leaves the cluster one node short."""
    pool = connect(cluster, micro_ws)
    node_b = cluster.nodes["b"][1]
    slot = next(s for s in pool.slots if pool.placement[s.index] == node_b)
    pool.start(1, slot, specs(micro_ws, 1)[0])
    wait_for_progress(pool, 1)
    job = training_job(cluster.processes("b"))
    assert job, "no training job under the node"
    victims = cluster.kill_node("b")
    ended, _ = run_until_ended(pool, 1, timeout=90)
    result = ended[1].result
    assert result["status"] == "interrupted" and result["requeue"] is True
    assert result["val_bpb"] is None and "lost mid-run" in result["reason"]
    _, alive = psutil.wait_procs(victims + job, timeout=20)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
