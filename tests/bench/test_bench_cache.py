"""``peft-safe bench --cache-frozen``: the SAFE run serves the frozen prefix from SAFE's cache (tiny random BERT,
tiny CSV; see conftest.py), and the report says how often and what it saved."""

from __future__ import annotations

import json

import pytest

from peft_safe.bench.cli import main
from peft_safe.bench.report import format_table

pytestmark = pytest.mark.usefixtures("single_thread_torch")  # conftest: one intra-op thread


def bench(assets, tiny_argv, out, *extra: str) -> dict:
    assert main(tiny_argv(assets, out, "--epochs", "5", "--no-plots", *extra)) == 0
    return json.loads((out / "bench.json").read_text())


def test_cache_frozen_serves_later_epochs_and_costs_fewer_flops(assets, tiny_argv, tmp_path):
    cached = bench(assets, tiny_argv, tmp_path / "cached", "--cache-frozen")
    plain = bench(assets, tiny_argv, tmp_path / "plain")
    assert cached["config"]["cache_frozen"] is True and plain["config"]["cache_frozen"] is False
    base, safe = cached["results"]
    assert base["memory"]["cache_served_steps"] is None and base["memory"]["cache_hit_rate"] is None
    assert safe["cut_block"] is not None, "the tiny run must freeze a bottom prefix to test anything"
    assert safe["memory"]["cache_served_steps"] > 0 and 0 < safe["memory"]["cache_hit_rate"] < 1
    assert safe["memory"]["peak_cache_bytes"] > 0
    assert safe["total_flops"] < plain["results"][1]["total_flops"]  # same run without the cache
    assert base["loss_series"] == plain["results"][0]["loss_series"]  # the baseline is untouched by the flag
    table = format_table(cached["results"], cached["summary"])
    assert "prefix cache hit rate (%)" in table and "steps served from the cache" in table
    assert "prefix cache hit rate" not in format_table(plain["results"], plain["summary"])
