"""Optional password protection of the emailed PDF (AES-256, PDF 2.0 encryption via pypdf).

The password follows a rule the member can work out from what they know, named by the
`pdf_password` setting; the email tells them the rule (templates/email.<language>.toml), never
the password.
"""

from __future__ import annotations

import io
import secrets

from pypdf import PdfReader, PdfWriter

from pipeline.documents.statements import Member


def pdf_password(member: Member, rule: str) -> str | None:
    """The member's password under the rule; None when the member lacks the data it needs
    (the PDF then goes unprotected rather than locked with a password nobody knows)."""
    birth = member.date_of_birth
    if birth is None:
        return None
    if rule == "date_of_birth":
        return birth.strftime("%m%d%Y")
    if rule == "postal_code_and_birth_year":
        return f"{member.postal_code.strip()[:5]}{birth:%Y}"
    raise ValueError(f"unknown pdf_password rule {rule!r}")


def protect_pdf(pdf: bytes, password: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    # The owner password is random and discarded: nobody needs to change the document's rights.
    writer.encrypt(
        user_password=password, owner_password=secrets.token_hex(16), algorithm="AES-256"
    )
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
