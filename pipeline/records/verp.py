"""The VERP return path: each message's bounces come back to an address that names it.

Below delivery (which writes it) and returns (which reads it back).
"""

from __future__ import annotations


def verp_return_path(token: str, domain: str) -> str:
    return f"bounces+{token}@{domain}"


def token_from_verp(address: str, domain: str) -> str | None:
    """The message token of a VERP return path of ours, else None."""
    local, _, address_domain = address.strip().strip("<>").rpartition("@")
    if address_domain.lower() != domain.lower() or not local.startswith("bounces+"):
        return None
    return local.removeprefix("bounces+") or None
