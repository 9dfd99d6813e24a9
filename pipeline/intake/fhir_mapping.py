"""FHIR mapping: one ExplanationOfBenefit resource to claim-line text rows.

`claim_rows(eob, refs)` yields one row per item, keyed by the claim-line contract's field names
(schemas/claim_line.json), every value text in the contract's textual form (dates YYYY-MM-DD,
money "123.45", whole numbers as digits) or None, and SOURCE, the item's position from 1.
`References` resolves the EOB's references to its contained resources and to the other
resources of its Bundle. Reading files and checking resources: pipeline.intake.fhir.

Decisions (the samples in /work/shared/data/fhir are the reference):

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

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from pipeline.intake.fhir_json import (
    Code,
    Resource,
    as_date,
    as_decimal,
    as_list,
    as_money,
    as_object,
    as_str,
    as_text,
    coding_keys,
    codings,
    type_codes,
    type_codes_of,
)
from pipeline.records.contracts import load_contract

Row = dict[str, str | None]

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


# ---------------------------------------------------------------------------------------------
# References


def index_resource(into: dict[str, Resource], resource: Resource, full_url: str | None) -> None:
    kind, rid = as_str(resource.get("resourceType")), as_str(resource.get("id"))
    if kind and rid:
        into.setdefault(f"{kind}/{rid}", resource)
    if full_url:
        into.setdefault(full_url, resource)


class References:
    """Resolves references of one EOB: its contained resources, then the Bundle's entries."""

    def __init__(self, eob: Resource, shared: dict[str, Resource]) -> None:
        self._contained = {
            f"#{r['id']}": r
            for r in map(as_object, as_list(eob.get("contained")))
            if isinstance(r.get("id"), str)
        }
        self._shared = shared

    def resolve(self, reference: object) -> Resource | None:
        target = as_str(as_object(reference).get("reference"))
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


def claim_rows(eob: Resource, refs: References) -> Iterator[Row]:
    names = load_contract("claim_line").column_names
    patient = refs.resolve(eob.get("patient"))
    claim: Row = {
        "member_id": _member_id(eob, patient, refs),
        "claim_id": _claim_id(eob),
        "adjudication_date": _adjudication_date(eob),
        "diagnosis_code": _diagnosis(eob),
        **_contact(patient),
    }
    for position, item in enumerate(map(as_object, as_list(eob.get("item"))), start=1):
        if _revenue_code(item) in _TOTAL_REVENUE_CODES:
            continue
        row: Row = dict.fromkeys(names)
        row.update(claim)
        row.update(_line(eob, item, refs))
        row[SOURCE] = str(position)
        yield row


def _line(eob: Resource, item: Resource, refs: References) -> Row:
    product = as_object(item.get("productOrService") or item.get("service"))
    procedure = next((c for c in codings(product) if c.get("system") in _PROCEDURE_SYSTEMS), {})
    amounts = _amounts(item)
    provider_name, provider_npi = _provider(eob, item, refs)
    return {
        "line_number": as_text(item.get("sequence")),
        "service_date": as_date(
            as_object(item.get("servicedPeriod")).get("start")
            or item.get("servicedDate")
            or as_object(eob.get("billablePeriod")).get("start")
        ),
        "provider_name": provider_name,
        "provider_npi": provider_npi,
        "procedure_code": as_str(procedure.get("code")),
        "service_description": as_str(procedure.get("display")) or as_str(product.get("text")),
        **{field: as_money(value) for field, value in amounts.items()},
        "claim_status": _status(eob, item, amounts),
        "adjustment_codes": _adjustment_codes(item),
    }


def _amounts(item: Resource) -> dict[str, Decimal | None]:
    best: dict[str, tuple[int, Decimal]] = {}
    paid_by_patient: Decimal | None = None
    for adjudication in map(as_object, as_list(item.get("adjudication"))):
        value = as_decimal(as_object(adjudication.get("amount")).get("value"))
        if value is None:
            continue
        codes = coding_keys(as_object(adjudication.get("category")))
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
    line_codes = [
        as_object(e.get("valueCoding")) for e in map(as_object, as_list(item.get("extension")))
    ]
    for adjudication in map(as_object, as_list(item.get("adjudication"))):
        line_codes += codings(as_object(adjudication.get("category")))
        line_codes += codings(as_object(adjudication.get("reason")))
    if any((c.get("system"), c.get("code")) in _DENIED_LINE_CODES for c in line_codes):
        return "denied"
    return "paid"


def _adjustment_codes(item: Resource) -> str | None:
    found: list[str] = []
    for adjudication in map(as_object, as_list(item.get("adjudication"))):
        reasons = codings(as_object(adjudication.get("reason")))
        nearby = reasons + codings(as_object(adjudication.get("category")))
        group = next(
            (as_str(c.get("code")) for c in nearby if c.get("system") in _GROUP_SYSTEMS), None
        )
        for coding in reasons:
            code = as_str(coding.get("code"))
            if not code:
                continue
            if coding.get("system") in _CARC_SYSTEMS:
                found.append(f"{group}-{code}" if group and "-" not in code else code)
            elif coding.get("system") in _RARC_SYSTEMS:
                found.append(code)
    return ";".join(dict.fromkeys(found)) or None


