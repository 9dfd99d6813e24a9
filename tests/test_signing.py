"""DKIM: a signed EOB email verifies against the selector's public key; no key, no signature."""

from __future__ import annotations

import base64
import email.policy
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pipeline.compose import compose_eob_email
from pipeline.policy import DkimPolicy
from pipeline.signing import DkimSigner


def eob_email() -> bytes:
    message = compose_eob_email(message_id="m1", statement_id="s1", recipient="r@example.org",
                                from_address="statements@eob.example.com", plan_name="Plan",
                                pdf=b"%PDF-1.4 test")  # fmt: skip
    return message.as_bytes(policy=email.policy.SMTP)


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

    signed = DkimSigner(DkimPolicy("eob.example.com", "eob1", key_file)).sign(eob_email())
    assert signed.startswith(b"DKIM-Signature:")
    assert dkim.verify(signed, dnsfunc=dns)
    assert not dkim.verify(signed.replace(b"Your Explanation", b"Our Explanation"), dnsfunc=dns)


def test_without_a_key_the_message_is_unchanged():
    content = eob_email()
    assert DkimSigner(DkimPolicy("eob.example.com", "eob1", None)).sign(content) == content
