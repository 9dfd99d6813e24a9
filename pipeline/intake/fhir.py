"""FHIR input: CARIN Blue Button ExplanationOfBenefit resources as claim-line text rows.

`read_fhir_claim_lines(path)` yields one dict per EOB item, keyed by the claim-line contract's
field names (schemas/claim_line.json), every value text in the contract's textual form (dates
YYYY-MM-DD, money "123.45", whole numbers as digits) or None. Ingest types and validates these
rows exactly like CSV rows: this module only maps. Each row also has "_source", the row's place
in the file for messages: "line N" (NDJSON), "entry N item M" (Bundle), "item M" (one resource);
M counts the EOB's items from 1 whatever their sequence numbers.

Input: NDJSON (one resource a line), one JSON resource, or a Bundle of type searchset or
collection; gzip-compressed or not. NDJSON is told by the name (.ndjson, .jsonl, before any
.gz) or, in a .json file, by several lines that are each a JSON object. Rejections raise
FileRejected naming what was found and where, never a value. NDJSON is read as a stream, so
FileRejected can come after rows were yielded: the caller must drain the iterator before using
any row (the whole file is refused, as for CSV).

Decisions (the samples in /work/shared/data/fhir are the reference):

* Supported: ExplanationOfBenefit with no meta.profile (plain FHIR, Blue Button STU3 and R4),
  the base FHIR EOB profile, any CARIN BB EOB profile (C4BB-ExplanationOfBenefit-*, any
  version) and Blue Button profiles. A resource is refused when none of its profiles is one of
  these, or when its `use` is not "claim" (preauthorizations and predeterminations decide no
  claim).
* Bundles: ExplanationOfBenefit entries are read; Patient, Coverage, Organization,
  Practitioner, PractitionerRole and Location entries only serve references; OperationOutcome
  entries (search warnings) are skipped; any other resource refuses the file, and so does a
  Bundle with entries but no ExplanationOfBenefit (an empty Bundle yields no rows). NDJSON (bulk
  export: one resource type a file) may hold ExplanationOfBenefit only.
* member_id: the member number of the resolved Patient (identifier type MB, else CARIN "um"),
  else of the resolved focal Coverage (type MB), else the identifier in EOB.patient, else the id
  of the Patient reference ("Patient/xyz" -> "xyz"). References resolve to contained resources
  and to entries of the same Bundle only, so a lone EOB falls back to the reference id (CARIN
  examples: "ExamplePatient1"; Blue Button: the beneficiary id). Insurers should send Bundles
  with the Patient or Coverage when the roster is keyed by member number.
* claim_id: first identifier typed "uc" (CARIN unique claim id), else the first identifier, else
  the resource id.
* service_date: item.servicedPeriod.start, item.servicedDate, else EOB.billablePeriod.start.
* adjudication_date: Blue Button's NCH weekly processing date (supportingInfo nch_wkly_proc_dt),
  else EOB.created (CARIN defines it as the date the claim was adjudicated) except on Blue
  Button EOBs (EOB.type has a Blue Button eob-type coding), whose `created` is when the API built
  the resource (2021-03-08 on 2015-2016 claims in the samples), else payment.date. The claim
  received date and the admission period are not used: both precede the decision.
* provider: a rendering-like care-team member (rendering, performing, primary, attending)
  linked to the item, else EOB.provider (the billing provider), else any rendering-like care
  team member; name and NPI come from the same party (the resolved Practitioner/Organization,
  else the reference's identifier and display). NPI: identifier with system
  http://hl7.org/fhir/sid/us-npi or type NPI.
* procedure_code: the CPT/HCPCS coding of item.productOrService (STU3: item.service); other
  systems (NDC on pharmacy claims, revenue codes) give None. service_description: that coding's
  display, else productOrService.text.
* diagnosis_code: the ICD-10 code of the diagnosis typed principal, else of sequence 1; ICD-9
  codes give None.
* amounts: item.adjudication by category through AMOUNT_CATEGORIES below. When an entry carries
  a Blue Button adjudication coding, that coding alone decides (Blue Button also tags e.g. the
  revenue-centre rate with the generic "submitted"). When several entries feed one field, the
  category listed first in the table wins.
* member_responsibility: memberliability (or Blue Button's patient responsibility / patient pay)
  when given, else deductible + copay + coinsurance + noncovered when any of those is given (the
  CARIN definition of member liability), else C4BB paidbypatient.
* adjustment_codes: every item.adjudication reason coding in the X12 CARC or RARC system, in
  order, semicolon-joined; a CARC is prefixed with the X12 group code found in the same entry
  ("CO-45"). Blue Button's own reason codes are not CARCs and are ignored.
* claim_status, per line: EOB.status cancelled or entered-in-error -> reversed; outcome error ->
  denied; a line with a negative submitted amount (the reversal of an earlier line, as in the
  CARIN professional example) -> reversed; a line marked denied (C4BB payer status "denied",
  Blue Button line processing indicator B, C, D or N) -> denied; else paid. So a claim whose
  lines are all denied is denied.
* Items with revenue code 0001 (the total-charges line of Blue Button institutional claims) are
  skipped: they repeat the sum of the other lines.
* Contact fields stay None unless the EOB's Patient resolves (contained or in the Bundle).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from decimal import Decimal, InvalidOperation
from io import BufferedReader
from pathlib import Path
from typing import Any

from pipeline.errors import FileRejected
from pipeline.records.contracts import load_contract

Row = dict[str, str | None]
Resource = dict[str, Any]
Code = tuple[str, str]

SOURCE = "_source"

_HL7_ADJ = "http://terminology.hl7.org/CodeSystem/adjudication"
_C4BB_ADJ = "http://hl7.org/fhir/us/carin-bb/CodeSystem/C4BBAdjudication"
_BB_ADJ = "https://bluebutton.cms.gov/resources/codesystem/adjudication"
_BB_VAR = "https://bluebutton.cms.gov/resources/variables/"


def _bb(variable: str) -> Code:
    return (_BB_ADJ, _BB_VAR + variable)


# Adjudication category -> contract field. Earlier rows win when a line has several categories
# feeding the same field.
AMOUNT_CATEGORIES: dict[Code, str] = {
    _bb("line_sbmtd_chrg_amt"): "billed_amount",
    _bb("rev_cntr_tot_chrg_amt"): "billed_amount",
    _bb("tot_rx_cst_amt"): "billed_amount",
    (_HL7_ADJ, "submitted"): "billed_amount",
    (_C4BB_ADJ, "drugcost"): "billed_amount",
    _bb("line_alowd_chrg_amt"): "allowed_amount",
    _bb("line_prmry_alowd_chrg_amt"): "allowed_amount",
    (_HL7_ADJ, "eligible"): "allowed_amount",
    _bb("line_nch_pmt_amt"): "plan_paid",
    _bb("rev_cntr_pmt_amt_amt"): "plan_paid",
    _bb("cvrd_d_plan_pd_amt"): "plan_paid",
    (_HL7_ADJ, "benefit"): "plan_paid",
    (_C4BB_ADJ, "paidtoprovider"): "plan_paid",
    (_C4BB_ADJ, "memberliability"): "member_responsibility",
    _bb("rev_cntr_ptnt_rspnsblty_pmt"): "member_responsibility",
    _bb("ptnt_pay_amt"): "member_responsibility",
    _bb("line_bene_ptb_ddctbl_amt"): "deductible_amount",
    _bb("rev_cntr_cash_ddctbl_amt"): "deductible_amount",
    (_HL7_ADJ, "deductible"): "deductible_amount",
    (_HL7_ADJ, "copay"): "copay_amount",
    _bb("line_coinsrnc_amt"): "coinsurance_amount",
    _bb("rev_cntr_coinsrnc_wge_adjstd_c"): "coinsurance_amount",
    (_C4BB_ADJ, "coinsurance"): "coinsurance_amount",
    _bb("rev_cntr_ncvrd_chrg_amt"): "noncovered_amount",
    (_C4BB_ADJ, "noncovered"): "noncovered_amount",
}
_RANK = {code: rank for rank, code in enumerate(AMOUNT_CATEGORIES)}
# Parts of member liability (CARIN: deductible + coinsurance + copay + noncovered).
MEMBER_LIABILITY_PARTS = (
    "deductible_amount",
    "copay_amount",
    "coinsurance_amount",
    "noncovered_amount",
)
# Used for member_responsibility only when neither the liability nor its parts are given.
_PAID_BY_PATIENT: Code = (_C4BB_ADJ, "paidbypatient")

_CARC_SYSTEMS = frozenset(
    {
        "https://x12.org/codes/claim-adjustment-reason-codes",
        "http://x12.org/codes/claim-adjustment-reason-codes",
    }
)
_RARC_SYSTEMS = frozenset(
    {
        "https://x12.org/codes/remittance-advice-remark-codes",
        "http://x12.org/codes/remittance-advice-remark-codes",
    }
)
_GROUP_SYSTEMS = frozenset(
    {
        "https://x12.org/codes/claim-adjustment-group-codes",
        "http://x12.org/codes/claim-adjustment-group-codes",
    }
)
# Codings on a line (item extension, adjudication category or reason) that mark it denied.
_DENIED_LINE_CODES = frozenset(
    {
        ("http://hl7.org/fhir/us/carin-bb/CodeSystem/C4BBPayerAdjudicationStatus", "denied"),
        *((_BB_VAR + "line_prcsg_ind_cd", code) for code in ("B", "C", "D", "N")),
    }
)
_REVERSED_STATUSES = frozenset({"cancelled", "entered-in-error"})
_TOTAL_REVENUE_CODES = frozenset({"0001"})

_PROCEDURE_SYSTEMS = frozenset(
    {
        "http://www.ama-assn.org/go/cpt",
        "urn:oid:2.16.840.1.113883.6.12",
        "https://bluebutton.cms.gov/resources/codesystem/hcpcs",
        "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
        "urn:oid:2.16.840.1.113883.6.285",
    }
)
_ICD10_SYSTEMS = frozenset(
    {
        "http://hl7.org/fhir/sid/icd-10-cm",
        "http://hl7.org/fhir/sid/icd-10",
        "urn:oid:2.16.840.1.113883.6.90",
    }
)
_NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
_NPI_TYPES = frozenset({"NPI", "npi"})
_MEMBER_ID_TYPES = ("MB", "um")
_CLAIM_ID_TYPE = "uc"
_RENDERING_ROLES = frozenset({"rendering", "performing", "primary", "attending"})
_BB_INFO = "https://bluebutton.cms.gov/resources/codesystem/information"
_PROCESSING_DATE: Code = (_BB_INFO, _BB_VAR + "nch_wkly_proc_dt")
_BB_EOB_TYPE = "https://bluebutton.cms.gov/resources/codesystem/eob-type"

_SUPPORTED_PROFILE_PREFIXES = (
    "http://hl7.org/fhir/us/carin-bb/StructureDefinition/C4BB-ExplanationOfBenefit",
    "http://hl7.org/fhir/StructureDefinition/ExplanationOfBenefit",
    "https://bluebutton.cms.gov/",
)
_BUNDLE_TYPES = frozenset({"searchset", "collection"})
# Bundle entries that only serve references.
_REFERENCE_TYPES = frozenset(
    {"Patient", "Coverage", "Organization", "Practitioner", "PractitionerRole", "Location"}
)
_SKIPPED_TYPES = frozenset({"OperationOutcome"})
_NDJSON_SUFFIXES = (".ndjson", ".jsonl")

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,63}$")
# A canonical StructureDefinition URL, optionally versioned: named in messages, nothing else is.
_PROFILE_URL = re.compile(
    r"^https?://[A-Za-z0-9.-]{1,100}(/[A-Za-z0-9._-]{1,100}){0,8}"
    r"/StructureDefinition/[A-Za-z0-9._-]{1,100}(\|[A-Za-z0-9._-]{1,20})?$"
)


def read_fhir_claim_lines(path: Path) -> Iterator[Row]:
    """One text row per ExplanationOfBenefit item of the file; see the module docstring."""
    if path.name.lower().removesuffix(".gz").endswith(_NDJSON_SUFFIXES):
        yield from _read_ndjson(path, _lines(path))
        return
    text = _read_text(path)
    try:
        document = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as err:
        lines = text.splitlines()
        first = next((line for line in lines if line.strip()), "")
        if not _is_json_object(first) or len(lines) < 2:
            raise FileRejected(
                path.name, f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
            ) from err
        # More than one JSON object, the first alone on its line: NDJSON.
        yield from _read_ndjson(path, enumerate(lines, start=1))
        return
    if not isinstance(document, dict):
        raise FileRejected(path.name, "not a FHIR resource: the JSON is not an object")
    if document.get("resourceType") == "Bundle":
        yield from _read_bundle(path, document)
        return
    _check_eob(path, document, "resource 1")
    for row in _rows(document, _References(document, {})):
        row[SOURCE] = f"item {row[SOURCE]}"
        yield row


def _open(path: Path) -> gzip.GzipFile | BufferedReader:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    with path.open("rb") as stream:
        gzipped = stream.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def _read_text(path: Path) -> str:
    try:
        with _open(path) as stream:
            return stream.read().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise FileRejected(path.name, f"not UTF-8 text (byte {err.start})") from err
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise FileRejected(path.name, f"unreadable gzip data: {type(err).__name__}") from err


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with _open(path) as stream:
            for number, raw in enumerate(stream, start=1):
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise FileRejected(
                        path.name,
                        f"line {number} is not UTF-8 text (byte {err.start} of the line)",
                    ) from err
                yield number, text
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise FileRejected(path.name, f"unreadable gzip data: {type(err).__name__}") from err


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _read_ndjson(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[Row]:
    count = 0
    for number, line in lines:
        if not line.strip():
            continue
        count += 1
        try:
            resource = json.loads(line, parse_float=Decimal)
        except json.JSONDecodeError as err:
            raise FileRejected(
                path.name, f"line {number} is not valid JSON: {err.msg} (column {err.colno})"
            ) from err
        if not isinstance(resource, dict):
            raise FileRejected(path.name, f"line {number} is not a JSON object")
        _check_eob(path, resource, f"resource {count} (line {number})")
        for row in _rows(resource, _References(resource, {})):
            row[SOURCE] = f"line {number}"
            yield row


def _read_bundle(path: Path, bundle: Resource) -> Iterator[Row]:
    kind = bundle.get("type")
    if kind not in _BUNDLE_TYPES:
        raise FileRejected(
            path.name,
            f"a Bundle of type {_safe_name(kind)} is not supported (searchset or collection)",
        )
    entries = _list(bundle.get("entry"))
    shared: dict[str, Resource] = {}
    eobs: list[tuple[int, Resource]] = []
    for number, entry in enumerate(entries, start=1):
        resource = _obj(_obj(entry).get("resource"))
        kind = resource.get("resourceType")
        where = f"entry {number}"
        if kind == "ExplanationOfBenefit":
            _check_eob(path, resource, where)
            eobs.append((number, resource))
        elif kind in _REFERENCE_TYPES:
            pass
        elif kind in _SKIPPED_TYPES:
            continue
        else:
            raise FileRejected(path.name, f"{where} is {_a_resource(kind)}, not supported here")
        _index(shared, resource, _str(_obj(entry).get("fullUrl")))
    if entries and not eobs:
        raise FileRejected(
            path.name, f"the Bundle's {len(entries)} entries hold no ExplanationOfBenefit"
        )
    for number, eob in eobs:
        for row in _rows(eob, _References(eob, shared)):
            row[SOURCE] = f"entry {number} item {row[SOURCE]}"
            yield row


def _check_eob(path: Path, resource: Resource, where: str) -> None:
    kind = resource.get("resourceType")
    if kind != "ExplanationOfBenefit":
        raise FileRejected(
            path.name, f"{where} is {_a_resource(kind)}, not an ExplanationOfBenefit"
        )
    profiles = [p for p in _list(_obj(resource.get("meta")).get("profile")) if isinstance(p, str)]
    if profiles and not any(_supported_profile(p) for p in profiles):
        raise FileRejected(
            path.name,
            f"{where} has profile {_safe_url(profiles[0])}, which is not supported"
            " (CARIN Blue Button, Blue Button or plain ExplanationOfBenefit)",
        )
    use = resource.get("use", "claim")
    if use != "claim":
        raise FileRejected(
            path.name, f"{where} is an ExplanationOfBenefit for use {_safe_name(use)}, not a claim"
        )
    if not isinstance(resource.get("item", []), list):
        raise FileRejected(path.name, f"{where} has an item element that is not a list")


def _supported_profile(profile: str) -> bool:
    return profile.split("|", 1)[0].startswith(_SUPPORTED_PROFILE_PREFIXES)


def _safe_name(value: object) -> str:
    return repr(value) if isinstance(value, str) and _NAME.match(value) else "(unrecognised)"


def _safe_url(value: str) -> str:
    return value if _PROFILE_URL.match(value) else "(unrecognised)"


def _a_resource(kind: object) -> str:
    if isinstance(kind, str) and _NAME.match(kind):
        return f"{'an' if kind[0] in 'AEIOU' else 'a'} {kind}"
    return (
        "a resource without a resourceType" if kind is None else "a resource of unrecognised type"
    )


# ---------------------------------------------------------------------------------------------
# References


def _index(into: dict[str, Resource], resource: Resource, full_url: str | None) -> None:
    kind, rid = _str(resource.get("resourceType")), _str(resource.get("id"))
    if kind and rid:
        into.setdefault(f"{kind}/{rid}", resource)
    if full_url:
        into.setdefault(full_url, resource)


class _References:
    """Resolves references of one EOB: its contained resources, then the Bundle's entries."""

    def __init__(self, eob: Resource, shared: dict[str, Resource]) -> None:
        self._contained = {
            f"#{r['id']}": r
            for r in map(_obj, _list(eob.get("contained")))
            if isinstance(r.get("id"), str)
        }
        self._shared = shared

    def resolve(self, reference: object) -> Resource | None:
        target = _str(_obj(reference).get("reference"))
        if not target:
            return None
        if target.startswith("#"):
            return self._contained.get(target)
        found = self._shared.get(target)
        if found is None and "/" in target:
            # An absolute URL ending in Type/id, or a version-specific reference.
            parts = target.split("/_history/", 1)[0].rstrip("/").split("/")
            found = self._shared.get("/".join(parts[-2:]))
        return found


