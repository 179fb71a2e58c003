"""Run a `python ...` command line in this process, as a fresh interpreter would run it.

The warm runtime (sandbox/warm.py, sandbox/zygote.py) forks a process that has already
imported torch and numpy; once that fork has confined itself (limits.py), this module
takes the place of exec: it gives the program the argv, sys.path, environment, standard
streams, signal dispositions and random state a new interpreter would have, runs it as
`__main__`, and ends the process the way an interpreter ends (threads joined, atexit
handlers, streams flushed, the same exit status).

    program = parse(cmd)          # None: not a command this process can run (exec it)
    become(program, env)          # never returns

Only this interpreter's own command lines qualify (the same executable), with the flags
-I, -s, -E, -u, -B and -S (the process has its site already; -S changes nothing a job can
rely on) followed by a script, `-m module` or `-c code`. Anything else is exec'd.

What a fresh interpreter has and a fork does not, handled here: the libraries' thread
counts (OMP_NUM_THREADS was read when torch loaded: torch.set_num_threads applies the
job's), torch's and numpy's global random state (drawn again, as a new process draws it),
tempfile's cached directory (the job's TMPDIR, not the server's), torch._dynamo's debug
directory (beneath the working directory when it was imported). random reseeds itself
at fork. Python's hash seed is the server's: only the iteration order of sets of strings
depends on it, never a job's seed or a score.
"""

import atexit
import io
import os
import runpy
import signal
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass

FLAGS = frozenset(("-I", "-s", "-E", "-u", "-B", "-S"))
# The launcher's modules, imported top-level by limits.py: not the job's to find.
LAUNCHER_MODULES = ("limits", "lsm", "mounts", "nsinit")


@dataclass(frozen=True)
class Program:
    kind: str  # "script", "module" or "code"
    target: str  # the script's path, the module's name or the code
    argv: tuple[str, ...]  # sys.argv as the program sees it
    isolated: bool  # -I: no script directory or cwd on sys.path, PYTHONPATH ignored
    ignore_env: bool  # -E (or -I): PYTHONPATH ignored
    unbuffered: bool  # -u


def parse(cmd: list[str], executable: str = sys.executable) -> Program | None:
    """The program `cmd` runs, when it is this interpreter's command line; else None."""
    if not cmd or not _same_file(cmd[0], executable):
        return None
    flags, rest = [], list(cmd[1:])
    while rest and rest[0] in FLAGS:
        flags.append(rest.pop(0))
    if not rest or (rest[0].startswith("-") and rest[0] not in ("-m", "-c")):
        return None
    isolated, unbuffered = "-I" in flags, "-u" in flags
    ignore_env = isolated or "-E" in flags
    if rest[0] in ("-m", "-c"):
        if len(rest) < 2:
            return None
        kind = "module" if rest[0] == "-m" else "code"
        argv0 = "-c" if kind == "code" else rest[1]  # runpy sets the module's path itself
        return Program(kind, rest[1], (argv0, *rest[2:]), isolated, ignore_env, unbuffered)
    return Program("script", rest[0], tuple(rest), isolated, ignore_env, unbuffered)


def _same_file(path: str, executable: str) -> bool:
    try:
        return os.path.samefile(path, executable)
    except OSError:
        return False


def become(program: Program, env: dict[str, str], base_path: list[str]) -> None:
    """Run `program` as this process's __main__ with `env`, then exit. Never returns.

    base_path: sys.path of the warm process before anything of its own was added."""
    _fresh_interpreter_state(program, env, base_path)
    code = 0
    try:
        _run(program)
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt:
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # an interpreter dies from SIGINT here
        code = 130
    except BaseException:  # noqa: BLE001 (an uncaught exception, printed as Python does)
        sys.excepthook(*sys.exc_info())
        code = 1
    _finish()
    os._exit(code)


def _fresh_interpreter_state(program: Program, env: dict[str, str], base_path: list[str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(program.argv)
    sys.path[:] = _program_path(program, env, base_path)
    for name in LAUNCHER_MODULES:
        sys.modules.pop(name, None)
    unbuffered = program.unbuffered or (not program.ignore_env and bool(env.get("PYTHONUNBUFFERED")))
    _fresh_streams(unbuffered)
    # A new interpreter ignores these two and handles SIGINT; everything else is default.
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tempfile.tempdir = None  # gettempdir() reads the job's TMPDIR again
    _fresh_libraries(env)


def _program_path(program: Program, env: dict[str, str], base_path: list[str]) -> list[str]:
    path = list(base_path)
    if not program.ignore_env:
        path[0:0] = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if not program.isolated:
        if program.kind == "script":
            first = os.path.dirname(os.path.realpath(program.target))
        else:
            first = os.getcwd() if program.kind == "module" else ""
        path.insert(0, first)
    return path


def _fresh_streams(unbuffered: bool) -> None:
    """Standard streams on descriptors 0, 1 and 2 as a new interpreter opens them: stderr
    line-buffered, stdout line-buffered only on a terminal, both unbuffered with -u."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding=encoding)
    sys.stdin = sys.__stdin__ = stdin
    for fd, name, errors in ((1, "stdout", "surrogateescape"), (2, "stderr", "backslashreplace")):
        raw = io.FileIO(fd, "w", closefd=False)
        stream = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding=encoding,
                                  errors=errors, line_buffering=raw.isatty() or name == "stderr",
                                  write_through=unbuffered)  # fmt: skip
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _fresh_libraries(env: dict[str, str]) -> None:
    """What torch and numpy fixed when the warm process imported them, set for this job."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # a new process draws its global state from the OS
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()  # a new process's generator starts from a seed of its own, not the server's
    threads = env.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    dynamo = sys.modules.get("torch._dynamo.config")
    if dynamo is not None:  # computed from the working directory when it was imported
        dynamo.debug_dir_root = dynamo.default_debug_dir_root()


def _run(program: Program) -> None:
    if program.kind == "module":
        runpy._run_module_as_main(program.target, alter_argv=True)  # what `python -m` calls
        return
    main = sys.modules["__main__"] = type(sys)("__main__")
    if program.kind == "script":
        main.__file__ = program.target
        with io.open_code(program.target) as handle:
            source = handle.read()
        code = compile(source, program.target, "exec")
    else:
        code = compile(program.target, "<string>", "exec")
    exec(code, main.__dict__)  # noqa: S102 (this process is the job's, confined)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _finish() -> None:
    """An interpreter's end: wait for non-daemon threads, run atexit, flush the streams."""
    try:
        threading._shutdown()
    except Exception:  # noqa: BLE001 (as at interpreter exit: print and go on)
        traceback.print_exc()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
