"""The package's public surface, and that it imports without Airflow."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import ModuleType

import pipeline
from tests.conftest import REPO


def test_all_lists_every_public_name():
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None
    # Submodules and the names __init__ imports for itself are not the package's API.
    own = {"annotations", "import_module", "Any"}
    public = {
        name for name, value in vars(pipeline).items()
        if not name.startswith("_") and not isinstance(value, ModuleType) and name not in own
    }  # fmt: skip
    assert public == set(pipeline.__all__) - set(pipeline._RUNNER_NAMES)


def test_pipeline_and_its_stages_import_without_airflow():
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoAirflow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "airflow" or name.startswith("airflow."):
                    raise ImportError("airflow is not installed")
                return None

        sys.meta_path.insert(0, NoAirflow())
        import pipeline, pipeline.runner, pipeline.ops.cli
        assert pipeline.STAGES[0] == "ingest"
        assert not any(m == "airflow" or m.startswith("airflow.") for m in sys.modules)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_the_committed_data_dictionary_matches_the_contracts():
    from pipeline.records.contracts import data_dictionary

    committed = (REPO / "docs" / "data_dictionary.md").read_text(encoding="utf-8")
    assert committed == data_dictionary(), "run `eob data-dictionary` and commit the result"
