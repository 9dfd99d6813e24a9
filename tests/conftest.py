"""Shared fixtures: ledgers on SQLite and on this machine's PostgreSQL, and a live TLS sink."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pipeline.config import Settings
from pipeline.ops.demo import free_port, unknown_mailboxes
from pipeline.ops.sink import start_sink
from pipeline.records.atrest import new_key_line, parse_keys

REPO = Path(__file__).resolve().parent.parent
# shared/ sits beside the clone (CI), or beside the folder of worktrees (development).
SHARED_DATA = next(
    (p / "shared" / "data" for p in (REPO.parent, REPO.parent.parent) if (p / "shared").is_dir()),
    REPO.parent / "shared" / "data",
)
# For stage functions called directly (the runner loads the data directory's keyring).
TEST_KEYRING = parse_keys(new_key_line("test"), source="tests")
PG_ADMIN = os.environ.get("EOB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database; PostgreSQL gets its own database, dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    name = f"eob_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (
            PG_ADMIN.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0]
            + "/"
            + name
        )
    finally:
        from pipeline.records.run_context import ledger_sessions

        # Engines are cached per URL; dispose of this one's pool before dropping its database.
        if ledger_sessions.cache_info().currsize:
            ledger_sessions.cache_clear()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(tmp_path: Path, ledger_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", database_url=ledger_url, smtp_port=free_port("127.0.0.1")
    )


@pytest.fixture
def sink(settings: Settings) -> Iterator[Settings]:
    """The demo's TLS sink running on the settings' port; yields the settings."""
    with start_sink(settings.smtp_host, settings.smtp_port, settings.data_dir, unknown_mailboxes()):
        yield settings


def sample_drop(tmp_path: Path) -> Path:
    """A copy of the bundled sample drop."""
    import shutil

    drop = tmp_path / "landing"
    shutil.copytree(REPO / "data_samples" / "landing", drop)
    return drop


def wait_for_listener(host: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until a daemon the test started accepts connections; its log if it never does."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{process.args!r} did not listen: {log.read_text()[-2000:]}")
