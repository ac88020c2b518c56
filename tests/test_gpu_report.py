"""CI guard for the committed GPU test report (CI has no GPU; tests/gpu_report.py writes the report on one).

Fails when any GPU source (every *.cu, *.cuh, *.py under backends/cupy_backend/, plus the report's listed sources)
changed since the report was made, or when the report does not show a clean GPU run.
Fix: on a GPU machine, `QLORA_COMMIT=$(git rev-parse HEAD) python tests/gpu_report.py`, then commit the report.
"""

from __future__ import annotations

import json

import pytest
from gpu_report import EXTRA_SOURCES, REPORT, gpu_sources, junit_summary, sources_sha256


@pytest.fixture(scope="module")
def report() -> dict:
    assert REPORT.is_file(), f"{REPORT} is missing: run tests/gpu_report.py on a GPU machine and commit it"
    return json.loads(REPORT.read_text())


def test_report_covers_every_gpu_source(report):
    """Every current GPU source is in the report's list (a new kernel file needs a new GPU run)."""
    missing = sorted(set(gpu_sources(EXTRA_SOURCES)) - set(report["sources"]))
    assert not missing, f"GPU sources not covered by {REPORT.name}: {missing}; rerun tests/gpu_report.py on a GPU"


def test_report_hash_matches_sources(report):
    """The sha256 over the report's sources matches the files as they are now."""
    assert sources_sha256(report["sources"]) == report["sources_sha256"], (
        f"GPU sources changed since {REPORT.name} was written ({report['date']}, {report['device']}): "
        "rerun `python tests/gpu_report.py` on a GPU machine and commit the new report"
    )


def test_report_is_a_clean_gpu_run(report):
    for key in ("device", "date", "commit", "passed", "failed", "sources", "sources_sha256"):
        assert key in report, f"{REPORT.name} lacks {key!r}"
    assert not report["device"].startswith("none"), f"the report was not made on a GPU: {report['device']}"
    assert report["passed"] > 0, "the report shows no passed GPU tests"
    assert report["failed"] == 0, f"the report shows {report['failed']} failed GPU tests"


def test_junit_summary_names_each_skipped_test(tmp_path):
    """The report lists which GPU tests skipped and why, not only how many (JUnit XML in pytest's shape)."""
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" '
        'skipped="1" tests="3"><testcase classname="tests.a" name="test_ok"/>'
        '<testcase classname="tests.a" name="test_bad"><failure message="boom"/></testcase>'
        '<testcase classname="tests.b" name="test_cpu[bf16]"><skipped type="pytest.skip" message="no avx512_bf16"/>'
        "</testcase></testsuite></testsuites>"
    )
    counts, skipped = junit_summary(xml)
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}
    assert skipped == [{"test": "tests.b::test_cpu[bf16]", "reason": "no avx512_bf16"}]
