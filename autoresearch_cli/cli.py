"""The `ar` command line: parse, call the core, render. Nothing else lives here."""

from __future__ import annotations

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
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


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
    from autoresearch_cli import workspace

    return workspace.find(_state["directory"])


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Directory for the new workspace (new or empty).")] = Path("."),
    profile: Annotated[str, typer.Option(help="cpu (a laptop, ~60 s runs) or gpu (the original's 5-minute H100 setup).")] = "cpu",
    tag: Annotated[str | None, typer.Option(help="Run tag; the branch is autoresearch/<tag>. Default: today, like nov23.")] = None,
    budget: Annotated[int | None, typer.Option(help="Training seconds per experiment (default: the profile's).")] = None,
) -> None:
    """Create a workspace: a git repo with train.py, prepare.py, program.md and ar.toml."""
    from autoresearch_cli import workspace

    base = _state["directory"] or Path.cwd()
    target = directory if directory.is_absolute() else base / directory
    try:
        ws = workspace.init(target, profile=profile, tag=tag, budget=budget)
        cfg = ws.config()
    except ArError as exc:
        _err(str(exc))
        raise typer.Exit(1) from None
    p = cfg["profile"]
    typer.echo(f"Created workspace {ws.root} on branch {cfg['workspace']['branch']}")
    typer.echo(
        f"  profile {p['name']}: vocab {p['vocab_size']}, context {p['max_seq_len']}, "
        f"budget {p['time_budget']} s, eval {p['eval_tokens']:,} tokens"
    )
    typer.echo(f"Next: cd {ws.root} && ar prepare")


@app.command()
def prepare(
    source: Annotated[str | None, typer.Option(help="stdlib | files:GLOB | climbmix[:N] (default: ar.toml's [data] source).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the data matches.")] = False,
) -> None:
    """Train the tokenizer and write train/val/holdout token files into .ar/data."""
    from autoresearch_cli import data

    try:
        ws = _workspace()
        cfg = ws.config()
        report = data.prepare_data(
            ws.data_dir,
            source=source or cfg["data"]["source"],
            vocab_size=int(cfg["profile"]["vocab_size"]),
            val_percent=int(cfg["data"]["val_percent"]),
            holdout_percent=int(cfg["data"]["holdout_percent"]),
            force=force,
            on_progress=lambda msg: typer.echo(f"  {msg}", err=True),
        )
    except ArError as exc:
        _err(str(exc))
        raise typer.Exit(1) from None
    m = report.manifest
    if report.skipped:
        typer.echo(f"Data for {m['source']} is up to date in {report.data_dir} (use --force to rebuild)")
        return
    typer.echo(f"Prepared {m['source']} in {report.seconds:.1f} s -> {report.data_dir}")
    for split, info in m["splits"].items():
        typer.echo(f"  {split:8s} {info['documents']:>7,} docs {info['tokens']:>12,} tokens")


def _session(command: str):
    from autoresearch_cli import runs

    return runs.session(_workspace(), command)


def _report_recovered(current) -> None:
    for row in current.recovered:
        typer.secho(
            f"note: experiment #{row['id']} was interrupted (its ar process ended); marked interrupted and cleaned up",
            fg=typer.colors.YELLOW, err=True,
        )


def _check_confinement(current, untrusted_code: bool, allowed: bool) -> None:
    """Say once per command when the kernel cannot confine the candidate's code; refuse to
    run model-written code then, unless the user named the risk."""
    from sandbox.confine import support

    level = support()
    if level.confines_files:
        return
    current.ledger.add_event("unconfined", None, level.note)
    typer.secho(f"warning: no confinement on this machine ({level.note}): train.py runs with "
                "your user's access to files and processes", fg=typer.colors.YELLOW, err=True)
    if untrusted_code and not allowed:
        raise ArError("refusing to run LLM-written train.py unconfined; pass --unsafe-unconfined "
                      "to accept that it can read and change anything your user can")


def _display(current):
    from autoresearch_cli.display import Display

    def baseline_mean():
        mean, _, _ = current.ledger.baseline_stats()
        return mean

    return Display(cost=lambda: current.ledger.total_cost().usd, baseline=baseline_mean)


@app.command()
def baseline(
    repeat: Annotated[int, typer.Option(help="Number of runs of the branch tip; >= 2 also measures noise.", min=1)] = 1,
) -> None:
    """Train and evaluate the branch tip's train.py to set the baseline."""
    from autoresearch_cli import runs

    try:
        with _session("ar baseline") as current:
            _report_recovered(current)
            _check_confinement(current, untrusted_code=False, allowed=True)
            with _display(current) as display:
                summary = runs.run_baseline(current, repeat, display)
    except KeyboardInterrupt:
        _err("interrupted: the running job was killed and its run marked interrupted")
        raise typer.Exit(130) from None
    except ArError as exc:
        _err(str(exc))
        raise typer.Exit(1) from None
    if summary.mean is None:
        _err("no baseline run succeeded; see the reasons above and .ar/runs/<id>/train.log")
        raise typer.Exit(1)
    spread = f" ± {summary.std:.6f} (std of {len(summary.values)} runs)" if summary.std is not None else ""
    typer.echo(f"baseline val_bpb {summary.mean:.6f}{spread} at {summary.sha[:7]}")