def _member_id(eob: Resource, patient: Resource | None, refs: References) -> str | None:
    raw = eob.get("insurance")
    insurance = [
        as_object(i) for i in ([raw] if isinstance(raw, dict) else as_list(raw))
    ]  # STU3: one
    focal = [i for i in insurance if i.get("focal") is True] or insurance or [{}]
    coverage = refs.resolve(focal[0].get("coverage"))
    reference = as_object(eob.get("patient"))
    for resource in (patient, coverage):
        for wanted in _MEMBER_ID_TYPES:
            for identifier in map(as_object, as_list(as_object(resource).get("identifier"))):
                if wanted in type_codes(identifier) and as_str(identifier.get("value")):
                    return as_str(identifier.get("value"))
    logical = as_str(as_object(reference.get("identifier")).get("value"))
    if logical:
        return logical
    target = as_str(reference.get("reference"))
    if target and not target.startswith("#") and "/" in target:
        parts = target.split("/_history/", 1)[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
            return parts[-1]
    return None


def _claim_id(eob: Resource) -> str | None:
    identifiers = [
        i for i in map(as_object, as_list(eob.get("identifier"))) if as_str(i.get("value"))
    ]
    typed = [i for i in identifiers if _CLAIM_ID_TYPE in type_codes(i)]
    chosen = (typed or identifiers or [{}])[0]
    return as_str(chosen.get("value")) or as_str(eob.get("id"))


def _adjudication_date(eob: Resource) -> str | None:
    for info in map(as_object, as_list(eob.get("supportingInfo") or eob.get("information"))):
        if _PROCESSING_DATE in coding_keys(as_object(info.get("category"))):
            date = as_date(info.get("timingDate"))
            if date:
                return date
    created = None if _is_blue_button(eob) else as_date(eob.get("created"))
    return created or as_date(as_object(eob.get("payment")).get("date"))


def _is_blue_button(eob: Resource) -> bool:
    return any(system == _BB_EOB_TYPE for system, _ in coding_keys(as_object(eob.get("type"))))


def _diagnosis(eob: Resource) -> str | None:
    diagnoses = [as_object(d) for d in as_list(eob.get("diagnosis"))]
    principal = [d for d in diagnoses if "principal" in type_codes_of(as_list(d.get("type")))]
    first = [d for d in diagnoses if d.get("sequence") == 1]
    for diagnosis in principal or first:
        for coding in codings(as_object(diagnosis.get("diagnosisCodeableConcept"))):
            if coding.get("system") in _ICD10_SYSTEMS and as_str(coding.get("code")):
                return as_str(coding.get("code"))
    return None


def _provider(eob: Resource, item: Resource, refs: References) -> tuple[str | None, str | None]:
    team = [as_object(member) for member in as_list(eob.get("careTeam"))]
    rendering = [m for m in team if type_codes_of([m.get("role")]) & _RENDERING_ROLES]
    linked = set(as_list(item.get("careTeamSequence") or item.get("careTeamLinkId")))
    candidates = [m.get("provider") for m in rendering if m.get("sequence") in linked]
    candidates.append(eob.get("provider"))
    candidates += [m.get("provider") for m in rendering]
    for reference in map(as_object, candidates):
        name, npi = _party(reference, refs.resolve(reference))
        if name or npi:
            return name, npi
    return None, None


def _party(reference: Resource, resource: Resource | None) -> tuple[str | None, str | None]:
    identifiers = [as_object(i) for i in as_list(as_object(resource).get("identifier"))]
    identifiers.append(as_object(reference.get("identifier")))
    npi = next(
        (
            as_str(i.get("value"))
            for i in identifiers
            if as_str(i.get("value"))
            and (i.get("system") == _NPI_SYSTEM or type_codes(i) & _NPI_TYPES)
        ),
        None,
    )
    return _party_name(resource) or as_str(reference.get("display")), npi


def _party_name(resource: Resource | None) -> str | None:
    name = as_object(resource).get("name")
    if isinstance(name, str):
        return name.strip() or None
    return _human_name(as_list(name))


def _human_name(names: list[Any]) -> str | None:
    if not names:
        return None
    name = as_object(names[0])
    if as_str(name.get("text")):
        return as_str(name.get("text"))
    words = [
        *[w for w in as_list(name.get("prefix")) if isinstance(w, str)],
        *[w for w in as_list(name.get("given")) if isinstance(w, str)],
        *([name["family"]] if isinstance(name.get("family"), str) else []),
        *[w for w in as_list(name.get("suffix")) if isinstance(w, str)],
    ]
    return " ".join(w.strip() for w in words if w.strip()) or None


def _contact(patient: Resource | None) -> Row:
    if patient is None or patient.get("resourceType") != "Patient":
        return {}
    name = as_object((as_list(patient.get("name")) or [{}])[0])
    addresses = [as_object(a) for a in as_list(patient.get("address"))]
    address = next((a for a in addresses if a.get("use") == "home"), None) or (
        addresses[0] if addresses else {}
    )
    emails = [
        as_object(t)
        for t in as_list(patient.get("telecom"))
        if as_object(t).get("system") == "email" and as_str(as_object(t).get("value"))
    ]
    emails.sort(key=_rank)
    lines = [line for line in as_list(address.get("line")) if isinstance(line, str)]
    return {
        "first_name": " ".join(g for g in as_list(name.get("given")) if isinstance(g, str)) or None,
        "last_name": as_str(name.get("family")),
        "date_of_birth": as_date(patient.get("birthDate")),
        "address_line": ", ".join(lines) or None,
        "city": as_str(address.get("city")),
        "state": as_str(address.get("state")),
        "postal_code": as_str(address.get("postalCode")),
        "email": as_str(emails[0].get("value")) if emails else None,
    }


def _rank(telecom: Resource) -> int:
    rank = telecom.get("rank")
    return rank if isinstance(rank, int) else 1 << 30


def _revenue_code(item: Resource) -> str | None:
    return next((as_str(c.get("code")) for c in codings(as_object(item.get("revenue")))), None)
