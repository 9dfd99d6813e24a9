"""Send-stage throughput into a real local Postfix, against Postfix's own smtp-source.

Our side: the send stage of the runner (ledger group commits, composing each EOB email with a
~40 KB PDF, DKIM signing, STARTTLS with certificate verification) over 4 source IPs
(127.0.0.20-23). Baseline, same run, same server: smtp-source (C, plain SMTP, 32 sessions) with
messages of the same size. The Postfix instance is private (its own config, queue and data
directories under a temp dir), listens on 127.0.0.28 only, offers STARTTLS and discards what it
accepts. A second, throttled run checks each IP's achieved rate against its configured rate.

Usage: python benchmarks/send_postfix.py [MESSAGES] [THROTTLED_RATE_PER_IP]
       (defaults 100000 and 3 messages/s; needs root and Debian's postfix)
"""

from __future__ import annotations

import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from reportlab.lib.pagesizes import letter
from reportlab.pdfgen import canvas
from sqlalchemy import insert, select

from pipeline.config import Settings
from pipeline.delivery.plan import message_token
from pipeline.ops.sink import ensure_certificates
from pipeline.records.atrest import load_keyring, write_encrypted
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import InputFile, Message, Run, Statement, StateTransition
from pipeline.records.ledger.states import MessageState
from pipeline.runner import run_stage

REPO = Path(__file__).resolve().parent.parent
# The test servers' policy builder serves the benchmark too: one definition of a warmed policy.
sys.path.insert(0, str(REPO))
from tests.smtp_servers import policy_toml  # noqa: E402

