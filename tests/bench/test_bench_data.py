"""The bench's data (:mod:`peft_safe.bench.data`): local tables read as CSV, JSON or JSON lines, labels mapped
to ids."""

from __future__ import annotations

import json

from peft_safe.bench.data import _label_ids, load_table


def test_labels_are_mapped_and_files_read_as_json(tmp_path):
    rows = [{"t": "x", "y": "pos"}, {"t": "y", "y": "neg"}, {"t": "z", "y": "pos"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.json", "b.jsonl"):
        table = load_table(str(tmp_path / name), "t", "y")
        assert table == [("x", "pos"), ("y", "neg"), ("z", "pos")]
    assert _label_ids(["pos", "neg", "pos"]) == ([1, 0, 1], 2)
    assert _label_ids(["2", "0", "1"]) == ([2, 0, 1], 3)
