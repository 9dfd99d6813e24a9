"""Bounce parsing and classification: the sink's DSNs, real MTAs' reports, the rules file."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bounces import (
    BounceClass,
    classify,
    enhanced_status,
    parse_report,
)  # fmt: skip
from pipeline.plan import token_from_verp, verp_return_path
from pipeline.sink import delivery_status_notification
from tests.conftest import SHARED_DATA

DOMAIN = "bounces.eob.example.com"
REAL_REPORTS = sorted((SHARED_DATA / "bounces").glob("*/*/*.*"))


def test_sink_dsn_is_matched_by_verp_and_classified_hard():
    original = b"Message-ID: <m1@eob.example.com>\r\nSubject: s\r\n\r\nbody"
    raw = delivery_status_notification(
        verp_return_path("mabc", DOMAIN), ["gone@example.org"], original
    ).as_bytes()
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert report.message_token == "mabc"
    assert report.recipient == "gone@example.org"
    assert report.status == "5.1.1"
    assert report.bounce_class == BounceClass.HARD_BOUNCE


def test_a_report_for_another_domain_is_not_matched():
    raw = delivery_status_notification("bounces+mabc@elsewhere.example", ["x@example.org"], b"")
    [report] = parse_report(raw.as_bytes(), return_path_domain=DOMAIN)
    assert report.message_token is None


@pytest.mark.skipif(not REAL_REPORTS, reason="shared/data not beside the repository")
def test_every_real_report_parses():
    classes = set()
    for path in REAL_REPORTS:
        for report in parse_report(path.read_bytes(), return_path_domain=DOMAIN):
            classes.add(report.bounce_class)
    assert len(REAL_REPORTS) > 400
    assert {BounceClass.HARD_BOUNCE, BounceClass.NOT_BOUNCE} <= classes


@pytest.mark.parametrize(
    ("name", "recipient", "expected"),
    [
        ("dsn_12.txt", "userx@example.jp", BounceClass.HARD_BOUNCE),
        ("dsn_13.txt", "userx@example.com", BounceClass.HARD_BOUNCE),
        ("dsn_05.txt", "userx@example.cz", BounceClass.SOFT_BOUNCE),
        ("dsn_07.txt", "userx@example.nz", BounceClass.SOFT_BOUNCE),
    ],
)
def test_real_dsns_match_their_labels(name, recipient, expected):
    """Expected values from shared/data/bounces/flufl-bounce/labels.csv."""
    path = SHARED_DATA / "bounces" / "flufl-bounce" / "data" / name
    if not path.exists():
        pytest.skip("shared/data not beside the repository")
    reports = parse_report(path.read_bytes(), return_path_domain=DOMAIN)
    assert [(r.recipient, r.bounce_class) for r in reports] == [(recipient, expected)]
    assert reports[0].status is not None and " " not in reports[0].status


def test_a_recipient_repeated_in_one_report_gets_distinct_keys():
    path = SHARED_DATA / "bounces" / "flufl-bounce" / "data" / "dsn_11.txt"
    if not path.exists():
        pytest.skip("shared/data not beside the repository")
    reports = parse_report(path.read_bytes(), return_path_domain=DOMAIN)
    assert len(reports) == 11 and len({r.dedupe_key for r in reports}) == 11


@pytest.mark.parametrize(
    ("status", "text", "expected"),
    [
        ("5.1.1", "550 5.1.1 user unknown", BounceClass.HARD_BOUNCE),
        ("5.7.1", "550 5.7.1 message rejected as spam", BounceClass.POLICY_BLOCK),
        # A policy status wins over address-like wording: the sender is blocked, not the address.
        ("5.7.1", "550 5.7.1 mailbox unavailable for your IP", BounceClass.POLICY_BLOCK),
        ("4.2.2", "452 4.2.2 mailbox full", BounceClass.SOFT_BOUNCE),
        ("5.2.2", "552 5.2.2 over quota", BounceClass.SOFT_BOUNCE),
        (None, "550 No such user here", BounceClass.HARD_BOUNCE),
        ("2.0.0", "250 delivered", BounceClass.DELIVERED),
        ("5.3.0", "554 other", BounceClass.SOFT_BOUNCE),
        ("5.0.0", "554 no words we know", BounceClass.UNKNOWN),
        ("5.0.0", "550 sender address rejected", BounceClass.POLICY_BLOCK),
        ("5.1.1", "552 mailbox full", BounceClass.SOFT_BOUNCE),
    ],
)
def test_shipped_rules(status, text, expected):
    assert classify(status, text) == expected


def test_verp_round_trip_and_enhanced_status():
    assert token_from_verp(f"<{verp_return_path('m42', DOMAIN)}>", DOMAIN) == "m42"
    assert token_from_verp("someone@example.org", DOMAIN) is None
    assert enhanced_status("550 5.1.1 <x@example.org>: User unknown") == "5.1.1"
    assert enhanced_status("550 no code") is None


def test_garbage_is_not_a_bounce():
    [report] = parse_report(b"\x00\xff not an email at all", return_path_domain=DOMAIN)
    assert report.bounce_class == BounceClass.NOT_BOUNCE


def test_a_reply_is_not_a_bounce_and_names_what_it_answers():
    raw = (
        b"From: member@example.org\r\nTo: statements@eob.example.com\r\n"
        b"Subject: Re: Your Explanation of Benefits is ready\r\n"
        b"In-Reply-To: <mabc123@eob.example.com>\r\n\r\nThis is not me, wrong person.\r\n"
    )
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert report.bounce_class == BounceClass.NOT_BOUNCE
    assert report.original_message_id == "mabc123@eob.example.com"
    assert "not me" in (report.diagnostic or "")


@given(
    raw=st.one_of(
        st.binary(max_size=2000),
        st.builds(
            lambda head, body: head + b"\r\n\r\n" + body,
            st.sampled_from(
                [
                    b"Content-Type: multipart/report; report-type=delivery-status; boundary=b",
                    b"Content-Type: message/delivery-status",
                    b"From: MAILER-DAEMON@example.org\r\nSubject: Undelivered Mail",
                    b"Auto-Submitted: auto-replied\r\nSubject: Out of office",
                ]
            ),
            st.binary(max_size=1500),
        ),
    )
)
@settings(max_examples=150, deadline=None)
def test_any_input_parses_to_at_least_one_report(raw):
    reports = parse_report(raw, return_path_domain=DOMAIN)
    assert reports
    assert len({r.dedupe_key for r in reports}) == len(reports)
    assert all(isinstance(r.bounce_class, BounceClass) for r in reports)
