"""`eob`: a subcommand per stage, `eob run` for all of them on a drop, and `eob demo`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from pipeline.config import Settings, load_settings
from pipeline.ops.exits import Attention, EobGroup
from pipeline.ops.loop import repeat
from pipeline.records.bounce_classes import RECLASSIFY_TO
from pipeline.stages import STAGES

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from pipeline.records.run_context import Track

# Heavy libraries (pandas, pyarrow, SQLAlchemy, Great Expectations, reportlab) are imported
# inside the commands that use them: `eob --help` and a mistyped command stay instant.
T = TypeVar("T")
console = Console(stderr=True)
log = logging.getLogger(__name__)


def progress(items: Iterable[T], description: str, total: int) -> Iterable[T]:
    from rich.progress import track as rich_track

    return rich_track(items, description=description, total=total, console=console, transient=True)


class LazyChoice(click.ParamType[str, Any]):
    """A choice among the values of `module.attribute`, imported only when a value is checked."""

    name = "choice"

    def __init__(self, module: str, attribute: str) -> None:
        self.module, self.attribute = module, attribute

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        choices = [str(choice) for choice in getattr(import_module(self.module), self.attribute)]
        return click.Choice(choices).convert(value, param, ctx)


@click.group(cls=EobGroup)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML settings file (else EOB_CONFIG, else the embedded defaults).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbose: bool) -> None:
    """Deliver Explanation of Benefits statements by secure email."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Great Expectations narrates its own start-up at INFO (hundreds of lines per run).
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # Alembic names its plugins and dialect on every start; -v shows them.
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)
    ctx.obj = load_settings(config)


