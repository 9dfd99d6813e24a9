"""The run context: what a step of one run is bound to (settings, run id, ledger, keyring),
below every stage family's steps so that the runner imports them and never the reverse."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import Settings
from pipeline.records.atrest import (
    Keyring,
    load_keyring,
)
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import (
    InputFile,
)

T = TypeVar("T")
# Wraps a long loop with a progress display: (items, description, total) -> items.
Track = Callable[[Iterable[T], str, int], Iterable[T]]


def no_progress(items: Iterable[T], _description: str, _total: int) -> Iterable[T]:
    return items


@dataclass
class LedgerContext:
    """What a step needs that is not scoped to one run: the due-work loops (deliver, returns)
    take this; a run's steps take a RunContext."""

    settings: Settings
    sessions: sessionmaker[Session]
    track: Track[object] = field(default=no_progress, kw_only=True)

    @cached_property
    def keyring(self) -> Keyring:
        # Loaded once per step: the intermediates of every file of the step use it.
        return load_keyring(self.settings.data_dir)


@dataclass
class RunContext(LedgerContext):
    """A step of one run (the intake of one drop): its id and run directory."""

    run_id: str = field(kw_only=True)

    @property
    def run_dir(self) -> Path:
        return self.settings.runs_dir / self.run_id

    def file_dir(self, file_id: int) -> Path:
        return self.run_dir / "files" / str(file_id)


@cache
def ledger_sessions(url: str) -> sessionmaker[Session]:
    return open_ledger(url)


def run_files(
    session: Session, run_id: str, status: str, kind: str | None = None
) -> list[InputFile]:
    query = select(InputFile).where(InputFile.run_id == run_id, InputFile.status == status)
    if kind is not None:
        query = query.where(InputFile.kind == kind)
    return list(session.scalars(query.order_by(InputFile.file_id)))
