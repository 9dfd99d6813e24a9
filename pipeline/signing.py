"""DKIM signatures (dkimpy) with the selector and key named in the sending policy."""

from __future__ import annotations

import dkim

from pipeline.errors import ConfigError
from pipeline.policy import DkimPolicy

# The headers a receiver shows or threads by; signing them stops them being altered in transit.
SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                  b"content-type")  # fmt: skip


class DkimSigner:
    def __init__(self, policy: DkimPolicy) -> None:
        self._selector = policy.selector.encode()
        self._domain = policy.domain.encode()
        self._key: bytes | None = None
        if policy.key_file is not None:
            try:
                self._key = policy.key_file.read_bytes()
            except OSError as err:
                raise ConfigError(
                    f"setting dkim.key_file: cannot read it ({err.strerror})"
                ) from err

    def sign(self, content: bytes) -> bytes:
        """`content` with a DKIM-Signature header in front; unchanged when no key is configured."""
        if self._key is None:
            return content
        signature: bytes = dkim.sign(
            content,
            self._selector,
            self._domain,
            self._key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(SIGNED_HEADERS),
        )
        return signature + content
