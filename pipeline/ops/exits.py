"""The exit codes of `eob` and the errors that carry them.

0  done.
1  done, with something for the operator to act on (files rejected, messages expired,
   a route paused by the bounce-rate monitor).
2  nothing done: a configuration error (one line naming the setting or file), an unknown
   run id, a refused run, or a usage error (Click's own code for usage errors is 2 too).
3  failure: an unexpected error; one line names the stage and the error type, the traceback
   goes to the log at DEBUG (`eob -v`).
"""

from __future__ import annotations

import logging
from typing import IO, Any

import click

from pipeline.errors import ConfigError, RunRefused, UnknownRun
from pipeline.stages import failed_stage

ATTENTION, REFUSED, FAILED = 1, 2, 3
log = logging.getLogger("pipeline.ops.cli")


class EobExit(click.ClickException):
    """One line on standard error, then exit with `exit_code`."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"eob: {self.format_message()}", file=file, err=True)


class Attention(EobExit):
    exit_code = ATTENTION


class Refused(EobExit):
    exit_code = REFUSED


class Failed(EobExit):
    exit_code = FAILED


class EobGroup(click.Group):
    """Turns what a command raises into one line and an exit code (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (ConfigError, UnknownRun, RunRefused) as err:
            raise Refused(str(err)) from err
        except Exception as err:
            # The message may quote a record (PHI): only the type is printed; the traceback
            # goes to the log at DEBUG.
            where = failed_stage(err) or ctx.invoked_subcommand or "eob"
            log.debug("%s failed", where, exc_info=err)
            raise Failed(f"{where} failed: {type(err).__name__} (details: eob -v)") from err
