"""The `ar` command line: parse, call the core, render. Nothing else lives here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from autoresearch_cli import __version__
from autoresearch_cli.errors import ArError

app = typer.Typer(
    name="ar",
    help="Autonomous ML research: propose a change to train.py, train it in a sandbox, keep it if it beats the best.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold API keys
    rich_markup_mode=None,
)

_state: dict[str, Path | None] = {"directory": None}


def _err(message: str) -> None:
    typer.secho(f"error: {clean(message)}", fg=typer.colors.RED, err=True)


def clean(text: str) -> str:
    """Text a run or a model wrote, safe for a terminal: no control characters."""
    from autoresearch_cli.doors.text import printable

    return printable(text)


@contextmanager
def _run(interrupted: str = "interrupted") -> Iterator[None]:
    """The one place where an expected failure becomes a red line and an exit code: an
    ArError exits 1, Ctrl-C (or SIGTERM, SIGHUP) 130, with no traceback."""
    try:
        yield
    except KeyboardInterrupt:
        _err(interrupted)
        raise typer.Exit(130) from None
    except ArError as exc:
        _err(str(exc))
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ar {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    directory: Annotated[
        Path | None,
        typer.Option("-C", help="Run as if ar was started in this directory.", show_default=False),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    if directory is not None and not directory.is_dir():
        _err(f"-C {directory}: no such directory")
        raise typer.Exit(1)
    _state["directory"] = directory


def _workspace():
    from autoresearch_cli.doors import workspace

    return workspace.find(_state["directory"])


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Directory for the new workspace (new or empty).")] = Path("."),
    profile: Annotated[str, typer.Option(help="cpu (a laptop, ~60 s runs) or gpu (the original's 5-minute H100 setup).")] = "cpu",
    tag: Annotated[str | None, typer.Option(help="Run tag; the branch is autoresearch/<tag>. Default: today, like nov23.")] = None,
    budget: Annotated[int | None, typer.Option(help="Training seconds per experiment (default: the profile's).")] = None,
) -> None:
    """Create a workspace: a git repo with train.py, prepare.py, program.md and ar.toml."""
    from autoresearch_cli.doors import workspace

    base = _state["directory"] or Path.cwd()
    target = directory if directory.is_absolute() else base / directory
    with _run():
        ws = workspace.init(target, profile=profile, tag=tag, budget=budget)
        settings = ws.settings()
    p = settings.profile
    typer.echo(f"Created workspace {ws.root} on branch {settings.branch}")
    typer.echo(f"  profile {p.name}: vocab {p.vocab_size}, context {p.max_seq_len}, "
               f"budget {p.time_budget} s, eval {p.eval_tokens:,} tokens")
    typer.echo(f"Next: cd {ws.root} && ar prepare")


@app.command()
def prepare(
    source: Annotated[str | None, typer.Option(help="stdlib | files:GLOB | climbmix[:N] (default: ar.toml's [data] source).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the data matches.")] = False,
) -> None:
    """Train the tokenizer and write train/val/holdout token files into .ar/data."""
    from autoresearch_cli.doors import data

    with _run():
        ws = _workspace()
        settings = ws.settings()
        report = data.prepare_data(
            ws.data_dir, source=source or settings.data.source,
            vocab_size=int(settings.profile.vocab_size), val_percent=int(settings.data.val_percent),
            holdout_percent=int(settings.data.holdout_percent), force=force,
            on_progress=lambda msg: typer.echo(f"  {msg}", err=True),
        )
    m = report.manifest
    if report.skipped:
        typer.echo(f"Data for {m['source']} is up to date in {report.data_dir} (use --force to rebuild)")
        return
    typer.echo(f"Prepared {m['source']} in {report.seconds:.1f} s -> {report.data_dir}")
    for split, info in m["splits"].items():
        typer.echo(f"  {split:8s} {info['documents']:>7,} docs {info['tokens']:>12,} tokens")
    near = m.get("near_duplicates") or {}
    if not near.get("checked", True):
        typer.echo(f"  near-copies across splits {near.get('note')}")
    elif near.get("dropped"):
        dropped = ", ".join(f"{n} {split}" for split, n in near["dropped"].items())
        typer.echo(f"  dropped near-copies of training documents: {dropped} (sharing at least "
                   f"{near['containment']:.0%} of their {near['shingle_words']}-word shingles)")


def _session(command: str):
    from autoresearch_cli.research import session

    return session.session(_workspace(), command)


def _report_recovered(current) -> None:
    for run in current.recovered:
        typer.secho(
            f"note: experiment #{run.id} was interrupted (its ar process ended); marked interrupted and cleaned up",
            fg=typer.colors.YELLOW, err=True,
        )


def _check_confinement(current, model_backed: bool, allowed: bool, explore: float = 0.0) -> None:
    """Say once per command when the kernel cannot confine the candidate's code; refuse to
    run model-written code then (the agent is model-backed, or a model wrote a commit the
    branch holds or, with `explore` > 0, one the search may build on), unless the user
    named the risk."""
    from autoresearch_cli.agents import model_backed as named_model_backed
    from autoresearch_cli.research.loop import runs_model_code
    from sandbox.confine import support

    level = support()
    if level.confines_files:
        if not level.pid_namespace or level.cgroup is None:  # confined, with less to hold it
            current.ledger.add_event("confinement", None, level.note)
            typer.secho(f"note: {level.note}", fg=typer.colors.YELLOW, err=True)
        return
    current.ledger.add_event("unconfined", None, level.note)
    typer.secho(f"warning: no confinement on this machine ({level.note}): train.py runs with "
                "your user's access to files and processes", fg=typer.colors.YELLOW, err=True)
    if not allowed and runs_model_code(current, model_backed, named_model_backed, explore):
        raise ArError("refusing to run LLM-written train.py unconfined; pass --unsafe-unconfined "
                      "to accept that it can read and change anything your user can")


def _display(current):
    from autoresearch_cli.display import Display

    def standing():
        evidence = current.evidence()
        return evidence.baseline(), evidence.best()

    return Display(cost=lambda: current.ledger.total_cost().usd, standing=standing)


BackendOption = Annotated[str, typer.Option(
    help="local: runs in processes on this machine; ray: on a Ray cluster (pip install 'ar[ray]').")]
AddressOption = Annotated[str | None, typer.Option(
    help="The Ray cluster to use (e.g. 10.0.0.1:6379; default: RAY_ADDRESS, else start one on "
         "this machine). Only with --backend ray.")]
WorkersOption = Annotated[int | None, typer.Option(
    help="Runs at once (default: one per visible GPU; one on CPU, where up to one per core is "
         "allowed, each worker getting its share of the cores).", min=1)]
UnconfinedOption = Annotated[bool, typer.Option(
    "--unsafe-unconfined",
    help="Run LLM-written train.py even where the kernel cannot confine it: it then runs with "
         "all of your user's access (files, keys, network).")]


def _check_backend(backend: str, address: str | None) -> None:
    from autoresearch_cli.backends import BACKENDS

    if backend not in BACKENDS:
        _err(f"unknown --backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        raise typer.Exit(2)
    if address is not None and backend != "ray":
        _err("--address names a Ray cluster: use it with --backend ray")
        raise typer.Exit(2)


@app.command()
def baseline(
    repeat: Annotated[int, typer.Option(help="Number of runs of the branch tip; >= 2 also measures noise.", min=1)] = 1,
    backend: BackendOption = "local",
    workers: WorkersOption = None,
    address: AddressOption = None,
    unsafe_unconfined: UnconfinedOption = False,
) -> None:
    """Train and evaluate the branch tip's train.py to set the baseline."""
    from autoresearch_cli.research import loop

    _check_backend(backend, address)
    with _run("interrupted: the running jobs were killed and their runs marked interrupted"):
        with _session("ar baseline") as current:
            _report_recovered(current)
            _check_confinement(current, model_backed=False, allowed=unsafe_unconfined)
            with _display(current) as display:
                summary = loop.baseline(current, repeat, display, backend=backend,
                                        workers=workers, address=address)
    if summary.evidence is None or summary.evidence.mean is None:
        _err("no baseline run succeeded; see the reasons above and .ar/runs/<id>/train.log")
        raise typer.Exit(1)
    spread = summary.evidence.std
    std = f", std {spread:.6f} of {summary.evidence.n} runs" if spread is not None else ""
    typer.echo(f"baseline val_bpb {summary.evidence.describe()}{std} at {summary.sha[:7]} on "
               f"{summary.evidence.slot_class} (± is the 95% interval of the mean)")


