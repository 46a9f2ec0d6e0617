"""Atomic writes: whole files or none, with the permissions of a plain open()."""

from __future__ import annotations

import stat

from tricks import atomic


def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic.write_json(tmp_path / "a.json", {"a": 1})
    atomic.write_with(tmp_path / "b.bin", lambda name: open(name, "wb").write(b"1"))
    for path in (tmp_path / "a.json", tmp_path / "b.bin"):
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) != 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "plain.txt"]
