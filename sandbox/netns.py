"""Which namespaces can this machine give a job? Probed once per process, then cached.

The launcher (limits.py) moves an offline job into a new network namespace where only
loopback exists and is up. It prefers to do so inside a new user namespace: that works
unprivileged where the kernel allows it, keeps even a root job from undoing it, and
walls ar's own process off from the job. A job allowed the network still gets the user
namespace. As root without user namespaces, a network namespace alone. Where neither
works (no Linux, a container that forbids unshare) the job runs with the network and the
result says so.
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


@dataclass(frozen=True)
class Plan:
    namespaces: str | None  # the launcher's --namespaces
    network_isolated: bool
    note: str


def plan(network: bool, user_namespace: bool = True) -> Plan:
    """The namespaces for one job, from what the kernel allows and what the limits ask."""
    probed = probe()
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
    failures = []
    for mode in ("user+net", "net"):
        try:
            done = subprocess.run(
                launcher_cmd("--probe", mode), capture_output=True, text=True,
                timeout=PROBE_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            failures.append(f"{mode}: {exc}")
            continue
        if done.returncode == 0:
            kind = "user + network namespace" if mode == "user+net" else "network namespace"
            return NetworkIsolation(mode, f"offline: {kind}, loopback only")
        failures.append(done.stderr.strip().removeprefix("[sandbox] the launcher failed: "))
    return NetworkIsolation(
        None,
        "the job has the network: the kernel refused a network namespace ("
        + "; ".join(failures)
        + ")",
    )
