"""Direct-to-MX routing against a real DNS server on loopback (dnspython answering MX queries),
and the provider roll-up from MX host names."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from pipeline.delivery.policy import load_policy
from pipeline.delivery.routing import MxRouter, NoRoute, RelayRouter, Route
from pipeline.delivery.shaping import provider_for

# name -> record type -> records; a name listed with no record of a type answers NOERROR with
# no data (NODATA) for it; a name not listed is NXDOMAIN; SERVFAIL names fail.
ZONE = {
    "members.example.": {"MX": ["20 mx2.members.example.", "10 mx1.members.example."]},
    "gmail-hosted.example.": {"MX": ["5 aspmx.l.google.com."]},
    "nullmx.example.": {"MX": ["0 ."], "A": ["192.0.2.1"]},
    "nomx.example.": {"A": ["192.0.2.2"]},
    "v6only.example.": {"AAAA": ["2001:db8::2"]},
    "nohost.example.": {"TXT": ['"v=spf1 -all"']},
}
SERVFAIL = {"broken.example."}


class DnsServer:
    """Answers queries from ZONE over UDP (NXDOMAIN, NODATA and SERVFAIL as ZONE says); counts
    the queries."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.29", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = 0

    def serve(self) -> None:
        while True:
            try:
                wire, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            self.queries += 1
            query = dns.message.from_wire(wire)
            reply = dns.message.make_response(query)
            question = query.question[0]
            name, kind = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
            if name in SERVFAIL:
                reply.set_rcode(dns.rcode.SERVFAIL)
            elif name not in ZONE:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif kind in ZONE[name]:
                reply.answer.append(
                    dns.rrset.from_text_list(name, 300, "IN", kind, ZONE[name][kind])
                )
            self.sock.sendto(reply.to_wire(), peer)


@contextmanager
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.sock.close()


def router_for(server: DnsServer, lifetime: float = 5.0) -> MxRouter:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.29"]
    resolver.port = server.port
    return MxRouter(resolver, lifetime=lifetime)


def routes(router: MxRouter, domain: str) -> list[Route]:
    return asyncio.run(router.routes("127.0.0.20", domain))


def refusal(router: MxRouter, domain: str) -> NoRoute:
    with pytest.raises(NoRoute) as caught:
        routes(router, domain)
    assert domain not in str(caught.value)  # part of a member's address: not in logs
    return caught.value


def test_the_best_mx_is_used_and_answers_are_cached():
    with dns_server() as server:
        router = router_for(server)

        async def routes() -> list[Route]:
            return [(await router.routes("127.0.0.20", "members.example"))[0] for _ in range(3)]

        assert asyncio.run(routes()) == [Route("mx1.members.example", 25)] * 3
        assert server.queries == 1


def test_every_mx_in_preference_order_for_the_sender_to_fall_back_through():
    with dns_server() as server:
        assert routes(router_for(server), "members.example") == [
            Route("mx1.members.example", 25),
            Route("mx2.members.example", 25),
        ]


def test_a_domain_with_no_mx_record_but_an_address_is_its_own_host():
    with dns_server() as server:
        router = router_for(server)
        assert routes(router, "nomx.example") == [Route("nomx.example", 25)]
        assert routes(router, "v6only.example") == [Route("v6only.example", 25)]
        # No MX and no address either: nowhere to deliver, for good.
        unreachable = refusal(router, "nohost.example")
    assert (unreachable.permanent, unreachable.code, unreachable.status) == (True, 550, "5.1.2")


def test_a_null_mx_is_a_permanent_failure_with_its_own_reason():
    with dns_server() as server:
        router = router_for(server)
        null = refusal(router, "nullmx.example")
        assert asyncio.run(router.mx_hosts("nullmx.example")) == []
    assert (null.permanent, null.code, null.status) == (True, 556, "5.1.10")  # RFC 7505 section 4.2
    assert null.reply.startswith("5.1.10 ") and "null MX" in null.reply


def test_a_domain_that_does_not_exist_is_not_taken_for_a_mail_host():
    with dns_server() as server:
        missing = refusal(router_for(server), "nxdomain.example")
    assert (missing.permanent, missing.code, missing.status) == (True, 550, "5.1.2")
    assert "does not exist" in missing.reason


def test_a_failed_lookup_is_transient_and_not_a_mail_host():
    with dns_server() as server:
        failed = refusal(router_for(server), "broken.example")
    assert (failed.permanent, failed.code, failed.status) == (False, 451, "4.4.3")


def test_a_dns_server_that_never_answers_fails_within_the_lifetime():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.29", 0))
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.29"]
    resolver.port = silent.getsockname()[1]
    started = time.monotonic()
    with silent:
        failed = refusal(MxRouter(resolver, lifetime=1.0), "members.example")
    assert failed.permanent is False
    assert time.monotonic() - started < 3


def test_answers_are_kept_in_a_bounded_cache():
    with dns_server() as server:
        router = router_for(server)
        cache = router.resolver.cache
        assert isinstance(cache, dns.resolver.LRUCache)
        assert 0 < cache.max_size <= 100_000
        for _ in range(3):
            refusal(router, "nxdomain.example")
        assert server.queries == 1  # the negative answer is cached too


def test_a_relay_route_is_the_only_host():
    policy = load_policy()
    relay = RelayRouter(policy, "relay.example", 2525)
    ip = policy.pool[0].address
    assert asyncio.run(relay.routes(ip, "members.example")) == [Route("relay.example", 2525)]


def test_mx_hosts_roll_up_to_the_provider():
    policy = load_policy()
    with dns_server() as server:
        hosts = asyncio.run(router_for(server).mx_hosts("gmail-hosted.example"))
    assert provider_for(policy, "gmail-hosted.example", hosts) == "google"
    assert provider_for(policy, "GMAIL.com") == "google"
    assert provider_for(policy, "members.example", ["mx1.members.example"]) == "default"