@app.command()
def iterate(
    n: Annotated[int | None, typer.Option("--n", help="Number of experiments (default: until interrupted).", min=1)] = None,
    agent: Annotated[str | None, typer.Option(help="llm or random (default: ar.toml's [agent] name).")] = None,
    model: Annotated[str | None, typer.Option(help="litellm model string, e.g. anthropic/claude-sonnet-4-5.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop before an LLM call that would exceed this many USD.", min=0)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the random agent.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Experiments at once (default: one per visible GPU; one on CPU, where up to one "
             "per core is allowed, each worker getting its share of the cores).", min=1)] = None,
    backend: Annotated[str, typer.Option(
        help="local: experiments in processes on this machine; ray: tasks on a Ray cluster "
             "(pip install 'ar[ray]').")] = "local",
    address: Annotated[str | None, typer.Option(
        help="The Ray cluster to use (e.g. 10.0.0.1:6379; default: RAY_ADDRESS, else start one "
             "on this machine). Only with --backend ray.")] = None,
    unsafe_unconfined: Annotated[bool, typer.Option(
        "--unsafe-unconfined",
        help="Run LLM-written train.py even where the kernel cannot confine it: it then runs "
             "with all of your user's access (files, keys, network).")] = False,
) -> None:
    """Run the research loop: propose, train, evaluate, keep or discard."""
    from autoresearch_cli import loop
    from autoresearch_cli.agents import make_agent

    if backend not in ("local", "ray"):
        _err(f"unknown --backend {backend!r}: choose local or ray")
        raise typer.Exit(2)
    if address is not None and backend != "ray":
        _err("--address names a Ray cluster: use it with --backend ray")
        raise typer.Exit(2)
    try:
        with _session("ar iterate") as current:
            _report_recovered(current)
            agent_config = dict(current.config["agent"])
            if agent:
                agent_config["name"] = agent
            name = "llm" if (model or agent_config["name"] == "llm") else agent_config["name"]
            _check_confinement(current, untrusted_code=name == "llm", allowed=unsafe_unconfined)
            with _display(current) as display:
                chosen = make_agent(
                    agent_config, seed=seed, model=model, max_cost_usd=max_cost,
                    on_stream=lambda tokens, seconds: display("answering", tokens=tokens, seconds=seconds),
                )  # each proposal's model calls are recorded against its experiment (pipeline)
                outcome = loop.iterate(current, chosen, name, n, display, workers=workers,
                                       backend=backend, address=address)
                status = display.status_line()
    except KeyboardInterrupt:
        _err("interrupted: the running jobs were killed and their experiments marked interrupted")
        raise typer.Exit(130) from None
    except ArError as exc:
        _err(str(exc))
        raise typer.Exit(1) from None
    typer.echo(status)
    if outcome.stopped_because:
        _err(f"stopped: {outcome.stopped_because}")
        raise typer.Exit(1)


@app.command()
def log(
    best: Annotated[bool, typer.Option("--best", help="Only the kept chain from baseline to the best.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    limit: Annotated[int | None, typer.Option(help="Show only the last N experiments.", min=1)] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the progress chart to this PNG file.")] = None,
) -> None:
    """Show the experiments recorded in the ledger."""
    import json

    from rich.console import Console

    from autoresearch_cli import report
    from autoresearch_cli.ledger import Ledger

    try:
        ws = _workspace()
        with Ledger.for_workspace(ws.root) as ledger:
            rows = ledger.experiments()
            best_row = ledger.best()
            chain = report.best_chain(rows, best_row) if best else None
            facts = report.summary(rows, best_row, ledger.total_cost())
        if plot is not None:
            written = report.plot_progress(rows, plot)
            typer.echo(f"wrote {written}", err=True)
        if as_json:
            payload = chain if best else report.json_rows(rows, limit)
            typer.echo(json.dumps(payload, indent=2, default=str))
            return
    except ArError as exc:
        _err(str(exc))
        raise typer.Exit(1) from None
    console = Console()
    if best:
        console.print(report.render_best_chain(chain))
    else:
        console.print(report.render_table(report.table_rows(rows, limit)))
    typer.echo(report.summary_text(facts))
    for line in report.noise_lines(rows):
        typer.echo(line)


@app.command()
def revert(sha: Annotated[str, typer.Argument(help="A kept commit to move the branch back to.")]) -> None:
    """Move the research branch back to an earlier kept commit."""
    from autoresearch_cli import loop

    try:
        with _session("ar revert") as current:
            old, new = loop.revert(current, sha)
            branch = current.ws.branch
    except ArError as exc:
        _err(str(exc))
        raise typer.Exit(1) from None
    typer.echo(f"{branch}: {old[:7]} -> {new[:7]}; later experiments compare against {new[:7]}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    import signal

    # a terminal closing or a `kill` cleans up like Ctrl-C: the job is killed, its row marked
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    app()
