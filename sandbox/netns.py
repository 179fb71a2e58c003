"""Which namespaces can this machine give a job? Probed once per process, then cached.

The launcher (limits.py) moves an offline job into a new network namespace where only
loopback exists and is up. It prefers to do so inside a new user namespace: that works
unprivileged where the kernel allows it, keeps even a root job from undoing it, and
walls ar's own process off from the job. A job allowed the network still gets the user
namespace. As root without user namespaces, a network namespace alone. Where neither
works (no Linux, a container that forbids unshare) the job runs with the network and the
result says so.

Where the kernel also lets the launcher make a PID namespace and mount a /proc for it
(not in a container whose /proc is partly masked), each job gets one: it sees only its
own processes, and killing it is the kernel's teardown of the namespace (nsinit.py).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).with_name("limits.py")
PROBE_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class NetworkIsolation:
    mode: str | None  # "user+net", "net", or None when no namespace can be had
    note: str
    pid: bool = False  # also a PID namespace with a /proc of its own (with `mode`)
    pid_note: str = "no PID namespace"


@dataclass(frozen=True)
class Plan:
    namespaces: str | None  # the launcher's --namespaces
    network_isolated: bool
    note: str


def plan(network: bool, user_namespace: bool = True, pid: bool = False,
         mount: bool = False) -> Plan:  # fmt: skip
    """The namespaces for one job, from what the kernel allows and what the limits ask.

    pid: a PID namespace (with a mount namespace and its own /proc) where the kernel gives
    one; mount, without pid: a mount namespace alone. Either needs a user namespace or root.
    """
    probed = probe()
    network_part = _network_plan(probed, network, user_namespace)
    names = network_part.namespaces.split("+") if network_part.namespaces else []
    if (pid or mount) and probed.pid and ("user" in names or os.geteuid() == 0):
        names.append("pid" if pid else "mnt")
    return Plan("+".join(names) or None, network_part.network_isolated, network_part.note)


def _network_plan(probed: NetworkIsolation, network: bool, user_namespace: bool) -> Plan:
    if probed.mode is None:
        return Plan(None, False, probed.note)
    if network:
        user_only = "user" if probed.mode == "user+net" and user_namespace else None
        return Plan(user_only, False, "the job has the network: the limits allow it")
    if not user_namespace:
        if os.geteuid() != 0:
            return Plan(
                None,
                False,
                "the job has the network: without a user namespace only root can cut it",
            )
        return Plan("net", True, "offline: network namespace, loopback only")
    return Plan(probed.mode, True, probed.note)


def launcher_cmd(*args: str) -> list[str]:
    """The launcher under ar's own interpreter: isolated mode, no site, standard library only."""
    return [sys.executable, "-I", "-S", str(LAUNCHER), *args]


@functools.cache
def probe() -> NetworkIsolation:
    if not sys.platform.startswith("linux"):
        return NetworkIsolation(
            None, f"no network isolation on {sys.platform}: the job has the network"
        )
    try:
        done = subprocess.run(
            launcher_cmd("--probe", "namespaces"), capture_output=True, text=True,
            timeout=PROBE_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return NetworkIsolation(None, f"the job has the network: the namespace probe failed: {exc}")
    refusals = "; ".join(line.removeprefix("[sandbox] the launcher failed: ")
                         for line in done.stderr.strip().splitlines())  # fmt: skip
    names = done.stdout.strip().split("+") if done.returncode == 0 else []
    mode = "+".join(name for name in names if name != "pid") or None
    if mode is None:
        return NetworkIsolation(
            None, f"the job has the network: the kernel refused a network namespace ({refusals})"
        )
    kind = "user + network namespace" if mode == "user+net" else "network namespace"
    pid_note = "PID namespace" if "pid" in names else f"no PID namespace ({refusals})"
    return NetworkIsolation(mode, f"offline: {kind}, loopback only", "pid" in names, pid_note)