@main.command()
@click.argument("drop", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_obj
def start(settings: Settings, drop: Path) -> None:
    """Start a run on DROP (a landing folder of <insurer>/<file>) and print its id."""
    from pipeline.runner import start_run

    click.echo(start_run(settings, drop))


def _stage_command(stage: str) -> click.Command:
    @click.pass_obj
    def command(settings: Settings, run_id: str) -> None:
        from pipeline.runner import run_stage

        _print_counts(stage, run_stage(settings, run_id, stage, progress))

    command.__doc__ = f"Run the {stage} stage of RUN_ID."
    return click.command(stage)(click.argument("run_id")(command))


for _stage in STAGES:
    main.add_command(_stage_command(_stage))


@main.command()
@click.argument("run_id")
@click.pass_obj
def finish(settings: Settings, run_id: str) -> None:
    """Mark RUN_ID finished and print its summary."""
    from pipeline.runner import finish_run

    _print_counts(run_id, finish_run(settings, run_id))


@main.command()
@click.argument("drop", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_obj
def run(settings: Settings, drop: Path) -> None:
    """Run every stage on DROP (refused while an earlier run of DROP is unfinished)."""
    from pipeline.runner import run_all

    run_id, summary = run_all(settings, drop, progress)
    _print_counts(run_id, summary)
    _print_datasets(settings)
    _attention(settings, summary, routes=True)


@main.command()
@click.argument("run_id")
@click.pass_obj
def resume(settings: Settings, run_id: str) -> None:
    """Finish unfinished RUN_ID: the stages after its last completed one, then its summary."""
    from pipeline.runner import resume as resume_run

    _, summary = resume_run(settings, run_id, progress)
    _print_counts(run_id, summary)
    _attention(settings, summary, routes=True)


@main.command()
@click.option("--limit", default=20, show_default=True, help="How many runs, newest first.")
@click.pass_obj
def runs(settings: Settings, limit: int) -> None:
    """List runs: drop, start, finish, last completed stage, and what is pending."""
    from pipeline.ops.runs import run_statuses

    table = Table()
    # The run id is what `eob resume` takes: never cut, whatever the terminal's width.
    table.add_column("run", no_wrap=True, min_width=22)
    for heading in ("drop", "started", "finished", "last stage", "pending"):
        table.add_column(heading)
    with _ledger(settings)() as session:
        for run in run_statuses(session, limit):
            table.add_row(
                run.run_id,
                run.drop,
                f"{run.started_at:%Y-%m-%d %H:%M}",
                f"{run.finished_at:%Y-%m-%d %H:%M}" if run.finished_at else "no",
                run.last_stage or "-",
                "; ".join(run.pending) or "-",
            )
    Console().print(table)


@main.command("intake")
@click.argument("drop", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_obj
def intake_command(settings: Settings, drop: Path) -> None:
    """Take in DROP up to planned messages (ingest, validate, statements, render, plan);
    `eob deliver` sends them when they are due. Refused while an earlier run of DROP is
    unfinished: `eob resume` finishes it."""
    from pipeline.runner import intake

    run_id, summary = intake(settings, drop, progress)
    _print_counts(run_id, summary)
    _attention(settings, summary, routes=False)


def _every(command: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--every",
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        help="Repeat: a pass, then wait SECONDS, until SIGTERM or SIGINT (the pass in progress "
        "finishes, then exit 0).",
    )(command)


@main.command("deliver")
@_every
@click.pass_obj
def deliver_command(settings: Settings, every: float | None) -> None:
    """Send every message that is due now, whatever run planned it: first attempts whose day
    has come, retries, approved resends, acknowledged requeues."""
    from pipeline.runner import deliver

    _due_work(settings, "deliver", deliver, every)


@main.command("returns")
@_every
@click.pass_obj
def returns_command(settings: Settings, every: float | None) -> None:
    """Collect the return path, reconcile bounces, raise alerts, plan approved resends."""
    from pipeline.runner import returns

    _due_work(settings, "returns", returns, every)


def _due_work(
    settings: Settings,
    name: str,
    one_pass: Callable[[Settings, Track[object]], dict[str, int]],
    every: float | None,
) -> None:
    if every is None:
        counts = one_pass(settings, progress)
        _print_counts(name, counts)
        if problems := _problems(settings, counts, routes=True):
            raise Attention("; ".join(problems))
        return

    from pipeline.records.run_context import no_progress

    def logged_pass() -> None:
        # A loop's passes go to the log (the pass's counts are logged by the runner).
        for problem in _problems(settings, one_pass(settings, no_progress), routes=True):
            log.warning("%s: %s", name, problem)

    repeat(logged_pass, every)


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def decrypt(settings: Settings, path: Path) -> None:
    """Write the plaintext of an encrypted file of the data directory (a run's PDF or print file,
    an archived drop, a kept bounce report) to standard output: pipe it to a viewer, it is PHI,
    so never into a file outside the data directory. Exits 1 on an altered or truncated file
    (for an archived drop, after the chunks read before the damage)."""
    from pipeline.ops.rekey import decrypted_file
    from pipeline.records.atrest import DecryptionError

    try:
        for piece in decrypted_file(settings, path.resolve()):
            sys.stdout.buffer.write(piece)
    except (ValueError, DecryptionError) as err:
        raise click.ClickException(str(err)) from err


@main.command()
@click.option(
    "--new-dev-key",
    is_flag=True,
    help="First add a fresh key to the development keyring (when EOB_AT_REST_KEYS is unset).",
)
@click.pass_obj
def rekey(settings: Settings, new_dev_key: bool) -> None:
    """Re-encrypt every PHI file at rest under the active key (PDFs, print files, parquet
    intermediates, rosters, archived drops, kept bounce reports)."""
    from pipeline.ops.rekey import rekey as rekey_files
    from pipeline.records.atrest import add_dev_key

    if new_dev_key:
        add_dev_key(settings.data_dir)
    _print_counts("rekey", rekey_files(settings))


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("var/demo"),
    show_default=True,
    help="Demo data directory; emptied first.",
)
@click.pass_obj
def demo(settings: Settings, data_dir: Path) -> None:
    """Run the whole pipeline on the bundled sample drop against a local TLS SMTP sink."""
    from pipeline.ops.demo import run_demo

    result = run_demo(replace(settings, data_dir=data_dir), progress)
    _print_counts(f"demo run {result.run_id}", result.summary)
    _print_datasets(result.settings)


@main.command("data-dictionary")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("docs/data_dictionary.md"),
    show_default=True,
)
def data_dictionary_command(out: Path) -> None:
    """Write the data dictionary generated from the contracts in schemas/."""
    from pipeline.records.contracts import data_dictionary

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(data_dictionary(), encoding="utf-8")
    click.echo(str(out))


@main.command()
@click.option("--port", type=int, default=None, help="Port (default: the smtp_port setting).")
@click.pass_obj
def sink(settings: Settings, port: int | None) -> None:
    """Run the local TLS SMTP sink in the foreground (Ctrl-C stops it)."""
    import threading

    from pipeline.ops.demo import unknown_mailboxes
    from pipeline.ops.sink import start_sink

    with start_sink(
        settings.smtp_host, port or settings.smtp_port, settings.data_dir, unknown_mailboxes()
    ) as certs:
        click.echo(f"sink on {settings.smtp_host}:{port or settings.smtp_port}, CA {certs.ca_file}")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


def _print_counts(title: str, counts: dict[str, int]) -> None:
    table = Table(title=title, show_header=False)
    for name, value in counts.items():
        table.add_row(name.replace("_", " "), str(value))
    Console().print(table)


def _attention(settings: Settings, counts: dict[str, int], *, routes: bool) -> None:
    """Exit 1 when the work is done but something needs the operator."""
    if problems := _problems(settings, counts, routes=routes):
        raise Attention("; ".join(problems))


def _problems(settings: Settings, counts: dict[str, int], *, routes: bool) -> list[str]:
    problems = []
    if counts.get("files_rejected"):
        problems.append(f"{counts['files_rejected']} files rejected (reports in the outbox)")
    if counts.get("expired"):
        problems.append(f"{counts['expired']} messages expired")
    if routes:
        from pipeline.records.ledger import paused_routes

        with _ledger(settings)() as session:
            paused = len(paused_routes(session))
        if paused:
            problems.append(f"{paused} routes paused (acknowledge the alert in the console)")
    return problems


def _print_datasets(settings: Settings) -> None:
    for name in ("delivery_facts", "audit_events"):
        click.echo(f"{name}: {(settings.datasets_dir / name).resolve()}")


@main.group()
def review() -> None:
    """Verify-before-resend cases, the bounce review list and console users."""


def _ledger(settings: Settings) -> sessionmaker[Session]:
    from pipeline.records.ledger import open_ledger

    return open_ledger(settings.ledger_url)


def _case_action(settings: Settings, action: Callable[[Session], object]) -> None:
    from pipeline.errors import IllegalTransition
    from pipeline.returns.cases import CaseActionRefused

    try:
        with _ledger(settings).begin() as session:
            action(session)
    except (CaseActionRefused, IllegalTransition) as err:
        raise click.ClickException(str(err)) from err


@review.command("list")
@click.option("--state", default="", help="Only cases in this state.")
@click.pass_obj
def review_list(settings: Settings, state: str) -> None:
    """Resend cases (newest first) and the count of unmatched bounces."""
    from sqlalchemy import func, select

    from pipeline.records.ledger.models import Bounce, ResendCase

    with _ledger(settings)() as session:
        query = select(ResendCase).order_by(ResendCase.opened_at.desc())
        # Plain tab-separated lines: readable, and scriptable without a table's wrapping.
        click.echo("case\tstate\treason\topened\tfailures")
        for case in session.scalars(query.where(ResendCase.state == state) if state else query):
            click.echo(
                f"{case.case_id}\t{case.state}\t{case.reason}\t"
                f"{case.opened_at:%Y-%m-%d %H:%M}\t{case.failures}"
            )
        unmatched = session.scalar(
            select(func.count()).select_from(Bounce).where(Bounce.message_id.is_(None))
        )
        click.echo(f"bounces on the review list (unmatched): {unmatched}")


@review.command("verify")
@click.argument("case_id")
@click.option("--actor", required=True, help="Who verified.")
@click.option("--channel", required=True, type=LazyChoice("pipeline.returns.cases", "CHANNELS"))
@click.option("--evidence", required=True, help="Evidence note (no PHI beyond the task).")
@click.option("--address", required=True, help="The verified address, same or new.")
@click.pass_obj
def review_verify(
    settings: Settings, case_id: str, actor: str, channel: str, evidence: str, address: str
) -> None:
    """Record a verification of CASE_ID's address by another channel."""
    from pipeline.returns import cases

    _case_action(
        settings,
        lambda s: cases.verify(
            s, case_id, actor=actor, channel=channel, evidence=evidence, address=address
        ),
    )
    click.echo(f"{case_id}: verified")


@review.command("approve")
@click.argument("case_id")
@click.option("--actor", required=True, help="Who approves (not the verifier).")
@click.pass_obj
def review_approve(settings: Settings, case_id: str, actor: str) -> None:
    """Approve the resend of verified CASE_ID; the next run's plan stage makes the attempt."""
    from pipeline.returns import cases, reconcile

    policy = reconcile.load_policy().cases
    _case_action(settings, lambda s: cases.approve(s, case_id, actor=actor, policy=policy))
    click.echo(f"{case_id}: approved")


@review.command("print")
@click.argument("case_id")
@click.option("--actor", required=True)
@click.option("--reason", default="operations")
@click.pass_obj
def review_print(settings: Settings, case_id: str, actor: str, reason: str) -> None:
    """Route CASE_ID's statement to print."""
    from pipeline.returns import cases

    _case_action(settings, lambda s: cases.route_to_print(s, case_id, actor=actor, reason=reason))
    click.echo(f"{case_id}: print_fallback")


@review.command("close")
@click.argument("case_id")
@click.option("--actor", required=True)
@click.option("--reason", required=True)
@click.pass_obj
def review_close(settings: Settings, case_id: str, actor: str, reason: str) -> None:
    """Close CASE_ID."""
    from pipeline.returns import cases

    _case_action(settings, lambda s: cases.close(s, case_id, actor=actor, reason=reason))
    click.echo(f"{case_id}: closed")


@review.command("add-user")
@click.argument("username")
@click.option("--role", required=True, type=LazyChoice("pipeline.ops.console.auth", "Role"))
@click.option("--actor", required=True, help="Who adds the user.")
@click.password_option()
@click.pass_obj
def review_add_user(
    settings: Settings, username: str, role: str, actor: str, password: str
) -> None:
    """Add or update a console user (the password is stored as an Argon2 hash)."""
    from pipeline.ops.console.auth import Role, add_user

    try:
        with _ledger(settings).begin() as session:
            add_user(session, username, password, Role(role), actor=actor)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{username}: {role}")


@review.command("reclassify")
@click.argument("bounce_id", type=int)
@click.argument("bounce_class", metavar="CLASS", type=click.Choice([str(c) for c in RECLASSIFY_TO]))
@click.option("--actor", required=True, help="Who read the report.")
@click.pass_obj
def review_reclassify(settings: Settings, bounce_id: int, bounce_class: str, actor: str) -> None:
    """Say what an `unknown` report BOUNCE_ID was (audited); the returns loop applies it."""
    from pipeline.records.bounce_classes import BounceClass
    from pipeline.returns import deadlines

    _case_action(
        settings,
        lambda s: deadlines.reclassify(s, bounce_id, BounceClass(bounce_class), actor=actor),
    )
    click.echo(f"bounce {bounce_id}: {bounce_class}")


@main.command("console")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--insecure-cookies", is_flag=True, help="Allow the session cookie over plain HTTP.")
@click.pass_obj
def console_server(settings: Settings, host: str, port: int, insecure_cookies: bool) -> None:
    """Serve the operations console (secret key from EOB_CONSOLE_SECRET)."""
    import os

    import uvicorn

    from pipeline.ops.console.app import create_app

    secret = os.environ.get("EOB_CONSOLE_SECRET", "")
    if len(secret) < 32:
        raise click.ClickException("EOB_CONSOLE_SECRET: set it to at least 32 random characters")
    app = create_app(settings, secret_key=secret, secure_cookies=not insecure_cookies)
    uvicorn.run(app, host=host, port=port, log_level="warning")
