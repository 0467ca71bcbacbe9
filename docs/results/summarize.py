"""Collect the comparison's sweeps into committed CSVs and one Markdown table (docs/results.md).

    python docs/results/summarize.py runs/dpmix-small docs/results

Writes OUT/tuning.csv (every validation run: stage, setting, method, validation accuracy), OUT/table.csv (every
finished reported run, from its summary.json, so a sweep still under way contributes what it has), OUT/spot.csv
(the K = M = 16 spot check), OUT/superseded.csv and OUT/sensitivity.csv (runs reported apart), and prints the
table of test accuracy, mean ± std over replicates, per method and ε (non-private last), then the spot check's.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

from dpmix_dist import summary as summary_json


def _rows(folder: Path, **extra) -> list[dict]:
    path = folder / "results.csv"
    if not path.is_file():
        return []
    return [{**extra, **row} for row in csv.DictReader(path.open())]


def _finished(runs: Path, pattern: str) -> list[dict]:
    """One row per finished run (its summary.json), also of sweeps still under way; names are METHOD-epsE-repR or
    METHOD-nonprivate-repR."""
    rows = []
    for path in sorted(runs.glob(f"{pattern}/*/summary.json")):
        s = summary_json.read(path)
        _, eps, rep = path.parent.name.rsplit("-", 2)
        rows.append(
            {
                "method": s["method"],
                "target_epsilon": math.inf if eps == "nonprivate" else float(eps[3:]),
                "replicate": rep[3:],
                "test_accuracy": s["test_accuracy"],
                "epsilon_spent": s["epsilon"],
                "delta": s["delta"],
                "steps": s["steps"],
                "noise_multiplier": s["noise_multiplier"],
                "num_train_examples": s["num_train_examples"],
                "group_size": s["group_size"],
                "num_views": s["num_views"],
                "num_synthetic": s["num_synthetic"],
                "num_mixes": s["num_mixes"],
                "train_seconds": s["train_seconds"],
            }
        )
    return rows


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
        _, stage, value = folder.name.split("-", 2)  # tune-lr-3 or tune-lr-3-dpmix_diff
        tuning += _rows(folder, stage=stage, value=value.split("-")[0])
    table, spot = _finished(runs, "table-*"), _finished(runs, "spot-*")
    outputs = {"tuning": tuning, "table": table, "spot": spot}
    # reported apart from the table: runs a later setting choice replaced (superseded-WHY-SWEEP), and checks of
    # how a setting moves the result (sensitivity-WHAT-METHOD)
    for kind in ("superseded", "sensitivity"):
        folders = sorted(runs.glob(f"{kind}-*"))
        outputs[kind] = [{"sweep": f.name, **row} for f in folders for row in _finished(runs, f.name)]
    for kind, rows in outputs.items():
        _write(out / f"{kind}.csv", rows)
    order = ["dpsgd", "self_aug", "dpmix_self", "dpmix_diff"]
    epsilons = sorted({float(r["target_epsilon"]) for r in table}, key=lambda e: (math.isinf(e), e))
    print("| method | group | " + " | ".join("non-private" if math.isinf(e) else f"ε = {e:g}" for e in epsilons) + " |")
    print("|---|---|" + "---|" * len(epsilons))
    for method in [m for m in order if any(r["method"] == m for r in table)]:
        cells = [_cell(table, method, e) for e in epsilons]
        group = next(r["group_size"] for r in table if r["method"] == method)
        print(f"| `{method}` | {group} | " + " | ".join(cells) + " |")
    if spot:
        print("\nK = M = 16 (S = 8), ε = 1 (spot.csv):\n\n| method | group | test % |\n|---|---|---|")
        for method in [m for m in order if any(r["method"] == m for r in spot)]:
            group = next(r["group_size"] for r in spot if r["method"] == method)
            print(f"| `{method}` | {group} | {_cell(spot, method, 1.0)} |")


def _cell(rows: list[dict], method: str, epsilon: float) -> str:
    """Test accuracy (%) of `method` at `epsilon`: mean ± std over replicates, and how many."""
    accs = [
        100 * float(r["test_accuracy"]) for r in rows if r["method"] == method and float(r["target_epsilon"]) == epsilon
    ]
    if not accs:
        return "–"
    if len(accs) == 1:
        return f"{accs[0]:.2f} (n=1)"
    return f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f} (n={len(accs)})"


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
