"""What the code assumes of its dependencies beyond their public API, and that everything it
imports is declared: an upgrade that breaks an assumption fails here, by name, not in a send."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import sys
import tomllib

import aiosmtplib
import dkim
import pytest
from aiosmtplib.protocol import SMTPProtocol
from dkim.canonicalization import CanonicalizationPolicy
from packaging.requirements import Requirement

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def declared() -> dict[str, Requirement]:
    """Every requirement of the project, runtime and extras, by normalised name."""
    extras = [r for group in PYPROJECT["optional-dependencies"].values() for r in group]
    requirements = [Requirement(r) for r in [*PYPROJECT["dependencies"], *extras]]
    return {r.name.lower().replace("_", "-"): r for r in requirements}


@pytest.mark.parametrize("name", ["aiosmtplib", "dkimpy"])
def test_a_dependency_used_beyond_its_public_api_is_pinned_below_its_next_release_line(name):
    requirement = declared()[name]
    upper = [s for s in requirement.specifier if s.operator == "<"]
    assert upper, f"{name} has no upper bound in pyproject.toml"
    assert importlib.metadata.version(name) in requirement.specifier


def test_aiosmtplib_has_what_the_fast_data_path_drives_directly():
    # send._data writes the dot-stuffed message on the protocol and reads the reply itself.
    client = aiosmtplib.SMTP()
    assert client.protocol is None  # set by connect()
    assert isinstance(client.timeout, int | float)
    assert list(inspect.signature(SMTPProtocol.write).parameters) == ["self", "data"]
    assert "timeout" in inspect.signature(SMTPProtocol.read_response).parameters
    assert inspect.iscoroutinefunction(SMTPProtocol.read_response)
    assert inspect.iscoroutinefunction(aiosmtplib.SMTP.execute_command)


def test_dkimpy_has_the_module_functions_signing_calls():
    # signing.py parses, canonicalizes, hashes and folds with dkimpy and signs on its own.
    assert list(inspect.signature(dkim.rfc822_parse).parameters) == ["message"]
    assert "namelen" in inspect.signature(dkim.fold).parameters
    assert list(inspect.signature(dkim.hash_headers).parameters) == [
        "hasher", "canonicalize_headers", "headers", "include_headers", "sigheader", "sig",
    ]  # fmt: skip
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/simple")
    assert policy.to_c_value() == b"relaxed/simple"
    assert policy.canonicalize_body(b"a\r\n\r\n") == b"a\r\n"
    assert policy.canonicalize_headers([(b"Subject", b"  x \r\n")]) == [(b"subject", b"x\r\n")]


def _imported_top_level_modules() -> set[str]:
    modules = set()
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.partition(".")[0])
    return modules - set(sys.stdlib_module_names) - {"pipeline", "__future__"}


def test_every_third_party_module_the_pipeline_imports_is_declared():
    distributions = importlib.metadata.packages_distributions()
    names = declared()
    undeclared = {
        module: distributions.get(module, ["?"])
        for module in _imported_top_level_modules()
        if not any(d.lower().replace("_", "-") in names for d in distributions.get(module, []))
    }
    assert undeclared == {}
