"""Whole-pipeline throughput: statements from a dropped extract to accepted messages at the
local TLS sink, against a baseline of bare aiosmtplib sends of the same messages (TLS, one
connection per IP, no ledger, no rendering) to the same sink in the same process.

Usage: python benchmarks/end_to_end.py [MEMBERS]   (default 1000; eight claim lines each)
"""

from __future__ import annotations

import asyncio
import mailbox
import resource
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

from pipeline.config import Settings
from pipeline.delivery.policy import policy_for
from pipeline.delivery.send import tls_context
from pipeline.ops.demo import free_port
from pipeline.ops.sink import start_sink
from pipeline.ops.synthetic import generate_extract
from pipeline.runner import STAGES, run_stage, start_run


async def bare_send(settings: Settings, messages: list[bytes]) -> None:
    async def over(ip: str, batch: list[bytes]) -> None:
        client = aiosmtplib.SMTP(hostname=settings.smtp_host, port=settings.smtp_port,
                                 source_address=(ip, 0), start_tls=True,
                                 tls_context=tls_context(settings.ca_file))  # fmt: skip
        async with client:
            for content in batch:
                await client.sendmail("bounces@b.example", ["baseline@example.org"], content)

    ips = [ip.address for ip in policy_for(settings).pool]
    await asyncio.gather(*(over(ip, messages[i :: len(ips)]) for i, ip in enumerate(ips)))


def main() -> None:
    members = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        settings = Settings(data_dir=data_dir, smtp_port=free_port("127.0.0.1"))
        drop = Path(tmp) / "landing"
        (drop / "bench").mkdir(parents=True)
        # Eight lines per member; no defects, so every member gets a message.
        generate_extract(drop / "bench" / "extract.csv", members * 8, bad_share=0.0)
        with start_sink(settings.smtp_host, settings.smtp_port, data_dir):
            seconds: dict[str, float] = {}
            started = time.perf_counter()
            run_id = start_run(settings, drop)
            for stage in STAGES:
                stage_started = time.perf_counter()
                counts = run_stage(settings, run_id, stage)
                seconds[stage] = time.perf_counter() - stage_started
                if stage == "send":
                    accepted = counts["accepted"]
            ours = time.perf_counter() - started

            sent = list(mailbox.Maildir(settings.sink_maildir, create=False))
            copies = [bytes(m) for m in sent]
            started = time.perf_counter()
            asyncio.run(bare_send(settings, copies))
            baseline = time.perf_counter() - started

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    slowest = ", ".join(
        f"{s} {t:.1f}s" for s, t in sorted(seconds.items(), key=lambda x: -x[1])[:3]
    )
    print(
        f"end to end: {accepted / ours:,.1f} messages/s ({accepted:,} accepted in {ours:.1f} s; "
        f"slowest: {slowest}); bare TLS send baseline {len(copies) / baseline:,.1f} messages/s; "
        f"ratio {ours / len(copies) / (baseline / len(copies)):.1f}x; peak RSS {peak_mb:,.0f} MB"
    )


if __name__ == "__main__":
    main()
