"""Design-space files read as every tricks YAML file is read: bad bytes, bad YAML, bombs and specs of
the wrong shape are one line naming the file (and the line and column where the problem is) and
the fix, before any data is loaded; ``tricks sample`` exits 2 with that line."""

from __future__ import annotations

from pathlib import Path

import pytest

from processes import cli_in_process, one_line_error
from tricks_regnet.spaces import DesignSpace, SpaceError, get_space

GOOD = ("kind: anynet\nstages: 3\nparams:\n  depth: {low: 1, high: 4}\n  width: {low: 16, high: 256, step: 16}\n"
        "  bottleneck: {values: [1, 2]}\n  group_width: {values: [8]}\n")


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def laughs() -> str:
    lines = ['name: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"d{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("content, fragments", [
    (laughs(), ("line 6, column 5", "once its aliases are expanded")),
    ("params: " + "[" * 3000 + "]" * 3000 + "\n", ("line 1, column", "nested deeper than")),
    (b"kind: anynet\nname: caf\xe9\n", ("not UTF-8", "byte 0xe9 at line 2, column 10")),
    ("kind: anynet\nparams: {depth: {low: 1, high: 4}\n", ("not valid YAML", "line 3, column 1")),
    (GOOD + "kind: regnet\n", ("line 8, column 1", "'kind' appears twice")),
    ("- anynet\n", ("must be a mapping at the top level", "but it is a list")),
    ("", ("but it is empty",)),
    ("kind: anynet\nparams: [depth, width]\n", ("line 2, column 1", "params must be a mapping")),
    (GOOD.replace("{low: 1, high: 4}", "1..4"), ("line 4, column 3", "parameter 'depth' must be a mapping")),
    (GOOD.replace("stages: 3", "stages: 1000000000"), ("line 2, column 1", "stages must be a whole number from 1 to 16")),
    (GOOD.replace("stages: 3", "stages: 2.5"), ("line 2, column 1", "stages must be a whole number")),
    (GOOD.replace("[1, 2]", "[a, b]"), ("line 6, column 3", "parameter 'bottleneck'", "finite numbers, not 'a'")),
    (GOOD.replace("{low: 1, high: 4}", "{low: 1, high: .inf}"), ("line 4, column 3", "high must be a finite number")),
    (GOOD.replace("step: 16}", "step: 0.000001}"), ("line 5, column 3", "raise step or narrow the range")),
    (GOOD.replace("{low: 1, high: 4}", "{low: 1, high: 100000}"), ("'depth' reaches 100000 blocks",)),
    (GOOD.replace("[8]", "[0]"), ("'group_width' reaches 0", "raise its low end")),
    (GOOD + "stage: 3\n", ("line 8, column 1", "unknown key 'stage' (did you mean stages?)")),
    (GOOD.replace("{low: 1, high: 4}", "{low: 1, hi: 4}"), ("line 4, column 19", "unknown key 'hi'")),
    (GOOD + "shared: [[bottleneck]]\n", ("line 8, column 1", "shared must be a list of parameter names")),
    (GOOD + "se: lots\n", ("line 8, column 1", "se (the squeeze-excitation ratio)")),
])
def test_a_bad_space_file_names_the_file_the_place_and_the_fix(tmp_path, content, fragments):
    path = write(tmp_path / "space.yaml", content)
    with pytest.raises(SpaceError) as error:
        get_space(path)
    message = str(error.value)
    assert message.startswith(f"space file {path}") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_tricks_sample_refuses_a_bad_space_file_before_any_work(tmp_path):
    path = write(tmp_path / "bomb.yaml", laughs())
    out = tmp_path / "sweep"
    code, _, err = cli_in_process("sample", "--space", str(path), "--n", "2", "--out", str(out), "--dry-run")
    one_line_error(code, err, "space file", "bomb.yaml", "line 6, column 5", "aliases")
    assert not out.exists()


def test_what_a_space_file_may_say(tmp_path):
    path = write(tmp_path / "mine.yaml", "\ufeff" + GOOD + "shared: bottleneck, group_width\nincreasing: [width]\n")
    space = get_space(path)
    assert space.name == "mine" and space.shared == ["bottleneck", "group_width"]  # not b, o, t, ...
    assert space.increasing == ["width"] and len(space.sample(3)) == 3
    with pytest.raises(SpaceError, match="space custom: stages must be a whole number"):
        DesignSpace({"stages": "4"})  # a dict spec is checked the same way, named by the space
