"""The launcher that runs inside the job's process: apply the limits, then become the job.

    python -I -S limits.py --fsize BYTES --nofile N [--cgroup DIR]... [--parent PID]
                           [--namespaces user+net+pid|user+net+mnt|user|net|...]
                           [--report FD] [--privileges drop]
                           [--confine offline|online [--read PATH]...
                           [--write PATH]... [--device PATH]... [--unix allow|hidden]] -- CMD...
    python -I -S limits.py --probe namespaces|landlock

In this order (launch()): it joins the job's control groups (cgroup.py made them; from here on the
kernel charges everything the job does to them), sets the resource limits (largest file,
open files, no core dumps), asks the kernel to SIGKILL it if ar dies, and moves into fresh
namespaces (nsinit.py). With a PID namespace it forks the namespace's init, which mounts
the job's /proc (mounts.py) and forks the job. The job's process then gives up every
privilege (`--privileges drop`: an untrusted job; the trusted scorer keeps what it needs to
make its model workers' namespaces), confines itself with Landlock and seccomp when asked
(lsm.py), and execs CMD.
`--unix hidden` (the GPU path) lets CUDA open unix sockets but first hides every socket of
the host from the job's mount namespace; `--unix allow` (no mount namespace) does not.

Any failure stops the launch with exit code 125: never unconfined by accident. Doing this
in the child after fork, instead of in a preexec_fn, keeps ar's own process free of
fork-unsafe Python code. Standard library only and run with -S: it starts in a few
milliseconds and imports nothing of ar (its sibling modules by file name).
"""

import os
import resource
import signal
import sys

# Its sibling modules, after the standard library's (-I leaves the script's directory out).
sys.path.append(os.path.dirname(os.path.realpath(__file__)))

import lsm  # noqa: E402
import mounts  # noqa: E402
import nsinit  # noqa: E402
from nsinit import EXIT_SETUP_FAILED  # noqa: E402

# Tried in order by `--probe namespaces`, in throwaway children; the first that works wins.
PROBE_MODES = ("user+net+pid", "user+net", "net+pid", "net")
LISTS = ("read", "write", "device", "cgroup")
SCALARS = ("fsize", "nofile", "namespaces", "parent", "probe", "confine", "unix", "report",
           "privileges")  # fmt: skip


def join_cgroup(directory: str) -> None:
    """Move this process (and so everything it starts) into the control group `directory`."""
    with open(os.path.join(directory, "cgroup.procs"), "w") as handle:
        handle.write("0\n")  # 0: the writing process, whatever its pid in any namespace