# ---------------------------------------------------------------------------------------------
# Mapping


def _rows(eob: Resource, refs: _References) -> Iterator[Row]:
    names = load_contract("claim_line").column_names
    patient = refs.resolve(eob.get("patient"))
    claim: Row = {
        "member_id": _member_id(eob, patient, refs),
        "claim_id": _claim_id(eob),
        "adjudication_date": _adjudication_date(eob),
        "diagnosis_code": _diagnosis(eob),
        **_contact(patient),
    }
    for position, item in enumerate(map(_obj, _list(eob.get("item"))), start=1):
        if _revenue_code(item) in _TOTAL_REVENUE_CODES:
            continue
        row: Row = dict.fromkeys(names)
        row.update(claim)
        row.update(_line(eob, item, refs))
        row[SOURCE] = str(position)
        yield row


def _line(eob: Resource, item: Resource, refs: _References) -> Row:
    product = _obj(item.get("productOrService") or item.get("service"))
    procedure = next((c for c in _codings(product) if c.get("system") in _PROCEDURE_SYSTEMS), {})
    amounts = _amounts(item)
    provider_name, provider_npi = _provider(eob, item, refs)
    return {
        "line_number": _text(item.get("sequence")),
        "service_date": _date(
            _obj(item.get("servicedPeriod")).get("start")
            or item.get("servicedDate")
            or _obj(eob.get("billablePeriod")).get("start")
        ),
        "provider_name": provider_name,
        "provider_npi": provider_npi,
        "procedure_code": _str(procedure.get("code")),
        "service_description": _str(procedure.get("display")) or _str(product.get("text")),
        **{field: _money(value) for field, value in amounts.items()},
        "claim_status": _status(eob, item, amounts),
        "adjustment_codes": _adjustment_codes(item),
    }


