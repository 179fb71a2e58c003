"""The Ray backend: `ar iterate --backend ray`, each experiment on a node of a Ray cluster.

The driver (this process) keeps the ledger, git and the decisions, as with LocalWorkers;
the pool has the same interface. Each experiment is a detached Ray actor, named from the
workspace and the experiment id, so that a restarted driver finds it again (reattach). It
asks for one GPU (or the slot's CPUs) on the node its slot belongs to: a slot is one
experiment's share of one node, and its class is that node's hardware.

The driver sends the commit's files, the spec and the hashes of its data. On the node,
trusted code (ray_node.ExperimentActor) writes the files to a temp dir, finds the data
(AR_RAY_DATA_DIR, else the driver's path when the node has it, else a copy it prepares
from the manifest), checks every file against the driver's hashes, and runs
`python -m autoresearch_cli.backends.worker_process` exactly as LocalWorkers does: the same
confinement, the same trusted scorer. It answers with plain bytes and JSON: result.json,
the run's logs and, for an ok run, the weights, which the driver writes to its run dir.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoresearch_cli.backends.base import WORKER_COMMAND, Ended, Progressed, Slot, SlotPool
from autoresearch_cli.backends.ray_node import (
    STOP_GRACE_S,
    SlotActor,
    file_sha256,
    probe_node,
    write_files,
)
from autoresearch_cli.errors import ArError

NAMESPACE = "ar"  # the Ray namespace of ar's actors
GPU_RESOURCE = "GPU"
CONNECT_TIMEOUT_S = 5.0  # reaching the cluster's address before ray.init (which would hang)
PROBE_TIMEOUT_S = 120.0  # every node answering what it has (a first Ray worker starts)
REATTACH_WAIT_S = 10.0  # an actor that has not answered by then is still waiting for a node
UNAVAILABLE_GRACE_S = 60.0  # an actor out of reach this long counts as lost
PROGRESS_EVERY_S = 1.0
NODES_EVERY_S = 5.0  # how often free_slots looks for nodes that left the cluster
KEEPALIVE_S = 15.0  # how often a driver touches its slot actors


def _ray():
    try:
        import ray
    except ImportError:
        raise ArError("the ray backend needs Ray: pip install 'ar[ray]'") from None
    return ray


# ---------------------------------------------------------------------------
# Planning: slots from the cluster's nodes (pure)


@dataclass(frozen=True)
class Node:
    node_id: str
    host: str
    ip: str
    cpus: float  # Ray's CPU resource
    gpus: float  # Ray's GPU resource (or the custom one standing in for it)
    cores: tuple[int, ...] = ()  # the cores its processes may use (affinity)
    gpu_names: tuple[str, ...] = ()


def plan_cluster(nodes: list[Node], workers: int | None, device: str) -> list[tuple[Slot, str]]:
    """(slot, node id) for each experiment the cluster runs at once: one per GPU when the
    profile runs on CUDA (or auto, with GPUs), else `workers` equal CPU shares."""
    if workers is not None and workers < 1:
        raise ArError("--workers must be at least 1")
    gpus = sum(int(node.gpus) for node in nodes)
    if device == "cuda" or (device == "auto" and gpus):
        if not gpus:
            raise ArError("the profile asks for cuda but the Ray cluster has no GPU")
        if workers is not None and workers > gpus:
            raise ArError(f"--workers {workers}: the Ray cluster has {gpus} GPU(s); "
                          "one experiment per GPU")
        shares = [[(node, index, ()) for index in range(int(node.gpus))] for node in nodes]
        picked = _round_robin(shares, workers or gpus)
        return [(Slot(index, "cuda", gpu=f"{node.host}/{gpu}",
                      slot_class=f"cuda:{node.gpu_names[0] if node.gpu_names else 'cuda'}"),
                 node.node_id) for index, (node, gpu, _) in enumerate(picked)]
    total = sum(int(node.cpus) for node in nodes)
    wanted = workers or sum(1 for node in nodes if int(node.cpus) >= 1)
    if not total or wanted > total:
        raise ArError(f"--workers {wanted}: the Ray cluster has {total} CPUs in {len(nodes)} "
                      "node(s); at most one worker per CPU")
    for share in range(total // wanted, 0, -1):  # the largest equal share that fits
        shares = [[(node, index, node.cores[index * share:(index + 1) * share])
                   for index in range(int(node.cpus) // share)] for node in nodes]
        if sum(map(len, shares)) >= wanted:
            break
    picked = _round_robin(shares, wanted)
    return [(Slot(index, "cpu", cpus=tuple(cores) if len(cores) == share else (),
                  slot_class=f"cpu:{share}"), node.node_id)
            for index, (node, _, cores) in enumerate(picked)]


def _round_robin(per_node: list[list[Any]], count: int) -> list[Any]:
    """`count` items, taking one from each node in turn: experiments spread over nodes."""
    order = [item for rank in range(max(map(len, per_node), default=0))
             for items in per_node if rank < len(items) for item in [items[rank]]]
    return order[:count]


def data_hashes(manifest: dict[str, Any], data_dir: Path) -> dict[str, str]:
    """sha256 of every data file, as the driver has them: the manifest's, and
    token_bytes.npy (which the manifest does not hash) read from disk."""
    hashes = {f"{split}.bin": entry["sha256"] for split, entry in manifest["splits"].items()}
    hashes["tokenizer.pkl"] = manifest["tokenizer_sha256"]
    hashes["token_bytes.npy"] = file_sha256(Path(data_dir) / "token_bytes.npy")
    return hashes


def workspace_key(run_dir: Path) -> str:
    """The workspace in actor names: a hash of its host and runs directory."""
    runs = f"{socket.gethostname()}:{Path(run_dir).resolve().parent}"
    return hashlib.sha256(runs.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# The driver side


def connect(address: str | None, workers: int | None, device: str, manifest: dict[str, Any],
            data_dir: Path, *, gpu_resource: str = GPU_RESOURCE,
            prepare: Any = None) -> RayWorkers:
    """Join the cluster at `address` (None: start a local one) and plan its slots."""
    ray = _ray()
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                     configure_logging=False, **({} if address else {"include_dashboard": False}))
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ArError(f"cannot join the Ray cluster at {address or 'a new local one'}: "
                          f"{first}") from None
    nodes = cluster_nodes(gpu_resource)
    placed = plan_cluster(nodes, workers, device)
    return RayWorkers([slot for slot, _ in placed], {slot.index: node for slot, node in placed},
                      data_hashes(manifest, data_dir), manifest, gpu_resource,
                      hosts={node.node_id: node.host for node in nodes}, prepare=prepare)


def _check_reachable(address: str | None) -> None:
    if not address or address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise ArError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def cluster_nodes(gpu_resource: str = GPU_RESOURCE) -> list[Node]:
    """The alive nodes, each probed for its host name, cores and GPU models."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [node for node in ray.nodes() if node["Alive"]]
    probe = ray.remote(num_cpus=0)(probe_node)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote() for node in alive]
    try:
        replies = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.RayError as exc:
        raise ArError(f"a node of the Ray cluster did not answer: {type(exc).__name__}") from None
    return [Node(node["NodeID"], reply["host"], node["NodeManagerAddress"],
                 node["Resources"].get("CPU", 0.0), node["Resources"].get(gpu_resource, 0.0),
                 tuple(reply["cores"]), tuple(reply["gpu_names"]))
            for node, reply in zip(alive, replies, strict=True)]


