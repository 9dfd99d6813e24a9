"""Where a message is handed over: the IP's smarthost (relay) or the recipient domain's mail
hosts (direct, RFC 5321 section 5.1).

Direct: the domain's MX hosts in preference order (equal preferences shuffled), for the sender
to try one after another; the domain itself (an implicit MX) only when the domain exists and
has no MX record but an address (A or AAAA). No host at all is a NoRoute: permanent for a null
MX (RFC 7505, `MX 0 .`), a domain that does not exist, or one with neither MX nor address;
transient when the lookup failed (SERVFAIL, timeout), to be retried later. Answers, negative
ones too, are kept in dnspython's LRU cache for their TTL, so a batch looks each domain up
once; every lookup gives up after `lifetime` seconds.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from pipeline.delivery.policy import SendingPolicy
from pipeline.errors import ConfigError, DeliveryError

# Domains whose answers the resolver's cache keeps at most: bounded memory for any batch.
CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Route:
    host: str
    port: int
    username: str | None = None
    password: str | None = None


class NoRoute(DeliveryError):
    """The recipient's domain has no mail host to try, as the reply a server would have given:
    code 5xx is permanent (a bounce), 4xx transient (retried later); status is the RFC 3463
    enhanced code. The message names no domain: it is part of a member's address."""

    def __init__(self, reason: str, *, code: int, status: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.status = status

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def reply(self) -> str:
        return f"{self.status} {self.reason}"


class Router(Protocol):
    async def routes(self, source_ip: str, domain: str) -> list[Route]:
        """The hosts to try for `domain`, in order; NoRoute when there is none."""
        ...


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

    async def routes(self, source_ip: str, domain: str) -> list[Route]:
        return [self._routes[source_ip]]


class MxRouter:
    """The recipient domain's mail hosts, best first, port 25 (see the module docstring)."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver | None = None,
        port: int = 25,
        *,
        lifetime: float = 10.0,
    ) -> None:
        self.resolver = resolver or dns.asyncresolver.Resolver()
        if self.resolver.cache is None:
            self.resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
        self.resolver.lifetime = lifetime
        self._port = port

    async def hosts(self, domain: str) -> list[str]:
        """The hosts to try in order, or NoRoute."""
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN as err:
            raise NoRoute("the domain does not exist", code=550, status="5.1.2") from err
        except dns.resolver.NoAnswer:
            return await self._implicit_mx(domain)
        except dns.exception.DNSException as err:
            raise _lookup_failed(err) from err
        records = random.sample(list(answer), len(answer))  # equal preferences in random order
        records.sort(key=lambda r: r.preference)
        hosts = [r.exchange.to_text(omit_final_dot=True) for r in records if r.exchange != _ROOT]
        if not hosts:
            raise NoRoute(
                "the domain accepts no mail (null MX, RFC 7505)", code=556, status="5.1.10"
            )
        return list(dict.fromkeys(hosts))

    async def _implicit_mx(self, domain: str) -> list[str]:
        for kind in ("A", "AAAA"):
            try:
                await self.resolver.resolve(domain, kind)
            except dns.resolver.NoAnswer:
                continue
            except dns.exception.DNSException as err:
                raise _lookup_failed(err) from err
            return [domain.lower()]
        raise NoRoute("the domain has no MX and no address", code=550, status="5.1.2")

    async def mx_hosts(self, domain: str) -> list[str]:
        """The hosts for the provider roll-up; none when there is no route (the send stage
        records why)."""
        try:
            return await self.hosts(domain)
        except NoRoute:
            return []

    async def routes(self, source_ip: str, domain: str) -> list[Route]:
        """Every host to try, in order: the sender moves to the next when one cannot be
        reached or answers with a 4xx greeting (RFC 5321 section 5.1)."""
        return [Route(host, self._port) for host in await self.hosts(domain)]


_ROOT = dns.name.root


def _lookup_failed(err: dns.exception.DNSException) -> NoRoute:
    # The exception's text names the domain: only its type goes into the reason.
    return NoRoute(f"DNS lookup failed ({type(err).__name__})", code=451, status="4.4.3")
