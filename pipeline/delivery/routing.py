"""Where a message is handed over: the IP's smarthost (relay) or the recipient domain's MX (direct).

MX answers are cached per domain for their TTL, so a batch looks each domain up once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver

from pipeline.delivery.policy import SendingPolicy
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Route:
    host: str
    port: int
    username: str | None = None
    password: str | None = None


class Router(Protocol):
    async def route(self, source_ip: str, domain: str) -> Route: ...


class RelayRouter:
    """Each IP's messages to its smarthost (else the default one), with AUTH if configured."""

    def __init__(self, policy: SendingPolicy, default_host: str, default_port: int) -> None:
        self._routes = {}
        for ip in policy.pool:
            username = password = None
            if ip.relay_user_env or ip.relay_password_env:
                username = os.environ.get(ip.relay_user_env or "")
                password = os.environ.get(ip.relay_password_env or "")
                if not username or not password:
                    raise ConfigError(
                        f"setting pool[{policy.pool.index(ip)}].relay_user_env/relay_password_env: "
                        "the environment variables they name are not set"
                    )
            self._routes[ip.address] = Route(
                ip.relay_host or default_host,
                ip.relay_port if ip.relay_host else default_port,
                username,
                password,
            )

    async def route(self, source_ip: str, domain: str) -> Route:
        return self._routes[source_ip]


class MxRouter:
    """The best MX of the recipient's domain, port 25; the domain itself when it has no MX."""

    def __init__(self, resolver: dns.asyncresolver.Resolver | None = None, port: int = 25) -> None:
        self._resolver = resolver or dns.asyncresolver.Resolver()
        self._port = port
        # domain -> (MX hosts best first, expiry on the monotonic clock)
        self._cache: dict[str, tuple[list[str], float]] = {}

    async def mx_hosts(self, domain: str) -> list[str]:
        domain = domain.lower()
        cached = self._cache.get(domain)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        try:
            answer = await self._resolver.resolve(domain, "MX")
            records = sorted(answer, key=lambda r: r.preference)
            hosts = [r.exchange.to_text(omit_final_dot=True) for r in records]
            ttl = float(answer.rrset.ttl if answer.rrset else 300)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            hosts, ttl = [domain], 300.0  # RFC 5321 5.1: no MX, the domain is its own host
        except dns.exception.DNSException:
            return [domain]  # a lookup failure is not cached: the next message asks again
        self._cache[domain] = (hosts, time.monotonic() + ttl)
        return hosts

    async def route(self, source_ip: str, domain: str) -> Route:
        return Route((await self.mx_hosts(domain))[0], self._port)
