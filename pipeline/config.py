"""One typed settings object: embedded defaults, an optional TOML file, then EOB_* environment.

Secrets (the at-rest key, SMTP credentials) come from the environment only.
Bad configuration fails fast with a ConfigError naming the setting.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

# What the email body may say about the member (email_body_phi).
BODY_PHI_LEVELS = ("none", "first_name")
# Member-knowable PDF password rules (pdf_password; empty: no password), see documents.protect.
PDF_PASSWORD_RULES = ("date_of_birth", "postal_code_and_birth_year")


@dataclass(frozen=True)
class Settings:
    # Root of every file the pipeline writes; PHI files never leave it.
    data_dir: Path = Path("var")
    # SQLAlchemy URL of the delivery ledger; empty means SQLite inside data_dir.
    database_url: str = ""
    # Relay or sink every message is handed to (direct-to-MX comes with the send engine).
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    # Trust store used to verify the receiver's certificate; empty means data_dir/sink/ca.pem.
    tls_ca_file: str = ""
    # Sending policy (pool, warm-up, shaping, back-off, retry); empty means config/sending.toml.
    sending_policy_file: str = ""
    # Visible From address of every EOB email.
    from_address: str = "statements@eob.example.com"
    # Domain of the VERP return path: bounces+<message token>@<domain>.
    return_path_domain: str = "bounces.eob.example.com"
    # Where reports to the return path are read: empty for data_dir/returnpath (a maildir),
    # "maildir:PATH", "mbox:PATH", or "imaps://USER@HOST[:PORT]/FOLDER" (password from
    # EOB_IMAP_PASSWORD).
    return_path_source: str = ""
    # Plan name shown on the document and in the email.
    plan_name: str = "Example Health Plan"
    # Processes that render PDFs over member shards; 0 means one per CPU.
    render_workers: int = 0
    # PHI the email body may carry: "none" or "first_name" (in the greeting).
    email_body_phi: str = "none"
    # Password rule of the emailed PDF: "" (none), "date_of_birth" (MMDDYYYY) or
    # "postal_code_and_birth_year" (ZIP5 + YYYY); the email names the rule, never the password.
    pdf_password: str = ""

    @property
    def render_processes(self) -> int:
        return self.render_workers or os.cpu_count() or 1

    @property
    def ledger_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'ledger.db'}"

    @property
    def ca_file(self) -> Path:
        return Path(self.tls_ca_file) if self.tls_ca_file else self.data_dir / "sink" / "ca.pem"

    @property
    def landing_dir(self) -> Path:
        return self.data_dir / "landing"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def rosters_dir(self) -> Path:
        return self.data_dir / "rosters"

    @property
    def return_path_maildir(self) -> Path:
        return self.data_dir / "returnpath"

    @property
    def sink_maildir(self) -> Path:
        return self.data_dir / "sink" / "inbox"


_SCALARS = {f.name: f for f in fields(Settings)}


def load_settings(
    config_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then `config_file` (TOML), then EOB_<SETTING> environment variables."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or (Path(environ["EOB_CONFIG"]) if environ.get("EOB_CONFIG") else None)
    if path is not None:
        try:
            values.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"reading {path}: {err}") from err
    for name in _SCALARS:
        env_name = f"EOB_{name.upper()}"
        if env_name in environ:
            values[name] = environ[env_name]
    return _build(values)


def _build(values: dict[str, Any]) -> Settings:
    settings = Settings()
    for name, value in values.items():
        if name not in _SCALARS:
            raise ConfigError(f"unknown setting {name!r}")
        default = getattr(settings, name)
        try:
            converted = type(default)(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"setting {name}: expected {type(default).__name__}") from err
        settings = replace(settings, **{name: converted})
    if settings.smtp_port <= 0 or settings.smtp_port > 65535:
        raise ConfigError("setting smtp_port: must be 1..65535")
    if settings.render_workers < 0:
        raise ConfigError("setting render_workers: must be >= 0")
    if settings.email_body_phi not in BODY_PHI_LEVELS:
        raise ConfigError(f"setting email_body_phi: one of {', '.join(BODY_PHI_LEVELS)}")
    if settings.pdf_password and settings.pdf_password not in PDF_PASSWORD_RULES:
        raise ConfigError(f"setting pdf_password: empty, {' or '.join(PDF_PASSWORD_RULES)}")
    return settings


__all__ = ["Settings", "load_settings"]