POSTFIX_HOST = "127.0.0.28"
IPS = ("127.0.0.20", "127.0.0.21", "127.0.0.22", "127.0.0.23")
MESSAGE_BYTES = 40 * 1024


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def start_postfix(tmp: Path, port: int, cert: Path, key: Path) -> subprocess.Popen[bytes]:
    # inet_interfaces cannot name 127.0.0.28 (not an interface address): the one listener is
    # bound to it in master.cf instead; nothing listens on inet_interfaces.
    tmp.chmod(0o755)  # the postfix user must reach its data directory
    conf = tmp / "postfix-conf"
    shutil.copytree("/etc/postfix", conf)
    # Debian's "No configuration" install has no main.cf: start from Postfix's defaults.
    (conf / "main.cf").write_text("")
    settings = {
        "queue_directory": tmp / "queue", "data_directory": tmp / "data",
        "maillog_file": "/dev/stdout", "inet_interfaces": "loopback-only", "inet_protocols": "ipv4",
        "myhostname": "bench.eob.test", "mydestination": "", "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject", "alias_maps": "",
        "alias_database": "", "local_recipient_maps": "", "relayhost": "",
        "default_transport": "discard", "relay_transport": "discard",
        "local_transport": "discard", "disable_dns_lookups": "yes",
        "smtpd_tls_cert_file": cert, "smtpd_tls_key_file": key,
        "smtpd_tls_security_level": "may", "smtpd_tls_loglevel": "0",
        "smtpd_client_connection_count_limit": "0", "default_process_limit": "200",
        "smtpd_client_connection_rate_limit": "0", "compatibility_level": "3.6",
    }  # fmt: skip
    subprocess.run(["postconf", "-c", conf, "-e", *(f"{k}={v}" for k, v in settings.items())],
                   check=True)  # fmt: skip
    subprocess.run(["postconf", "-c", conf, "-F", "*/*/chroot = n"], check=True)
    master = (conf / "master.cf").read_text()
    (conf / "master.cf").write_text(
        re.sub(r"^smtp\s+inet", f"{POSTFIX_HOST}:{port} inet", master, count=1, flags=re.M)
    )
    (tmp / "queue").mkdir()
    (tmp / "data").mkdir()
    shutil.chown(tmp / "data", "postfix")
    subprocess.run(["postfix", "-c", conf, "check"], check=True)
    with (tmp / "maillog").open("wb") as maillog:
        server = subprocess.Popen(["postfix", "-c", conf, "start-fg"], stdout=maillog,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection((POSTFIX_HOST, port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    tail = (tmp / "maillog").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"postfix did not listen:\n{tail}")


def stop_postfix(tmp: Path, server: subprocess.Popen[bytes]) -> None:
    subprocess.run(["postfix", "-c", tmp / "postfix-conf", "stop"], check=False,
                   capture_output=True)  # fmt: skip
    server.wait(timeout=60)


def smtp_source(port: int, count: int) -> float:
    """Messages per second that Postfix's own C client pushes in plain SMTP."""
    started = time.perf_counter()
    subprocess.run(["smtp-source", "-c", "-s", "32", "-l", str(MESSAGE_BYTES), "-m", str(count),
                    "-f", "bench@eob.example.com", "-t", "member@example.org",
                    f"{POSTFIX_HOST}:{port}"], check=True, capture_output=True)  # fmt: skip
    return count / (time.perf_counter() - started)


def cpu_seconds() -> float:
    """This process's CPU time, user and system: the measure that other load on a shared
    machine distorts least."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def forty_kb_pdf(path: Path) -> None:
    """A real PDF of about 40 KB (uncompressed text pages, like a long statement)."""
    pdf = canvas.Canvas(str(path), pagesize=letter, pageCompression=0)
    for page in range(9):
        for line in range(50):
            pdf.drawString(40, 750 - line * 14, f"Claim line {page}.{line}: service, billed, "
                           "allowed, plan paid, you owe — synthetic benchmark text")  # fmt: skip
        pdf.showPage()
    pdf.save()


def policy_file(tmp: Path, key_file: Path, rate: float, connections: int) -> Path:
    path = tmp / f"sending-{rate}.toml"
    path.write_text(policy_toml(IPS, connections, rate_per_ip=rate, messages_per_connection=1000,
                                dkim_key_file=str(key_file)))  # fmt: skip
    return path


def seed(settings: Settings, run_id: str, count: int, pdf: Path) -> None:
    """`count` planned messages over the IPs, each with its statement and the PDF."""
    sessions = open_ledger(settings.ledger_url)
    # Encrypted at rest and bound to its statement, as the render stage leaves each PDF.
    pdf_dir = settings.runs_dir / run_id / "pdf"
    pdf_dir.mkdir(parents=True)
    plaintext, keyring = pdf.read_bytes(), load_keyring(settings.data_dir)
    for n in range(count):
        write_encrypted(pdf_dir / f"{run_id}-{n}.pdf", plaintext, keyring, f"{run_id}-{n}")
    now = datetime.now(UTC)
    with sessions.begin() as session:
        session.add(Run(run_id=run_id, started_at=now, drop="bench"))
        session.flush()
        session.add(
            InputFile(sha256=run_id.ljust(64, "0"), file_name="f.csv", insurer="bench",
                      size_bytes=1, run_id=run_id, registered_at=now, status="validated")
        )  # fmt: skip
        session.flush()
        file_id = session.scalars(select(InputFile.file_id).where(InputFile.run_id == run_id)).one()
        statements = [dict(statement_id=f"{run_id}-{n}", run_id=run_id, file_id=file_id,
                           member_id=f"B{n}", channel="email", email=f"member{n}@example.org",
                           claim_lines=1, member_owes=0, pdf_path=f"pdf/{run_id}-{n}.pdf")
                      for n in range(count)]  # fmt: skip
        session.execute(insert(Statement), statements)
        session.execute(insert(Message), [
            dict(message_id=message_token(s["statement_id"], 1), statement_id=s["statement_id"],
                 run_id=run_id, attempt=1, recipient=s["email"], source_ip=IPS[n % len(IPS)],
                 ehlo_name=f"mta{n % len(IPS)}.eob.example.com", provider="default",
                 send_day=now.date(), state=MessageState.PLANNED, created_at=now, updated_at=now)
            for n, s in enumerate(statements)
        ])  # fmt: skip


def per_ip_rates(settings: Settings, run_id: str) -> dict[str, float]:
    """Achieved messages per second per source IP, from the times their claims were committed
    (`sending`): a claim is committed right after the IP's token bucket lets the message go,
    just before its SMTP transaction. (A result is committed later, with the connection's next
    claim, so its time says when it was recorded rather than when the server replied.)"""
    with open_ledger(settings.ledger_url)() as session:
        rows = session.execute(
            select(Message.source_ip, StateTransition.at)
            .join(StateTransition, StateTransition.entity_id == Message.message_id)
            .where(Message.run_id == run_id, StateTransition.to_state == MessageState.SENDING)
        ).all()
    times: dict[str, list[datetime]] = defaultdict(list)
    for ip, at in rows:
        times[ip].append(at)
    return {ip: (len(t) - 1) / (max(t) - min(t)).total_seconds() for ip, t in sorted(times.items())}


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    throttled_rate = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        certs = ensure_certificates(tmp / "certs", POSTFIX_HOST)
        shutil.chown(certs.key_file, "postfix")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        dkim_key = tmp / "dkim.pem"
        dkim_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))  # fmt: skip
        forty_kb_pdf(tmp / "eob.pdf")
        port = free_port(POSTFIX_HOST)
        server = start_postfix(tmp, port, certs.cert_file, certs.key_file)
        try:
            baseline = smtp_source(port, count)
            fast = policy_file(tmp, dkim_key, 1e6, 8)
            settings = Settings(data_dir=tmp / "eob", smtp_host=POSTFIX_HOST, smtp_port=port,
                                tls_ca_file=str(certs.ca_file),
                                sending_policy_file=str(fast))  # fmt: skip
            seed(settings, "bench", count, tmp / "eob.pdf")
            started, cpu_started = time.perf_counter(), cpu_seconds()
            counts = run_stage(settings, "bench", "send")
            ours = counts["accepted"] / (time.perf_counter() - started)
            cpu_ms = (cpu_seconds() - cpu_started) / counts["accepted"] * 1000
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            throttled = Settings(data_dir=tmp / "eob", smtp_host=POSTFIX_HOST, smtp_port=port,
                                 tls_ca_file=str(certs.ca_file), sending_policy_file=str(
                                     policy_file(tmp, dkim_key, throttled_rate, 2)))  # fmt: skip
            seed(throttled, "throttled", int(throttled_rate * len(IPS) * 20), tmp / "eob.pdf")
            run_stage(throttled, "throttled", "send")
            rates = per_ip_rates(throttled, "throttled")
        finally:
            stop_postfix(tmp, server)
    per_ip = " ".join(f"{ip}={rate:.2f}/{throttled_rate:g}({rate / throttled_rate - 1:+.1%})"
                      for ip, rate in rates.items())  # fmt: skip
    print(f"send stage into Postfix: {ours:.0f} msg/s ({counts['accepted']}/{count} accepted, "
          f"~40 KB PDF, STARTTLS+DKIM, 4 IPs); smtp-source baseline {baseline:.0f} msg/s "
          f"(plain, {MESSAGE_BYTES // 1024} KB); ratio {ours / baseline:.2f}; our CPU "
          f"{cpu_ms:.2f} ms/message; peak RSS "
          f"{peak_mib:.0f} MiB; throttled per-IP achieved/configured msg/s: {per_ip}")  # fmt: skip


if __name__ == "__main__":
    main()
