"""Helpers for tests that need other processes: deterministic crashes (plugins that SIGKILL their
own process when an epoch starts, or while its checkpoint is being written), CLI runs started
side by side, the CLI's entry point called in this process for errors that need no training, and
the check for leftover temporary files.

Killed at the start of epoch ``k`` (0-based), a run has checkpointed epochs ``0..k-1`` and
nothing after: no ``finally``, no exception hook, no clean-up runs, as after a power cut.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import tricks
from tricks import RunDir
from tricks.testing import one_torch_thread  # noqa: F401  (re-exported for the tests)

HERE = Path(__file__).resolve().parent
# One thread per process: runs compared for equality must use the same thread count, and two
# cores shared with other work get slower, not faster, with more threads per process.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class AtEpoch(tricks.Plugin):
    """Do ``act`` when epoch ``epoch`` (0-based) starts."""

    tasks = ("*",)  # an observer of the loop: it works in every task

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def act(self, epoch: int) -> None:
        raise NotImplementedError

    @tricks.hookimpl
    def on_epoch_start(self, ctx, epoch):
        if epoch == self.epoch:
            self.act(epoch)


class KillAtEpoch(AtEpoch):
    """SIGKILL this process when epoch ``epoch`` (0-based) starts."""

    def act(self, epoch: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class Stopped(Exception):
    """What :class:`StopAtEpoch` raises."""


class StopAtEpoch(AtEpoch):
    """Stop the run in this process (an exception, not a kill) when epoch ``epoch`` (0-based)
    starts: the in-process stand-in for an interruption, its last epoch committed."""

    def act(self, epoch: int) -> None:
        raise Stopped(f"stopped as epoch {epoch} starts")


class KillWhileSaving(tricks.Plugin):
    """SIGKILL this process in the middle of writing the checkpoint of epoch ``epoch`` (0-based):
    its temporary file is written and synced, the rename into place never happens."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    @tricks.hookimpl
    def state_dict(self, ctx):
        if ctx.epoch == self.epoch:
            kill_at_write(RunDir.CHECKPOINT.name, before=True)
        return None


def kill_at_write(name: str, before: bool, nth: int = 1) -> None:
    """From now on, SIGKILL this process at the ``nth`` atomic rename onto a file called ``name``
    (any name: ``"*"``), just ``before`` it or just after it. For a process about to be killed:
    it patches ``os.replace`` for the whole process."""
    real = os.replace
    seen = [0]

    def replace(src, dst, *args, **kwargs):
        if name in ("*", Path(dst).name):
            seen[0] += 1
            if seen[0] == nth and before:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, *args, **kwargs)
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return
        real(src, dst, *args, **kwargs)

    os.replace = replace


def start(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start a command with one torch thread; collect it with :func:`finish`."""
    full_env = {**os.environ, "COLUMNS": "200", **ONE_THREAD, **(env or {})}
    return subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """``tricks ARGS`` in a fresh process, as ``conftest.run_cli`` runs it, without waiting."""
    return start([sys.executable, "-m", "tricks.cli.main", *args], cwd=cwd, env=env)


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} ran over {timeout}s:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_script(code: str, cwd: Path | None = None) -> subprocess.Popen:
    """Run the Python ``code`` in a fresh process; it may import this module and the test modules."""
    script = f"import sys\nsys.path.insert(0, {str(HERE)!r})\n" + textwrap.dedent(code)
    return start([sys.executable, "-c", script], cwd=cwd)


def finish_killed(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a script started with :func:`start_script` and check that SIGKILL ended it."""
    done = finish(proc)
    assert done.returncode == -signal.SIGKILL, f"exit status {done.returncode}, expected SIGKILL:\n{done.stderr}"
    return done


def cli_in_process(*args: str) -> tuple[int, str, str]:
    """Call the ``tricks`` console script's entry point here: ``(exit status, stdout, stderr)``.

    For commands that fail before any training, where a fresh process would only add its start-up."""
    from tricks.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", ["tricks", *args]), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, stderr: str, *fragments: str) -> str:
    """Check the CLI's contract for bad input: exit status 2, one line on stderr naming the problem."""
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files (the atomic writes' ``.NAME.*`` files) anywhere in a run directory."""
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*")
                  if (p.name.startswith(".") or p.name.endswith(".tmp")) and p.name != ".lock")


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes, to check that nothing was rewritten."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}
