"""Render throughput: typical statements (3-8 lines) from the statement model to encrypted PDFs
on disk, over processes by shard, against a bare reportlab canvas drawing the same text.

The baseline gets the same statements, the same processes and shards and the same disk: per
statement it draws every string our document shows (header, address, summary, each line's
cells and notes, totals, every notice) with canvas.drawString at fixed positions, breaking
long text at a fixed character count, and writes a plain PDF. It is the floor: no measuring,
no wrapping, no tables, no encryption.

Prints one line: EOB/s, pages, the baseline's EOB/s, our cost per document over the baseline's,
peak RSS of this process and of the largest worker.
Usage: python benchmarks/render.py [STATEMENTS] [PROCESSES]   (default 2000, 2)
"""

from __future__ import annotations

import random
import resource
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

from reportlab.lib.pagesizes import LETTER
from reportlab.pdfgen.canvas import Canvas

from pipeline.documents.codes import load_code_book
from pipeline.documents.page import BRANDING
from pipeline.documents.render import render_all
from pipeline.documents.statements import Accumulator, LineStatus, Member, Statement, StatementLine
from pipeline.documents.wording import format_money, wording_for
from pipeline.records.atrest import load_keyring

PROVIDERS = ["Valley Medical Group", "Sunrise Physical Therapy", "Valley Imaging Center",
             "Northside Family Practice and Urgent Care", "Clínica Núñez & Hijos"]  # fmt: skip
SERVICES = [("99213", "Office visit, established patient"), ("80053", "Metabolic panel"),
            ("73721", "MRI of knee"), ("97110", None), ("85025", "Blood count")]  # fmt: skip
CODES = [(), ("CO-45",), ("CO-45", "PR-1"), ("PR-2",), ("CO-97", "M15"), ("CO-197", "N130")]


def typical_statements(count: int, seed: int = 7) -> list[Statement]:
    rng = random.Random(seed)
    statements = []
    for n in range(count):
        member = Member(f"B{n:09d}", "Ana María", "Pérez", f"{n} Avenida de la Constitución",
                        "San José", "CA", "95112", "member@example.org", date(1980, 3, 4),
                        "es" if n % 5 == 0 else "en")  # fmt: skip
        lines = []
        for number in range(rng.randint(3, 8)):
            code, description = rng.choice(SERVICES)
            billed = Decimal(rng.randint(5000, 90000)) / 100
            allowed = (billed * Decimal("0.7")).quantize(Decimal("0.01"))
            owe = (allowed * Decimal("0.2")).quantize(Decimal("0.01"))
            status = LineStatus.DENIED if rng.random() < 0.05 else LineStatus.PAID
            lines.append(StatementLine(
                f"K{n:08d}", number + 1, date(2026, 10, 1) + timedelta(days=rng.randint(0, 29)),
                rng.choice(PROVIDERS), code, description, billed, allowed, allowed - owe, owe,
                status=status, coinsurance=owe, adjustment_codes=rng.choice(CODES),
            ))  # fmt: skip
        lines.sort(key=lambda line: line.service_date)
        statements.append(Statement(
            f"s{n:024x}", member, lines[0].service_date, lines[-1].service_date, tuple(lines),
            deductible=Accumulator(Decimal("1500.00"), Decimal("400.00")),
            out_of_pocket=Accumulator(Decimal("6000.00"), Decimal("900.00")),
        ))  # fmt: skip
    return statements


def document_text(statement: Statement, plan_name: str) -> list[str]:
    """Every string the document shows, in reading order (markup left in: same glyph count)."""
    w = wording_for(statement.member.language)
    m = statement.member
    book = load_code_book(w.language_tag[:2])
    phone = BRANDING.member_services_phone
    text = [plan_name, w.title, w.statement_id.format(statement_id=statement.statement_id),
            w.period.format(start=statement.period_start, end=statement.period_end),
            f"{m.first_name} {m.last_name}", m.address_line, f"{m.city}, {m.state} {m.postal_code}",
            w.summary.format(amount=format_money(statement.total_member_responsibility)),
            w.not_a_bill, w.summary_note, w.claims_heading]  # fmt: skip
    for line in statement.lines:
        text.append(" ".join([
            line.service_date.strftime(w.date_format), line.provider_name, line.procedure_code,
            line.service_description or w.generic_service, format_money(line.billed_amount),
            format_money(line.allowed_amount), format_money(line.plan_paid),
            format_money(line.member_responsibility), " ".join(line.adjustment_codes),
        ]))  # fmt: skip
    text.append(f"{w.totals_label} {format_money(statement.total_billed)}")
    text += [f"{code}: {book.explain(code)}" for code in statement.adjustment_codes]
    text += [w.appeal_rights, w.contact.format(plan_name=plan_name, phone=phone, website=""),
             w.nondiscrimination.format(plan_name=plan_name, phone=phone),
             *w.taglines.format(phone=phone).splitlines()]  # fmt: skip
    return text


def bare_canvas_shard(statements: Sequence[Statement], out_dir: Path, plan_name: str) -> int:
    for statement in statements:
        canvas = Canvas(str(out_dir / f"{statement.statement_id}.pdf"), pagesize=LETTER)
        y = 720.0
        for paragraph in document_text(statement, plan_name):
            for piece in textwrap.wrap(paragraph, 110) or [""]:
                if y < 60:
                    canvas.showPage()
                    y = 720.0
                canvas.setFont("Helvetica", 9)
                canvas.drawString(54, y, piece)
                y -= 11
        canvas.showPage()
        canvas.save()
    return len(statements)


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of this process and its finished workers (other work on
    the machine inflates the first, much less the second)."""
    cpu_before = _cpu()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started, _cpu() - cpu_before


def _cpu() -> float:
    own, workers = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    processes = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    statements = typical_statements(count)
    # The runner's shard size; smaller for small runs so that every process gets work.
    shard_size = min(200, -(-count // (2 * processes)))
    shards = [statements[i : i + shard_size] for i in range(0, count, shard_size)]
    plan = "Example Health Plan"
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, base_dir = Path(tmp) / "ours", Path(tmp) / "bare"
        ours_dir.mkdir()
        base_dir.mkdir()
        keyring = load_keyring(Path(tmp) / "data")

        def ours() -> None:
            done = render_all(statements, plan_name=plan, out_dir=ours_dir, keyring=keyring,
                              workers=processes, shard_size=shard_size)  # fmt: skip
            pages.extend(r.pages for shard in done for r in shard)

        def baseline() -> None:
            with ProcessPoolExecutor(processes) as pool:
                list(pool.map(bare_canvas_shard, shards, [base_dir] * len(shards),
                              [plan] * len(shards)))  # fmt: skip

        pages: list[int] = []
        base_seconds, base_cpu = timed(baseline)
        our_seconds, our_cpu = timed(ours)
        assert len(pages) == count and len(list(ours_dir.glob("*.pdf"))) == count

    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"render: {count / our_seconds:,.0f} EOB/s ({count:,} statements, {sum(pages):,} pages, "
        f"{min(pages)}-{max(pages)} per EOB, {processes} processes, encrypted to disk); "
        f"bare canvas baseline {count / base_seconds:,.0f} EOB/s; "
        f"ratio {our_seconds / base_seconds:.1f}x cost per EOB; CPU per EOB "
        f"{our_cpu / count * 1000:.1f} ms vs {base_cpu / count * 1000:.1f} ms "
        f"({our_cpu / base_cpu:.1f}x); peak RSS {parent_mb:,.0f} MB "
        f"parent, {worker_mb:,.0f} MB largest worker"
    )


if __name__ == "__main__":
    main()
