"""A real MTA's DSN: our own Postfix instance relays to a test server that rejects the
recipient, and Postfix writes its own RFC 3464 bounce into the return-path maildir.

The instance is private: config, queue and data directories in a temp dir, listening on
127.0.0.30 only (127.0.0.20-29 belong to another test suite), log to stdout.
"""

from __future__ import annotations

import mailbox
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.ops.demo import free_port
from pipeline.records.atrest import load_keyring
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import AuditEvent, Bounce, Message, ResendCase
from pipeline.records.ledger.states import CaseState, MessageState
from pipeline.returns import cases, reconcile
from pipeline.returns.collect import Archive
from pipeline.runner import STAGES, deliver, finish_run, returns, run_stage, start_run
from tests.conftest import sample_drop, wait_for_listener

POSTFIX = "/usr/sbin/postfix"
pytestmark = pytest.mark.skipif(
    not Path(POSTFIX).exists() or os.geteuid() != 0, reason="needs Debian postfix, run as root"
)
MTA_IP, NEXT_HOP_IP = "127.0.0.30", "127.0.0.31"
REJECTED = {"mei.chen@example.net", "kwame.asante@example.net"}
NEW_ADDRESS = "mei.chen.verified@example.org"


class NextHop:
    """The recipient's server: rejects REJECTED at RCPT with 550 5.1.1, keeps the rest."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.lower() in REJECTED:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        self.received.append((str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 2.0.0 queued"


@dataclass
class PostfixInstance:
    port: int
    ca_file: Path
    next_hop: NextHop


def _main_cf(base: Path, cert: Path, key: Path, next_hop_port: int, returnpath_base: Path) -> str:
    nobody = 65534
    return f"""
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = /dev/stdout
# 127.0.0.30 is not an interface address; smtpd binds it explicitly in master.cf.
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = mta.eob.test
mydomain = eob.test
myorigin = $myhostname
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [{NEXT_HOP_IP}]:{next_hop_port}
smtp_bind_address = {MTA_IP}
smtp_host_lookup = native
smtp_dns_support_level = disabled
smtputf8_enable = no
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
virtual_mailbox_domains = bounces.eob.example.com
virtual_mailbox_base = {returnpath_base}
virtual_mailbox_maps = static:returnpath/
virtual_uid_maps = static:{nobody}
virtual_gid_maps = static:{nobody}
virtual_minimum_uid = 100
bounce_queue_lifetime = 0
maximal_queue_lifetime = 1h
"""


def _master_cf(port: int) -> str:
    """Debian's master.cf without chroot, with smtpd on our address and port only."""
    lines = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"{MTA_IP}:{port}"
            fields[4] = "n"  # no chroot: the instance's files are in a temp dir
            line = " ".join(fields)
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture
def postfix(returnpath_base: Path) -> Iterator[PostfixInstance]:
    base = Path(tempfile.mkdtemp(prefix="eob-postfix-"))
    base.chmod(0o755)
    conf = base / "conf"
    conf.mkdir()
    # postfix check creates the queue's subdirectories; the roots must exist.
    (base / "queue").mkdir()
    (base / "data").mkdir()
    owner = pwd.getpwnam("postfix")
    os.chown(base / "data", owner.pw_uid, owner.pw_gid)
    ca = trustme.CA()
    server = ca.issue_cert(MTA_IP, "localhost")
    cert, key, ca_file = conf / "cert.pem", conf / "key.pem", base / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    ca.cert_pem.write_to_path(str(ca_file))
    next_hop = NextHop()
    hop_port = free_port(NEXT_HOP_IP)
    controller = Controller(next_hop, hostname=NEXT_HOP_IP, port=hop_port)
    controller.start()
    port = free_port(MTA_IP)
    (conf / "main.cf").write_text(_main_cf(base, cert, key, hop_port, returnpath_base))
    (conf / "master.cf").write_text(_master_cf(port))
    log = (base / "postfix.log").open("wb")
    process = subprocess.Popen([POSTFIX, "-c", str(conf), "start-fg"], stdout=log, stderr=log)
    try:
        wait_for_listener(MTA_IP, port, process, base / "postfix.log")
        yield PostfixInstance(port, ca_file, next_hop)
    finally:
        subprocess.run([POSTFIX, "-c", str(conf), "stop"], capture_output=True, timeout=60)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        controller.stop()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def returnpath_base() -> Iterator[Path]:
    """A data directory the virtual delivery agent (as nobody) can reach."""
    base = Path(tempfile.mkdtemp(prefix="eob-data-"))
    base.chmod(0o755)
    maildir = base / "returnpath"
    mailbox.Maildir(maildir, create=True)
    for path in (maildir, *maildir.iterdir()):
        os.chown(path, 65534, 65534)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _wait_for_reports(maildir: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(mailbox.Maildir(maildir, create=False)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(mailbox.Maildir(maildir))} of {count} DSNs arrived")
        time.sleep(0.3)


def _run(settings: Settings, drop: Path, *, before_bounces=lambda: None) -> str:
    run_id = start_run(settings, drop)
    for stage in STAGES:
        if stage == "bounces":
            before_bounces()
        run_stage(settings, run_id, stage)
    finish_run(settings, run_id)
    return run_id


def test_postfix_dsn_to_resend(postfix: PostfixInstance, returnpath_base: Path, tmp_path: Path):
    settings = Settings(
        data_dir=returnpath_base,
        smtp_host=MTA_IP,
        smtp_port=postfix.port,
        tls_ca_file=str(postfix.ca_file),
    )
    drop = sample_drop(tmp_path)
    maildir = settings.return_path_maildir
    first = _run(settings, drop, before_bounces=lambda: _wait_for_reports(maildir, len(REJECTED)))

    # Postfix, not our code, wrote these reports. Once processed they are gone from the
    # maildir; their encrypted archive copies are the record.
    assert list(mailbox.Maildir(maildir, create=False)) == []
    archive = Archive.in_data_dir(settings.data_dir, load_keyring(settings.data_dir))
    raw = [archive.read_file(path) for path in archive.directory.glob("*.eml.enc")]
    assert len(raw) == len(REJECTED)
    for report in raw:
        assert b"Reporting-MTA: dns; mta.eob.test" in report
        assert b"X-Postfix-Queue-ID:" in report
        assert b"<MAILER-DAEMON@mta.eob.test>" in report
    sessions = open_ledger(settings.ledger_url)
    with sessions.begin() as session:
        bounced = session.scalars(
            select(Message).where(Message.recipient == "mei.chen@example.net")
        ).one()
        bounce = session.scalars(
            select(Bounce).where(Bounce.message_id == bounced.message_id)
        ).one()
        assert (bounce.kind, bounce.matched_by, bounce.bounce_class, bounce.status_code) == (
            "dsn",
            "verp",
            "hard_bounce",
            "5.1.1",
        )
        assert bounced.state == MessageState.BOUNCED
        case_id = reconcile.case_id_for(bounced.message_id)
        cases.verify(
            session,
            case_id,
            actor="alice",
            channel="secure_sms",
            evidence="member replied to a secure SMS",
            address=NEW_ADDRESS,
        )
        cases.approve(session, case_id, actor="bob")
    accepted_before = len(postfix.next_hop.received)

    # No new drop: the returns loop plans the approved resend, the deliver loop sends it.
    assert returns(settings)["resends_planned"] == 1
    deliver(settings)
    # Relayed once by Postfix to the next hop, to the verified address only.
    deadline = time.monotonic() + 30
    while len(postfix.next_hop.received) == accepted_before and time.monotonic() < deadline:
        time.sleep(0.2)
    new = postfix.next_hop.received[accepted_before:]
    assert [rcpts for _, rcpts, _ in new] == [[NEW_ADDRESS]]
    with sessions() as session:
        resend = session.scalars(select(Message).where(Message.case_id == case_id)).one()
        assert (resend.run_id, resend.attempt, resend.state) == (first, 2, MessageState.ACCEPTED)
        assert f"{resend.message_id}@".encode() in new[0][2]
        assert session.get_one(ResendCase, case_id).state == CaseState.RESENT
        actions = {e.action for e in session.scalars(select(AuditEvent))}
        assert {"resend_case_opened", "case_verified", "case_approved", "resend_planned"} <= actions
