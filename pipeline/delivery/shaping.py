"""Traffic shaping for one (source IP, provider) lane: a pacing token bucket and back-off rules.

Everything here runs on the sender's event loop; the clock is injectable for tests.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.delivery.policy import DEFAULT_PROVIDER, BackoffRule, Provider, SendingPolicy

Clock = Callable[[], float]

_HOUR = 3600.0
_RETRY_HINT = re.compile(
    r"(?:try|retry)\s+(?:again\s+)?(?:in|after)\s+(\d+)\s*(s|sec|second|m|min|minute|h|hour)",
    re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def retry_hint_seconds(reply: str) -> float | None:
    """The wait a 4xx reply asks for ("try again in 10 minutes"), if it names one."""
    match = _RETRY_HINT.search(reply)
    return int(match[1]) * _UNIT_SECONDS[match[2][0].lower()] if match else None


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def provider_for(policy: SendingPolicy, domain: str, mx_hosts: Sequence[str] = ()) -> str:
    """Roll a recipient domain (and, in direct mode, its MX hosts) up to a provider name."""
    domain = domain.lower()
    for provider in policy.providers.values():
        if domain in provider.domains:
            return provider.name
    for host in mx_hosts:
        host = "." + host.lower().rstrip(".")
        for provider in policy.providers.values():
            if any(host.endswith(suffix) for suffix in provider.mx_suffixes):
                return provider.name
    return DEFAULT_PROVIDER


class TokenBucket:
    """Paces takers to `rate` per second, with no burst: the achieved rate is the configured one."""

    def __init__(self, rate: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._next = clock()

    async def take(self) -> None:
        # The slot is reserved before sleeping, so concurrent takers queue up one interval apart.
        now = self._clock()
        at = max(self._next, now)
        self._next = at + 1 / self.rate
        if at > now:
            await asyncio.sleep(at - now)


@dataclass
class Lane:
    """One source IP sending to one provider: its pace and its back-off state."""

    ip: str
    provider: Provider
    rules: Sequence[BackoffRule]
    clock: Clock = time.monotonic
    bucket: TokenBucket = field(init=False)
    # Until when the lane is slowed or suspended (clock time); 0: not.
    slowed_until: float = 0.0
    suspended_until: float = 0.0
    _hits: dict[str, deque[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(self.provider.max_rate_per_ip, self.clock)

    @property
    def suspended(self) -> bool:
        return self.clock() < self.suspended_until

    async def take(self) -> None:
        if self.slowed_until and self.clock() >= self.slowed_until:
            self.slowed_until, self.bucket.rate = 0.0, self.provider.max_rate_per_ip
        await self.bucket.take()

    def observe(self, code: int | None, text: str) -> BackoffRule | None:
        """Count a reply against the back-off rules; apply and return a rule that fires."""
        now = self.clock()
        reply = f"{code} {text}" if code else text
        for rule in self.rules:
            if not rule.pattern.search(reply):
                continue
            hits = self._hits.setdefault(rule.name, deque())
            hits.append(now)
            while hits and hits[0] <= now - _HOUR:
                hits.popleft()
            if len(hits) >= rule.threshold_per_hour:
                hits.clear()
                if rule.action == "slow":
                    self.slowed_until = now + rule.duration_seconds
                    self.bucket.rate = min(self.bucket.rate, rule.rate)
                else:
                    self.suspended_until = now + rule.duration_seconds
                return rule
        return None
