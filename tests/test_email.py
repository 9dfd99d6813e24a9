"""The EOB email: text and HTML bodies from templates, PHI only as configured, optional
AES-256 password on the PDF; and the whole pipeline sending them."""

from __future__ import annotations

import email
import email.policy
import io
import mailbox
import os
from dataclasses import replace
from datetime import date
from email.message import EmailMessage
from pathlib import Path

import pytest
from pypdf import PdfReader
from pypdf.errors import FileNotDecryptedError

from pipeline.config import Settings, load_settings
from pipeline.delivery.compose import compose_eob_email
from pipeline.documents.protect import pdf_password, protect_pdf
from pipeline.documents.render import render_statement
from pipeline.errors import ConfigError
from pipeline.ops.demo import free_port, unknown_mailboxes
from pipeline.ops.sink import start_sink
from pipeline.runner import run_all
from tests.conftest import sample_drop
from tests.test_render import MEMBER, line, statement

PDF = render_statement(statement([line(1)]), plan_name="Plan")[0]


def compose(**kwargs: object) -> EmailMessage:
    base: dict[str, object] = dict(
        message_id="m1", statement_id="s1", recipient="ana@example.com",
        from_address="statements@plan.example", plan_name="Example Health Plan", pdf=PDF,
    )  # fmt: skip
    raw = compose_eob_email(**{**base, **kwargs})  # type: ignore[arg-type]
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def bodies(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    # Text travels with CRLF line ends (canonical MIME); compare it with the templates' "\n".
    return tuple(part.get_content().replace("\r\n", "\n") for part in (text, html))  # type: ignore[return-value]


def test_text_and_html_bodies_carry_no_phi_by_default() -> None:
    message = compose()

    text, html = bodies(message)
    assert message["Subject"] == "Your Explanation of Benefits is ready"
    assert text.startswith("Hello,\n") and "<p>Hello,</p>" in html
    assert "This is not a bill" in text and "<strong>This is not a bill.</strong>" in html
    assert "password" not in text
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == PDF


def test_first_name_only_when_given_and_escaped_in_html() -> None:
    text, html = bodies(compose(first_name="Ana <María>"))
    assert text.startswith("Hello Ana <María>,\n")
    assert "Hello Ana &lt;María&gt;," in html and "<María>" not in html


def test_spanish_email_and_no_phi_in_its_subject() -> None:
    message = compose(language="es", first_name="Ana")
    text, html = bodies(message)
    assert message["Subject"] == "Su Explicación de Beneficios está lista"
    assert text.startswith("Hola, Ana:") and 'lang="es"' in html
    assert "Ana" not in message["Subject"]
    # A language without email wording falls back to English.
    assert compose(language="fr")["Subject"] == "Your Explanation of Benefits is ready"


def test_password_hint_names_the_rule_not_the_password() -> None:
    text, html = bodies(compose(password_rule="date_of_birth"))
    assert "your date of birth as eight digits" in text and "MMDDYYYY" in html
    assert "03041980" not in text


def test_message_is_well_formed_mime_with_the_pdf_intact_and_no_phi_in_headers() -> None:
    pdf = os.urandom(40_000)  # any bytes survive base64, whatever boundary-like runs they hold
    # A name that looks like a boundary line cannot end a part: quoted-printable escapes "=".
    first_name = "--=_eob_ Ana"
    raw = compose_eob_email(
        message_id="m1", statement_id="s1", recipient="ana@example.com",
        from_address="statements@plan.example", plan_name="Example Health Plan", pdf=pdf,
        language="es", first_name=first_name, password_rule="date_of_birth",
    )  # fmt: skip

    assert raw.count(b"\n") == raw.count(b"\r\n")  # CRLF only, ready for SMTP as it is
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    message = email.message_from_bytes(raw, policy=email.policy.default)
    parts = list(message.walk())
    assert [p.get_content_type() for p in parts] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html", "application/pdf",
    ]  # fmt: skip
    assert all(not p.defects for p in parts)
    assert message.keys() == ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version",
                              "Content-Type"]  # fmt: skip
    assert message["From"] == "Example Health Plan <statements@plan.example>"
    assert message["Message-ID"] == "<m1@plan.example>"
    assert message["Subject"] == "Su Explicación de Beneficios está lista"
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_filename() == "EOB-s1.pdf"
    assert attachment.get_content() == pdf
    text, html = bodies(message)
    assert text.startswith(f"Hola, {first_name}:") and "MMDDAAAA" in text
    assert "Ana" not in str(list(p.items() for p in parts))


def test_password_rules_and_aes256_protection() -> None:
    member = replace(MEMBER, date_of_birth=date(1980, 3, 4), postal_code="95112-1234")
    assert pdf_password(member, "date_of_birth") == "03041980"
    assert pdf_password(member, "postal_code_and_birth_year") == "951121980"
    assert pdf_password(replace(member, date_of_birth=None), "date_of_birth") is None

    protected = protect_pdf(PDF, "03041980")

    reader = PdfReader(io.BytesIO(protected))
    assert reader.is_encrypted
    encrypt = reader.trailer["/Encrypt"]
    assert (encrypt["/V"], encrypt["/R"]) == (5, 6)  # AES-256, PDF 2.0
    with pytest.raises(FileNotDecryptedError):
        reader.pages[0].extract_text()
    assert reader.decrypt("03041980")
    assert "Explanation of Benefits" in reader.pages[0].extract_text()
    assert not PdfReader(io.BytesIO(protected)).decrypt("12345678")


@pytest.mark.parametrize(
    ("name", "value"), [("EOB_EMAIL_BODY_PHI", "full_name"), ("EOB_PDF_PASSWORD", "ssn")]
)
def test_unknown_email_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"setting {name[4:].lower()}"):
        load_settings(environ={name: value})


def test_pipeline_sends_protected_pdfs_and_greets_by_first_name(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", smtp_port=free_port("127.0.0.1"),
        email_body_phi="first_name", pdf_password="date_of_birth", render_workers=2,
    )  # fmt: skip
    with start_sink(settings.smtp_host, settings.smtp_port, settings.data_dir, unknown_mailboxes()):
        _, summary = run_all(settings, sample_drop(tmp_path))

    delivered = list(mailbox.Maildir(settings.sink_maildir, create=False))
    assert len(delivered) == summary["messages_accepted"] > 0
    # James O'Connor, born 1971-11-02, in the sample drop.
    (james,) = [m for m in delivered if "jim.oconnor@example.org" in m["X-Sink-Rcpt"]]
    parsed = james.get_payload()
    text = parsed[0].get_payload()[0].get_payload(decode=True).decode()
    assert text.startswith("Hello James,")
    assert "James" not in james["Subject"]
    pdf = parsed[1].get_payload(decode=True)
    reader = PdfReader(io.BytesIO(pdf))
    assert reader.is_encrypted and reader.decrypt("11021971")
    assert "James O'Connor" in reader.pages[0].extract_text()
