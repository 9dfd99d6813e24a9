"""The sending policy (config/sending.toml): IP pool, warm-up, provider shaping, back-off, retry.

`load_policy` checks every setting and raises ConfigError naming the setting (never its value,
which could be a path or a secret's name the operator would rather not see in a log).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal, TypeVar

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.resources import CONFIG_DIR

DEFAULT_POLICY_FILE = CONFIG_DIR / "sending.toml"
# The provider of recipients no listed provider claims; every policy must shape it.
DEFAULT_PROVIDER = "default"

T = TypeVar("T")


@dataclass(frozen=True)
class PoolIp:
    address: str
    ehlo_name: str
    weight: int
    # Day 1 of the warm-up schedule; None: fully warmed.
    warmup_start: date | None = None
    relay_host: str | None = None
    relay_port: int = 587
    relay_user_env: str | None = None
    relay_password_env: str | None = None


@dataclass(frozen=True)
class Provider:
    name: str
    domains: frozenset[str]
    mx_suffixes: tuple[str, ...]
    max_connections_per_ip: int
    max_messages_per_connection: int
    max_rate_per_ip: float


@dataclass(frozen=True)
class BackoffRule:
    name: str
    pattern: re.Pattern[str]
    threshold_per_hour: int
    action: Literal["slow", "suspend"]
    # Messages per second while slowed; unused for "suspend".
    rate: float
    duration_seconds: float


@dataclass(frozen=True)
class RetryPolicy:
    first_delay_seconds: float
    multiplier: float
    max_delay_seconds: float
    max_age_seconds: float

    def delay(self, tries: int, hint_seconds: float | None = None) -> float:
        """Seconds to wait after the `tries`-th deferral; never less than the server's hint."""
        backoff = self.first_delay_seconds * self.multiplier ** max(tries - 1, 0)
        return max(min(backoff, self.max_delay_seconds), hint_seconds or 0.0)


@dataclass(frozen=True)
class DkimPolicy:
    domain: str
    selector: str
    # None: do not sign.
    key_file: Path | None


@dataclass(frozen=True)
class SendingPolicy:
    mode: Literal["relay", "direct"]
    timeout_seconds: float
    tls_min_version: Literal["1.2", "1.3"]
    tls_fallback: Literal["notification", "print"]
    portal_url: str
    dkim: DkimPolicy
    retry: RetryPolicy
    pool: tuple[PoolIp, ...]
    # Daily caps by day of warm-up, for every provider and per provider where stricter.
    warmup_caps: tuple[int, ...]
    warmup_provider_caps: dict[str, tuple[int, ...]]
    providers: dict[str, Provider]
    backoff: tuple[BackoffRule, ...]

    def ip(self, address: str) -> PoolIp:
        for ip in self.pool:
            if ip.address == address:
                return ip
        raise ConfigError(f"setting pool: no IP {address} (planned earlier, since removed?)")

    def daily_cap(self, ip: PoolIp, day: date, provider: str | None = None) -> int | None:
        """How many messages `ip` may send on `day` (to `provider`); None: no cap (warmed)."""
        if ip.warmup_start is None:
            return None
        caps = self.warmup_caps if provider is None else self.warmup_provider_caps.get(provider)
        if caps is None:
            return None
        day_number = (day - ip.warmup_start).days
        if day_number < 0:
            return 0
        return caps[day_number] if day_number < len(caps) else None


def load_policy(path: Path = DEFAULT_POLICY_FILE) -> SendingPolicy:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"sending policy {path}: {err}") from err
    return parse_policy(raw)


def parse_policy(raw: dict[str, Any]) -> SendingPolicy:
    _known(raw, "", {"delivery", "tls", "dkim", "retry", "pool", "warmup", "providers", "backoff"})
    delivery, tls, dkim = _table(raw, "delivery"), _table(raw, "tls"), _table(raw, "dkim")
    retry, warmup = _table(raw, "retry"), _table(raw, "warmup")
    _known(delivery, "delivery", {"mode", "timeout_seconds"})
    _known(tls, "tls", {"min_version", "fallback", "portal_url"})
    _known(dkim, "dkim", {"domain", "selector", "key_file"})
    _known(warmup, "warmup", {"daily_cap", "providers"})
    providers = {
        name: _provider(name, _table(raw["providers"], name, "providers"))
        for name in _table(raw, "providers")
    }
    if DEFAULT_PROVIDER not in providers:
        raise ConfigError("setting providers.default: missing (recipients of no listed provider)")
    provider_caps = {
        name: _caps(
            _table(_table(warmup, "providers", "warmup"), name, "warmup.providers"),
            f"warmup.providers.{name}",
        )  # fmt: skip
        for name in _table(warmup, "providers", "warmup")
    }
    for name in provider_caps:
        if name not in providers:
            raise ConfigError(f"setting warmup.providers.{name}: no such provider")
    pool = _pool(raw.get("pool"))
    key_file = _get(dkim, "key_file", str, "dkim", "")
    return SendingPolicy(
        mode=_choice(delivery, "mode", ("relay", "direct"), "delivery"),
        timeout_seconds=_positive(delivery, "timeout_seconds", "delivery", 30.0),
        tls_min_version=_choice(tls, "min_version", ("1.2", "1.3"), "tls"),
        tls_fallback=_choice(tls, "fallback", ("notification", "print"), "tls"),
        portal_url=_get(tls, "portal_url", str, "tls"),
        dkim=DkimPolicy(
            domain=_get(dkim, "domain", str, "dkim"),
            selector=_get(dkim, "selector", str, "dkim"),
            key_file=Path(key_file) if key_file else None,
        ),
        retry=RetryPolicy(
            first_delay_seconds=_positive(retry, "first_delay_seconds", "retry"),
            multiplier=_positive(retry, "multiplier", "retry"),
            max_delay_seconds=_positive(retry, "max_delay_seconds", "retry"),
            max_age_seconds=_positive(retry, "max_age_hours", "retry") * 3600,
        ),
        pool=pool,
        warmup_caps=_caps(warmup, "warmup"),
        warmup_provider_caps=provider_caps,
        providers=providers,
        backoff=tuple(_backoff(i, r) for i, r in enumerate(_list(raw, "backoff"))),
    )


