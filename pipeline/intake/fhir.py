"""FHIR input: CARIN Blue Button ExplanationOfBenefit resources as claim-line text rows.

`read_fhir_claim_lines(path)` yields one dict per EOB item, keyed by the claim-line contract's
field names (schemas/claim_line.json), every value text in the contract's textual form (dates
YYYY-MM-DD, money "123.45", whole numbers as digits) or None. Ingest types and validates these
rows exactly like CSV rows: they are only read here and mapped (pipeline.intake.fhir_mapping,
over the tolerant accessors of pipeline.intake.fhir_json). Each row also has "_source", its place
in the file for messages: "line N" (NDJSON), "entry N item M" (Bundle), "item M" (one resource);
M counts the EOB's items from 1 whatever their sequence numbers.

Input: NDJSON (one resource a line), one JSON resource, or a Bundle of type searchset or
collection; gzip-compressed or not, within the insurer's read limits (pipeline.intake.limits:
inflated size, the size of a document or NDJSON line parsed whole; deep nesting is refused).
NDJSON is told by the name (.ndjson, .jsonl, before any .gz) or, in a .json file, by several
lines that are each a JSON object. Rejections raise FileRejected naming what was found and
where, never a value. NDJSON is read as a stream, so FileRejected can come after rows were
yielded: the caller must drain the iterator before using any row (the whole file is refused,
as for CSV).

Decisions on what is read (the samples in /work/shared/data/fhir are the reference; how a
resource maps to claim lines is decided in pipeline.intake.fhir_mapping):

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
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path

from pipeline.errors import FileRejected
from pipeline.intake.fhir_json import Resource, as_list, as_object, as_str
from pipeline.intake.fhir_mapping import SOURCE, References, Row, claim_rows, index_resource
from pipeline.intake.limits import DEFAULT_LIMITS, MIB, ReadLimits, open_input

__all__ = ["SOURCE", "read_fhir_claim_lines"]

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


def read_fhir_claim_lines(path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[Row]:
    """One text row per ExplanationOfBenefit item of the file; see the module docstring."""
    if path.name.lower().removesuffix(".gz").endswith(_NDJSON_SUFFIXES):
        yield from _read_ndjson(path, _lines(path, limits))
        return
    text = _read_text(path, limits)
    try:
        document = _parse(path, text, "the file")
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
    for row in claim_rows(document, References(document, {})):
        row[SOURCE] = f"item {row[SOURCE]}"
        yield row


def _read_text(path: Path, limits: ReadLimits) -> str:
    """The whole file as text: a Bundle or single resource is parsed whole, so its size is
    bounded (max_json_mib)."""
    limit = limits.max_json_mib * MIB
    try:
        data = bytearray()
        with open_input(path, limits) as stream:
            while chunk := stream.read(MIB):
                data += chunk
                if len(data) > limit:
                    raise FileRejected(
                        path.name, f"larger than {limits.max_json_mib} MiB (max_json_mib)"
                    )
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise FileRejected(path.name, f"not UTF-8 text (byte {err.start})") from err
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise FileRejected(path.name, f"unreadable gzip data: {type(err).__name__}") from err


def _lines(path: Path, limits: ReadLimits) -> Iterator[tuple[int, str]]:
    """NDJSON lines, streamed; each one is bounded like a whole document (max_json_mib)."""
    limit = limits.max_json_mib * MIB
    try:
        with open_input(path, limits) as stream:
            for number, raw in enumerate(iter(lambda: stream.readline(limit + 1), b""), start=1):
                if len(raw) > limit:
                    raise FileRejected(
                        path.name,
                        f"line {number} is larger than {limits.max_json_mib} MiB (max_json_mib)",
                    )
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


def _parse(path: Path, text: str, where: str) -> object:
    """The JSON value of `text`; JSON nested deeper than the parser's recursion limit (about a
    thousand levels; a FHIR resource needs about ten) refuses the file."""
    try:
        return json.loads(text, parse_float=Decimal)
    except RecursionError as err:
        raise FileRejected(path.name, f"{where} is JSON nested too deeply") from err


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _read_ndjson(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[Row]:
    count = 0
    for number, line in lines:
        if not line.strip():
            continue
        count += 1
        try:
            resource = _parse(path, line, f"line {number}")
        except json.JSONDecodeError as err:
            raise FileRejected(
                path.name, f"line {number} is not valid JSON: {err.msg} (column {err.colno})"
            ) from err
        if not isinstance(resource, dict):
            raise FileRejected(path.name, f"line {number} is not a JSON object")
        _check_eob(path, resource, f"resource {count} (line {number})")
        for row in claim_rows(resource, References(resource, {})):
            row[SOURCE] = f"line {number}"
            yield row


def _read_bundle(path: Path, bundle: Resource) -> Iterator[Row]:
    kind = bundle.get("type")
    if kind not in _BUNDLE_TYPES:
        raise FileRejected(
            path.name,
            f"a Bundle of type {_safe_name(kind)} is not supported (searchset or collection)",
        )
    entries = as_list(bundle.get("entry"))
    shared: dict[str, Resource] = {}
    eobs: list[tuple[int, Resource]] = []
    for number, entry in enumerate(entries, start=1):
        resource = as_object(as_object(entry).get("resource"))
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
        index_resource(shared, resource, as_str(as_object(entry).get("fullUrl")))
    if entries and not eobs:
        raise FileRejected(
            path.name, f"the Bundle's {len(entries)} entries hold no ExplanationOfBenefit"
        )
    for number, eob in eobs:
        for row in claim_rows(eob, References(eob, shared)):
            row[SOURCE] = f"entry {number} item {row[SOURCE]}"
            yield row


def _check_eob(path: Path, resource: Resource, where: str) -> None:
    kind = resource.get("resourceType")
    if kind != "ExplanationOfBenefit":
        raise FileRejected(
            path.name, f"{where} is {_a_resource(kind)}, not an ExplanationOfBenefit"
        )
    profiles = [
        p for p in as_list(as_object(resource.get("meta")).get("profile")) if isinstance(p, str)
    ]
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
