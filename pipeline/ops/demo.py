"""The demo: every stage on the embedded defaults, against the local TLS sink.

It works in its own data directory, which it empties first (only if that directory was made
by a demo), copies the bundled sample drop into it, and starts the sink on a free loopback port.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass, replace

from pipeline.config import Settings
from pipeline.ops.sink import start_sink
from pipeline.records.run_context import Track, no_progress
from pipeline.resources import SAMPLES_DIR
from pipeline.runner import run_all

_MARKER = ".eob-demo"


@dataclass(frozen=True)
class DemoResult:
    run_id: str
    summary: dict[str, int]
    settings: Settings


def run_demo(settings: Settings, track: Track[object] = no_progress) -> DemoResult:
    data_dir = settings.data_dir
    if data_dir.exists():
        if not (data_dir / _MARKER).exists():
            raise SystemExit(f"{data_dir} exists and was not made by the demo: not touching it")
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    (data_dir / _MARKER).touch()
    shutil.copytree(SAMPLES_DIR / "landing", data_dir / "landing")
    settings = replace(settings, smtp_port=free_port(settings.smtp_host))
    with start_sink(settings.smtp_host, settings.smtp_port, data_dir, unknown_mailboxes()):
        run_id, summary = run_all(settings, settings.landing_dir, track)
    return DemoResult(run_id, summary, settings)


def unknown_mailboxes() -> frozenset[str]:
    lines = (
        (SAMPLES_DIR / "sink" / "unknown_mailboxes.txt").read_text(encoding="utf-8").splitlines()
    )
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
