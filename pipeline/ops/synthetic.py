"""Synthetic claims extracts of any size, for benchmarks, tests and demos. No real person.

Members have several claims of four lines; amounts add up the way adjudication makes
them (allowed = plan paid + member responsibility; member responsibility = deductible + copay +
coinsurance); NPIs carry a valid Luhn check digit; a configurable share of rows gets exactly one
realistic defect. Columns are generated with NumPy per chunk and written by pyarrow, so a
five-million-line extract takes seconds, not minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.records.contracts import load_contract

_FIRST = [
    "Ana María",
    "James",
    "Mei",
    "Samuel",
    "Olivia",
    "Rahul",
    "Zoë",
    "Harold",
    "Lucía",
    "Kwame",
    "Grace",
    "Diego",
    "Fatima",
    "Noah",
    "Sofia",
    "Liam",
]
_LAST = [
    "Pérez",
    "O'Connor",
    "Chen",
    "Okafor",
    "Brooks",
    "Iyer",
    "Lambert",
    "Whitfield",
    "Fernández",
    "Asante",
    "Kim",
    "Santos",
    "Haddad",
    "Nguyen",
    "Rossi",
    "Murphy",
]
_CITIES = [
    ("Fresno", "CA", "93720"),
    ("Springfield", "IL", "62704"),
    ("Seattle", "WA", "98101"),
    ("Atlanta", "GA", "30303"),
    ("Austin", "TX", "78701"),
    ("Boston", "MA", "02108"),
]
_PROVIDERS = [
    "Fresno Family Medicine",
    "Valley Imaging Center",
    "Sunrise Physical Therapy",
    "Metro Urgent Care",
    "Cascade Orthopedic and Sports Medicine Associates",
    "Lakeside Laboratory Services",
]
# Common CPT/HCPCS codes with plain descriptions an insurer's extract would carry.
_SERVICES = [
    ("99213", "Office visit, established patient"),
    ("99214", "Office visit, moderate"),
    ("73721", "MRI of knee"),
    ("97110", "Therapeutic exercise"),
    ("80053", "Comprehensive metabolic panel"),
    ("36415", "Blood draw"),
    ("J1100", ""),
    ("G0439", "Annual wellness visit"),
]
_DIAGNOSES = ["E11.9", "I10", "M25.561", "Z00.00", "J06.9", "R51.9"]
_ADJUSTMENTS = ["CO-45", "PR-1", "PR-2", "PR-3", "CO-45;N130", "", "", ""]
# One defect per bad row: (column, bad value).
_DEFECTS = [
    ("billed_amount", "-12.00"),
    ("provider_npi", "12345"),
    ("service_date", "2026-02-30"),
    ("plan_paid", "ninety"),
    ("procedure_code", "ABC"),
    ("email", "not-an-address"),
    ("member_id", ""),
]


def luhn_npi(base9: np.ndarray) -> np.ndarray:
    """10-digit NPIs: nine digits plus the Luhn check digit over the '80840' prefix."""
    digits = np.array([[int(d) for d in f"80840{b:09d}"] for b in base9])
    doubled = digits[:, ::-1].copy()
    doubled[:, ::2] *= 2
    doubled[doubled > 9] -= 9
    check = (10 - doubled.sum(axis=1) % 10) % 10
    return np.array([f"{b:09d}{c}" for b, c in zip(base9, check, strict=True)])


def generate_extract(
    path: Path, lines: int, *, bad_share: float = 0.02, seed: int = 7, chunk: int = 500_000
) -> None:
    """Write a claims CSV of `lines` claim lines to `path`."""
    rng = np.random.default_rng(seed)
    npis = luhn_npi(rng.integers(100_000_000, 999_999_999, size=len(_PROVIDERS)))
    names = load_contract("claim_line").column_names
    with pacsv.CSVWriter(path, pa.schema([(n, pa.string()) for n in names])) as writer:
        for start in range(0, lines, chunk):
            n = min(chunk, lines - start)
            writer.write_table(_chunk(rng, start, n, npis, bad_share).select(names))


def pick(options: list[str], key: np.ndarray) -> np.ndarray:
    chosen: np.ndarray = np.asarray(options, dtype=object)[key % len(options)]
    return chosen


def money(cents: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(cents / 100), pa.decimal128(12, 2)).cast(pa.string())


def _chunk(rng: np.random.Generator, start: int, n: int, npis: np.ndarray, bad: float) -> pa.Table:
    row = np.arange(start, start + n)
    member = row // 8  # eight lines per member: two claims of four lines
    claim = row // 4
    city = pick([c for c, _, _ in _CITIES], member)
    service = rng.integers(0, len(_SERVICES), n)
    billed = rng.integers(4_000, 90_000, n)  # cents
    allowed = (billed * rng.uniform(0.4, 0.9, n)).astype(np.int64)
    deductible = np.where(rng.random(n) < 0.3, np.minimum(allowed, 5_000), 0)
    copay = np.where(rng.random(n) < 0.5, np.minimum(allowed - deductible, 2_500), 0)
    coinsurance = ((allowed - deductible - copay) * 0.2).astype(np.int64)
    member_owes = deductible + copay + coinsurance
    day = 1 + claim % 27
    columns = {
        "member_id": np.char.add("M", np.char.zfill(member.astype(str), 9)),
        "first_name": pick(_FIRST, member),
        "last_name": pick(_LAST, member // 16),
        "date_of_birth": np.char.add("19", np.char.add((50 + member % 50).astype(str), "-03-14")),
        "address_line": np.char.add((100 + member % 9_000).astype(str), " Alder Ct"),
        "city": city,
        "state": pick([s for _, s, _ in _CITIES], member),
        "postal_code": pick([z for _, _, z in _CITIES], member),
        "email": np.char.add(np.char.add("member", member.astype(str)), "@example.com"),
        "claim_id": np.char.add("CLM", claim.astype(str)),
        "line_number": (1 + row % 4).astype(str),
        "service_date": np.char.add("2026-10-", np.char.zfill(day.astype(str), 2)),
        "adjudication_date": np.char.add(
            "2026-11-", np.char.zfill((1 + claim % 20).astype(str), 2)
        ),
        "provider_name": pick(_PROVIDERS, claim),
        "provider_npi": npis[claim % len(npis)],
        "procedure_code": pick([c for c, _ in _SERVICES], service),
        "service_description": pick([d for _, d in _SERVICES], service),
        "billed_amount": money(billed),
        "allowed_amount": money(allowed),
        "plan_paid": money(allowed - member_owes),
        "member_responsibility": money(member_owes),
        "claim_status": pick(["paid"], row),
        "diagnosis_code": pick(_DIAGNOSES, claim),
        "deductible_amount": money(deductible),
        "copay_amount": money(copay),
        "coinsurance_amount": money(coinsurance),
        "noncovered_amount": money(np.zeros(n)),
        "adjustment_codes": pick(_ADJUSTMENTS, claim),
        # Plan-year limits; the amounts met are left for the statements stage to compute.
        "deductible_limit": pick(["1500.00", "3000.00"], member),
        "deductible_met": pick([""], member),
        "out_of_pocket_limit": pick(["6000.00", "8700.00"], member),
        "out_of_pocket_met": pick([""], member),
    }
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})
    defect_rows = np.flatnonzero(rng.random(n) < bad)
    for which, (column, value) in enumerate(_DEFECTS):
        rows = defect_rows[defect_rows % len(_DEFECTS) == which]
        if len(rows):
            mask = np.zeros(n, dtype=bool)
            mask[rows] = True
            values = pc.if_else(pa.array(mask), pa.scalar(value), table[column])
            table = table.set_column(table.schema.get_field_index(column), column, values)
    return table
