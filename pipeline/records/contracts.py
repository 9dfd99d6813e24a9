"""Data contracts in schemas/: the one source of the Arrow schemas."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import pyarrow as pa

from pipeline.resources import SCHEMAS_DIR

# Money is exact: two decimals, up to ten digits before the point.
MONEY = pa.decimal128(12, 2)
_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "date": pa.date32(),
    "decimal": MONEY,
    "int32": pa.int32(),
    "int64": pa.int64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True)
class ContractField:
    name: str
    type: str
    nullable: bool
    phi: bool
    description: str

    @property
    def arrow_type(self) -> pa.DataType:
        return _ARROW_TYPES[self.type]


@dataclass(frozen=True)
class Contract:
    name: str
    version: int
    fields: tuple[ContractField, ...]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(f.name, f.arrow_type, nullable=f.nullable) for f in self.fields],
            metadata={"contract": self.name, "contract_version": str(self.version)},
        )

    @property
    def staging_schema(self) -> pa.Schema:
        """The schema with every field nullable: rows are typed before they are validated."""
        return pa.schema(
            [f.with_nullable(True) for f in self.schema], metadata=self.schema.metadata
        )

    @property
    def column_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def phi_columns(self) -> list[str]:
        return [f.name for f in self.fields if f.phi]


@cache
def load_contract(name: str) -> Contract:
    raw = json.loads((SCHEMAS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return Contract(
        name=raw["name"],
        version=raw["version"],
        fields=tuple(ContractField(**f) for f in raw["fields"]),
    )


DATA_CONTRACTS = ("claim_line", "roster", "quarantine", "delivery_facts", "audit_events")


def data_dictionary() -> str:
    """docs/data_dictionary.md, generated from the contracts (`eob data-dictionary`)."""
    parts = [
        "# Data dictionary",
        "",
        "Generated from `schemas/*.json` by `eob data-dictionary`; do not edit by hand.",
    ]
    for name in DATA_CONTRACTS:
        raw = json.loads((SCHEMAS_DIR / f"{name}.json").read_text(encoding="utf-8"))
        contract = load_contract(name)
        parts += ["", f"## {name} (version {contract.version})", "", raw["description"], ""]
        parts += ["| field | type | required | PHI | meaning |", "|---|---|---|---|---|"]
        parts += [
            f"| `{f.name}` | {f.type} | {'no' if f.nullable else 'yes'} | "
            f"{'yes' if f.phi else 'no'} | {f.description} |"
            for f in contract.fields
        ]
    return "\n".join(parts) + "\n"