@dataclass
class Remote:
    """One experiment on the cluster, as the driver follows it."""

    exp_id: int
    slot: Slot
    node: str  # the node's host name, or its id
    run_dir: Path
    actor: Any  # the slot's actor
    result_ref: Any
    started_ref: Any  # resolves once the actor runs: until then it waits for resources
    poll_ref: Any = None
    polled: float = 0.0
    unavailable_since: float | None = None


class RayWorkers(SlotPool):
    """Experiments on a Ray cluster, at most one per slot (the Backend protocol).

    A slot is a detached actor on its node (ray_node.SlotActor), named from the workspace,
    the node and the slot, made at the slot's first experiment and kept for the next ones:
    its GPU or cores stay ar's between experiments. A task id is the actor's name and the
    experiment's id: a restarted driver finds the actor by name and asks it for the run."""

    def __init__(self, slots: list[Slot], placement: dict[int, str], hashes: dict[str, str],
                 manifest: dict[str, Any], gpu_resource: str = GPU_RESOURCE,
                 command: tuple[str, ...] = WORKER_COMMAND, hosts: dict[str, str] | None = None,
                 prepare: Any = None):
        super().__init__(slots)
        self.placement = placement  # slot index -> node id
        self.running: dict[int, Remote] = {}
        self.hashes, self.manifest = hashes, manifest
        self.gpu_resource, self.command = gpu_resource, command
        self.hosts = hosts or {}  # node id -> host name
        self.prepare = prepare  # prepares a node's copy of the data (doors.data.prepare_data)
        self._actors: dict[int, Any] = {}  # slot index -> its actor, once made
        self._workspace = ""  # workspace_key of the run dirs, from the first one seen
        self._alive: set[str] = set(placement.values())
        self._nodes_checked = time.monotonic()
        threading.Thread(target=_keep_alive, args=(weakref.ref(self),), daemon=True).start()

    def free_slots(self) -> list[Slot]:
        busy = {remote.slot.index for remote in self.running.values()}
        alive = self._alive_nodes()
        return [slot for slot in self.slots
                if slot.index not in busy and self.placement.get(slot.index) in alive]

    def _alive_nodes(self) -> set[str]:
        if time.monotonic() - self._nodes_checked > NODES_EVERY_S:
            self._alive = {node["NodeID"] for node in _ray().nodes() if node["Alive"]}
            self._nodes_checked = time.monotonic()
        return self._alive

    def actor_name(self, slot: Slot) -> str:
        """Workspace, node, and the slot's shape and place on it: what a restarted driver
        with the same plan names it too."""
        node = self.placement[slot.index]
        on_node = [s.index for s in self.slots if self.placement[s.index] == node]
        shape = "gpu" if slot.device == "cuda" else slot.slot_class.replace(":", "")
        return f"ar-{self._workspace}-{node[:12]}-{shape}-{on_node.index(slot.index)}"

    def _slot_actor(self, slot: Slot) -> Any:
        """The slot's actor: this driver's, an earlier driver's (same name) or a new one."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if slot.index in self._actors:
            return self._actors[slot.index]
        if slot.device == "cuda":
            needs = ({"num_gpus": 1} if self.gpu_resource == GPU_RESOURCE
                     else {"resources": {self.gpu_resource: 1}})
            needs["num_cpus"] = 0
        else:
            needs = {"num_cpus": int(slot.slot_class.split(":")[1])}
        actor = _ray().remote(SlotActor).options(
            name=self.actor_name(slot), namespace=NAMESPACE, get_if_exists=True,
            lifetime="detached", max_restarts=0, max_concurrency=8,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.placement[slot.index],
                                                               soft=False), **needs).remote()
        self._actors[slot.index] = actor
        return actor

    def start(self, exp_id: int, slot: Slot, spec: Any) -> str:
        """Run `spec` on `slot`'s node; returns the task id, "<actor name>:<exp_id>"."""
        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.json").write_text(spec.to_json())
        (run_dir / "result.json").unlink(missing_ok=True)
        self._workspace = self._workspace or workspace_key(run_dir)
        actor = self._slot_actor(slot)
        payload = {"spec": spec.to_json(), "code": _code_files(Path(spec.code_dir)),
                   "hashes": self.hashes, "manifest": self.manifest, "cpus": list(slot.cpus),
                   "slot_class": slot.slot_class, "command": list(self.command),
                   "prepare": self.prepare}
        node_id = self.placement[slot.index]
        started_ref = actor.start.remote(exp_id, payload)
        self.running[exp_id] = Remote(exp_id, slot, self.hosts.get(node_id, node_id[:12]),
                                      run_dir, actor, actor.result.remote(exp_id), started_ref)
        return f"{self.actor_name(slot)}:{exp_id}"

    def wait(self, timeout: float) -> list[Progressed | Ended]:
        """What happened within `timeout` seconds (sooner when a run ended)."""
        if not self.running:
            return []
        ray = _ray()
        by_ref = {remote.result_ref: remote for remote in self.running.values()}
        ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        events: list[Progressed | Ended] = [ended for ref in ready
                                            if (ended := self._end(by_ref[ref])) is not None]
        return events + self._progress()

    def _progress(self) -> list[Progressed]:
        from sandbox.progress import Progress

        ray, now, reports = _ray(), time.monotonic(), []
        for remote in self.running.values():
            if remote.poll_ref is None:
                if now - remote.polled >= PROGRESS_EVERY_S:
                    remote.poll_ref = remote.actor.poll.remote(remote.exp_id)
                    remote.polled = now
                continue
            if not ray.wait([remote.poll_ref], timeout=0)[0]:
                continue
            try:
                latest = ray.get(remote.poll_ref)
                if latest:
                    reports.append(Progressed(remote.exp_id, Progress(**latest)))
            except (ray.exceptions.RayError, TypeError):
                pass  # a lost actor is reported by its result
            remote.poll_ref = None
        return reports

    def _end(self, remote: Remote) -> Ended | None:
        ray = _ray()
        try:
            reply = ray.get(remote.result_ref)
            remote.actor.release.remote(remote.exp_id)
        except ray.exceptions.ActorUnavailableError as exc:  # maybe a network blip: ask again
            now = time.monotonic()
            remote.unavailable_since = remote.unavailable_since or now
            if now - remote.unavailable_since < UNAVAILABLE_GRACE_S:
                remote.result_ref = remote.actor.result.remote(remote.exp_id)
                return None
            reply = self._lost(remote, exc)
        except ray.exceptions.RayError as exc:  # the node, the actor or its worker died
            reply = self._lost(remote, exc)
        del self.running[remote.exp_id]
        if reply.get("sandbox_failed"):  # as locally: the sandbox itself failed, ar stops
            raise ArError(f"node {remote.node}: {reply['sandbox_failed']}")
        write_files(remote.run_dir, reply.get("files", {}))
        return Ended(remote.exp_id, remote.slot, reply["result"])

    def _lost(self, remote: Remote, exc: Exception) -> dict[str, Any]:
        if self._actors.get(remote.slot.index) is remote.actor:
            self._drop(remote.slot.index)  # the slot gets a new actor next time
        return {"result": lost(remote, exc)}

    def _drop(self, slot_index: int) -> None:
        _kill(self._actors.pop(slot_index))

    def stop_all(self) -> list[int]:
        """Stop every run (its worker process kills its job first), then every slot actor."""
        ray = _ray()
        stopped = list(self.running)
        started = [remote for remote in self.running.values()
                   if ray.wait([remote.started_ref], timeout=0)[0]]
        stops = [remote.actor.stop.remote() for remote in started]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=STOP_GRACE_S + 5)
        for remote in self.running.values():
            _kill(remote.actor)
        for slot_index in list(self._actors):
            self._drop(slot_index)
        self.running.clear()
        return stopped

    def close(self) -> None:
        """Give back the slots that run nothing (their actors exit); runs go on."""
        busy = {remote.slot.index for remote in self.running.values()}
        for slot_index in list(self._actors):
            if slot_index not in busy:
                self._drop(slot_index)

    def reattach(self, exp_id: int, task_id: str, slot_class: str, run_dir: Path) -> bool:
        """Follow a run that an earlier ar started (task_id: "<actor name>:<exp_id>") to its
        end; False when the cluster no longer has it."""
        ray = _ray()
        name = task_id.rpartition(":")[0]
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            if not ray.get(actor.has.remote(exp_id), timeout=REATTACH_WAIT_S):
                return False
        except (ValueError, ray.exceptions.RayError):  # no such actor, or it cannot answer
            return False
        self._workspace = self._workspace or workspace_key(run_dir)
        busy = {remote.slot.index for remote in self.running.values()}
        slot = next((s for s in self.slots if s.index not in busy and
                     self.placement[s.index] in self._alive and self.actor_name(s) == name), None)
        if slot is None:  # the plan changed: follow it outside the slots
            slot = Slot(-exp_id, "cuda" if name.split("-")[-2] == "gpu" else "cpu",
                        slot_class=slot_class)
        else:
            self._actors[slot.index] = actor
        node = next((host for node_id, host in self.hosts.items()
                     if node_id.startswith(name.split("-")[2])), name.split("-")[2])
        self.running[exp_id] = Remote(exp_id, slot, node, Path(run_dir),
                                      actor, actor.result.remote(exp_id), actor.has.remote(exp_id))
        return True

    def waiting_reason(self) -> str | None:
        """Why runs that were started wait for the cluster, or None when none does."""
        ray = _ray()
        pending = [remote for remote in self.running.values()
                   if not ray.wait([remote.started_ref], timeout=0)[0]]
        if not pending:
            return None
        free, total = ray.available_resources(), ray.cluster_resources()
        what, key = ("GPU", self.gpu_resource) if any(
            remote.slot.device == "cuda" for remote in pending) else ("CPU", "CPU")
        return (f"no free {what} in the cluster: {free.get(key, 0):g} of {total.get(key, 0):g} "
                f"free ({len(pending)} pending tasks)")


