"""``tricks attention``: a command this plugin adds to the ``tricks`` CLI (entry point group
``tricks.commands``); the package (and torch) is imported only when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tricks import TricksError


def attention(
    run: Path = typer.Argument(..., help="A run directory of a ViT (trained with --model vit_cifar, ...)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The PNG to write (default RUN/attention.png)."),
    images: int = typer.Option(8, "--images", "-n", min=1, max=32, help="How many validation images to draw."),
    fusion: str = typer.Option("mean", "--fusion", help="How the heads of a layer are fused: mean, max or min."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
):
    """Draw a ViT run's class-token attention rollout on its first validation images.

    Rebuilds the run's model with its last weights and its data set, multiplies the layers'
    head-averaged attention (with the residual as (A + I) / 2, Abnar & Zuidema 2020) and overlays
    the class token's row on each image. Writes RUN/attention.png unless --out says otherwise.
    """
    import torch

    import tricks
    from tricks.data import load_data

    from . import write_attention_png
    from .model import VisionTransformer
    from .rollout import FUSIONS

    if fusion not in FUSIONS:
        raise TricksError(f"--fusion {fusion} is not one of {', '.join(FUSIONS)}")
    rd = tricks.RunDir(run)
    if not rd.has_run():
        raise TricksError(f"{run} holds no run (no {rd.CONFIG}); give the directory of a ViT run")
    model = rd.build_model(device)
    if not isinstance(model, VisionTransformer):
        raise TricksError(f"the run in {run} trained {type(model).__name__}, not a ViT of the vit plugin; "
                          "attention maps need --model vit_cifar (or vit_tiny, ...)")
    data = load_data(rd.run_config().core)
    if data.val is None:
        raise TricksError(f"the run's data set ({data.name}) is read from image files; attention maps need an in-memory one")
    path = out or Path(run) / "attention.png"
    with torch.no_grad():
        write_attention_png(model, data, path, images, fusion, torch.device(device),
                            title=f"{run}: class-token attention rollout ({fusion} over heads)")
    typer.echo(str(path))
