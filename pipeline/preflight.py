"""Preflight: load and check everything a command's stages will need before its first stage.

A configuration error then stops the command with one line naming the setting or file, and
nothing is half done (no orphaned run, no drop taken in without the policy to plan it). Each
check calls the loader the stage itself uses: the rules live there, once.
"""

from __future__ import annotations

import ssl
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import ConfigError

Check = Callable[[Settings, Path | None], None]


def preflight(settings: Settings, stages: Iterable[str], drop: Path | None = None) -> None:
    """Raise ConfigError (naming the setting or file) if anything `stages` need is broken;
    `drop` is the drop folder of a run (its insurers' profiles are checked)."""
    checks: list[Check] = []
    for stage in stages:
        checks += [check for check in _NEEDS[stage] if check not in checks]
    for check in checks:
        check(settings, drop)


def _keyring(settings: Settings, _drop: Path | None) -> None:
    from pipeline.records.atrest import load_keyring

    load_keyring(settings.data_dir)


def _insurer_profiles(_settings: Settings, drop: Path | None) -> None:
    from pipeline.intake.profiles import load_profile

    if drop is None or not drop.is_dir():
        return
    for folder in sorted(p for p in drop.iterdir() if p.is_dir() and not p.name.startswith(".")):
        load_profile(folder.name)


def _document_wording(_settings: Settings, _drop: Path | None) -> None:
    from pipeline.documents.templates import _document_languages
    from pipeline.documents.wording import load_wording

    for language in sorted(_document_languages()):
        load_wording(language)


def _email_wording(_settings: Settings, _drop: Path | None) -> None:
    from pipeline.delivery.compose import load_email_wording
    from pipeline.documents.templates import DEFAULT_LANGUAGE, _document_languages

    for language in sorted(_document_languages() | {DEFAULT_LANGUAGE}):
        load_email_wording(language)


def _sending_policy(settings: Settings, _drop: Path | None) -> None:
    from pipeline.delivery.policy import policy_for
    from pipeline.delivery.signing import DkimSigner

    DkimSigner(policy_for(settings).dkim)  # reads the DKIM key, when one is configured


def _ca_file(settings: Settings, _drop: Path | None) -> None:
    from pipeline.delivery.policy import policy_for
    from pipeline.delivery.send import tls_context

    path = settings.ca_file
    # ssl names neither the setting nor the file ("[Errno 2] No such file or directory").
    if not path.is_file():
        raise ConfigError(f"setting tls_ca_file: {path} does not exist")
    try:
        tls_context(path, policy_for(settings).tls_min_version)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"setting tls_ca_file: {path}: not a PEM CA bundle") from err


def _return_path_source(settings: Settings, _drop: Path | None) -> None:
    from pipeline.returns.collect import source_from

    source_from(settings.return_path_source, settings.return_path_maildir)


def _bounce_rules(_settings: Settings, _drop: Path | None) -> None:
    from pipeline.records.bounce_classes import RULES_FILE, load_rules

    _shipped_file(RULES_FILE, load_rules)


def _reconcile_policy(_settings: Settings, _drop: Path | None) -> None:
    from pipeline.returns.reconcile import POLICY_FILE, load_policy

    _shipped_file(POLICY_FILE, load_policy)


def _shipped_file(path: Path, load: Callable[[], object]) -> None:
    """Load a rules file shipped in config/; its loader reports its own content errors (as
    ConfigError) or raises the parser's error, which names neither the file nor the key."""
    try:
        load()
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {type(err).__name__}: {err}") from err


_NEEDS: dict[str, tuple[Check, ...]] = {
    "ingest": (_keyring, _insurer_profiles),
    "validate": (_keyring, _insurer_profiles),
    "statements": (_keyring,),
    "render": (_keyring, _document_wording),
    "plan": (_sending_policy,),
    "resends": (_sending_policy, _reconcile_policy),
    "send": (_keyring, _sending_policy, _email_wording, _ca_file),
    "bounces": (_keyring, _return_path_source, _bounce_rules),
    "reconcile": (_sending_policy, _reconcile_policy, _bounce_rules),
    "datasets": (_keyring,),
}
