"""The benchmark scripts still run: each at a tiny size, printing its one-line figure.

They measure nothing here; this only keeps them from rotting between the full-size runs
reported in the closing notes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA


@pytest.mark.parametrize(
    ("script", "args", "figure"),
    [
        ("render.py", ["40", "2"], "render: "),
        ("ingest_validate.py", ["5000"], "ingest+validate"),
        ("end_to_end.py", ["20"], "end to end"),
        pytest.param(
            "bounce_agreement.py",
            [],
            "bounce agreement ",
            marks=pytest.mark.skipif(
                not (SHARED_DATA / "bounces").is_dir(),
                reason="shared/data not beside the repository",
            ),
        ),
    ],
)
def test_a_benchmark_prints_its_one_line_figure(script: str, args: list[str], figure: str):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines and figure in lines[-1], done.stdout[-2000:]


@pytest.mark.skipif(shutil.which("postfix") is None, reason="needs Debian's postfix")
def test_the_postfix_benchmark_prints_its_figures():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "send_postfix.py"), "200", "20"],
        capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "msg/s" in done.stdout, done.stdout[-2000:]
