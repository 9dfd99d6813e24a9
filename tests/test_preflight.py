"""Preflight: what a command's stages need is loaded and checked before the first stage, so a
configuration error stops it with one line naming the setting or file, and nothing half done."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.ops.cli import main
from pipeline.preflight import preflight
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import Run
from pipeline.stages import INTAKE_STAGES, STAGES
from tests.conftest import sample_drop


def _not_pem(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n")
    return str(path)


@pytest.mark.parametrize(
    ("change", "stage", "named"),
    [
        (lambda s, t: replace(s, sending_policy_file=str(t / "gone.toml")), "plan", "gone.toml"),
        (lambda s, t: replace(s, tls_ca_file=str(t / "gone.pem")), "send", "tls_ca_file: "),
        (lambda s, t: replace(s, tls_ca_file=_not_pem(t)), "send", "tls_ca_file: "),
        (lambda s, t: replace(s, return_path_source="pop3:x"), "bounces", "return_path_source"),
    ],
)  # fmt: skip
def test_preflight_names_the_broken_setting(sink: Settings, tmp_path, change, stage, named):
    broken, drop = change(sink, tmp_path), sample_drop(tmp_path)
    with pytest.raises(ConfigError, match=named):
        preflight(broken, (stage,), drop)
    # Each command checks what its stages need, nothing more: the stages before plan need
    # no sending policy, and only send needs the CA file, only bounces the return path.
    unaffected = STAGES[: STAGES.index("plan")] if stage == "plan" else set(STAGES) - {stage}
    preflight(broken, unaffected, drop)


def test_a_broken_keyring_is_named(settings: Settings, tmp_path, monkeypatch):
    monkeypatch.setenv("EOB_AT_REST_KEYS", "k1:short")
    with pytest.raises(ConfigError, match="EOB_AT_REST_KEYS"):
        preflight(settings, ("ingest",), sample_drop(tmp_path))


def _cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, **extra: str) -> CliRunner:
    environment = {"EOB_DATA_DIR": str(settings.data_dir), "EOB_DATABASE_URL": settings.ledger_url}
    for name, value in (environment | extra).items():
        monkeypatch.setenv(name, value)
    return CliRunner()


@pytest.mark.parametrize(
    ("command", "setting", "named"),
    [
        ("intake", "EOB_SENDING_POLICY_FILE", "gone.toml"),
        ("run", "EOB_TLS_CA_FILE", "setting tls_ca_file: "),
    ],
)
def test_a_run_with_a_config_error_starts_nothing(
    settings: Settings, tmp_path, monkeypatch, command: str, setting: str, named: str
):
    cli = _cli(settings, monkeypatch, **{setting: str(tmp_path / "gone.toml")})
    drop = sample_drop(tmp_path)
    result = cli.invoke(main, [command, str(drop)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and named in result.output
    assert "Traceback" not in result.output
    with open_ledger(settings.ledger_url)() as session:
        assert session.scalars(select(Run)).all() == []
    assert len(list(drop.rglob("*.csv"))) == 1  # still in landing: nothing was taken in


def test_deliver_without_its_ca_file_names_the_setting(settings: Settings, monkeypatch):
    # A fresh data directory: the default CA file (written by the local sink) is not there.
    result = _cli(settings, monkeypatch).invoke(main, ["deliver"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"eob: setting tls_ca_file: {settings.data_dir / 'sink' / 'ca.pem'} does not exist"
    ]


def test_intake_needs_no_ca_file(settings: Settings, tmp_path, monkeypatch):
    result = _cli(settings, monkeypatch).invoke(main, ["intake", str(sample_drop(tmp_path))])
    assert result.exit_code == 0, result.output
    assert set(INTAKE_STAGES) < set(STAGES)


def test_every_stage_says_what_it_needs():
    from pipeline.preflight import _NEEDS

    assert set(_NEEDS) == set(STAGES)
