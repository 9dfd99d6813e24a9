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
    assert len(settings.sending_ips) >= 2


def test_file_then_environment(tmp_path: Path):
    config = tmp_path / "eob.toml"
    config.write_text(
        'smtp_port = 2525\nplan_name = "Acme"\n'
        '[[sending_ips]]\naddress = "127.0.0.9"\nehlo_name = "a"\nweight = 3\n'
        '[[sending_ips]]\naddress = "127.0.0.10"\nehlo_name = "b"\n'
    )
    settings = load_settings(config, environ={"EOB_SMTP_PORT": "2526"})
    assert settings.smtp_port == 2526
    assert settings.plan_name == "Acme"
    assert [(ip.address, ip.weight) for ip in settings.sending_ips] == [
        ("127.0.0.9", 3), ("127.0.0.10", 1),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("smtp_prot = 1", "smtp_prot"),
        ('smtp_port = "many"', "smtp_port"),
        ("smtp_port = 70000", "smtp_port"),
        ('[[sending_ips]]\naddress = "127.0.0.2"\nehlo_name = "a"\n', "sending_ips"),
        ('[[sending_ips]]\naddress = "nope"\nehlo_name = "a"\n'
         '[[sending_ips]]\naddress = "127.0.0.3"\nehlo_name = "b"\n', "sending_ips[0].address"),
        ("smtp_port = ", "eob.toml"),
    ],
)  # fmt: skip
def test_bad_configuration_names_the_setting(tmp_path: Path, text: str, named: str):
    config = tmp_path / "eob.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_settings(config, environ={})
