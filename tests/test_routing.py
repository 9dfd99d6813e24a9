"""Direct-to-MX routing against a real DNS server on loopback (dnspython answering MX queries),
and the provider roll-up from MX host names."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rrset

from pipeline.delivery.policy import load_policy
from pipeline.delivery.routing import MxRouter, Route
from pipeline.delivery.shaping import provider_for

ZONE = {
    "members.example.": ["20 mx2.members.example.", "10 mx1.members.example."],
    "gmail-hosted.example.": ["5 aspmx.l.google.com."],
}


class DnsServer:
    """Answers MX queries from ZONE over UDP; NXDOMAIN otherwise. Counts the queries."""

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
            name = query.question[0].name.to_text()
            if name in ZONE:
                reply.answer.append(dns.rrset.from_text_list(name, 300, "IN", "MX", ZONE[name]))
            else:
                reply.set_rcode(dns.rcode.NXDOMAIN)
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


def router_for(server: DnsServer) -> MxRouter:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.29"]
    resolver.port = server.port
    return MxRouter(resolver)


def test_the_best_mx_is_used_and_answers_are_cached():
    with dns_server() as server:
        router = router_for(server)

        async def routes() -> list[Route]:
            return [await router.route("127.0.0.20", "members.example") for _ in range(3)]

        assert asyncio.run(routes()) == [Route("mx1.members.example", 25)] * 3
        assert server.queries == 1


def test_a_domain_without_mx_is_its_own_host():
    with dns_server() as server:
        route = asyncio.run(router_for(server).route("127.0.0.20", "nomx.example"))
    assert route == Route("nomx.example", 25)


def test_mx_hosts_roll_up_to_the_provider():
    policy = load_policy()
    with dns_server() as server:
        hosts = asyncio.run(router_for(server).mx_hosts("gmail-hosted.example"))
    assert provider_for(policy, "gmail-hosted.example", hosts) == "google"
    assert provider_for(policy, "GMAIL.com") == "google"
    assert provider_for(policy, "members.example", ["mx1.members.example"]) == "default"
