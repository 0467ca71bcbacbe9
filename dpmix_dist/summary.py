"""summary.json as strict JSON: what every parser (jq, JavaScript, most JSON libraries) reads.

The non-private ceiling spends ε = ∞, which JSON cannot spell; it is written as `"epsilon": null` (the summary's
`"private": false` says why) and read back as `math.inf`. Files written before this (`Infinity`) still read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _finite_or_none(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def dumps(summary: dict) -> str:
    """The summary (and its history) as strict JSON: non-finite numbers become null."""
    strict = _finite_or_none(summary)
    if "history" in summary:
        strict["history"] = [_finite_or_none(h) for h in summary["history"]]
    return json.dumps(strict, indent=2, allow_nan=False)


def read(path: str | Path) -> dict:
    """A summary.json, with ε = null read back as ∞ (in the summary and its history)."""
    summary = json.loads(Path(path).read_text())
    for record in (summary, *summary.get("history", [])):
        if "epsilon" in record and record["epsilon"] is None:
            record["epsilon"] = math.inf
    return summary