def _pool(value: Any) -> tuple[PoolIp, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("setting pool: a list of [[pool]] tables, at least one")
    pool = []
    for index, item in enumerate(value):
        where = f"pool[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"setting {where}: a table")
        _known(item, where, {"address", "ehlo_name", "weight", "warmup_start", "relay_host",
                             "relay_port", "relay_user_env", "relay_password_env"})  # fmt: skip
        address = _get(item, "address", str, where)
        try:
            ipaddress.ip_address(address)
        except ValueError as err:
            raise ConfigError(f"setting {where}.address: not an IP address") from err
        start = item.get("warmup_start")
        if start is not None and not isinstance(start, date):
            raise ConfigError(f"setting {where}.warmup_start: a date (YYYY-MM-DD)")
        pool.append(
            PoolIp(
                address=address,
                ehlo_name=_get(item, "ehlo_name", str, where),
                weight=_whole(item, "weight", where, 1),
                warmup_start=start,
                relay_host=_optional(item, "relay_host", where),
                relay_port=_whole(item, "relay_port", where, 587),
                relay_user_env=_optional(item, "relay_user_env", where),
                relay_password_env=_optional(item, "relay_password_env", where),
            )
        )
    addresses = [ip.address for ip in pool]
    if len(set(addresses)) != len(addresses):
        raise ConfigError("setting pool: an address is listed twice")
    return tuple(pool)


def _provider(name: str, raw: dict[str, Any]) -> Provider:
    where = f"providers.{name}"
    _known(raw, where, {"domains", "mx_suffixes", "max_connections_per_ip",
                        "max_messages_per_connection", "max_rate_per_ip"})  # fmt: skip
    domains = _get(raw, "domains", list, where, [])
    suffixes = _get(raw, "mx_suffixes", list, where, [])
    if not all(isinstance(d, str) for d in domains + suffixes):
        raise ConfigError(f"setting {where}.domains/mx_suffixes: lists of strings")
    return Provider(
        name=name,
        domains=frozenset(d.lower() for d in domains),
        mx_suffixes=tuple(s.lower() for s in suffixes),
        max_connections_per_ip=_whole(raw, "max_connections_per_ip", where),
        max_messages_per_connection=_whole(raw, "max_messages_per_connection", where),
        max_rate_per_ip=_positive(raw, "max_rate_per_ip", where),
    )


def _backoff(index: int, raw: Any) -> BackoffRule:
    where = f"backoff[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"setting {where}: a table")
    _known(raw, where, {"name", "pattern", "threshold_per_hour", "action", "rate",
                        "duration_minutes"})  # fmt: skip
    try:
        pattern = re.compile(_get(raw, "pattern", str, where), re.IGNORECASE)
    except re.error as err:
        raise ConfigError(f"setting {where}.pattern: not a valid regex ({err.msg})") from err
    action = _choice(raw, "action", ("slow", "suspend"), where)
    return BackoffRule(
        name=_get(raw, "name", str, where),
        pattern=pattern,
        threshold_per_hour=_whole(raw, "threshold_per_hour", where),
        action=action,
        rate=_positive(raw, "rate", where) if action == "slow" else 0.0,
        duration_seconds=_positive(raw, "duration_minutes", where) * 60,
    )


def _caps(raw: dict[str, Any], where: str) -> tuple[int, ...]:
    caps = _get(raw, "daily_cap", list, where)
    if not caps or not all(isinstance(c, int) and c >= 0 for c in caps):
        raise ConfigError(f"setting {where}.daily_cap: a list of whole numbers >= 0")
    if any(b < a for a, b in zip(caps, caps[1:], strict=False)):
        raise ConfigError(f"setting {where}.daily_cap: must not decrease day by day")
    return tuple(caps)


# Typed access that names the setting ----------------------------------------------------------


def _get(raw: dict[str, Any], key: str, kind: type[T], where: str, default: T | None = None) -> T:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"setting {_name(where, key)}: missing")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"setting {_name(where, key)}: expected {kind.__name__}")
    return value


def _optional(raw: dict[str, Any], key: str, where: str) -> str | None:
    return _get(raw, key, str, where) if key in raw else None


def _whole(raw: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = _get(raw, key, int, where, default)
    if value < 1:
        raise ConfigError(f"setting {_name(where, key)}: a whole number >= 1")
    return value


def _positive(raw: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"setting {_name(where, key)}: a number > 0")
    return float(value)


def _choice(raw: dict[str, Any], key: str, allowed: tuple[str, ...], where: str) -> Any:
    value = _get(raw, key, str, where)
    if value not in allowed:
        raise ConfigError(f"setting {_name(where, key)}: one of {', '.join(allowed)}")
    return value


def _table(raw: Any, key: str, where: str = "") -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"setting {_name(where, key)}: a table")
    return value


def _list(raw: dict[str, Any], key: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"setting {key}: a list of [[{key}]] tables")
    return value


def _known(raw: dict[str, Any], where: str, allowed: set[str]) -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"setting {_name(where, key)}: unknown")


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def policy_for(settings: Settings) -> SendingPolicy:
    """The sending policy the settings name (`sending_policy_file`), else the shipped one."""
    path = settings.sending_policy_file
    return load_policy(Path(path)) if path else load_policy()