def set_limits(fsize: int, nofile: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        nofile = min(nofile, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def _parse(argv: list[str]) -> dict:
    options: dict = {key: [] for key in LISTS} | {key: None for key in SCALARS}
    options["unix"] = "deny"
    args = list(argv)
    while args and args[0] != "--":
        name = args.pop(0)
        key = name.removeprefix("--")
        if key not in options or not args:
            raise ValueError(f"bad launcher argument {name!r}")
        if isinstance(options[key], list):
            options[key].append(args.pop(0))
        else:
            options[key] = args.pop(0)
    if options["unix"] not in ("deny", "allow", "hidden"):
        raise ValueError(f"bad --unix {options['unix']!r}")
    if options["privileges"] not in (None, "drop"):
        raise ValueError(f"bad --privileges {options['privileges']!r}")
    options["cmd"] = args[1:]
    return options


def _fail(why: object) -> None:
    sys.stderr.write(f"[sandbox] the launcher failed: {why}\n")
    os._exit(EXIT_SETUP_FAILED)


def _probe(what: str) -> None:
    if what == "landlock":  # restrict this process for real, then tell the ABI
        sys.stdout.write(f"{lsm.confine('offline', ['/'], [], [])}\n")
    elif what == "namespaces":
        works = next((mode for mode in PROBE_MODES if _works(mode)), None)
        if works is None:
            os._exit(1)  # each refusal went to stderr
        sys.stdout.write(f"{works}\n")
    else:
        raise ValueError(f"bad --probe {what!r}")
    sys.stdout.flush()
    os._exit(0)


def _works(mode: str) -> bool:
    """Whether this process could enter `mode` (and mount a /proc there): tried in a child."""
    child = os.fork()
    if child == 0:
        try:
            nsinit.enter(mode)
            if "pid" in mode:  # the namespace's first process mounts its /proc
                init = os.fork()
                if init == 0:
                    try:
                        _prepare_view({"unix": "deny"}, proc=True)
                    except OSError as exc:
                        _fail(f"{mode}: {exc}")
                    os._exit(0)
                os._exit(os.waitstatus_to_exitcode(os.waitpid(init, 0)[1]))
        except OSError as exc:
            _fail(f"{mode}: {exc}")
        os._exit(0)
    return os.waitpid(child, 0)[1] == 0


def _prepare_view(options: dict, proc: bool) -> None:
    """The job's mount namespace: private; its own /proc; the host's sockets hidden."""
    mounts.make_private()
    if proc:
        mounts.mount_proc()
    if options["unix"] == "hidden":
        mounts.hide_host_sockets([*options["read"], *options["write"], *options["device"]])


def _become_job(options: dict, become) -> None:
    """In the job's own process: give up privileges, confine, become(cmd). Never returns."""
    try:
        if options["privileges"] == "drop":
            lsm.drop_privileges()
        if options["confine"]:
            unix = "deny" if options["unix"] == "deny" else "allow"
            lsm.confine(options["confine"], options["read"], options["write"], options["device"],
                        unix)  # fmt: skip
    except (OSError, ValueError) as exc:
        _fail(exc)
    # Python ignores these two; ignored signals survive exec, so give the job the defaults.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    become(options["cmd"])
    os._exit(EXIT_SETUP_FAILED)  # become() returned: it must not


def exec_cmd(cmd: list[str]) -> None:
    """The cold path's become(): exec the job's command. Never returns."""
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        sys.stderr.write(f"[sandbox] cannot run {cmd[0]!r}: {exc.strerror}\n")
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)


def parse(argv: list[str]) -> dict:
    """The launcher's options from its command line (after the script's name)."""
    options = _parse(argv)
    if not options["cmd"] and not options["probe"]:
        raise ValueError("no command after --")
    return options


def launch(options: dict, become=exec_cmd) -> None:
    """Join the job's groups, set its limits, enter its namespaces and become the job:
    become(cmd) in the job's process, once it is confined (the warm runtime runs a Python
    command in that process instead of exec'ing it: sandbox/zygote.py). Never returns."""
    try:
        for directory in options["cgroup"]:
            join_cgroup(directory)
        set_limits(int(options["fsize"]), int(options["nofile"]))
        if options["parent"]:
            nsinit.die_with_parent(int(options["parent"]))
        names = nsinit.tokens(options["namespaces"]) if options["namespaces"] else []
        if options["unix"] == "hidden" and not {"pid", "mnt"} & set(names):
            raise ValueError("--unix hidden needs a mount namespace (pid or mnt)")
        report = int(options["report"]) if options["report"] else None
        if names:
            nsinit.enter(options["namespaces"])
        if "mnt" in names:
            _prepare_view(options, proc=False)
    except (OSError, ValueError, TypeError) as exc:
        _fail(exc)
    if "pid" in names:
        nsinit.supervise(lambda: _prepare_view(options, proc=True),
                         lambda: _become_job(options, become), report)  # fmt: skip
    if report is not None:
        os.close(report)  # without a PID namespace the runner's tree does the counting
    _become_job(options, become)


def main(argv: list[str]) -> None:
    try:
        options = parse(argv)
        if options["probe"]:
            _probe(options["probe"])
    except (OSError, ValueError, TypeError) as exc:
        _fail(exc)
    launch(options)


if __name__ == "__main__":
    main(sys.argv[1:])
