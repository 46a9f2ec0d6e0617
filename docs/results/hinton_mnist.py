"""The MNIST experiments of docs/results/hinton_mnist.md (Hinton, Vinyals, Dean, arXiv 1503.02531,
section 3), on this machine's CPU:

    python docs/results/hinton_mnist.py --runs runs/hinton --seeds 0 1 2

For each seed it trains (or resumes, or skips when finished) with ``tricks run``:

* ``teacher{S}``: mlp:1200-1200, dropout 0.5 on the hidden units and 0.2 on the inputs, max-norm
  15, inputs jittered by up to 2 pixels (``--crop-pad 2``);
* ``student{S}``: mlp:800-800 alone, no regularization, no jitter;
* ``distilled{S}``: the same student distilled from ``teacher{S}`` at T = 20;
* ``no3_{S}``: the same, on a transfer set without any 3 (``kd.omit_classes=[3]``);

then counts the test errors of each (and of ``no3_{S}`` with the 3's logit raised, the paper's bias
shift), and runs the soft-targets-as-a-regularizer ablation on 3% of the training images
(``tricks ablate --plugins kd``: the student with hard targets against the same student with
teacher ``teacher0``'s soft targets). Writes hinton_mnist.csv (``--csv``) beside this script and
prints the tables of the page.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import tricks
from tricks.config import CoreSettings
from tricks.data import load_data
from tricks.ablate import csv_text
from tricks.atomic import write_text

HERE = Path(__file__).resolve().parent
MNIST = str(HERE.parents[2] / "shared" / "data" / "mnist")
# the recipe every run shares: SGD + Nesterov momentum 0.9, cosine decay, no weight decay
COMMON = ["--dataset", "mnist", "--batch-size", "128", "--lr", "0.03", "--weight-decay", "0"]
TEACHER = ["--model", "mlp:1200-1200", "--crop-pad", "2", "--plugins", "cosine", "--set", "mlp.dropout=0.5",
           "--set", "mlp.input_dropout=0.2", "--set", "mlp.max_norm=15"]
STUDENT = ["--model", "mlp:800-800", "--no-augment"]
KD = ["--set", "kd.temperature=20", "--set", "kd.hard_weight=0.1"]
SHIFTS = (0.0, 1.0, 2.0, 3.0, 3.5, 4.0, 5.0)


def tricks_command(*args: str) -> None:
    command = [sys.executable, "-m", "tricks.cli.main", *args]
    print("$ tricks " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def train(out: Path, args: list[str]) -> None:
    run = tricks.RunDir(out)
    if run.status() == "finished":
        return
    if run.has_checkpoint():
        tricks_command("run", "--resume", str(out), "--quiet")
    else:
        tricks_command("run", *args, "--out", str(out), "--quiet")


def predictions(out: Path, data) -> torch.Tensor:
    """The run's logits on the 10,000 test images."""
    from tricks.data import Pipeline

    model = tricks.RunDir(out).build_model().eval()
    pipeline = Pipeline(data, torch.device("cpu"), data.image_size, False)
    with torch.no_grad():
        return torch.cat([model(pipeline(data.val.x[i:i + 1000], False)) for i in range(0, len(data.val.y), 1000)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/hinton"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", default=MNIST)
    parser.add_argument("--skip-ablation", action="store_true")
    parser.add_argument("--csv", default="hinton_mnist.csv", help="the per-run table, written beside this script")
    a = parser.parse_args()
    common = [*COMMON, "--data-dir", a.data_dir, "--epochs", str(a.epochs)]
    for seed in a.seeds:
        s = ["--seed", str(seed)]
        teacher = a.runs / f"teacher{seed}"
        train(teacher, [*common, *TEACHER, *s])
        train(a.runs / f"student{seed}", [*common, *STUDENT, "--plugins", "cosine", *s])
        kd = [*common, *STUDENT, "--plugins", "cosine,kd", "--set", f"kd.teacher={teacher}", *KD, *s]
        train(a.runs / f"distilled{seed}", kd)
        train(a.runs / f"no3_{seed}", [*kd, "--set", "kd.omit_classes=[3]"])
    if not a.skip_ablation:
        out = a.runs / "soft_targets_3pct"
        start = time.time()
        tricks_command("ablate", "--plugins", "kd", "--base", "cosine", *common[:-2], "--epochs", "200",
                       *STUDENT, "--train-limit", "1800", "--set", f"kd.teacher={a.runs / 'teacher0'}", *KD,
                       "--seeds", str(len(a.seeds)), "--out", str(out), "--quiet")
        print(f"ablation: {time.time() - start:.0f} s")

    data = load_data(CoreSettings(dataset="mnist", data_dir=a.data_dir))
    y = data.val.y
    rows = []
    for seed in a.seeds:
        for name in ("teacher", "student", "distilled", "no3_"):
            out = a.runs / f"{name}{seed}"
            logits = predictions(out, data)
            summary = tricks.RunDir(out).summary() or {}
            row = {"model": name.rstrip("_"), "seed": seed, "errors": int((logits.argmax(1) != y).sum()),
                   "errors_on_3": int((logits.argmax(1) != y)[y == 3].sum()),
                   "train_seconds": round(summary.get("train_seconds", 0.0)), "params": summary.get("params")}
            if name == "no3_":
                for shift in SHIFTS:
                    shifted = logits.clone()
                    shifted[:, 3] += shift
                    row[f"errors_shift_{shift:g}"] = int((shifted.argmax(1) != y).sum())
                    row[f"errors_on_3_shift_{shift:g}"] = int((shifted.argmax(1) != y)[y == 3].sum())
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k) if k in rows[-1] else -1)
    write_text(HERE / a.csv, csv_text(rows, keys))

    print("\n| model | paper's test errors | ours: test errors (mean ± sd over seeds) | seeds |")
    print("| --- | --- | --- | --- |")
    paper = {"teacher": "67", "student": "146", "distilled": "74", "no3": "206 (133 of them on the 1010 threes)"}
    for name in ("teacher", "student", "distilled", "no3"):
        errors = [r["errors"] for r in rows if r["model"] == name]
        print(f"| {name} | {paper[name]} | {_mean_sd(errors)} | {len(errors)} |")
    no3 = [r for r in rows if r["model"] == "no3"]
    print(f"| no3, 3's logit + 3.5 | 109 | {_mean_sd([r['errors_shift_3.5'] for r in no3])} | {len(no3)} |")
    print("\nno3: errors (on the 1010 threes) by the shift of the 3's logit")
    for shift in SHIFTS:
        print(f"  +{shift:g}: {_mean_sd([r[f'errors_shift_{shift:g}'] for r in no3])} "
              f"({_mean_sd([r[f'errors_on_3_shift_{shift:g}'] for r in no3])} on threes)")



def _mean_sd(values: list) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    return f"{values[0]}" if values else "-"


if __name__ == "__main__":
    main()
