"""The sending policy file (validated at load, errors name the setting) and the planner."""

from __future__ import annotations

import copy
import tomllib
from collections import Counter
from datetime import date, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.delivery.plan import ToPlan, plan_sends
from pipeline.delivery.policy import DEFAULT_POLICY_FILE, load_policy, parse_policy
from pipeline.delivery.shaping import retry_hint_seconds
from pipeline.errors import ConfigError

SHIPPED: dict[str, Any] = tomllib.loads(DEFAULT_POLICY_FILE.read_text())
TODAY = date(2026, 11, 22)


def raw_policy(pool: list[dict[str, Any]], caps: list[int] | None = None) -> dict[str, Any]:
    raw = copy.deepcopy(SHIPPED)
    raw["pool"] = pool
    if caps is not None:
        raw["warmup"]["daily_cap"] = caps
    return raw


def test_the_shipped_policy_loads():
    policy = load_policy()
    assert {"google", "microsoft", "yahoo", "apple", "default"} <= set(policy.providers)
    assert len(policy.pool) >= 2 and policy.backoff


def _set(path: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(SHIPPED)
    *parents, key = path.split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[key]
    else:
        node[key] = value
    return raw


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("delivery.mode", "carrier-pigeon", "delivery.mode"),
        ("tls.fallback", "plaintext", "tls.fallback"),
        ("tls.min_version", "1.0", "tls.min_version"),
        ("pool.0.address", "not-an-ip", "pool[0].address"),
        ("pool.1.weight", 0, "pool[1].weight"),
        ("pool.2.warmup_start", "yesterday", "pool[2].warmup_start"),
        ("pool.0.colour", "red", "pool[0].colour"),
        ("warmup.daily_cap", [10, 5], "warmup.daily_cap"),
        ("providers.google.max_rate_per_ip", 0, "providers.google.max_rate_per_ip"),
        (
            "providers.yahoo.max_connections_per_ip",
            "many",
            "providers.yahoo.max_connections_per_ip",
        ),
        ("providers.default", _DELETE, "providers.default"),
        ("backoff.0.pattern", "([unclosed", "backoff[0].pattern"),
        ("backoff.1.action", "panic", "backoff[1].action"),
        ("retry.max_age_hours", -1, "retry.max_age_hours"),
    ],
)
def test_a_bad_setting_is_named(path, value, named):
    with pytest.raises(ConfigError) as raised:
        parse_policy(_set(path, value))
    assert str(raised.value).startswith(f"setting {named}:")


def test_a_file_that_is_not_toml_is_named(tmp_path):
    bad = tmp_path / "sending.toml"
    bad.write_text("[pool\n")
    with pytest.raises(ConfigError, match="sending.toml"):
        load_policy(bad)


def test_planning_is_deterministic_and_follows_the_weights():
    policy = parse_policy(raw_policy([
        {"address": "127.0.0.20", "ehlo_name": "a", "weight": 3},
        {"address": "127.0.0.21", "ehlo_name": "b", "weight": 1},
    ]))  # fmt: skip
    items = [ToPlan(f"s{n}", "default") for n in range(8000)]
    first = plan_sends(items, policy, TODAY)
    assert first == plan_sends(list(reversed(items)), policy, TODAY)
    share = Counter(a.ip.address for a in first)
    assert share["127.0.0.20"] / len(items) == pytest.approx(0.75, abs=0.02)
    assert {a.day for a in first} == {TODAY}


def test_a_warming_ip_takes_its_cap_and_the_rest_overflows_to_warmed_ips():
    policy = parse_policy(raw_policy([
        {"address": "127.0.0.20", "ehlo_name": "a", "weight": 1},
        {"address": "127.0.0.21", "ehlo_name": "b", "weight": 9, "warmup_start": TODAY},
    ], caps=[100, 200]))  # fmt: skip
    plan = plan_sends([ToPlan(f"s{n}", "default") for n in range(1000)], policy, TODAY)
    share = Counter(a.ip.address for a in plan)
    assert share == {"127.0.0.21": 100, "127.0.0.20": 900}


def test_a_full_pool_spills_to_the_next_days_within_their_caps():
    policy = parse_policy(raw_policy([
        {"address": "127.0.0.20", "ehlo_name": "a", "weight": 1, "warmup_start": TODAY},
        {"address": "127.0.0.21", "ehlo_name": "b", "weight": 1, "warmup_start": TODAY},
    ], caps=[100, 200, 400]))  # fmt: skip
    plan = plan_sends([ToPlan(f"s{n}", "default") for n in range(1000)], policy, TODAY)
    per_day = Counter(a.day for a in plan)
    assert per_day == {TODAY: 200, TODAY + timedelta(1): 400, TODAY + timedelta(2): 400}
    # What was planned earlier counts against the cap: a second plan today starts tomorrow.
    used = Counter({("127.0.0.20", None, TODAY): 100, ("127.0.0.21", None, TODAY): 100})
    [later] = plan_sends([ToPlan("x", "default")], policy, TODAY, used)
    assert later.day == TODAY + timedelta(1)


def test_a_provider_cap_is_stricter_than_the_ip_cap():
    policy = parse_policy(raw_policy([
        {"address": "127.0.0.20", "ehlo_name": "a", "weight": 1, "warmup_start": TODAY},
    ], caps=[1000]))  # fmt: skip
    google_cap = policy.warmup_provider_caps["google"][0]
    items = [ToPlan(f"g{n}", "google") for n in range(google_cap + 10)]
    items += [ToPlan(f"d{n}", "default") for n in range(10)]
    plan = plan_sends(items, policy, TODAY)
    today_google = [a for a in plan if a.day == TODAY and a.statement_id.startswith("g")]
    assert len(today_google) == google_cap
    assert all(a.day == TODAY for a in plan if a.statement_id.startswith("d"))


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    warming=st.lists(st.booleans(), min_size=4, max_size=4),
    caps=st.lists(st.integers(0, 30), min_size=1, max_size=4).map(sorted),
    count=st.integers(0, 300),
)
def test_no_ip_ever_exceeds_its_daily_cap(weights, warming, caps, count):
    caps[-1] = max(caps[-1], 1)
    pool = [{"address": f"127.0.0.{20 + i}", "ehlo_name": "x", "weight": w}
            | ({"warmup_start": TODAY} if warming[i] else {})
            for i, w in enumerate(weights)]  # fmt: skip
    policy = parse_policy(raw_policy(pool, caps))
    plan = plan_sends([ToPlan(f"s{n}", "default") for n in range(count)], policy, TODAY)
    assert len(plan) == count
    for (address, day), n in Counter((a.ip.address, a.day) for a in plan).items():
        cap = policy.daily_cap(policy.ip(address), day)
        assert cap is None or n <= cap


def test_retry_delays_grow_and_honour_the_servers_hint():
    retry = load_policy().retry
    delays = [retry.delay(n) for n in range(1, 10)]
    assert delays == sorted(delays) and delays[-1] == retry.max_delay_seconds
    assert (
        retry.delay(1, hint_seconds=retry.first_delay_seconds * 10)
        == retry.first_delay_seconds * 10
    )
    assert retry_hint_seconds("452 4.2.2 over quota, try again in 2 hours") == 7200
    assert retry_hint_seconds("451 4.7.1 Please retry after 90 seconds") == 90
    assert retry_hint_seconds("450 mailbox busy") is None
