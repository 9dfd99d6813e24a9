"""DKIM: a signed EOB email verifies against the selector's public key; no key, no signature."""

from __future__ import annotations

import base64
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pipeline.delivery.compose import compose_eob_email
from pipeline.delivery.policy import DkimPolicy
from pipeline.delivery.signing import DkimSigner


def eob_email(language: str = "en", first_name: str | None = None) -> bytes:
    return compose_eob_email(message_id="m1", statement_id="s1", recipient="r@example.org",
                             from_address="statements@eob.example.com", plan_name="Plan",
                             pdf=b"%PDF-1.4 test", language=language,
                             first_name=first_name)  # fmt: skip


def test_a_signed_message_verifies_and_tampering_breaks_it(tmp_path: Path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))  # fmt: skip
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"eob1._domainkey.eob.example.com."
        return record

    signer = DkimSigner(DkimPolicy("eob.example.com", "eob1", key_file))
    for content in (eob_email(), eob_email("es", "Ana")):
        signed = signer.sign(content)
        assert signed.startswith(b"DKIM-Signature:") and signed.endswith(content)
        # dkimpy verifies what OpenSSL signed: headers (relaxed) and body (simple).
        assert dkim.verify(signed, dnsfunc=dns)
        assert b"c=relaxed/simple" in signed
        in_header = signed.replace(b"Message-ID: <m1@", b"Message-ID: <m2@")
        # The attachment swapped for another of the same length.
        in_body = signed.replace(
            base64.b64encode(b"%PDF-1.4 test"), base64.b64encode(b"%PDF-1.4 evil")
        )
        assert in_header != signed and not dkim.verify(in_header, dnsfunc=dns)
        assert in_body != signed and not dkim.verify(in_body, dnsfunc=dns)


def test_without_a_key_the_message_is_unchanged():
    content = eob_email()
    assert DkimSigner(DkimPolicy("eob.example.com", "eob1", None)).sign(content) == content
