"""specs/ stays honest: every rule ID cited is defined, every rule is cited by a test, and the written golden vectors
still follow from the spec.

A rule is defined in specs/*.md as a bold ID opening its paragraph (``**BW-3 (reciprocal).**``) and cited anywhere else
by its bare ID (``BW-3``) or a range (``BW-2 .. BW-6``, ``ADAMW-6..8``), which cites every rule in it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFINITION = re.compile(r"\*\*([A-Z]{2,5}-\d+)\b")
# A citation: an ID, or a range of them; the range's end may repeat the prefix or not (BW-2 .. BW-6, ADAMW-6..8).
CITATION = re.compile(r"\b([A-Z]{2,5})-(\d+)(?:\s*(?:\.\.|–)\s*(?:\1-)?(\d+)\b)?\b")
# Names that look like rule IDs and are not (a standard, a model, a data set).
NOT_RULES = {"GPT-2", "GPT-4", "SST-2", "UTF-8", "SHA-256"}
# Where rules are cited: the spec, the backends and kernels, the torch library and the application, the benchmarks,
# the specs themselves, the tests and the README.
CITING = {
    "qlora_ref": ("*.py",),
    "backends": ("*.py", "*.cu", "*.cuh", "*.md"),
    "benchmarks": ("*.py", "*.md"),
    "specs": ("*.md", "*.py"),
    "tests": ("*.py",),
}


def _rules() -> dict[str, str]:
    rules = {}
    for md in sorted((REPO / "specs").glob("*.md")):
        for rule in DEFINITION.findall(md.read_text()):
            rules[rule] = md.name
    return rules


def _citing_files() -> list[Path]:
    files = [REPO / "README.md"]
    for folder, patterns in CITING.items():
        for pattern in patterns:
            files += (REPO / folder).rglob(pattern)
    return sorted(f for f in set(files) if ".venv" not in f.parts and f.name != "test_specs.py")


def cited(text: str) -> set[str]:
    """Every rule ID the text cites, ranges expanded: 'DQ-1 .. DQ-3' cites DQ-1, DQ-2 and DQ-3."""
    ids = set()
    for prefix, first, last in CITATION.findall(text):
        lo, hi = int(first), int(last or first)
        ids |= {f"{prefix}-{k}" for k in range(lo, max(lo, hi) + 1)}
    return ids - NOT_RULES


def test_citation_parser():
    text = "BW-2 .. BW-6, ADAMW-6..8 and DQ-3; CPU-1..CPU-2, UTF-8 JSON, LORA-7)"
    assert cited(text) == {"BW-2", "BW-3", "BW-4", "BW-5", "BW-6", "ADAMW-6", "ADAMW-7", "ADAMW-8", "DQ-3", "CPU-1",
                           "CPU-2", "LORA-7"}  # fmt: skip
    assert cited("**MEM-12 (Ledger).** see MEM-3") == {"MEM-12", "MEM-3"}


def test_specs_define_rules():
    rules = _rules()
    for prefix in ("CB", "BW", "PK", "DQ", "FMT", "CPU", "LORA", "ADAMW", "MEM"):
        assert any(r.startswith(prefix + "-") for r in rules), f"no {prefix}-* rule in specs/"


def test_every_cited_rule_is_defined():
    """A cited rule that specs/ does not define points a reader nowhere (code, kernels, benchmarks, specs, tests)."""
    rules = _rules()
    undefined = {}
    for f in _citing_files():
        for rule in sorted(cited(f.read_text(errors="replace")) - rules.keys()):
            undefined.setdefault(rule, []).append(str(f.relative_to(REPO)))
    assert not undefined, f"rule IDs cited but not defined in specs/*.md: {undefined}"


def test_every_rule_is_cited_by_a_test():
    """A rule no test names is a rule nobody checks (tests/**; a range cites every rule in it)."""
    tests = [p for p in (REPO / "tests").rglob("test_*.py") if p.name != "test_specs.py"]
    named = set().union(*(cited(p.read_text()) for p in tests))
    missing = sorted(r for r in _rules() if r not in named)
    assert not missing, f"rules in specs/ cited by no test: {missing}"


def test_written_vectors_follow_from_the_reference():
    """specs/golden/vectors.json (checked against bitsandbytes' CUDA output when written) re-derives exactly."""
    sys.path.insert(0, str(REPO / "specs" / "golden"))
    try:
        from make_vectors import case_from_reference
    finally:
        sys.path.pop(0)
    cases = json.loads((REPO / "specs" / "golden" / "vectors.json").read_text())
    assert len(cases) >= 12
    kinds = {c["kind"] for c in cases}
    assert {"zero_block", "midpoints", "ties", "tiny"} <= kinds
    for c in cases:
        got = case_from_reference(c["x"], c["dtype"], c["quant_type"], c["blocksize"], c["double_quant"])
        assert got == c["expect"], c["name"]


@pytest.mark.parametrize("md", sorted(p.name for p in (REPO / "specs").glob("*.md")))
def test_spec_files_name_their_agreement_class_or_index(md):
    text = (REPO / "specs" / md).read_text()
    assert md in ("README.md", "peers.md", "tolerances.md") or "agreement" in text.lower()
