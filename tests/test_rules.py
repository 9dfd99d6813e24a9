"""Row rules on their own: date ranges on every run date, and the email check agreeing with
email-validator on every address."""

from __future__ import annotations

import calendar
import string
from datetime import date, timedelta

import pyarrow as pa
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.intake.rules import EmailCheck, RowRule, roster_rules

ONE_DAY = timedelta(days=1)


def rule(name: str) -> RowRule:
    return next(r for r in roster_rules() if r.rule == name)


def emails(addresses: list[str | None]) -> pa.RecordBatch:
    return pa.record_batch({"email": pa.array(addresses, pa.string())})


def failing(name: str, addresses: list[str | None]) -> list[bool]:
    verdict: list[bool] = rule(name).failing(emails(addresses), date(2026, 11, 22)).to_pylist()
    return verdict


def library_accepts(address: str) -> bool:
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


# Date of birth -------------------------------------------------------------------------------


def test_a_run_on_29_february_checks_birth_dates_against_28_february_125_years_before():
    run = date(2028, 2, 29)
    dates = [date(1903, 2, 27), date(1903, 2, 28), run, run + ONE_DAY]
    batch = pa.record_batch({"date_of_birth": pa.array(dates, pa.date32())})
    assert rule("date_of_birth_range").failing(batch, run).to_pylist() == [True, False, False, True]


@given(st.dates(min_value=date(200, 1, 1), max_value=date(9998, 12, 31)))
def test_the_birth_date_range_holds_on_every_run_date(run: date):
    year = run.year - 125
    # The same day of the year 125 years before; 29 February becomes 28 February.
    earliest = date(year, run.month, min(run.day, calendar.monthrange(year, run.month)[1]))
    dates = [earliest - ONE_DAY, earliest, run, run + ONE_DAY]
    batch = pa.record_batch({"date_of_birth": pa.array(dates, pa.date32())})
    assert rule("date_of_birth_range").failing(batch, run).to_pylist() == [True, False, False, True]


# Email ---------------------------------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
LABEL_CHARS = string.ascii_letters + string.digits + "-"
TOP_LEVEL = ["test", "local", "localhost", "invalid", "onion", "arpa", "example", "com",
             "TEST", "Local", "org", "de", "co", "io", "xn--p1ai", "c0m", "123"]  # fmt: skip

atoms = st.text(ATEXT, min_size=0, max_size=70)
local_parts = st.lists(atoms, min_size=1, max_size=5).map(".".join) | st.sampled_from(
    ['"quoted"', "a..b", ".a", "a.", "", " a", "a b"]
)
labels = st.text(LABEL_CHARS, min_size=0, max_size=70) | st.sampled_from(
    ["xn--bcher-kva", "xn--zz", "ab--cd", "XN--x", "a" * 63, "a" * 64]
)
domains = st.builds(
    lambda parts, tld: ".".join([*parts, tld]),
    st.lists(labels, min_size=0, max_size=6),
    st.sampled_from(TOP_LEVEL) | labels,
)
ascii_addresses = (
    st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains)
    | st.emails().map(str)
    # Long ones: past 254 characters in all, or a local part past 64.
    | st.builds(lambda n, d: "a" * n + "@" + d, st.integers(1, 300), domains)
    | st.text(ATEXT + '@."[] \\', max_size=40)
)


@settings(max_examples=400, deadline=None)
@given(st.lists(ascii_addresses, min_size=1, max_size=20))
def test_the_email_check_agrees_with_email_validator_on_ascii_addresses(addresses: list[str]):
    assert failing("email_syntax", [*addresses]) == [not library_accepts(a) for a in addresses]
    assert failing("email_smtputf8", [*addresses]) == [False] * len(addresses)


def test_what_the_old_fast_path_let_through_is_refused():
    refused = ["a@b.test", "ana@mail.LOCAL", "a" * 250 + "@example.com", "x@ab--cd.example.com"]
    assert failing("email_syntax", refused) == [True] * len(refused)
    assert failing("email_syntax", ["ana@example.com", None]) == [False, False]


def test_plain_addresses_take_the_fast_path_without_the_library():
    check = EmailCheck()
    plain = ["ana@example.com", "A.B+eob@Mail.Example-Health.ORG", "x@ab-c-d.tests"]
    assert check(emails(plain), date(2026, 11, 22)).to_pylist() == [False] * 3
    assert check.verdicts == {}  # none needed email-validator


@given(
    st.builds(
        lambda local, domain: f"{local}@{domain}",
        st.text(ATEXT + "éü文", min_size=1, max_size=20),
        st.text(LABEL_CHARS + "äß文", min_size=1, max_size=20).map(lambda d: d + ".de"),
    ).filter(lambda a: not a.isascii())
)
def test_a_non_ascii_address_is_quarantined_as_needing_smtputf8(address: str):
    # Sending does not use SMTPUTF8, so even one email-validator accepts cannot be sent.
    assert failing("email_smtputf8", [address, "ana@example.com", None]) == [True, False, False]
    assert failing("email_syntax", [address]) == [False]  # one reason, not two
    assert "SMTPUTF8" in rule("email_smtputf8").message
