"""Row rules where Great Expectations is costly or cannot express them: cross-column money
rules that depend on the line's status, the NPI check digit, dates against the run date,
adjustment-code syntax, and email syntax. Vectorised over Arrow record batches.

Each rule returns the mask of rows that FAIL it; `ROW_RULES` lists them with the column they
name and the message the insurer reads (never a value).
"""

from __future__ import annotations

import calendar
import string
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

CENT = pa.scalar(Decimal("0.01"), pa.decimal128(12, 2))
ZERO = pa.scalar(Decimal("0.00"), pa.decimal128(12, 2))
# The email fast path: an address of at most EMAIL_MAX_LENGTH characters that _plain_email()
# matches is valid for email-validator too (tests/test_rules.py holds the two to agreement), so
# only the rest need the library's slower check.
EMAIL_MAX_LENGTH = 254
# Adjustment reasons: a CARC, with or without its group code (CO-45, 45, PR-1), or a RARC
# (N130, MA04). FHIR EOBs usually carry the CARC without its group.
_ADJUSTMENT = r"^(((CO|PR|OA|PI|CR)-)?([1-9][0-9]{0,2}|[A-Z][0-9]{1,2})|(M|MA|N)[0-9]{1,3})$"
EARLIEST_SERVICE = date(2000, 1, 1)


@dataclass(frozen=True)
class RowRule:
    rule: str
    field: str
    message: str
    failing: Callable[[pa.RecordBatch, date], pa.Array]


def _status_is(batch: pa.RecordBatch, status: str) -> pa.Array:
    return pc.fill_null(pc.equal(pc.utf8_lower(batch.column("claim_status")), status), False)


def _off_by_more_than_a_cent(a: pa.Array, b: pa.Array) -> pa.Array:
    return pc.greater(pc.abs(pc.subtract(a, b)), CENT)


def negative_amount(column: str) -> Callable[[pa.RecordBatch, date], pa.Array]:
    def failing(batch: pa.RecordBatch, _run: date) -> pa.Array:
        # A reversal or a void carries the original line's amounts with their signs flipped.
        negative = pc.less(batch.column(column), ZERO)
        cancelling = pc.or_(_status_is(batch, "reversed"), _status_is(batch, "voided"))
        return pc.and_(pc.fill_null(negative, False), pc.invert(cancelling))

    return failing


def _billed_below_allowed(batch: pa.RecordBatch, _run: date) -> pa.Array:
    billed, allowed = pc.abs(batch.column("billed_amount")), pc.abs(batch.column("allowed_amount"))
    return pc.fill_null(pc.less(billed, allowed), False)


def _allowed_not_paid_plus_member(batch: pa.RecordBatch, _run: date) -> pa.Array:
    split = pc.add(batch.column("plan_paid"), batch.column("member_responsibility"))
    off = pc.fill_null(_off_by_more_than_a_cent(batch.column("allowed_amount"), split), False)
    # A denied line allows nothing; what the member owes is then not part of an allowance.
    return pc.and_(off, pc.invert(_status_is(batch, "denied")))


def _parts_not_member_share(batch: pa.RecordBatch, _run: date) -> pa.Array:
    # CARIN Blue Button's member liability: deductible + copay + coinsurance + not covered.
    parts = ["deductible_amount", "copay_amount", "coinsurance_amount", "noncovered_amount"]
    given = pc.is_valid(batch.column(parts[0]))
    for part in parts[1:]:
        given = pc.or_(given, pc.is_valid(batch.column(part)))
    total = ZERO
    for part in parts:
        total = pc.add(total, pc.fill_null(batch.column(part), ZERO))
    off = _off_by_more_than_a_cent(total, batch.column("member_responsibility"))
    return pc.and_(given, pc.fill_null(off, False))


