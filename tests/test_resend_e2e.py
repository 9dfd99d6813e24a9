"""End to end: send, a real DSN comes back, reconcile, verify, approve, resend to the new
address by the returns and deliver loops with no new drop, received once, and the audit trail
tells the whole story.

The DSN here is the local sink's (RFC 3464, worded as Postfix words one); the same path with a
real Postfix writing the DSN is in test_postfix_dsn.py.
"""

from __future__ import annotations

import mailbox
from pathlib import Path

from sqlalchemy import select

from pipeline.config import Settings
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import AuditEvent, Bounce, Message, ResendCase, StateTransition
from pipeline.records.ledger.states import CaseState, MessageState
from pipeline.returns import cases, reconcile
from pipeline.runner import deliver, returns, run_all
from tests.conftest import sample_drop

NEW_ADDRESS = "mei.chen.verified@example.org"


def test_bounce_verify_approve_resend_once(sink: Settings, tmp_path: Path):
    drop = sample_drop(tmp_path)
    first_run, _ = run_all(sink, drop)
    sessions = open_ledger(sink.ledger_url)
    with sessions.begin() as session:
        bounced = session.scalars(
            select(Message).where(Message.recipient == "mei.chen@example.net")
        ).one()
        assert bounced.state == MessageState.BOUNCED
        bounce = session.scalars(
            select(Bounce).where(Bounce.message_id == bounced.message_id)
        ).one()
        assert (bounce.kind, bounce.matched_by, bounce.bounce_class) == (
            "dsn",
            "verp",
            "hard_bounce",
        )
        case_id = reconcile.case_id_for(bounced.message_id)
        cases.verify(
            session,
            case_id,
            actor="alice",
            channel="phone",
            evidence="member confirmed a new address by phone",
            address=NEW_ADDRESS,
        )
        cases.approve(session, case_id, actor="bob")

    # No new drop: the returns loop plans the approved resend, the deliver loop sends it.
    assert returns(sink)["resends_planned"] == 1
    sent = deliver(sink)
    assert (sent["accepted"], sent["bounced"]) == (1, 0)

    delivered = list(mailbox.Maildir(sink.sink_maildir, create=False))
    to_new = [m for m in delivered if NEW_ADDRESS in m["X-Sink-Rcpt"]]
    assert len(to_new) == 1
    with sessions() as session:
        resend = session.scalars(select(Message).where(Message.case_id == case_id)).one()
        # The attempt belongs to the run of the drop that brought the statement.
        assert (resend.attempt, resend.run_id, resend.recipient, resend.state) == (
            2,
            first_run,
            NEW_ADDRESS,
            MessageState.ACCEPTED,
        )
        assert to_new[0]["Message-ID"].startswith(f"<{resend.message_id}@")
        # Planned like a first attempt: on its provider's shaped lane, counted in today's usage.
        assert resend.provider == "default" and resend.send_day == resend.created_at.date()
        case = session.get_one(ResendCase, case_id)
        assert case.state == CaseState.RESENT
        trail = [
            (t.entity_id, t.to_state, t.actor)
            for t in session.scalars(
                select(StateTransition)
                .where(
                    StateTransition.entity_id.in_([bounced.message_id, resend.message_id, case_id])
                )
                .order_by(StateTransition.transition_id)
            )
        ]
        assert trail == [
            (bounced.message_id, "sending", "send"),
            (bounced.message_id, "accepted", "send"),
            (bounced.message_id, "bounced", "reconcile"),
            (case_id, "verified", "alice"),
            (case_id, "resend_planned", "plan"),
            (resend.message_id, "sending", "send"),
            (resend.message_id, "accepted", "send"),
            (case_id, "resent", "send"),
        ]
        actions = [
            (e.action, e.actor)
            for e in session.scalars(
                select(AuditEvent)
                .where(AuditEvent.entity_id.in_([bounced.message_id, case_id]))
                .order_by(AuditEvent.event_id)
            )
        ]
        for step in [
            ("bounce_hard_bounce", "reconcile"),
            ("address_suppressed", "reconcile"),
            ("resend_case_opened", "reconcile"),
            ("case_verified", "alice"),
            ("case_approved", "bob"),
            ("resend_planned", "plan"),
        ]:
            assert step in actions
    # The bounced address itself was never sent to again.
    assert sum("mei.chen@example.net" in m["X-Sink-Rcpt"] for m in delivered) == 1
