"""Markdown table of a fair-protocol experiment (seeds + held-out lr sweep) for the docs.

    python scripts/fair_table.py --workdir=runs/fair_cpu

Reads `report_summary.csv` (mean, 95 % half-width per column, written by kd_keras.experiment)
and every variant's `runs/<variant>/sweep/selected.json`; prints one row per finished variant:
the sweep's held-out value per candidate, the selected candidate, and the reported metrics as
mean ± half-width of the 95 % interval (in points).
"""

import argparse
import csv
import json
import os

METRICS = (
    ("knn/majority_k1_top1", "1-NN"),
    ("knn/majority_k20_top1", "20-NN"),
    ("linear/simreg_cached_features_top1", "linear"),
)


def sweep_cells(workdir, variant):
    path = os.path.join(workdir, "runs", variant, "sweep", "selected.json")
    if not os.path.exists(path):
        return "–"
    record = json.load(open(path))
    return ", ".join(
        f"{' '.join(c['flags']).replace('--', '')}: {100 * c['value']:.1f}"
        for c in record["candidates"]
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    rows = list(csv.DictReader(open(os.path.join(args.workdir, "report_summary.csv"))))
    names = [label for _, label in METRICS]
    print(f"| variant | n | sweep (held-out 20-NN, %) | selected | {' | '.join(names)} |")
    print("|---" * (4 + len(names)) + "|")
    for row in rows:
        cells = []
        for column, _ in METRICS:
            mean, half = row.get(column), row.get(f"{column}:ci95")
            cells.append(f"{100 * float(mean):.1f} ± {100 * float(half):.1f}" if mean else "–")
        print(
            f"| {row['variant']} | {row['n']} | {sweep_cells(args.workdir, row['variant'])} | "
            f"`{row['selected']}` | {' | '.join(cells)} |"
        )


if __name__ == "__main__":
    main()
