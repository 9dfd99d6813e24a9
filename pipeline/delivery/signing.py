"""DKIM signatures (RFC 6376) with the selector and key named in the sending policy.

rsa-sha256 with c=relaxed/simple. dkimpy supplies the header parsing, canonicalization, the
header hash and the tag folding; the RSA signature itself is made by `cryptography` (OpenSSL),
because dkimpy's pure-Python RSA costs about ten milliseconds per message. The body is hashed
as the sender wrote it (simple canonicalization needs no per-line rewriting), in one call.
"""

from __future__ import annotations

import base64
import hashlib
import time

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy

from pipeline.delivery.policy import DkimPolicy
from pipeline.errors import ConfigError

# The headers a receiver shows or threads by; signing them stops them being altered in transit.
SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                  b"content-type")  # fmt: skip
_CANONICALIZATION = CanonicalizationPolicy.from_c_value(b"relaxed/simple")
_HEADER_NAME = b"DKIM-Signature"


class DkimSigner:
    def __init__(self, policy: DkimPolicy) -> None:
        self._selector = policy.selector.encode()
        self._domain = policy.domain.encode()
        self._key: rsa.RSAPrivateKey | None = None
        if policy.key_file is not None:
            try:
                key = serialization.load_pem_private_key(policy.key_file.read_bytes(), None)
            except OSError as err:
                raise ConfigError(
                    f"setting dkim.key_file: cannot read it ({err.strerror})"
                ) from err
            except (ValueError, TypeError) as err:
                raise ConfigError("setting dkim.key_file: not an unencrypted PEM key") from err
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ConfigError("setting dkim.key_file: an RSA key")
            self._key = key

    def sign(self, content: bytes) -> bytes:
        """`content` (CRLF line ends) with a DKIM-Signature header in front; unchanged when no
        key is configured."""
        if self._key is None:
            return content
        end = content.index(b"\r\n\r\n") + 2
        # Only the header block is parsed: dkimpy's parser splits every line it is given.
        headers, _ = dkim.rfc822_parse(content[:end] + b"\r\n")
        body = _CANONICALIZATION.canonicalize_body(content[end + 2 :])
        fields = [
            (b"v", b"1"),
            (b"a", b"rsa-sha256"),
            (b"c", _CANONICALIZATION.to_c_value()),
            (b"d", self._domain),
            (b"i", b"@" + self._domain),
            (b"q", b"dns/txt"),
            (b"s", self._selector),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(SIGNED_HEADERS)),
            (b"bh", base64.b64encode(hashlib.sha256(body).digest())),
            (b"b", b""),
        ]
        # The signature header is hashed with an empty b= tag, folded as it will be sent.
        unsigned = dkim.fold(_tags(fields), namelen=len(_HEADER_NAME))
        digest = hashlib.sha256()
        dkim.hash_headers(
            digest,
            _CANONICALIZATION,
            _CANONICALIZATION.canonicalize_headers(headers),
            SIGNED_HEADERS,
            (_HEADER_NAME, b" " + unsigned),
            dict(fields),
        )
        signature = self._key.sign(
            digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
        )
        fields[-1] = (b"b", base64.b64encode(signature))
        signed: bytes = dkim.fold(_tags(fields) + b"\r\n", namelen=len(_HEADER_NAME))
        return _HEADER_NAME + b": " + signed + content


def _tags(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"; ".join(name + b"=" + value for name, value in fields)
