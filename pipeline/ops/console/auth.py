"""Console users, roles and password hashing (Argon2id via argon2-cffi)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.orm import Session

from pipeline.records.ledger import audit
from pipeline.records.ledger.models import ConsoleUser

_HASHER = PasswordHasher()
# Verified against when the user does not exist, so both paths cost the same.
_DUMMY_HASH = _HASHER.hash("not-a-real-password")


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"


# What each role may do besides viewing. Approval is the approver's alone; an approver may
# also route to print or close, but verification stays with operators (four eyes).
PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.VIEWER: frozenset(),
    Role.OPERATOR: frozenset({"verify", "unreachable", "print", "close", "ack"}),
    Role.APPROVER: frozenset({"approve", "print", "close", "ack"}),
}


def add_user(session: Session, username: str, password: str, role: Role, *, actor: str) -> None:
    if len(password) < 12:
        raise ValueError("password: at least 12 characters")
    session.merge(
        ConsoleUser(
            username=username,
            password_hash=_HASHER.hash(password),
            role=role,
            created_at=datetime.now(UTC),
        )
    )
    audit(session, "console_user_set", "user", username, actor=actor, detail=f"role={role}")


def authenticate(session: Session, username: str, password: str) -> ConsoleUser | None:
    user = session.get(ConsoleUser, username)
    try:
        _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    return user


def may(role: str, action: str) -> bool:
    return action in PERMISSIONS[Role(role)]


def mask_email(address: str | None) -> str:
    """j***@e******.com: enough to tell addresses apart on screen, not to read them."""
    if not address or "@" not in address:
        return "-"
    local, _, domain = address.partition("@")
    name, dot, tld = domain.rpartition(".")
    masked_domain = f"{name[:1]}{'*' * max(len(name) - 1, 1)}{dot}{tld}" if dot else "***"
    return f"{local[:1]}{'*' * max(len(local) - 1, 1)}@{masked_domain}"
