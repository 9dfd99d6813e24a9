"""Settings: defaults, file, environment; bad values name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError


def test_defaults_need_no_file_or_environment():
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.ledger_url == "sqlite:///var/ledger.db"


def test_file_then_environment(tmp_path: Path):
    config = tmp_path / "eob.toml"
    config.write_text('smtp_port = 2525\nplan_name = "Acme"\n')
    settings = load_settings(config, environ={"EOB_SMTP_PORT": "2526"})
    assert settings.smtp_port == 2526
    assert settings.plan_name == "Acme"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("smtp_prot = 1", "smtp_prot"),
        ('smtp_port = "many"', "smtp_port"),
        ("smtp_port = 70000", "smtp_port"),
        # The sending IPs moved to the sending policy's pool: the old setting is refused.
        ('[[sending_ips]]\naddress = "127.0.0.2"\n', "unknown setting 'sending_ips'"),
        ("smtp_port = ", "eob.toml"),
    ],
)  # fmt: skip
def test_bad_configuration_names_the_setting(tmp_path: Path, text: str, named: str):
    config = tmp_path / "eob.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_settings(config, environ={})
