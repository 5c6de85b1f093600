"""examples/scoring_sites.py: every scoring site on the same LoRA run, on the bench's tiny model and data."""

from __future__ import annotations

import json

import pytest
from tiny_models import load_example

from peft_safe.core.cka import SCORING_SITES


@pytest.fixture(scope="module")
def example():
    return load_example("scoring_sites")


def test_spearman_is_one_for_the_same_order_and_minus_one_for_the_reverse(example):
    assert example.spearman([0.1, 0.5, 0.3], [1.0, 9.0, 2.0]) == pytest.approx(1.0)
    assert example.spearman([0.1, 0.5, 0.3], [9.0, 1.0, 2.0]) == pytest.approx(-1.0)


def test_the_study_scores_every_unit_at_every_site_at_each_scoring(example, assets, tiny_argv, tmp_path, bench_layers):
    argv = tiny_argv(assets, tmp_path, "--steps", "4", "--score-every", "2")
    example.main(argv)
    data = json.loads((tmp_path / "bench.json").read_text())
    units = data["units"]
    assert units == [f"bert.encoder.layer.{i}" for i in range(bench_layers)]
    assert [r["step"] for r in data["records"]] == [2, 4]
    for record in data["records"]:
        assert set(record["scores"]) == set(SCORING_SITES)
        for site in SCORING_SITES:
            assert list(record["scores"][site]) == units
            assert all(0.0 <= v <= 1.0 for v in record["scores"][site].values())
    assert any(v > 0 for v in data["records"][-1]["scores"]["adapter_output"].values())  # LoRA has trained
    assert (tmp_path / "bench.png").stat().st_size > 0
