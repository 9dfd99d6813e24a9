"""eob-delivery: deliver Explanation of Benefits statements to members by secure email.

Importing the package is cheap and needs no Airflow: the runner (which loads Great
Expectations) is imported on first use of its names.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pipeline.config import Settings, load_settings
from pipeline.errors import (
    AccountingError,
    ConfigError,
    DeliveryError,
    EobError,
    FileRejected,
    IllegalTransition,
    InputError,
    LedgerError,
    RunRefused,
    TlsRequired,
    UnknownRun,
)

_RUNNER_NAMES = (
    "STAGES",
    "start_run",
    "run_stage",
    "finish_run",
    "run_all",
    "intake",
    "deliver",
    "returns",
    "resume",
)

__all__ = [
    "AccountingError",
    "ConfigError",
    "DeliveryError",
    "EobError",
    "FileRejected",
    "IllegalTransition",
    "InputError",
    "LedgerError",
    "RunRefused",
    "Settings",
    "TlsRequired",
    "UnknownRun",
    "load_settings",
    *_RUNNER_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _RUNNER_NAMES:
        return getattr(import_module("pipeline.runner"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