def _amounts(item: Resource) -> dict[str, Decimal | None]:
    best: dict[str, tuple[int, Decimal]] = {}
    paid_by_patient: Decimal | None = None
    for adjudication in map(_obj, _list(item.get("adjudication"))):
        value = _decimal(_obj(adjudication.get("amount")).get("value"))
        if value is None:
            continue
        codes = _coding_keys(_obj(adjudication.get("category")))
        if any(system == _BB_ADJ for system, _ in codes):
            codes = [code for code in codes if code[0] == _BB_ADJ]
        for code in codes:
            if code == _PAID_BY_PATIENT and paid_by_patient is None:
                paid_by_patient = value
            field = AMOUNT_CATEGORIES.get(code)
            if field is not None and (field not in best or _RANK[code] < best[field][0]):
                best[field] = (_RANK[code], value)
    amounts: dict[str, Decimal | None] = {
        field: best[field][1] if field in best else None
        for field in set(AMOUNT_CATEGORIES.values())
    }
    if amounts["member_responsibility"] is None:
        parts = [part for f in MEMBER_LIABILITY_PARTS if (part := amounts[f]) is not None]
        if parts:
            amounts["member_responsibility"] = sum(parts, Decimal(0))
        else:
            amounts["member_responsibility"] = paid_by_patient
    return amounts


