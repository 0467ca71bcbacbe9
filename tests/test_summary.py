"""summary.json is strict JSON (ε = ∞ of the non-private ceiling written as null), and old files still read."""

from __future__ import annotations

import json
import math

import pytest

from dpmix_dist import summary


def _strict(text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_private_summary_is_strict_json_and_reads_back_as_infinite(tmp_path):
    record = {
        "epsilon": math.inf,
        "private": False,
        "test_accuracy": 0.5,
        "history": [{"step": 1, "epsilon": math.inf, "test_accuracy": 0.4}],
    }
    text = summary.dumps(record)
    parsed = _strict(text)
    assert parsed["epsilon"] is None and parsed["history"][0]["epsilon"] is None and parsed["private"] is False
    (tmp_path / "summary.json").write_text(text)
    assert summary.read(tmp_path / "summary.json") == record


def test_private_summary_is_unchanged_and_old_files_with_infinity_still_read(tmp_path):
    record = {"epsilon": 7.99, "private": True, "history": [{"step": 1, "epsilon": 1.5}]}
    assert _strict(summary.dumps(record)) == record
    (tmp_path / "old.json").write_text('{"epsilon": Infinity, "private": false, "history": []}')
    assert summary.read(tmp_path / "old.json")["epsilon"] == math.inf
    with pytest.raises(ValueError):
        summary.dumps({"epsilon": 1.0, "bad": [math.nan]})  # nested non-finite values are not silently written