def _npi_check_digit(batch: pa.RecordBatch, _run: date) -> pa.Array:
    npi = batch.column("provider_npi")
    ten_digits = pc.fill_null(pc.match_substring_regex(npi, r"^[0-9]{10}$"), False)
    text = pc.filter(npi, ten_digits).to_numpy(zero_copy_only=False).astype("U10")
    failing = np.zeros(len(npi), dtype=bool)
    if len(text):
        digits = text.view(np.uint32).reshape(-1, 10).astype(np.int64) - ord("0")
        # Luhn over "80840" + the NPI (the card-issuer prefix for US health), right to left.
        prefix = np.array([8, 0, 8, 4, 0], dtype=np.int64)
        full = np.hstack([np.broadcast_to(prefix, (len(digits), 5)), digits])[:, ::-1]
        doubled = full[:, 1::2] * 2
        total = full[:, ::2].sum(axis=1) + (doubled - 9 * (doubled > 9)).sum(axis=1)
        failing[np.flatnonzero(ten_digits.to_numpy(zero_copy_only=False))] = total % 10 != 0
    return pa.array(failing)


def _service_after_adjudication(batch: pa.RecordBatch, _run: date) -> pa.Array:
    later = pc.greater(batch.column("service_date"), batch.column("adjudication_date"))
    return pc.fill_null(later, False)


def _date_out_of_range(
    column: str, earliest: Callable[[date], date]
) -> Callable[[pa.RecordBatch, date], pa.Array]:
    def failing(batch: pa.RecordBatch, run: date) -> pa.Array:
        values = batch.column(column)
        outside = pc.or_(
            pc.less(values, pa.scalar(earliest(run), pa.date32())),
            pc.greater(values, pa.scalar(run, pa.date32())),
        )
        return pc.fill_null(outside, False)

    return failing


def _bad_adjustment_code(batch: pa.RecordBatch, _run: date) -> pa.Array:
    codes = pc.split_pattern(pc.utf8_upper(batch.column("adjustment_codes")), ";")
    flat = pc.utf8_trim_whitespace(pc.list_flatten(codes))
    bad = pc.invert(pc.match_substring_regex(flat, _ADJUSTMENT))
    owner = pc.list_parent_indices(codes)
    failing = np.zeros(batch.num_rows, dtype=bool)
    failing[pc.filter(owner, bad).to_numpy(zero_copy_only=False)] = True
    return pa.array(failing)


def _top_level_name_except(words: Collection[str], prefix: str = "") -> str:
    """A regex for a name of 2 to 63 letters that is none of words (lower case; the caller
    matches case-insensitively), spelled out as the ways a name can differ from them, since
    RE2 has no negative look-ahead: one regex pass instead of two."""
    depth = len(prefix)
    following = sorted({w[depth] for w in words if w.startswith(prefix) and len(w) > depth})
    options = [""] if depth >= 2 and prefix not in words else []
    if depth < 63:
        other = "".join(c for c in string.ascii_lowercase if c not in following)
        options.append(f"[{other}][a-z]{{{max(1 - depth, 0)},{62 - depth}}}")
        options += [c + _top_level_name_except(words, prefix + c) for c in following]
    return "(?:" + "|".join(options) + ")"


def _plain_email() -> str:
    """Plain ASCII addresses that email-validator accepts: a dot-atom local part, and domain
    labels of 1 to 63 letters, digits and inner hyphens without "--" in their third and fourth
    places (reserved, or Punycode the library decodes), under a top-level name of letters that
    is not special-use (test, local, ...)."""
    atom = "[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,64}"
    a, h = "[a-z0-9]", "[a-z0-9-]"
    label = f"(?:{a}(?:{h}?{a})?|{a}{h}{h}{a}|{a}{h}(?:{a}{h}|-{a}){h}{{0,58}}{a})"
    top = _top_level_name_except(SPECIAL_USE_DOMAIN_NAMES)
    return rf"(?i)^{atom}(?:\.{atom})*@(?:{label}\.)+{top}$"


_PLAIN_EMAIL = _plain_email()


