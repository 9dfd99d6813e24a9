"""Plan stage: give each message a dedicated sending IP and a VERP return path.

Assignment is a stable weighted hash of the statement id: re-planning gives the same IP, and
traffic splits across the pool in proportion to the weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pipeline.config import SendingIp


def message_token(statement_id: str, attempt: int) -> str:
    """The message's id in the ledger, its Message-ID local part and its VERP token."""
    return "m" + hashlib.sha256(f"{statement_id}:{attempt}".encode()).hexdigest()[:24]


def assign_ip(statement_id: str, pool: Sequence[SendingIp]) -> SendingIp:
    total = sum(ip.weight for ip in pool)
    slot = int(hashlib.sha256(statement_id.encode()).hexdigest()[:12], 16) % total
    for ip in pool:
        if slot < ip.weight:
            return ip
        slot -= ip.weight
    raise AssertionError("unreachable: slot is below the total weight")


def verp_return_path(token: str, domain: str) -> str:
    return f"bounces+{token}@{domain}"


def token_from_verp(address: str, domain: str) -> str | None:
    """The message token of a VERP return path of ours, else None."""
    local, _, address_domain = address.strip().strip("<>").rpartition("@")
    if address_domain.lower() != domain.lower() or not local.startswith("bounces+"):
        return None
    return local.removeprefix("bounces+") or None
