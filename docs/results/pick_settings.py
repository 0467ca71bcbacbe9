"""Pick the DP-Mix comparison's settings from the tuning sweeps' validation accuracy (docs/results/dpmix_small.sh).

    python docs/results/pick_settings.py crop runs/dpmix-small          # crop_padding_fraction (self_aug)
    python docs/results/pick_settings.py lr runs/dpmix-small METHOD     # learning rate of METHOD
    python docs/results/pick_settings.py show runs/dpmix-small          # every tuning result, and the choices

Only `validation_accuracy` (PUBLIC validation images) is read; a sweep that measured anything else is refused.
Ties go to the first value in the list (the smaller padding, the smaller learning rate).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

CROPS = ("0", "0.03", "0.125")
LRS = ("1", "3", "9")


def _accuracy(out: Path, what: str, value: str, method: str) -> float:
    """Mean validation accuracy of `method` over the sweeps tune-WHAT-VALUE and tune-WHAT-VALUE-* (one per group of
    methods run together)."""
    values = []
    for path in [out / f"tune-{what}-{value}" / "results.csv", *sorted(out.glob(f"tune-{what}-{value}-*/results.csv"))]:
        if not path.is_file():
            continue
        rows = list(csv.DictReader(path.open()))
        if rows and "validation_accuracy" not in rows[0]:
            raise SystemExit(f"{path} has no validation_accuracy column: settings are chosen on validation only")
        values += [float(r["validation_accuracy"]) for r in rows if r["method"] == method]
    if not values:
        raise SystemExit(f"no finished {method} run for {what}={value} under {out}")
    return sum(values) / len(values)


def best(out: Path, what: str, method: str = "self_aug") -> str:
    values = CROPS if what == "crop" else LRS
    scores = {v: _accuracy(out, what, v, method) for v in values}
    return max(values, key=lambda v: (scores[v], -values.index(v)))


def main(argv: list[str]) -> None:
    what, out = argv[0], Path(argv[1])
    if what == "crop":
        print(best(out, "crop"))
    elif what == "lr":
        print(best(out, "lr", argv[2]))
    else:
        for kind, values, methods in (
            ("crop", CROPS, ["self_aug"]),
            ("lr", LRS, ["dpsgd", "self_aug", "dpmix_self", "dpmix_diff"]),
        ):
            for method in methods:
                scores = {}
                for v in values:
                    try:
                        scores[v] = f"{100 * _accuracy(out, kind, v, method):.2f}"
                    except SystemExit:
                        scores[v] = "–"
                print(f"{kind:4} {method:10} " + "  ".join(f"{v}: {s}" for v, s in scores.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
