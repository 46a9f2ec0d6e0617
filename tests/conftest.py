"""Shared helpers for the tests: CLI runs in a subprocess, tiny run settings, the shared data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The full CIFAR-10 as .npz shards, beside the checkout; tests that need it skip where it is absent.
SHARED_CIFAR10 = Path(os.environ.get("TRICKS_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))

# Settings for runs that finish in seconds on 2 CPU cores.
TINY = ["--model", "resnet8", "--batch-size", "32", "--set", "core.train_limit=256", "--set", "core.val_limit=128"]
TINY_API = dict(model="resnet8", batch_size=32, train_limit=256, val_limit=128)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``tricks ARGS`` as a user would, in a fresh process."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tricks.cli.main", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def cifar10_dir() -> Path:
    if not (SHARED_CIFAR10 / "train_0.npz").exists():
        pytest.skip(f"the shared CIFAR-10 shards are not at {SHARED_CIFAR10}")
    return SHARED_CIFAR10
