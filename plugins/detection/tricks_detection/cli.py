"""``tricks detection-data``: write an MNIST-detection set as images plus COCO JSON (a command
this plugin adds to the ``tricks`` CLI through the entry point group ``tricks.commands``), so that
any COCO tool can read the set a run trains on (``--dataset coco --data-dir OUT`` reads it back)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()


def detection_data(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write: train/, val/ (PNG images) and annotations/instances_{train,val}.json."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="MNIST's folder (the one holding MNIST/raw/); without it, the bundled 8x8 digits."),
    train_images: int = typer.Option(4000, "--train-images", min=1, help="Training canvases (from MNIST's training digits)."),
    val_images: int = typer.Option(500, "--val-images", min=1, help="Validation canvases (from MNIST's test digits)."),
    canvas: int = typer.Option(64, "--canvas", min=16, help="Side of a canvas in pixels."),
    digits: str = typer.Option("1,3", "--digits", help="Fewest and most digits on a canvas: LO,HI."),
    scale: Optional[str] = typer.Option(None, "--scale", help="Range of a digit's scale LO,HI (default 0.75,1.5 for MNIST, 2,4 for the bundled digits)."),
    max_iou: float = typer.Option(0.0, "--max-iou", min=0.0, max=1.0, help="Largest IoU of two boxes on a canvas (0: no overlap)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the canvases: the same seed writes the same set."),
):
    """Write an MNIST-detection set (digits pasted on canvases, one box per digit) as PNG images and COCO JSON."""
    from tricks.errors import TricksError

    from .mnist_detection import EMBEDDED, generate, write_coco

    def pair(text: str, kind, what: str):
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            return tuple(kind(p) for p in parts)
        except ValueError:
            raise TricksError(f"--{what} {text}: write two numbers LO,HI (e.g. --{what} 1,3)") from None

    source = str(data_dir.expanduser()) if data_dir is not None else EMBEDDED
    if data_dir is not None and not data_dir.expanduser().is_dir():
        raise TricksError(f"--data-dir {data_dir} is not a folder; point it at the folder that holds MNIST/raw/")
    spread = pair(scale, float, "scale") if scale else ((0.75, 1.5) if data_dir is not None else (2.0, 4.0))
    args = dict(canvas=canvas, digits=pair(digits, int, "digits"), scale=spread, max_iou=max_iou, seed=seed)
    for split, train, count in (("train", True, train_images), ("val", False, val_images)):
        dataset = generate(source, train=train, count=count, **args)
        path = write_coco(dataset, out, split)
        console.print(f"{split}: {count} images, {sum(len(b) for b in dataset.boxes)} boxes -> {path}")
    console.print(f"train on it with: tricks run --task detection --dataset coco --data-dir {out}")