class EmailCheck:
    """Email syntax of ASCII addresses: a regex fast path for plain addresses, email-validator
    for the rest (the non-ASCII ones fail _needs_smtputf8 instead). Verdicts are cached per
    address across the batches of a file."""

    def __init__(self) -> None:
        self.verdicts: dict[str, bool] = {}

    def __call__(self, batch: pa.RecordBatch, _run: date) -> pa.Array:
        email = batch.column("email")
        plain = pc.and_kleene(
            pc.match_substring_regex(email, _PLAIN_EMAIL),
            pc.less_equal(pc.utf8_length(email), EMAIL_MAX_LENGTH),
        )
        checked = pc.and_(pc.invert(pc.fill_null(plain, True)), pc.string_is_ascii(email))
        others = pc.unique(pc.filter(email, checked)).to_pylist()
        for address in others:
            if address not in self.verdicts:
                self.verdicts[address] = _library_accepts(address)
        rejected = [a for a in others if not self.verdicts[a]]
        return pc.fill_null(pc.is_in(email, value_set=pa.array(rejected, pa.string())), False)


def _library_accepts(address: str) -> bool:
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def _needs_smtputf8(batch: pa.RecordBatch, _run: date) -> pa.Array:
    # email-validator accepts internationalised addresses, but sending writes ASCII envelopes
    # and headers and does not use SMTPUTF8: such an address is quarantined with its reason.
    return pc.invert(pc.fill_null(pc.string_is_ascii(batch.column("email")), True))


def _years_before(years: int) -> Callable[[date], date]:
    def earliest(run: date) -> date:
        year = run.year - years
        # The same day of the year, except that 29 February becomes 28 February.
        return date(year, run.month, min(run.day, calendar.monthrange(year, run.month)[1]))

    return earliest


def claim_line_rules() -> tuple[RowRule, ...]:
    money = ["billed_amount", "allowed_amount", "plan_paid", "member_responsibility"]
    return (
        *(
            RowRule(
                "amount_non_negative",
                m,
                f"{m} is negative on a line that is not a reversal or void",
                negative_amount(m),
            )
            for m in money
        ),
        RowRule(
            "billed_at_least_allowed",
            "billed_amount,allowed_amount",
            "allowed amount exceeds billed amount",
            _billed_below_allowed,
        ),
        RowRule(
            "allowed_is_paid_plus_member",
            "allowed_amount,plan_paid,member_responsibility",
            "allowed amount differs from plan paid plus member responsibility by more than a cent",
            _allowed_not_paid_plus_member,
        ),
        RowRule(
            "member_share_parts",
            "member_responsibility",
            "deductible + copay + coinsurance + not covered differ from member "
            "responsibility by more than a cent",
            _parts_not_member_share,
        ),
        RowRule(
            "npi_check_digit",
            "provider_npi",
            "provider NPI fails its check digit",
            _npi_check_digit,
        ),
        RowRule(
            "adjudicated_after_service",
            "service_date,adjudication_date",
            "service date is after the adjudication date",
            _service_after_adjudication,
        ),
        RowRule(
            "service_date_range",
            "service_date",
            "service date is before 2000 or after the run date",
            _date_out_of_range("service_date", lambda _run: EARLIEST_SERVICE),
        ),
        RowRule(
            "adjudication_date_range",
            "adjudication_date",
            "adjudication date is before 2000 or after the run date",
            _date_out_of_range("adjudication_date", lambda _run: EARLIEST_SERVICE),
        ),
        RowRule(
            "date_of_birth_range",
            "date_of_birth",
            "date of birth is in the future or more than 125 years ago",
            _date_out_of_range("date_of_birth", _years_before(125)),
        ),
        RowRule(
            "adjustment_code_syntax",
            "adjustment_codes",
            "an adjustment code is neither a CARC (45, CO-45) nor a RARC (N130)",
            _bad_adjustment_code,
        ),
        *_email_rules(),
    )


def _email_rules() -> tuple[RowRule, ...]:
    return (
        RowRule("email_syntax", "email", "email address is not valid", EmailCheck()),
        RowRule(
            "email_smtputf8",
            "email",
            "email address needs SMTPUTF8 (it is not ASCII), which sending does not use",
            _needs_smtputf8,
        ),
    )


def roster_rules() -> tuple[RowRule, ...]:
    return (
        RowRule(
            "date_of_birth_range",
            "date_of_birth",
            "date of birth is in the future or more than 125 years ago",
            _date_out_of_range("date_of_birth", _years_before(125)),
        ),
        *_email_rules(),
    )