def _keep_alive(pool_ref: weakref.ref) -> None:
    """Touch the pool's slot actors while the pool lives (this driver, not dropped): an
    actor no driver touches gives its slot back when idle (ray_node.IDLE_EXIT_S)."""
    while (pool := pool_ref()) is not None:
        try:
            for actor in list(pool._actors.values()):
                actor.touch.remote()
        except Exception:  # noqa: BLE001 (Ray was shut down)
            return
        del pool
        time.sleep(KEEPALIVE_S)


def lost(remote: Remote, exc: Exception) -> dict[str, Any]:
    """The result of a run whose node (or actor) went away: interrupted, to run again."""
    why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return {"status": "interrupted", "val_bpb": None, "requeue": True, "node": remote.node,
            "reason": f"node {remote.node} lost mid-run: {type(exc).__name__}: {why}"}


def _code_files(code_dir: Path) -> dict[str, bytes]:
    """The commit's files (train.py, prepare.py, ar.toml, program.md), as bytes."""
    return {path.name: path.read_bytes() for path in sorted(code_dir.iterdir())
            if path.is_file() and not path.name.startswith(".")}


def _kill(actor: Any) -> None:
    try:
        _ray().kill(actor)
    except Exception:  # noqa: BLE001 (already gone)
        pass


def open_ray(workers: int | None, device: str, *, address: str | None, data_dir: Path,
             manifest: dict[str, Any], prepare: Any, **_: Any) -> RayWorkers:
    """`--backend ray`: slots on the cluster at `address` (None: a new local one)."""
    return connect(address, workers, device, manifest, data_dir, prepare=prepare)
