"""The coverage sweep of benchmarks/coeff_coverage.py: every transformers causal LM (minutes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "coeff_coverage.py"


def load_sweep():
    spec = importlib.util.spec_from_file_location("coeff_coverage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_coeff_on_every_causal_lm_is_exact_or_refused_clearly(tmp_path) -> None:
    counts = load_sweep().main(["--json", str(tmp_path / "coverage.json")])
    judged = sum(counts.get(b, 0) for b in ("exact", "refused", "failed", "wrong"))
    assert judged > 100  # the sweep reached the mapping, not a handful of models
    assert counts.get("wrong", 0) == 0, counts
    assert counts.get("failed", 0) == 0, counts
    assert counts.get("exact", 0) >= 0.9 * judged, counts
