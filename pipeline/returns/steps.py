"""Returns' steps bound to the ledger: collect and parse the return path, reconcile bounces."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.delivery.policy import policy_for
from pipeline.delivery.steps import providers_of
from pipeline.records.ledger.models import (
    Bounce,
    Message,
)
from pipeline.records.run_context import LedgerContext
from pipeline.returns import bounces, cases, collect, deadlines, reconcile


def collect_bounces(ctx: LedgerContext) -> dict[str, int]:
    counts = {"reports": 0, "matched": 0, "unmatched": 0, "already_seen": 0}
    source = collect.source_from(ctx.settings.return_path_source, ctx.settings.return_path_maildir)
    archive = collect.Archive.in_data_dir(ctx.settings.data_dir, ctx.keyring)
    for item in source.messages():
        # The ledger, not the archive, says whether a report was processed: a report archived
        # by a run that then failed before its commit is processed again, never skipped.
        with ctx.sessions.begin() as session:
            known = select(Bounce.bounce_id).where(Bounce.raw_sha256 == item.sha256).limit(1)
            if session.scalar(known) is not None:
                counts["already_seen"] += 1
            else:
                for report in bounces.parse_report(
                    item.raw, return_path_domain=ctx.settings.return_path_domain
                ):
                    matched = _record_report(session, report, item.sha256)
                    counts["reports"] += 1
                    counts["matched" if matched else "unmatched"] += 1
                archive.keep(item)  # last: a failure here rolls the rows back
        source.mark_processed(item.ref)
    return counts


def _record_report(session: Session, report: bounces.BounceReport, sha256: str) -> bool:
    """Match VERP first, else the returned Message-ID; unmatched ones wait for review."""
    message_id, matched_by = None, "none"
    if report.message_token and session.get(Message, report.message_token):
        message_id, matched_by = report.message_token, "verp"
    elif report.original_message_id:
        local = report.original_message_id.partition("@")[0]
        if session.get(Message, local):
            message_id, matched_by = local, "message_id"
    session.add(
        Bounce(
            dedupe_key=report.dedupe_key,
            message_id=message_id,
            received_at=datetime.now(UTC),
            bounce_class=report.bounce_class,
            status_code=report.status,
            diagnostic=report.diagnostic,
            recipient=report.recipient,
            kind=report.kind,
            matched_by=matched_by,
            raw_sha256=sha256,
        )
    )
    return message_id is not None


def reconcile_bounces(ctx: LedgerContext) -> dict[str, int]:
    policy = reconcile.load_policy()
    counts = {"bounces": 0, "resend_cases_opened": 0}
    with ctx.sessions.begin() as session:
        for bounce in session.scalars(select(Bounce).where(Bounce.reconciled.is_(False))).all():
            counts["bounces"] += 1
            counts["resend_cases_opened"] += reconcile.reconcile_bounce(session, bounce, policy)
        rates = reconcile.monitor_bounce_rates(session, policy)
        # Failures no bounce settled in time get a case, overdue cases go to print.
        swept = deadlines.sweep(session, policy)
    return counts | {f"bounce_rate_{level}": n for level, n in rates.items()} | swept


def plan_resends(ctx: LedgerContext) -> dict[str, int]:
    """Approved verify-before-resend cases become new attempts (delivery's planner)."""
    policy = policy_for(ctx.settings)
    with ctx.sessions.begin() as session:
        planned = cases.plan_approved_resends(
            session,
            policy,
            providers_of=lambda addresses: providers_of(policy, addresses),
        )
    return {"resends_planned": planned}