def _status(eob: Resource, item: Resource, amounts: dict[str, Decimal | None]) -> str:
    if eob.get("status") in _REVERSED_STATUSES:
        return "reversed"
    if eob.get("outcome") == "error":
        return "denied"
    billed = amounts.get("billed_amount")
    if billed is not None and billed < 0:
        return "reversed"
    line_codes = [_obj(e.get("valueCoding")) for e in map(_obj, _list(item.get("extension")))]
    for adjudication in map(_obj, _list(item.get("adjudication"))):
        line_codes += _codings(_obj(adjudication.get("category")))
        line_codes += _codings(_obj(adjudication.get("reason")))
    if any((c.get("system"), c.get("code")) in _DENIED_LINE_CODES for c in line_codes):
        return "denied"
    return "paid"


def _adjustment_codes(item: Resource) -> str | None:
    found: list[str] = []
    for adjudication in map(_obj, _list(item.get("adjudication"))):
        codings = _codings(_obj(adjudication.get("reason")))
        nearby = codings + _codings(_obj(adjudication.get("category")))
        group = next(
            (_str(c.get("code")) for c in nearby if c.get("system") in _GROUP_SYSTEMS), None
        )
        for coding in codings:
            code = _str(coding.get("code"))
            if not code:
                continue
            if coding.get("system") in _CARC_SYSTEMS:
                found.append(f"{group}-{code}" if group and "-" not in code else code)
            elif coding.get("system") in _RARC_SYSTEMS:
                found.append(code)
    return ";".join(dict.fromkeys(found)) or None


