"""Recall@K and MAP@R of the retrieval ablations in docs/results/imperfect_supervision_cifar10.md:
the final epoch of every run of a ``tricks ablate --task retrieval`` folder, as a Markdown table
(mean ± sample sd over seeds, per configuration).

    python docs/results/retrieval_recall.py ABLATION [ABLATION ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ["val_recall_at_1", "val_recall_at_2", "val_recall_at_4", "val_recall_at_8", "val_map_at_r"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    print("| ablation | configuration | seeds | R@1 | R@2 | R@4 | R@8 | MAP@R |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for folder in args.folders:
        runs: dict[str, list[dict]] = {}
        for result in sorted((folder / "results").glob("*.json")):
            r = json.loads(result.read_text())
            if r.get("status") != "ok":
                continue
            last = [json.loads(line) for line in (folder / r["run_dir"] / "metrics.jsonl").read_text().splitlines()][-1]
            runs.setdefault(r["configuration"], []).append(last)
        for name, rows in runs.items():
            cells = []
            for key in KEYS:
                values = [row[key] for row in rows]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.3f} ± {sd:.3f}")
            print(f"| {folder.name} | {name} | {len(rows)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