@app.command()
def iterate(
    n: Annotated[int | None, typer.Option("--n", help="Number of experiments (default: until interrupted).", min=1)] = None,
    hours: Annotated[float | None, typer.Option(help="Start nothing new after this many hours; what runs then finishes.", min=0)] = None,
    agent: Annotated[str | None, typer.Option(help="The agent (llm, random, tpe; default: ar.toml's [agent] name).")] = None,
    model: Annotated[str | None, typer.Option(help="litellm model string, e.g. anthropic/claude-sonnet-4-5.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop before an LLM call that would exceed this many USD.", min=0)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the random and tpe agents: the same history gives the same proposals.")] = None,
    workers: WorkersOption = None,
    backend: BackendOption = "local",
    address: AddressOption = None,
    unsafe_unconfined: UnconfinedOption = False,
) -> None:
    """Run the research loop: propose, train, evaluate, keep or discard."""
    from autoresearch_cli.agents import agent_name, make_agent
    from autoresearch_cli.research import loop

    _check_backend(backend, address)
    with _run("interrupted: the running jobs were killed and their experiments marked interrupted"):
        with _session("ar iterate") as current:
            _report_recovered(current)
            settings = current.settings.agent
            name = agent_name(settings, agent, model)
            with _display(current) as display:
                chosen = make_agent(
                    settings, name=name, seed=seed, model=model, max_cost_usd=max_cost,
                    on_stream=lambda tokens, seconds: display("answering", tokens=tokens, seconds=seconds),
                )  # each proposal's model calls are recorded against its experiment (pipeline)
                _check_confinement(current, model_backed=chosen.model_backed,
                                   allowed=unsafe_unconfined, explore=settings.explore)
                outcome = loop.iterate(current, chosen, name, n, display, workers=workers,
                                       backend=backend, address=address, hours=hours)
                status = display.status_line()
    typer.echo(status)
    if outcome.time_up:
        typer.echo(f"stopped at the time limit (--hours {hours:g}): runs in flight finished; "
                   "candidates still waiting for runs are judged by the next `ar iterate`")
    if outcome.stopped_because:
        _err(f"stopped: {outcome.stopped_because}")
        raise typer.Exit(1)


@app.command()
def log(
    best: Annotated[bool, typer.Option("--best", help="Only the kept chain from baseline to the best.")] = False,
    tree: Annotated[bool, typer.Option("--tree", help="Every experiment under the commit it built on.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    limit: Annotated[int | None, typer.Option(help="Show only the last N experiments.", min=1)] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the progress chart to this PNG file.")] = None,
    timing: Annotated[bool, typer.Option("--timing", help="Where each run's wall time went.")] = False,
) -> None:
    """Show the experiments recorded in the ledger (read-only: safe beside a running ar)."""
    import json

    from rich.console import Console

    from autoresearch_cli.doors.ledger import Ledger
    from autoresearch_cli.report import log as shown
    from autoresearch_cli.research.evidence import Evidence

    with _run():
        ws = _workspace()
        with Ledger.for_workspace(ws.root, read_only=True) as ledger:
            evidence = Evidence.load(ledger)
            cost = ledger.total_cost()
        if plot is not None:
            from autoresearch_cli.report.plot import plot_progress

            typer.echo(f"wrote {plot_progress(evidence, plot)}", err=True)
        if timing:
            _log_timing(evidence.runs[-limit:] if limit else evidence.runs, as_json)
            return
        if tree:
            from autoresearch_cli.report.tree import render_tree, tree_rows

            rows = tree_rows(evidence)
            typer.echo(json.dumps(rows, indent=2, default=str) if as_json
                       else "\n".join(clean(line) for line in render_tree(rows)))
            return
        if as_json:
            payload = shown.best_chain(evidence) if best else shown.json_rows(evidence, limit)
            typer.echo(json.dumps(payload, indent=2, default=str))
            return
    console = Console()
    if best:
        console.print(shown.render_best_chain(shown.best_chain(evidence)))
    else:
        console.print(shown.render_table(shown.table_rows(evidence, limit)))
    typer.echo(shown.summary_text(shown.summary(evidence, cost)))
    for line in shown.noise_lines(evidence):
        typer.echo(line)


def _log_timing(runs, as_json: bool) -> None:
    import json

    from rich.console import Console

    from autoresearch_cli.report import walltime

    rows = walltime.timing_rows(runs)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    Console().print(walltime.render_timing(rows))
    typer.echo(walltime.timing_summary(rows))


@app.command()
def report(
    out: Annotated[Path | None, typer.Option(help="The HTML page to write (default .ar/report/report.html); the Markdown summary goes beside it (.md).")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Serve the page live on 127.0.0.1 instead, refreshed while ar iterate runs.")] = False,
    port: Annotated[int, typer.Option(help="With --serve: the port (0: a free one).", min=0, max=65535)] = 0,
) -> None:
    """Write what the research found: one self-contained HTML page and a Markdown summary
    for a pull request (read-only: safe beside a running ar)."""
    from autoresearch_cli.report import write

    with _run("stopped"):
        ws = _workspace()
        if serve:
            _serve(ws, port)
            return
        html_path, md_path = write.write(ws, out)
    typer.echo(f"wrote {html_path}")
    typer.echo(f"wrote {md_path} (for a pull request's description)")


def _serve(ws, port: int) -> None:
    from autoresearch_cli.report.serve import open_server

    server, live, url = open_server(ws, port)
    typer.echo(f"serving the live report at {url} (Ctrl-C stops it)", err=True)
    typer.echo(url)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        return  # the way to stop a server: not an error
    finally:
        server.server_close()
        live.ledger.close()


RunsOption = Annotated[int, typer.Option(
    help="Paired runs per commit, on seed indices 0..N-1 (two or more give an interval).", min=1)]


def _study(command: str, plan_for, backend: str, workers: int | None, address: str | None,
           allowed: bool):
    """Plan a study in a session (`plan_for(session)` -> studies.Plan), run it, and return
    the plan and the evidence after it."""
    from autoresearch_cli.research import loop

    _check_backend(backend, address)
    with _run("interrupted: the running jobs were killed and their runs marked interrupted"):
        with _session(command) as current:
            _report_recovered(current)
            _check_confinement(current, model_backed=False, allowed=allowed)
            plan = plan_for(current)
            for step, why in plan.skipped:
                typer.secho(f"#{step.id} not ablated: {why}", fg=typer.colors.YELLOW, err=True)
            with _display(current) as display:
                loop.study(current, plan, display, backend=backend, workers=workers,
                           address=address)
            return plan, current.evidence()


@app.command()
def ablate(
    runs: RunsOption = 3,
    backend: BackendOption = "local",
    workers: WorkersOption = None,
    address: AddressOption = None,
    unsafe_unconfined: UnconfinedOption = False,
) -> None:
    """Run the best without each kept step in turn, paired with the best on the same seeds,
    and show which steps carry the gain."""
    from rich.console import Console

    from autoresearch_cli.report.log import render_ablations
    from autoresearch_cli.research import findings, studies

    _, evidence = _study("ar ablate", lambda current: studies.plan_ablation(current, runs),
                         backend, workers, address, unsafe_unconfined)
    Console().print(render_ablations(findings.ablations(evidence)))


@app.command()
def transfer(
    budget_factor: Annotated[float, typer.Option("--budget-factor", help="Train for this many times the profile's budget.", min=0.01)],
    runs: RunsOption = 3,
    backend: BackendOption = "local",
    workers: WorkersOption = None,
    address: AddressOption = None,
    unsafe_unconfined: UnconfinedOption = False,
) -> None:
    """Run the baseline and the best at K times the budget, paired, and say whether the
    gain holds, shrinks or grows."""
    from rich.console import Console

    from autoresearch_cli.report.log import render_transfers
    from autoresearch_cli.research import findings, studies

    plan, evidence = _study("ar transfer",
                            lambda current: studies.plan_transfer(current, budget_factor, runs),
                            backend, workers, address, unsafe_unconfined)
    Console().print(render_transfers([found for found in findings.transfers(evidence)
                                      if found.slot_class == plan.slot_class]))


@app.command()
def revert(sha: Annotated[str, typer.Argument(help="A kept commit to move the branch back to.")]) -> None:
    """Move the research branch back to an earlier kept commit."""
    from autoresearch_cli.research import loop

    with _run():
        with _session("ar revert") as current:
            old, new = loop.revert(current, sha)
            branch = current.ws.branch
    typer.echo(f"{branch}: {old[:7]} -> {new[:7]}; later experiments compare against {new[:7]}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    import signal

    # a terminal closing or a `kill` cleans up like Ctrl-C: the job is killed, its row marked
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    app()
