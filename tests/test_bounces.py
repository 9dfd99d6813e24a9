"""Bounce parsing and classification: the sink's DSNs, real MTAs' reports, the rules file."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ops.sink import delivery_status_notification
from pipeline.records.bounce_classes import classify, enhanced_status, mail_hosts, smtp_stage
from pipeline.records.verp import token_from_verp, verp_return_path
from pipeline.returns.bounces import BounceClass, Finality, ReportKind, SmtpStage, parse_report
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
        ("2.0.0", "250 delivered", BounceClass.DELIVERED),
        ("5.3.0", "554 other", BounceClass.SOFT_BOUNCE),
        ("5.0.0", "554 no words we know", BounceClass.UNKNOWN),
        ("5.0.0", "550 sender address rejected", BounceClass.POLICY_BLOCK),
        ("5.1.1", "552 mailbox full", BounceClass.SOFT_BOUNCE),
        # X.2.0 and X.2.1 say the mailbox exists: unless RCPT TO refused it, a filter did.
        ("5.2.1", "550 5.2.1 <a@example.org>... User Unknown", BounceClass.POLICY_BLOCK),
        (
            "5.2.1",
            "550-5.2.1 The email account that you tried to reach is inactive.",
            BounceClass.HARD_BOUNCE,
        ),  # fmt: skip
        ("5.6.0", "550 5.6.0 Recipient address rejected: Media error", BounceClass.POLICY_BLOCK),
        # RFC 7505 null MX: a permanent failure is a bad address, a transient one is retried.
        (
            "5.0.0",
            "DNS: the domain doesn't receive email: returned Null MX",
            BounceClass.HARD_BOUNCE,
        ),
        (
            "4.0.0",
            "DNS: the domain doesn't receive email: returned Null MX",
            BounceClass.SOFT_BOUNCE,
        ),
        (
            "5.4.4",
            "Name service error for name=example.org type=MX: Malformed or unexpected "
            "name server reply",
            BounceClass.SOFT_BOUNCE,
        ),  # fmt: skip
        ("5.4.316", "550 5.4.316 Message expired, connection refused", BounceClass.SOFT_BOUNCE),
        (
            "5.4.1",
            "550 5.4.1 [a@example.org]: Recipient address rejected: Access denied",
            BounceClass.HARD_BOUNCE,
        ),  # fmt: skip
        (
            "5.2.1",
            "550-5.2.1 The user you are trying to contact is receiving mail at a rate "
            "that prevents additional messages",
            BounceClass.POLICY_BLOCK,
        ),  # fmt: skip
        (
            None,
            "551 Server access forbidden by invalid RDNS record of your mail server",
            BounceClass.POLICY_BLOCK,
        ),  # fmt: skip
        (
            "5.5.0",
            "550 domain [example.com] mismatches client ip 192.0.2.1",
            BounceClass.POLICY_BLOCK,
        ),
        (
            None,
            "550-Please turn on SMTP Authentication in your mail client.",
            BounceClass.POLICY_BLOCK,
        ),  # fmt: skip
        ("5.0.0", "550 Denied by policy", BounceClass.POLICY_BLOCK),
        (None, "Google Groups: https://groups.google.com/support/", BounceClass.POLICY_BLOCK),
        # A relay refusal is the receiver's policy, whatever it guesses of the address.
        (
            "5.7.54",
            "Recipient email address is possibly incorrect. 5.7.54 SMTP; Unable to relay "
            "recipient in non-accepted domain",
            BounceClass.POLICY_BLOCK,
        ),
        # A mail loop (RFC 3463 X.4.6) in a list manager's words: a routing problem, retried.
        (None, "Loop Alert: Duplicated Message-ID (members ML)", BounceClass.SOFT_BOUNCE),
    ],
)
def test_shipped_rules(status, text, expected):
    assert classify(status, text) == expected


def test_a_rule_can_be_limited_to_stages():
    status, text = "5.0.0", "550 Rejected"
    assert classify(status, text) == BounceClass.UNKNOWN
    assert classify(status, text, SmtpStage.CONNECT) == BounceClass.POLICY_BLOCK
    assert classify(status, text, SmtpStage.RCPT) == BounceClass.UNKNOWN


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


def _dsn(diagnostic: str, *, human: str = "", action: str = "failed", status: str = "5.0.0"):
    """A multipart/report DSN for gone@example.org with the given fields."""
    return (
        "From: MAILER-DAEMON@mx.example.net\r\nTo: bounces@eob.example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        f"--b\r\nContent-Type: text/plain\r\n\r\n{human}\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; gone@example.org\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n--b--\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("human", "stage", "expected"),
    [
        # The same words are a filter's answer after DATA and a bad address at RCPT TO.
        (
            "<gone@example.org>: host mx.example.org said: 550 User unknown "
            "(in reply to end of DATA command)",
            SmtpStage.DATA,
            BounceClass.POLICY_BLOCK,
        ),
        (
            "<gone@example.org>: host mx.example.org said: 550 User unknown "
            "(in reply to RCPT TO command)",
            SmtpStage.RCPT,
            BounceClass.HARD_BOUNCE,
        ),
        (
            "gone@example.org\nSMTP error from remote mail server after MAIL FROM:<s@eob>: "
            "550 Rejected",
            SmtpStage.MAIL,
            BounceClass.POLICY_BLOCK,
        ),  # fmt: skip
        (
            "<gone@example.org>: host mx.example.org refused to talk to me: 554 Rejected",
            SmtpStage.CONNECT,
            BounceClass.POLICY_BLOCK,
        ),
        # No stage named: words that say the mailbox is missing mean it, in every MTA.
        ("<gone@example.org>: 550 User unknown", None, BounceClass.HARD_BOUNCE),
        # A transient refusal at the greeting refuses our host, not the address.
        (
            "<gone@example.org>: host mx.example.org refused to talk to me: 421 Try later",
            SmtpStage.CONNECT,
            BounceClass.POLICY_BLOCK,
        ),
    ],
)
def test_the_smtp_stage_decides_whether_the_address_was_refused(human, stage, expected):
    diagnostic = "421 Try later" if "421" in human else "550 User unknown"
    [report] = parse_report(_dsn(diagnostic, human=human), return_path_domain=DOMAIN)
    assert report.smtp_stage == stage
    assert report.bounce_class == expected


@pytest.mark.parametrize(
    "diagnostic",
    [
        # Refusals that name no SMTP stage, in the words different MTAs use for a missing or
        # closed mailbox: the address is bad (issue #12's held-out confusions).
        "550 5.0.0 Requested action not taken: mailbox does not exist",
        "550 This user doesn't have a example.org account (gone@example.org)",
        "550 gone@example.org... No such user",
        "550 <gone@example.org>: User unknown",
        "550 Invalid recipient <gone@example.org>",
        "550 Account disabled",
        "550 5.1.6 Recipient has moved",
        "550 5.2.1 The email account that you tried to reach is disabled",
    ],
)
def test_missing_mailbox_words_without_a_stage_are_a_hard_bounce(diagnostic):
    [report] = parse_report(_dsn(diagnostic, human=""), return_path_domain=DOMAIN)
    assert report.smtp_stage is None
    assert report.bounce_class == BounceClass.HARD_BOUNCE


@pytest.mark.parametrize(
    ("status", "text", "stage", "expected"),
    [
        ("5.0.0", "550 No such user here", None, BounceClass.HARD_BOUNCE),
        ("5.0.0", "550 No such user here", SmtpStage.RCPT, BounceClass.HARD_BOUNCE),
        # After DATA the address had been accepted: a filter's answer in those words.
        ("5.0.0", "550 No such user here", SmtpStage.DATA, BounceClass.POLICY_BLOCK),
        ("5.1.1", "550 No such user here", None, BounceClass.HARD_BOUNCE),
        (None, "MSEXCH:IMS:X 0 (000C05A6) Unknown Recipient", None, BounceClass.HARD_BOUNCE),
        ("5.0.0", "550 : User unknown", None, BounceClass.HARD_BOUNCE),
        # RFC 3463 X.2.1, mailbox disabled: hard at RCPT TO, a filter's after DATA.
        ("5.2.1", "550 5.2.1 Mailbox disabled", SmtpStage.RCPT, BounceClass.HARD_BOUNCE),
        ("5.2.1", "550 5.2.1 Mailbox disabled", SmtpStage.DATA, BounceClass.POLICY_BLOCK),
        # A sender-side cue in the same reply is a block, whatever else it says.
        ("5.7.1", "550 5.7.1 Unknown user; blocked using zen.spamhaus.org", None,
         BounceClass.POLICY_BLOCK),
    ],
)  # fmt: skip
def test_missing_mailbox_words_are_hard_unless_refused_after_data(status, text, stage, expected):
    assert classify(status, text, stage, "example.org") == expected


@pytest.mark.parametrize(
    ("text", "stage", "hosts", "expected"),
    [
        # Orange and La Poste codes decide, whatever the stage; another host's text does not.
        ("550 5.5.0 Invalid recipient. LPN007_416", SmtpStage.DATA, "laposte.net",
         BounceClass.HARD_BOUNCE),
        ("421 mwinf5c77 ME Service refused, please try later. OFR_999 [999]", SmtpStage.CONNECT,
         "wanadoo.fr\nsmtp-in.orange.fr", BounceClass.POLICY_BLOCK),
        ("552 5.1.1 Recipient overquota. OFR_417 [417]", SmtpStage.RCPT, "orange.fr",
         BounceClass.SOFT_BOUNCE),
        ("550 5.5.0 Invalid recipient. LPN007_416", SmtpStage.DATA, "example.org",
         BounceClass.POLICY_BLOCK),
        # Spectrum's AUP codes: connection limits are temporary, the rest are blocks.
        ("550 5.1.0 <x@example.net> sender rejected. AUP#In-1310", None, "charter.net",
         BounceClass.SOFT_BOUNCE),
        ("554 5.7.1 Your IP address has been blocked. AUP#In-1000", None, "charter.net",
         BounceClass.POLICY_BLOCK),
        # Yahoo refuses a missing mailbox after DATA.
        ("554 delivery error: dd This user doesn't have a yahoo.com account", SmtpStage.DATA,
         "yahoo.com\nmta6.am0.yahoodns.net", BounceClass.HARD_BOUNCE),
        ("554 delivery error: dd This user doesn't have a example.com account", SmtpStage.DATA,
         "example.com", BounceClass.POLICY_BLOCK),
    ],
)  # fmt: skip
def test_providers_own_codes_decide(text, stage, hosts, expected):
    # As a DSN would report them: a permanent failure's general status.
    assert classify("5.0.0", text, stage, hosts) == expected


def test_a_providers_rule_reads_the_dsns_mta_names():
    # La Poste's own code 416 (invalid recipient) decides even after DATA; another MTA's same
    # refusal after DATA is a filter's.
    raw = _dsn(
        "550 5.5.0 Invalid recipient. LPN007_416",
        human="<gone@example.org>: host mx said: 550 (in reply to end of DATA command)",
    )
    laposte = raw.replace(b"dns; mx.example.net", b"dns; smtp-in.laposte.net")
    [report] = parse_report(laposte, return_path_domain=DOMAIN)
    assert report.bounce_class == BounceClass.HARD_BOUNCE
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert report.bounce_class == BounceClass.POLICY_BLOCK
    assert (
        mail_hosts("a@Example.org", "dns; MX.example.net.", None) == "example.org\nmx.example.net"
    )


@pytest.mark.parametrize(
    ("text", "stage"),
    [
        ("host said: 550 no (in reply to RCPT TO command)", SmtpStage.RCPT),
        ("SMTP error from remote mail server after RCPT TO:<a@example.org>: 550", SmtpStage.RCPT),
        ("... while talking to mx.example.org.:\n>>> DATA\n<<< 554 rejected", SmtpStage.DATA),
        ("SMTP error from remote server for TEXT command, host: mx", SmtpStage.DATA),
        ("192.0.2.1 does not like recipient. Remote host said: 550", SmtpStage.RCPT),
        ("SMTP error from remote mail server after initial connection: 554", SmtpStage.CONNECT),
        ("550 mailbox unavailable", None),
        (
            "SMTP:RCPT host 192.0.2.8: 553 5.3.0 <a@example.com>... No such user here",
            SmtpStage.RCPT,
        ),
    ],
)
def test_stage_wording_of_common_mtas(text, stage):
    assert smtp_stage(text) == stage


@pytest.mark.parametrize(
    ("action", "human", "finality", "expected"),
    [
        ("failed", "", Finality.FAILED, BounceClass.HARD_BOUNCE),
        ("delayed", "", Finality.DELAYED, BounceClass.SOFT_BOUNCE),
        ("failure", "", Finality.FAILED, BounceClass.HARD_BOUNCE),
        (
            "",
            "THIS IS A WARNING ONLY. It will be retried until it is 5 days old.",
            Finality.DELAYED,
            BounceClass.SOFT_BOUNCE,
        ),  # fmt: skip
        ("", "Your message could not be delivered.", Finality.FAILED, BounceClass.HARD_BOUNCE),
    ],
)
def test_finality_comes_from_the_action_else_the_words(action, human, finality, expected):
    raw = _dsn("550 5.1.1 user unknown", human=human, action=action, status="5.1.1")
    if not action:
        raw = raw.replace(b"Action: \r\n", b"")
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert (report.finality, report.bounce_class) == (finality, expected)


def _non_standard(body: str, *, headers: str = "", content_type: str = "text/plain") -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
        f"To: bounces@eob.example.com\r\nSubject: Mail delivery failed\r\n{headers}"
        f"Content-Type: {content_type}\r\n\r\n{body}"
    ).encode()


def test_each_listed_recipient_gets_the_reason_on_its_own_lines():
    raw = _non_standard(
        "The following addresses failed:\r\n"
        "<full@example.org>: 552 mailbox full\r\n"
        "<gone@example.org>: 550 5.1.1 no such user\r\n"
        "<alias@example.org> (generated from list@example.org)\r\n"
        "  550 5.1.1 no such user\r\n"
    )
    reports = parse_report(raw, return_path_domain=DOMAIN)
    got = {r.recipient: r.bounce_class for r in reports}
    assert got["full@example.org"] == BounceClass.SOFT_BOUNCE
    assert got["gone@example.org"] == BounceClass.HARD_BOUNCE
    assert got["alias@example.org"] == BounceClass.HARD_BOUNCE
    assert "bounces@eob.example.com" not in got


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # A one-recipient report may give its reason before it names the address.
        (
            "Error: Invalid user address\r\n550 this account has been disabled\r\n\r\n"
            "Message details:\r\n  MAIL FROM: bounces@eob.example.com\r\n"
            "  RCPT TO: gone@example.org\r\n",
            ("gone@example.org", None, BounceClass.HARD_BOUNCE),
        ),
        # A transcript's success codes are not the failure's status.
        (
            "Transcript of session follows.\r\n"
            "Out: 250-mx.example.org 2.0.0 Hello\r\nIn: RCPT TO:<gone@example.org>\r\n"
            "Out: 451 4.3.0 Temporary system failure\r\n",
            ("gone@example.org", "4.3.0", BounceClass.SOFT_BOUNCE),
        ),
    ],
)
def test_reading_a_report_in_no_known_format(body, expected):
    [report] = parse_report(_non_standard(body), return_path_domain=DOMAIN)
    assert (report.recipient, report.status, report.bounce_class) == expected


def test_an_html_only_report_is_read_as_text():
    raw = _non_standard(
        "<html><head><style>td { color: #222 }</style></head><body><table><tr><td>"
        "Your message to <a href='mailto:gone@example.org'>gone@example.org</a> failed"
        "</td></tr><tr><td>because: Mailbox is full</td></tr></table></body></html>",
        content_type="text/html",
    )
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert report.bounce_class == BounceClass.SOFT_BOUNCE
    assert "color" not in (report.diagnostic or "")


def test_an_auto_reply_header_does_not_hide_a_mailer_daemons_report():
    raw = _non_standard(
        "<gone@example.org>: 550 5.1.1 User unknown\r\n", headers="Auto-Submitted: auto-replied\r\n"
    )
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert report.bounce_class == BounceClass.HARD_BOUNCE


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # A null return path does not make an automatic reply a bounce.
        (b"Return-Path: <>\r\nSubject: Automatic reply: statement\r\n", BounceClass.AUTO_REPLY),
        # Apple Mail's unsubscribe request is marked auto-replied too: it is an opt-out.
        (
            b"Subject: unsubscribe\r\nAuto-Submitted: auto-replied\r\n"
            b"X-Apple-Unsubscribe: true\r\n",
            BounceClass.COMPLAINT,
        ),
    ],
)
def test_a_message_from_the_recipients_own_address_names_it(headers, expected):
    raw = b"From: Member <member@example.org>\r\n" + headers + b"\r\nI am away until Monday.\r\n"
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert report.bounce_class == expected
    assert report.recipient == "member@example.org"  # RFC 3834: the recipient replies


def test_a_multipart_whose_boundary_does_not_parse_is_read_as_text():
    raw = _non_standard(
        "Recipient address: gone@example.org\r\nReason: 550 5.1.1 User Unknown\r\n",
        content_type="multipart/report",  # no boundary parameter
    )
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert report.bounce_class == BounceClass.HARD_BOUNCE
    assert "User Unknown" in (report.diagnostic or "")


def test_a_dsn_names_the_address_we_sent_to():
    """Original-Recipient over an aliased or X.400 Final-Recipient; a bare "<address>"; a block
    without Status takes the diagnostic's code; a report of one block (McAfee's)."""
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\r\nSubject: Delivery Status\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Original-Recipient: <member@example.org>\r\n"
        b"Final-Recipient: x400; /S=member/O=example/C=GB/\r\nAction: failed\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 <member@example.org>... User unknown\r\n--b--\r\n"
    )
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert (report.recipient, report.status) == ("member@example.org", "5.1.1")
    assert report.bounce_class == BounceClass.HARD_BOUNCE


def test_the_recipient_of_a_quoted_original_is_named():
    raw = _non_standard(
        "There was an error delivering your mail to <gone@example.org>.\r\n\r\n"
        "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown\r\n\r\n"
        "Message headers follow.\r\n\r\n"
        "Received: from root (uid 0) by mx.eob.example.com\r\n"
        "To: <gone@example.org>\r\nFrom: <statements@eob.example.com>\r\nSubject: s\r\n"
    )
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert (report.recipient, report.bounce_class) == ("gone@example.org", BounceClass.HARD_BOUNCE)


def _ses_notification(notice: dict[str, object], *, sns: bool = False) -> bytes:
    """An Amazon SES notification as SES emails it: the JSON alone, or (SNS) as the "Message"
    string of an SNS envelope, its long lines wrapped as mail wraps them."""
    body = json.dumps(notice)
    if sns:
        envelope = json.dumps({"Type": "Notification", "Message": body}, indent=2)
        body = "\r\n ".join(envelope[i : i + 70] for i in range(0, len(envelope), 70))
    return (
        "From: no-reply@sns.amazonaws.com\r\nTo: statements@eob.example.com\r\n"
        f"Subject: AWS Notification Message\r\nContent-Type: text/plain\r\n\r\n{body}\r\n"
    ).encode()


def _ses_bounce(bounce_type: str, subtype: str, status: str, diagnostic: str) -> dict[str, object]:
    recipient = {"emailAddress": "member@example.org", "status": status}
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": subtype,
            "bouncedRecipients": [{**recipient, "diagnosticCode": diagnostic}],
            "reportingMTA": "dsn; a1-2.smtp-out.us-west-2.amazonses.com",
        },
    }


@pytest.mark.parametrize(
    ("notice", "expected"),
    [
        # "General": the recipient's status and diagnostic decide, as in a DSN.
        (
            _ses_bounce("Permanent", "General", "5.1.1", "smtp; 550 5.1.1 user unknown"),
            (BounceClass.HARD_BOUNCE, Finality.FAILED, "5.1.1"),
        ),
        # SES's own sub-types decide over the words.
        (
            _ses_bounce("Permanent", "Suppressed", "5.1.1", "Amazon SES has suppressed sending"),
            (BounceClass.HARD_BOUNCE, Finality.FAILED, "5.1.1"),
        ),
        (
            _ses_bounce("Transient", "MailboxFull", "5.2.2", "smtp; 552 5.2.2 over the limit"),
            (BounceClass.SOFT_BOUNCE, Finality.FAILED, "5.2.2"),
        ),
        (
            _ses_bounce("Transient", "ContentRejected", "5.3.0", "smtp; 550 5.3.0 refused"),
            (BounceClass.POLICY_BLOCK, Finality.FAILED, "5.3.0"),
        ),
        # A transient bounce whose words read as a bad address is still temporary.
        (
            _ses_bounce("Transient", "General", "5.1.1", "smtp; 550 user unknown"),
            (BounceClass.SOFT_BOUNCE, Finality.FAILED, "5.1.1"),
        ),
        (
            {
                "notificationType": "Delivery",
                "delivery": {
                    "recipients": ["member@example.org"],
                    "smtpResponse": "250 2.6.0 Message received",
                },
            },
            (BounceClass.DELIVERED, Finality.DELIVERED, "2.6.0"),
        ),
        (
            {
                "notificationType": "Complaint",
                "complaint": {"complainedRecipients": [{"emailAddress": "member@example.org"}]},
            },
            (BounceClass.COMPLAINT, None, None),
        ),
    ],
)
@pytest.mark.parametrize("sns", [False, True])
def test_amazon_ses_notifications(notice, expected, sns):
    [report] = parse_report(_ses_notification(notice, sns=sns), return_path_domain=DOMAIN)
    assert report.recipient == "member@example.org"
    assert (report.bounce_class, report.finality, report.status) == expected


@pytest.mark.parametrize(
    "mail",
    [
        {"commonHeaders": {"messageId": "<m1a2b3@eob.example.com>"}},
        {"headers": [{"name": "Subject", "value": "x"},
                     {"name": "Message-ID", "value": "<m1a2b3@eob.example.com>"}]},
    ],
)  # fmt: skip
def test_an_ses_notice_matches_by_the_message_id_it_records(mail):
    # SES bounces from its own return path (no VERP token): the recorded Message-ID matches.
    notice = {**_ses_bounce("Permanent", "General", "5.1.1", "smtp; 550 5.1.1"), "mail": mail}
    [report] = parse_report(_ses_notification(notice, sns=True), return_path_domain=DOMAIN)
    assert (report.message_token, report.original_message_id) == (None, "m1a2b3@eob.example.com")


def test_json_that_is_no_ses_notification_is_not_read_as_one():
    raw = _ses_notification({"eventType": "Open", "note": "notificationType"})
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert report.bounce_class == BounceClass.NOT_BOUNCE


_STATUS_FIELDS = (
    "Reporting-MTA: dns; mx.example.net\r\n\r\n"
    "Final-Recipient: rfc822; full@example.org\r\nAction: failed\r\nStatus: 5.2.2\r\n"
    "Diagnostic-Code: smtp; 552 5.2.2 Mailbox full\r\n\r\n"
    "Final-Recipient: rfc822; late@example.org\r\nAction: delayed\r\nStatus: 4.4.1\r\n"
)


def _report(status_fields: str, *, indent: str = "") -> str:
    """A multipart/report; `indent` goes before the boundary line of its delivery-status part."""
    return (
        "From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; "
        'boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n\r\n'
        f"{indent}--b\r\nContent-Type: message/delivery-status\r\n\r\n{status_fields}\r\n--b--\r\n"
    )


@pytest.mark.parametrize(
    "raw",
    [
        _report(_STATUS_FIELDS),
        # An AOL relay runs the recipients' fields together, with no blank line between them.
        _report(
            _STATUS_FIELDS.replace(
                "\r\n\r\nFinal-Recipient: rfc822; late", "\r\nFinal-Recipient: rfc822; late"
            )
        ),
        # An indented boundary line: the MIME structure does not parse, the text is read.
        _report(_STATUS_FIELDS, indent=" "),
        # A provider's helpdesk forwards the whole bounce as text, after its own words.
        "From: MAILER-DAEMON@mail.example.jp\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "Content-Type: text/plain\r\n\r\nThe message below could not be delivered.\r\n"
        "------------------\r\nReceived: by relay.example.net (Postfix)\r\n"
        + _report(_STATUS_FIELDS),
    ],
)
def test_each_recipient_of_a_delivery_status_report_however_it_arrives(raw):
    reports = parse_report(raw.encode(), return_path_domain=DOMAIN)
    got = {r.recipient: (r.bounce_class, r.finality) for r in reports}
    assert got == {
        "full@example.org": (BounceClass.SOFT_BOUNCE, Finality.FAILED),
        "late@example.org": (BounceClass.SOFT_BOUNCE, Finality.DELAYED),
    }


def test_a_list_managers_notice_names_the_list_and_gives_the_reason_in_its_subject():
    raw = (
        b"From: members-admin@lists.example.org\r\nTo: statements@eob.example.com\r\n"
        b"Subject: Loop Alert: Duplicated Message-ID (members ML)\r\n"
        b"X-MLServer: fml [fml 4.0.3 release]\r\n\r\n"
        b"Duplicated Message-ID in <members@lists.example.org>.\r\n\r\n"
        b"Original mail as follows:\r\n\r\n   To: <someone@example.net>\r\n"
    )
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert report.kind == ReportKind.NON_STANDARD
    assert (report.recipient, report.bounce_class) == (
        "members@lists.example.org",
        BounceClass.SOFT_BOUNCE,
    )


def test_a_dsn_returning_headers_only_matches_by_their_message_id():
    # RET=HDRS: the original comes back as text/rfc822-headers, a string part, not a message.
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\r\nTo: statements@eob.example.com\r\n"
        b"Subject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example.net\r\n\r\n"
        b"Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n"
        b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        b"From: statements@eob.example.com\r\nTo: gone@example.org\r\n"
        b"Message-ID: <m0123abc@eob.example.com>\r\nSubject: Your statement\r\n"
        b"--b--\r\n"
    )
    [report] = parse_report(raw, return_path_domain=DOMAIN)
    assert (report.recipient, report.original_message_id) == (
        "gone@example.org",
        "m0123abc@eob.example.com",
    )


def test_dsn_fields_written_in_the_text_are_read_per_recipient():
    # Sun/Oracle Messaging Server writes the RFC 3464 fields into its text part.
    raw = (
        b"From: postmaster@mx.example.net\r\nTo: bounces@eob.example.com\r\n"
        b"Subject: Delivery Notification: Delivery has failed\r\n\r\n"
        b"This report relates to a message you sent with the following header fields:\r\n"
        b"  Message-id: <0001@example.org>\r\n\r\n"
        b"Reporting-MTA: dns; mailbox0.example.net\r\n\r\n"
        b"Action: failed\r\nStatus: 5.0.0 (Remote SMTP server has rejected address)\r\n"
        b"Final-recipient: rfc822;gone@example.org\r\n"
        b"Diagnostic-code: smtp; 550 5.1.1 User Unknown: gone@example.org\r\n\r\n"
        b"Action: failed\r\nStatus: 5.0.0\r\nFinal-recipient: rfc822;full@example.org\r\n"
        b"Diagnostic-code: smtp; 552 5.2.2 Mailbox full\r\n"
    )
    reports = parse_report(raw, return_path_domain=DOMAIN)
    assert [(r.recipient, r.bounce_class) for r in reports] == [
        ("gone@example.org", BounceClass.HARD_BOUNCE),
        ("full@example.org", BounceClass.SOFT_BOUNCE),
    ]


def test_sendmail_transcript_lines_name_each_recipient_with_its_own_reason():
    raw = (
        b"From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.net>\r\n"
        b"To: bounces@eob.example.com\r\nSubject: Returned mail: Host unknown\r\n\r\n"
        b"   ----- Transcript of session follows -----\r\n"
        b"550 example.or.jp (smtp)... 550 Host unknown\r\n"
        b"554 <gone@example.or.jp>... 550 Host unknown (Authoritative answer from name server)\r\n"
        b"While talking to mx.example.co.jp:\r\n>>> RCPT To:<nobody@example.co.jp>\r\n"
        b"<<< 421 Connection reset by peer\r\n"
        b"554 <full@example.co.jp>... 452 4.2.2 Mailbox full\r\n"
        b"\r\n   ----- Unsent message follows -----\r\n"
    )
    found = {r.recipient: r.bounce_class for r in parse_report(raw, return_path_domain=DOMAIN)}
    assert found["gone@example.or.jp"] == BounceClass.HARD_BOUNCE
    assert found["full@example.co.jp"] == BounceClass.SOFT_BOUNCE


def test_a_full_or_congested_system_is_a_retry_at_any_stage():
    # RFC 5321 452 insufficient system storage; RFC 3463 X.3.1 and X.4.5.
    for text in (
        "452 4.4.5 Insufficient disk space; try again later",
        "452 4.3.1 Mail system full",
    ):
        assert classify("4.4.7", text, SmtpStage.MAIL) == BounceClass.SOFT_BOUNCE
    assert classify("4.0.0", "421 Too many errors", SmtpStage.CONNECT) == BounceClass.POLICY_BLOCK


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Nothing but the RFC 5321 basic reply code explains these.
        ("551 please use mx2.example.org instead", BounceClass.HARD_BOUNCE),
        ("553 sorry, that name is not allowed here", BounceClass.HARD_BOUNCE),
        ("552 requested action aborted", BounceClass.SOFT_BOUNCE),
        ("451 local problem, requested action aborted", BounceClass.SOFT_BOUNCE),
        ("554 transaction failed", BounceClass.UNKNOWN),
    ],
)
def test_the_basic_reply_code_decides_when_nothing_else_does(text, expected):
    assert classify(None, text, None) == expected