def _member_id(eob: Resource, patient: Resource | None, refs: _References) -> str | None:
    raw = eob.get("insurance")
    insurance = [_obj(i) for i in ([raw] if isinstance(raw, dict) else _list(raw))]  # STU3: one
    focal = [i for i in insurance if i.get("focal") is True] or insurance or [{}]
    coverage = refs.resolve(focal[0].get("coverage"))
    reference = _obj(eob.get("patient"))
    for resource in (patient, coverage):
        for wanted in _MEMBER_ID_TYPES:
            for identifier in map(_obj, _list(_obj(resource).get("identifier"))):
                if wanted in _type_codes(identifier) and _str(identifier.get("value")):
                    return _str(identifier.get("value"))
    logical = _str(_obj(reference.get("identifier")).get("value"))
    if logical:
        return logical
    target = _str(reference.get("reference"))
    if target and not target.startswith("#") and "/" in target:
        parts = target.split("/_history/", 1)[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
            return parts[-1]
    return None


def _claim_id(eob: Resource) -> str | None:
    identifiers = [i for i in map(_obj, _list(eob.get("identifier"))) if _str(i.get("value"))]
    typed = [i for i in identifiers if _CLAIM_ID_TYPE in _type_codes(i)]
    chosen = (typed or identifiers or [{}])[0]
    return _str(chosen.get("value")) or _str(eob.get("id"))


def _adjudication_date(eob: Resource) -> str | None:
    for info in map(_obj, _list(eob.get("supportingInfo") or eob.get("information"))):
        if _PROCESSING_DATE in _coding_keys(_obj(info.get("category"))):
            date = _date(info.get("timingDate"))
            if date:
                return date
    created = None if _is_blue_button(eob) else _date(eob.get("created"))
    return created or _date(_obj(eob.get("payment")).get("date"))


def _is_blue_button(eob: Resource) -> bool:
    return any(system == _BB_EOB_TYPE for system, _ in _coding_keys(_obj(eob.get("type"))))


def _diagnosis(eob: Resource) -> str | None:
    diagnoses = [_obj(d) for d in _list(eob.get("diagnosis"))]
    principal = [d for d in diagnoses if "principal" in _type_codes_of(_list(d.get("type")))]
    first = [d for d in diagnoses if d.get("sequence") == 1]
    for diagnosis in principal or first:
        for coding in _codings(_obj(diagnosis.get("diagnosisCodeableConcept"))):
            if coding.get("system") in _ICD10_SYSTEMS and _str(coding.get("code")):
                return _str(coding.get("code"))
    return None


def _provider(eob: Resource, item: Resource, refs: _References) -> tuple[str | None, str | None]:
    team = [_obj(member) for member in _list(eob.get("careTeam"))]
    rendering = [m for m in team if _type_codes_of([m.get("role")]) & _RENDERING_ROLES]
    linked = set(_list(item.get("careTeamSequence") or item.get("careTeamLinkId")))
    candidates = [m.get("provider") for m in rendering if m.get("sequence") in linked]
    candidates.append(eob.get("provider"))
    candidates += [m.get("provider") for m in rendering]
    for reference in map(_obj, candidates):
        name, npi = _party(reference, refs.resolve(reference))
        if name or npi:
            return name, npi
    return None, None


def _party(reference: Resource, resource: Resource | None) -> tuple[str | None, str | None]:
    identifiers = [_obj(i) for i in _list(_obj(resource).get("identifier"))]
    identifiers.append(_obj(reference.get("identifier")))
    npi = next(
        (
            _str(i.get("value"))
            for i in identifiers
            if _str(i.get("value"))
            and (i.get("system") == _NPI_SYSTEM or _type_codes(i) & _NPI_TYPES)
        ),
        None,
    )
    return _party_name(resource) or _str(reference.get("display")), npi


def _party_name(resource: Resource | None) -> str | None:
    name = _obj(resource).get("name")
    if isinstance(name, str):
        return name.strip() or None
    return _human_name(_list(name))


def _human_name(names: list[Any]) -> str | None:
    if not names:
        return None
    name = _obj(names[0])
    if _str(name.get("text")):
        return _str(name.get("text"))
    words = [
        *[w for w in _list(name.get("prefix")) if isinstance(w, str)],
        *[w for w in _list(name.get("given")) if isinstance(w, str)],
        *([name["family"]] if isinstance(name.get("family"), str) else []),
        *[w for w in _list(name.get("suffix")) if isinstance(w, str)],
    ]
    return " ".join(w.strip() for w in words if w.strip()) or None


def _contact(patient: Resource | None) -> Row:
    if patient is None or patient.get("resourceType") != "Patient":
        return {}
    name = _obj((_list(patient.get("name")) or [{}])[0])
    addresses = [_obj(a) for a in _list(patient.get("address"))]
    address = next((a for a in addresses if a.get("use") == "home"), None) or (
        addresses[0] if addresses else {}
    )
    emails = [
        _obj(t)
        for t in _list(patient.get("telecom"))
        if _obj(t).get("system") == "email" and _str(_obj(t).get("value"))
    ]
    emails.sort(key=_rank)
    lines = [line for line in _list(address.get("line")) if isinstance(line, str)]
    return {
        "first_name": " ".join(g for g in _list(name.get("given")) if isinstance(g, str)) or None,
        "last_name": _str(name.get("family")),
        "date_of_birth": _date(patient.get("birthDate")),
        "address_line": ", ".join(lines) or None,
        "city": _str(address.get("city")),
        "state": _str(address.get("state")),
        "postal_code": _str(address.get("postalCode")),
        "email": _str(emails[0].get("value")) if emails else None,
    }


def _rank(telecom: Resource) -> int:
    rank = telecom.get("rank")
    return rank if isinstance(rank, int) else 1 << 30


def _revenue_code(item: Resource) -> str | None:
    return next((_str(c.get("code")) for c in _codings(_obj(item.get("revenue")))), None)


# ---------------------------------------------------------------------------------------------
# JSON helpers: the input is untrusted, so every access tolerates a missing or mistyped element.


def _obj(value: object) -> Resource:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _codings(concept: Resource) -> list[Resource]:
    return [_obj(c) for c in _list(concept.get("coding"))]


def _coding_keys(concept: Resource) -> list[Code]:
    return [
        (c["system"], c["code"])
        for c in _codings(concept)
        if isinstance(c.get("system"), str) and isinstance(c.get("code"), str)
    ]


def _type_codes(identifier: Resource) -> set[str]:
    return _type_codes_of([identifier.get("type")])


def _type_codes_of(concepts: list[Any]) -> set[str]:
    return {
        c["code"] for concept in concepts for c in _codings(_obj(concept)) if _str(c.get("code"))
    }


def _text(value: object) -> str | None:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | Decimal):
        return str(value)
    return _str(value)


def _date(value: object) -> str | None:
    text = _str(value)
    # A dateTime keeps its date as written; partial dates go on for ingest to refuse.
    return text.split("T", 1)[0] if text else None


def _decimal(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    return None


def _money(value: Decimal | None) -> str | None:
    if value is None:
        return None
    try:
        cents = value.quantize(Decimal("0.01"))
    except InvalidOperation:  # too many digits for two decimals
        return format(value, "f")
    # More than two decimals is not rounded away: ingest refuses the row.
    return f"{cents:.2f}" if cents == value else format(value, "f")
