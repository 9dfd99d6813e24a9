"""FHIR input: CARIN Blue Button EOB samples mapped onto claim-line text rows.

Expected values are read by hand from the public samples in /work/shared/data/fhir.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import FileRejected
from pipeline.intake.fhir import SOURCE, read_fhir_claim_lines
from pipeline.records.contracts import load_contract
from tests.conftest import SHARED_DATA, TEST_KEYRING

CARIN = SHARED_DATA / "fhir" / "carin-bb"
BB = SHARED_DATA / "fhir" / "bluebutton2"
PROFESSIONAL = CARIN / "ExplanationOfBenefit_ProfessionalEOBExample1.json"
OUTPATIENT = CARIN / "ExplanationOfBenefit_OutpatientEOBExample1.json"
INPATIENT = CARIN / "ExplanationOfBenefit_InpatientEOBExample1.json"
CARRIER_V2 = BB / "eob_read_carrier_v2.json"
CONTRACT_FIELDS = set(load_contract("claim_line").column_names)

# Every sample holding ExplanationOfBenefit resources, with the rows it gives.
SAMPLE_ROWS = {
    PROFESSIONAL: 6,
    OUTPATIENT: 2,
    INPATIENT: 13,
    CARRIER_V2: 1,
    BB / "eob_read_carrier_v1.json": 1,
    # 11 items, the last the revenue-code 0001 total-charges line.
    BB / "eob_read_in_pt_v2.json": 10,
    # 6 items, the last the revenue-code 0001 total-charges line.
    BB / "eob_read_out_pt_v2.json": 5,
    BB / "eob_search_v2.json": 10,
    BB / "eob_search_pt_v2.json": 10,
}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def rows_of(path: Path) -> list[dict[str, str | None]]:
    return list(read_fhir_claim_lines(path))


def write_json(path: Path, resource: dict[str, Any]) -> Path:
    path.write_text(json.dumps(resource), encoding="utf-8")
    return path


def rejection(path: Path) -> str:
    with pytest.raises(FileRejected) as caught:
        rows_of(path)
    assert caught.value.file_name == path.name
    return caught.value.reason


@pytest.mark.parametrize("path", list(SAMPLE_ROWS), ids=lambda p: p.name)
def test_every_sample_gives_one_row_per_item_with_every_contract_field(path: Path) -> None:
    rows = rows_of(path)
    assert len(rows) == SAMPLE_ROWS[path]
    for row in rows:
        assert set(row) == CONTRACT_FIELDS | {SOURCE}
        assert all(v is None or isinstance(v, str) for v in row.values())
        assert row["member_id"] and row["claim_id"] and row["line_number"]


def test_carin_professional_lines() -> None:
    rows = rows_of(PROFESSIONAL)
    first = rows[0]
    assert first["member_id"] == "ExamplePatient1"  # Patient/ExamplePatient1, not resolvable
    assert first["claim_id"] == "ProfessionalEOBExample1"  # identifier typed "uc"
    assert first["line_number"] == "1"
    assert first["service_date"] == "2020-08-04"
    assert first["adjudication_date"] == "2020-08-24"  # created 2020-08-24T00:00:00-04:00
    assert first["procedure_code"] == "75710"
    assert first["service_description"] is None
    assert first["diagnosis_code"] == "I70.249"
    assert (first["billed_amount"], first["allowed_amount"], first["plan_paid"]) == (
        "68.80",
        "34.80",
        "34.80",
    )
    # No memberliability on the lines: deductible 0 + copay 0 + noncovered 0.
    assert first["member_responsibility"] == "0.00"
    assert (first["deductible_amount"], first["copay_amount"]) == ("0.00", "0.00")
    assert first["coinsurance_amount"] is None
    assert first["noncovered_amount"] == "0.00"
    assert first["claim_status"] == "paid"
    assert first["adjustment_codes"] is None
    # Organization/ProviderOrganization1 is in another file: nothing to read here.
    assert (first["provider_name"], first["provider_npi"]) == (None, None)
    # Contact fields come from the roster.
    assert first["first_name"] is None and first["email"] is None
    assert [r[SOURCE] for r in rows] == [f"item {n}" for n in range(1, 7)]
    # Line 2 reverses line 1 with negative amounts.
    assert (rows[1]["billed_amount"], rows[1]["claim_status"]) == ("-68.80", "reversed")
    # Line 4: 751.20 billed, 224.11 eligible, nothing paid, 224.11 not covered.
    fourth = rows[3]
    assert fourth["procedure_code"] == "37228"
    assert (fourth["billed_amount"], fourth["allowed_amount"], fourth["plan_paid"]) == (
        "751.20",
        "224.11",
        "0.00",
    )
    assert fourth["noncovered_amount"] == "224.11"
    assert fourth["member_responsibility"] == "224.11"
    assert fourth["claim_status"] == "paid"


def test_carin_outpatient_and_inpatient() -> None:
    outpatient = rows_of(OUTPATIENT)
    assert outpatient[0]["claim_id"] == "OutpatientEOBExample1"
    assert outpatient[0]["service_date"] == "2020-09-29"
    assert outpatient[0]["adjudication_date"] == "2020-10-10"
    assert outpatient[0]["diagnosis_code"] == "I95.1"
    # "eligible" here also carries Blue Button's line_prmry_alowd_chrg_amt.
    assert [outpatient[0][f] for f in ("billed_amount", "allowed_amount", "plan_paid")] == [
        "84.40",
        "56.52",
        "56.52",
    ]
    assert outpatient[1]["billed_amount"] == "0.00"

    inpatient = rows_of(INPATIENT)
    assert {r["service_date"] for r in inpatient} == {"2017-05-23"}  # servicedPeriod.start
    assert {r["adjudication_date"] for r in inpatient} == {"2017-06-01"}
    assert {r["diagnosis_code"] for r in inpatient} == {"I21.4"}
    # CARIN inpatient EOBs adjudicate the claim, not the lines.
    assert {r["billed_amount"] for r in inpatient} == {None}


@pytest.mark.parametrize(
    ("path", "allowed"), [(CARRIER_V2, "250.00"), (BB / "eob_read_carrier_v1.json", "60.00")]
)
def test_blue_button_carrier(path: Path, allowed: str) -> None:
    [row] = rows_of(path)
    assert row["member_id"] == "-20140000008325"
    assert row["claim_id"] == "22639159481"  # clm_id, before the claim group
    assert row["service_date"] == "2015-12-01"
    assert row["adjudication_date"] == "2016-01-08"  # NCH weekly processing date
    assert row["procedure_code"] == "77085"
    assert row["provider_npi"] == "999999999999"  # the performing care-team member of the line
    assert row["provider_name"] is None
    assert row["diagnosis_code"] == "M810"
    assert row["billed_amount"] == "250.00"
    assert row["allowed_amount"] == allowed
    assert row["plan_paid"] == "50.00"
    assert (row["deductible_amount"], row["coinsurance_amount"]) == ("0.00", "10.00")
    assert row["member_responsibility"] == "10.00"  # deductible 0 + coinsurance 10
    assert row["claim_status"] == "paid"  # line processing indicator A
    assert row[SOURCE] == "item 1"


def test_blue_button_institutional() -> None:
    inpatient = rows_of(BB / "eob_read_in_pt_v2.json")
    assert [r["billed_amount"] for r in inpatient][:3] == ["4000.00", "650.00", "500.00"]
    assert "10000.00" not in {r["billed_amount"] for r in inpatient}  # the total line
    assert {r["provider_npi"] for r in inpatient} == {"9999999999"}  # contained Organization
    assert {r["adjudication_date"] for r in inpatient} == {"2015-05-22"}
    assert {r["diagnosis_code"] for r in inpatient} == {None}  # ICD-9 only

    outpatient = rows_of(BB / "eob_read_out_pt_v2.json")
    third = outpatient[2]
    assert third["billed_amount"] == "70.00"  # rev_cntr_tot_chrg_amt, not the 10.00 rate
    assert third["noncovered_amount"] == "70.00"
    assert third["member_responsibility"] == "0.00"  # rev_cntr_ptnt_rspnsblty_pmt
    assert third["plan_paid"] == "0.00"
    assert third["adjudication_date"] == "2015-04-17"


def test_blue_button_bundle() -> None:
    rows = rows_of(BB / "eob_search_v2.json")
    assert [r[SOURCE] for r in rows] == [f"entry {n} item 1" for n in range(1, 11)]
    assert [r["claim_id"] for r in rows][:2] == ["-3269834580", "-4894712975"]
    assert rows[0]["service_date"] == "2016-12-01"
    second = rows[1]
    assert second["billed_amount"] == "10.00"  # total drug cost
    assert second["plan_paid"] == "10.00"  # covered D plan paid
    assert second["member_responsibility"] == "10.00"  # patient pay
    # The gross drug cost "coinsurance" codings are not coinsurance.
    assert second["coinsurance_amount"] is None
    assert second["procedure_code"] is None  # an NDC
    # Blue Button's created (2021-03-08T23:28:10) is when the API built the resource.
    assert {r["adjudication_date"] for r in rows_of(BB / "eob_search_pt_v2.json")} == {None}


def test_bundle_resolves_patient_coverage_and_providers(tmp_path: Path) -> None:
    professional = load(PROFESSIONAL)
    # Line 1 names its own rendering provider: the referring Practitioner1, made rendering.
    professional["careTeam"][1]["role"]["coding"][0]["code"] = "rendering"
    professional["item"][0]["careTeamSequence"] = [2]
    coverage = load(CARIN / "Coverage_CoverageEx1.json")
    coverage["identifier"][0]["value"] = "COVERAGE-MB"  # the Patient's MB comes first
    resources = [
        professional,
        load(INPATIENT),
        load(CARIN / "Patient_ExamplePatient1.json"),
        coverage,
        load(CARIN / "Organization_ProviderOrganization1.json"),
        load(CARIN / "Organization_ProviderOrganization3.json"),
        load(CARIN / "Practitioner_Practitioner1.json"),
        load(CARIN / "Practitioner_Practitioner2.json"),
    ]
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }
    rows = rows_of(write_json(tmp_path / "bundle.json", bundle))
    assert len(rows) == 6 + 13
    first = rows[0]
    assert first["member_id"] == "88800933501"  # Patient identifier typed MB
    assert (first["provider_name"], first["provider_npi"]) == ("Dr. John Smith", "6667778880")
    # Line 2 has no care-team link: the billing provider.
    assert (rows[1]["provider_name"], rows[1]["provider_npi"]) == (
        "Orange Medical Group",
        "1112223330",
    )
    assert (first["first_name"], first["last_name"], first["date_of_birth"]) == (
        "Member 01",
        "Test",
        "1943-01-01",
    )
    assert (first["address_line"], first["city"], first["state"], first["postal_code"]) == (
        "123 Main Street",
        "PITTSBURGH",
        "PA",
        "15239",
    )
    assert first["email"] == "GXXX@XXXX.com"
    assert first[SOURCE] == "entry 1 item 1"
    inpatient = rows[6]
    assert inpatient[SOURCE] == "entry 2 item 1"
    # The billing hospital, not the attending physician.
    assert (inpatient["provider_name"], inpatient["provider_npi"]) == (
        "Green Medical Group",
        "3334445550",
    )


def test_member_id_from_coverage_when_the_patient_is_not_sent(tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": load(OUTPATIENT)},
            {"resource": load(CARIN / "Coverage_CoverageEx1.json")},
        ],
    }
    rows = rows_of(write_json(tmp_path / "b.json", bundle))
    assert {r["member_id"] for r in rows} == {"88800933501"}


def test_ndjson_of_several_resources(tmp_path: Path) -> None:
    path = tmp_path / "eobs.ndjson"
    path.write_text(
        "\n".join(json.dumps(load(p)) for p in (PROFESSIONAL, OUTPATIENT, CARRIER_V2)) + "\n",
        encoding="utf-8",
    )
    rows = rows_of(path)
    assert [r[SOURCE] for r in rows] == ["line 1"] * 6 + ["line 2"] * 2 + ["line 3"]
    assert [r["claim_id"] for r in rows][5:] == [
        "ProfessionalEOBExample1",
        "OutpatientEOBExample1",
        "OutpatientEOBExample1",
        "22639159481",
    ]
    # The same content in a .json file is recognised as NDJSON too, and gzip is read through.
    renamed = tmp_path / "eobs.json"
    renamed.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert rows_of(renamed) == rows
    packed = tmp_path / "eobs.ndjson.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert rows_of(packed) == rows


def test_malformed_ndjson_names_the_line_not_the_content(tmp_path: Path) -> None:
    good = json.dumps(load(CARRIER_V2))
    path = tmp_path / "eobs.ndjson"
    path.write_text(
        f'{good}\n{good}\n{{"resourceType": "ExplanationOfBenefit", "id": "SECRET-42"\n'
    )
    reason = rejection(path)
    assert reason.startswith("line 3 is not valid JSON")
    assert "SECRET" not in reason


def test_malformed_json_document(tmp_path: Path) -> None:
    text = PROFESSIONAL.read_text(encoding="utf-8")
    path = tmp_path / "eob.json"
    path.write_text(text.replace('"status": "active",', '"status": "active"'), encoding="utf-8")
    reason = rejection(path)
    assert reason.startswith("not valid JSON: Expecting ',' delimiter (line 28,")


def test_coverage_is_rejected(tmp_path: Path) -> None:
    assert (
        rejection(CARIN / "Coverage_CoverageEx1.json")
        == "resource 1 is a Coverage, not an ExplanationOfBenefit"
    )
    path = tmp_path / "mixed.ndjson"
    lines = [load(PROFESSIONAL), load(OUTPATIENT), load(CARIN / "Coverage_CoverageEx2.json")]
    path.write_text("\n".join(json.dumps(r) for r in lines), encoding="utf-8")
    assert rejection(path) == "resource 3 (line 3) is a Coverage, not an ExplanationOfBenefit"


def test_bundles_that_hold_no_claims_or_other_resources_are_rejected(tmp_path: Path) -> None:
    assert rejection(BB / "coverage_search_v2.json") == (
        "the Bundle's 4 entries hold no ExplanationOfBenefit"
    )
    claim = {"resourceType": "Claim", "id": "c1"}
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": load(CARRIER_V2)}, {"resource": claim}],
    }
    assert rejection(write_json(tmp_path / "b.json", bundle)) == (
        "entry 2 is a Claim, not supported here"
    )
    bundle["entry"][1] = {"fullUrl": "urn:uuid:0"}
    assert rejection(write_json(tmp_path / "n.json", bundle)) == (
        "entry 2 is a resource without a resourceType, not supported here"
    )
    bundle["type"] = "transaction"
    assert rejection(write_json(tmp_path / "t.json", bundle)).startswith(
        "a Bundle of type 'transaction' is not supported"
    )
    empty = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    assert rows_of(write_json(tmp_path / "e.json", empty)) == []


def test_unsupported_profile_and_use_are_rejected(tmp_path: Path) -> None:
    eob = load(PROFESSIONAL)
    pdex = "http://hl7.org/fhir/us/davinci-pdex/StructureDefinition/pdex-priorauthorization"
    eob["meta"]["profile"] = [pdex]
    reason = rejection(write_json(tmp_path / "p.json", eob))
    assert reason.startswith(f"resource 1 has profile {pdex}, which is not supported")
    eob["meta"]["profile"] = ["urn:member:Jane-Doe-1943"]  # not a profile URL: not quoted
    reason = rejection(write_json(tmp_path / "q.json", eob))
    assert reason.startswith("resource 1 has profile (unrecognised), which is not supported")
    assert "Jane" not in reason
    eob = load(PROFESSIONAL)
    eob["use"] = "preauthorization"
    assert rejection(write_json(tmp_path / "u.json", eob)) == (
        "resource 1 is an ExplanationOfBenefit for use 'preauthorization', not a claim"
    )
    # A later CARIN version, or no profile at all, is accepted.
    eob = load(PROFESSIONAL)
    eob["meta"]["profile"] = [
        "http://hl7.org/fhir/us/carin-bb/StructureDefinition/"
        "C4BB-ExplanationOfBenefit-Professional-NonClinician|2.1.0"
    ]
    assert len(rows_of(write_json(tmp_path / "v2.json", eob))) == 6
    del eob["meta"]
    assert len(rows_of(write_json(tmp_path / "plain.json", eob))) == 6


def test_not_utf8_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "eob.json"
    path.write_bytes(b'{"resourceType": "\xff"}')
    assert rejection(path) == "not UTF-8 text (byte 18)"


def _professional_line(tmp_path: Path, change: Any) -> dict[str, str | None]:
    eob = load(PROFESSIONAL)
    change(eob)
    return rows_of(write_json(tmp_path / "eob.json", eob))[0]


def test_claim_status_rule(tmp_path: Path) -> None:
    def cancelled(eob: dict[str, Any]) -> None:
        eob["status"] = "cancelled"

    def error(eob: dict[str, Any]) -> None:
        eob["outcome"] = "error"

    def denied_line(eob: dict[str, Any]) -> None:
        status = "http://hl7.org/fhir/us/carin-bb/CodeSystem/C4BBPayerAdjudicationStatus"
        eob["item"][0]["adjudication"][-1]["category"]["coding"][0] = {
            "system": status,
            "code": "denied",
        }

    assert _professional_line(tmp_path, cancelled)["claim_status"] == "reversed"
    assert _professional_line(tmp_path, error)["claim_status"] == "denied"
    assert _professional_line(tmp_path, denied_line)["claim_status"] == "denied"


def test_adjustment_codes_with_group_code(tmp_path: Path) -> None:
    x12 = "https://x12.org/codes/"
    discriminator = "http://hl7.org/fhir/us/carin-bb/CodeSystem/C4BBAdjudicationDiscriminator"

    def add_reasons(eob: dict[str, Any]) -> None:
        reasons = [
            {"system": x12 + "claim-adjustment-group-codes", "code": "CO"},
            {"system": x12 + "claim-adjustment-reason-codes", "code": "45"},
            {"system": x12 + "remittance-advice-remark-codes", "code": "N130"},
            # Not X12: ignored.
            {"system": "https://bluebutton.cms.gov/resources/variables/x", "code": "0"},
        ]
        eob["item"][0]["adjudication"].append(
            {
                "category": {"coding": [{"system": discriminator, "code": "denialreason"}]},
                "reason": {"coding": reasons},
            }
        )

    assert _professional_line(tmp_path, add_reasons)["adjustment_codes"] == "CO-45;N130"


def test_member_liability_wins_over_its_parts_and_money_is_not_rounded(tmp_path: Path) -> None:
    def add_liability(eob: dict[str, Any]) -> None:
        item = eob["item"][0]["adjudication"]
        liability = copy.deepcopy(item[0])
        liability["category"]["coding"][0] = {
            "system": "http://hl7.org/fhir/us/carin-bb/CodeSystem/C4BBAdjudication",
            "code": "memberliability",
        }
        liability["amount"]["value"] = 12
        item.append(liability)
        item[1]["amount"]["value"] = 5  # copay
        item[0]["amount"]["value"] = 68.805  # submitted, three decimals

    row = _professional_line(tmp_path, add_liability)
    assert row["member_responsibility"] == "12.00"
    assert row["copay_amount"] == "5.00"
    assert row["billed_amount"] == "68.805"  # left for ingest to refuse


def test_first_listed_category_wins(tmp_path: Path) -> None:
    def pay_part_to_patient(eob: dict[str, Any]) -> None:
        item = eob["item"][0]["adjudication"]
        to_provider = copy.deepcopy(item[4])  # benefit 34.80
        to_provider["category"]["coding"][0] = {
            "system": "http://hl7.org/fhir/us/carin-bb/CodeSystem/C4BBAdjudication",
            "code": "paidtoprovider",
        }
        to_provider["amount"]["value"] = 30
        item.append(to_provider)  # after the benefit: order in the file does not decide

    assert _professional_line(tmp_path, pay_part_to_patient)["plan_paid"] == "34.80"


def test_blue_button_codings_decide_over_generic_ones(tmp_path: Path) -> None:
    eob = load(BB / "eob_read_out_pt_v2.json")
    total = "https://bluebutton.cms.gov/resources/variables/rev_cntr_tot_chrg_amt"
    first = eob["item"][0]
    first["adjudication"] = [
        a for a in first["adjudication"] if total not in json.dumps(a["category"])
    ]
    row = rows_of(write_json(tmp_path / "out.json", eob))[0]
    # Left: the revenue-centre rate (10.00) and payment, both also tagged "submitted".
    assert row["billed_amount"] is None


def test_fhir_samples_stream_through_ingest_onto_the_typed_contract(tmp_path: Path) -> None:
    """NDJSON of real samples -> typed contract rows with the files' exact amounts; then every
    row is accepted or quarantined with a named reason."""
    from datetime import date
    from decimal import Decimal

    from pipeline.intake.ingest import detect_format, ingest_file
    from pipeline.intake.validate import validate_file
    from pipeline.records.atrest_parquet import read_table
    from pipeline.records.contracts import load_contract

    samples = [
        CARIN / "ExplanationOfBenefit_ProfessionalEOBExample1.json",
        BB / "eob_read_carrier_v2.json",
    ]
    path = tmp_path / "eobs.ndjson"
    path.write_text(
        "\n".join(json.dumps(json.loads(p.read_text(encoding="utf-8"))) for p in samples) + "\n",
        encoding="utf-8",
    )
    assert detect_format(path) == "fhir"
    result = ingest_file(
        path,
        parsed_out=tmp_path / "p.parquet",
        quarantine_out=tmp_path / "pq.parquet",
        fmt="fhir",
        columns={},
        contract=load_contract("claim_line"),
        keyring=TEST_KEYRING,
    )
    typed = read_table(tmp_path / "p.parquet", TEST_KEYRING).to_pylist()
    assert (result.rows_in, result.rows_typed) == (7, 7)
    first = typed[0]
    assert (first["member_id"], first["claim_id"], first["service_date"]) == (
        "ExamplePatient1",
        "ProfessionalEOBExample1",
        date(2020, 8, 4),
    )
    assert (first["billed_amount"], first["allowed_amount"], first["plan_paid"]) == (
        Decimal("68.80"),
        Decimal("34.80"),
        Decimal("34.80"),
    )
    assert typed[1]["claim_status"] == "reversed" and typed[1]["billed_amount"] == Decimal("-68.80")
    carrier = typed[-1]
    assert (carrier["billed_amount"], carrier["coinsurance_amount"]) == (
        Decimal("250.00"),
        Decimal("10.00"),
    )

    verdict = validate_file(
        kind="claims",
        file_name=path.name,
        parsed=tmp_path / "p.parquet",
        parse_quarantine=tmp_path / "pq.parquet",
        accepted_out=tmp_path / "a.parquet",
        quarantine_out=tmp_path / "q.parquet",
        rows_in=result.rows_in,
        run_date=date(2026, 11, 22),
        roster=None,
        max_bad_row_share=1.0,
        keyring=TEST_KEYRING,
    )
    reasons = read_table(tmp_path / "q.parquet", TEST_KEYRING).to_pylist()
    assert verdict.rows_in == verdict.accepted + len({r["row_number"] for r in reasons})
    # Without a roster nobody has a name, so every row is held back, each for a named rule.
    assert verdict.accepted == 0
    assert {"member_name", "member_contact"} <= {r["rule"] for r in reasons}
