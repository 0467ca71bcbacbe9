"""Collect the comparison's sweeps into committed CSVs and one Markdown table (docs/results.md).

    python docs/results/summarize.py runs/dpmix-small docs/results

Writes OUT/tuning.csv (every validation run: stage, setting, method, validation accuracy), OUT/table.csv (every
reported run: the sweeps' results.csv rows) and OUT/spot.csv (the K = M = 16 spot check), and prints the table of
test accuracy, mean ± std over replicates, per method and ε (non-private last).
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path


def _rows(folder: Path, **extra) -> list[dict]:
    path = folder / "results.csv"
    if not path.is_file():
        return []
    return [{**extra, **row} for row in csv.DictReader(path.open())]


def _write(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def main(runs: Path, out: Path) -> None:
    tuning = []
    for folder in sorted(runs.glob("tune-*")):
        _, stage, value = folder.name.split("-", 2)
        tuning += _rows(folder, stage=stage, value=value)
    table = [row for folder in sorted(runs.glob("table-*")) for row in _rows(folder)]
    spot = [row for folder in sorted(runs.glob("spot-*")) for row in _rows(folder)]
    for name, rows in (("tuning.csv", tuning), ("table.csv", table), ("spot.csv", spot)):
        _write(out / name, rows)
    order = ["dpsgd", "self_aug", "dpmix_self", "dpmix_diff"]
    epsilons = sorted({float(r["target_epsilon"]) for r in table}, key=lambda e: (math.isinf(e), e))
    print("| method | group | " + " | ".join("non-private" if math.isinf(e) else f"ε = {e:g}" for e in epsilons) + " |")
    print("|---|---|" + "---|" * len(epsilons))
    for method in [m for m in order if any(r["method"] == m for r in table)]:
        cells = []
        for e in epsilons:
            accs = [100 * float(r["test_accuracy"]) for r in table if r["method"] == method and float(r["target_epsilon"]) == e]
            if not accs:
                cells.append("–")
            elif len(accs) == 1:
                cells.append(f"{accs[0]:.2f} (n=1)")
            else:
                cells.append(f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f} (n={len(accs)})")
        group = next(r["group_size"] for r in table if r["method"] == method)
        print(f"| `{method}` | {group} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
