"""The bounces stage collecting from a real IMAP server: a private Dovecot on loopback.

Dovecot (Debian's dovecot-imapd, installed by .ci/run) runs from its own configuration in a
temporary directory: IMAPS only, on a free port, with a certificate from a test CA, one user
in a passwd file. Reports are appended over IMAP as a mail server would deliver them.
"""

from __future__ import annotations

import dataclasses
import imaplib
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from pipeline.config import Settings
from pipeline.errors import ReturnPathError
from pipeline.ops.demo import free_port
from pipeline.ops.sink import delivery_status_notification
from pipeline.records.verp import verp_return_path
from pipeline.returns.collect import ImapSource
from pipeline.runner import run_stage, start_run
from tests.conftest import sample_drop, wait_for_listener

DOVECOT = Path("/usr/sbin/dovecot")
HOST = "127.0.0.1"
USER, PASSWORD = "bounces", "imap-test-password"

needs_dovecot = pytest.mark.skipif(not DOVECOT.exists(), reason="dovecot-imapd is not installed")


@dataclass(frozen=True)
class Imap:
    port: int
    ca_file: Path

    def client(self) -> imaplib.IMAP4_SSL:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        client = imaplib.IMAP4_SSL(HOST, self.port, ssl_context=context)
        client.login(USER, PASSWORD)
        client.select("INBOX")
        return client

    def deliver(self, raw: bytes) -> None:
        client = self.client()
        try:
            client.append("INBOX", None, None, raw)
        finally:
            client.logout()

    def unseen(self) -> int:
        client = self.client()
        try:
            _, data = client.uid("SEARCH", "UNSEEN")
            return len((data[0] or b"").split())
        finally:
            client.logout()


def _config(base: Path, port: int) -> str:
    # Dovecot refuses mail access as root: run as root, the mailbox belongs to its own user.
    mail_user = "dovecot" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    unprivileged = (
        ""
        if os.geteuid() == 0
        else f"default_login_user = {mail_user}\ndefault_internal_user = {mail_user}\n"
    )
    return f"""\
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = imap
listen = {HOST}
ssl = required
ssl_min_protocol = TLSv1.2
ssl_cert = <{base}/cert.pem
ssl_key = <{base}/key.pem
auth_mechanisms = plain
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {base}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_user} home={base}/home/%u
}}
mail_location = maildir:~/Maildir
first_valid_uid = {pwd.getpwnam(mail_user).pw_uid}
{unprivileged}service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
"""


@pytest.fixture
def dovecot() -> Iterator[Imap]:
    # Not under pytest's tmp_path: Dovecot's unprivileged processes must reach the home.
    base = Path(tempfile.mkdtemp(prefix="eob-dovecot-"))
    base.chmod(0o755)
    ca = trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    server.private_key_pem.write_to_path(str(base / "key.pem"))
    (base / "cert.pem").write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    (base / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    home = base / "home"
    home.mkdir()
    if os.geteuid() == 0:
        shutil.chown(home, "dovecot", "dovecot")
    port = free_port(HOST)
    (base / "dovecot.conf").write_text(_config(base, port))
    log = base / "dovecot.log"
    process = subprocess.Popen(
        [str(DOVECOT), "-F", "-c", str(base / "dovecot.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        log.touch()
        wait_for_listener(HOST, port, process, log)
        yield Imap(port, base / "ca.pem")
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def _dsn(token: str) -> bytes:
    return delivery_status_notification(
        verp_return_path(token, "bounces.eob.example.com"),
        ["gone@example.org"],
        b"Subject: s\r\n\r\nbody",
    ).as_bytes()


@needs_dovecot
def test_the_bounces_stage_reads_imap_once_and_marks_what_it_processed(
    dovecot: Imap, settings: Settings, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("EOB_IMAP_PASSWORD", PASSWORD)
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.ca_file))
    imap_settings = dataclasses.replace(
        settings, return_path_source=f"imaps://{USER}@{HOST}:{dovecot.port}/INBOX"
    )
    run_id = start_run(imap_settings, sample_drop(tmp_path))
    first = _dsn("mfirst")
    dovecot.deliver(first)
    dovecot.deliver(_dsn("msecond"))
    assert dovecot.unseen() == 2

    counts = run_stage(imap_settings, run_id, "bounces")
    assert (counts["reports"], counts["already_seen"]) == (2, 0)
    assert dovecot.unseen() == 0  # marked \Seen after processing
    assert run_stage(imap_settings, run_id, "bounces")["reports"] == 0

    # The same report delivered again is a new IMAP message but not a new report.
    dovecot.deliver(first)
    counts = run_stage(imap_settings, run_id, "bounces")
    assert (counts["reports"], counts["already_seen"]) == (0, 1)
    assert dovecot.unseen() == 0


@needs_dovecot
def test_an_imap_server_the_trust_store_does_not_know_is_refused(dovecot: Imap, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    source = ImapSource(HOST, USER, PASSWORD, "INBOX", dovecot.port)
    with pytest.raises(ReturnPathError, match="connect: SSLCertVerificationError") as refused:
        list(source.messages())
    assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)


@needs_dovecot
def test_a_missing_folder_is_a_named_error_not_a_search_in_the_wrong_state(
    dovecot: Imap, monkeypatch
):
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.ca_file))
    source = ImapSource(HOST, USER, PASSWORD, "Missing", dovecot.port)
    with pytest.raises(ReturnPathError, match=rf"{HOST}:{dovecot.port}: SELECT Missing: NO"):
        list(source.messages())


@pytest.mark.timeout(20)
def test_a_server_that_accepts_and_never_answers_times_out():
    # A TCP listener on loopback that never speaks: neither TLS nor an IMAP greeting comes.
    with socket.create_server(("127.0.0.31", 0)) as listener:
        port = listener.getsockname()[1]
        source = ImapSource("127.0.0.31", USER, PASSWORD, "INBOX", port, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(
            ReturnPathError, match=rf"127.0.0.31:{port}: connect: no answer within 1.0 s"
        ):
            list(source.messages())
        assert time.monotonic() - started < 5
