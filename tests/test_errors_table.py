"""docs/errors.md's table is true: every bad input gets exactly the line the table gives, exit code 2,
and writes nothing (the table's own introduction says how its damage column reads)."""
import contextlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

import tinyllm as tl
from tinyllm.cli import main as cli_main
from tinyllm.safetensors_io import load_file, save_file
from tinyllm.tokenizer import BPETokenizer

TABLE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "2",
        "--eval-iters", "2", "--eval-interval", "3", "--max-iters", "3", "--warmup-iters", "2", "--threads", "1",
        "--sample-tokens", "0"]


def table_rows():
    """(bad input, damage, command, expected line) of every row of the table."""
    rows = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| ") or line.startswith("| bad input") or line.startswith("| ---"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        cells = [c.replace("\\|", "|") for c in cells]
        assert len(cells) == 4, line
        unquote = lambda c: c[1:-1] if c.startswith("`") and c.endswith("`") else c  # noqa: E731
        rows.append((cells[0], unquote(cells[1]), unquote(cells[2]), unquote(cells[3])))
    return rows


ROWS = table_rows()


def test_the_table_is_read():
    assert len(ROWS) >= 40
    assert all(command.startswith(("tinyllm ", "python: ")) for _, _, command, _ in ROWS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A 3-step run on the small dataset (conftest.py), to copy for each row."""
    root = tmp_path_factory.mktemp("errors")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["train", "--data", str(data_dir), "--out", str(root / "run"), *TINY]) == 0
    return root


def damage(run, spec):
    """Apply one damage of the table's second column to the run directory."""
    if not spec:
        return
    file_name, _, action = spec.partition(": ")
    path = run / "ckpt" / file_name
    if file_name == "state.json":
        state = json.loads(path.read_text())
        if action.startswith("del "):
            del state[action[4:]]
        else:
            key, _, value = action.partition(" = ")
            *parents, last = key.split(".")
            target = state
            for part in parents:
                target = target[int(part)] if isinstance(target, list) else target[part]
            target[last] = json.loads(value)
        path.write_text(json.dumps(state))
        return
    words = action.split()
    if words[0] == "rename":
        tensors = load_file(path)
        tensors[words[2]] = tensors.pop(words[1])
        save_file(tensors, path)
    elif words[1:] == ["dtype", "I32"]:  # rewrite the header only: I32 has F32's size
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        assert header[words[0]]["dtype"] == "F32"
        header[words[0]]["dtype"] = "I32"
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        path.write_bytes(raw[:8] + text + raw[8 + n:])
    elif words[1:] == ["=", "NaN"]:
        tensors = load_file(path)
        tensors[words[0]].reshape(-1)[0] = np.nan
        save_file(tensors, path)
    else:
        raise AssertionError(f"unknown damage {spec!r}")


def snapshot(root):
    """Every file under root and its bytes (what "writes nothing" is checked against)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("what, spec, command, expected", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_gets_its_line(what, spec, command, expected, trained, data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    damage(run, spec)
    paths = {"RUN": str(run), "DATA": str(data_dir)}
    expected = re.sub(r"\b(RUN|DATA)\b", lambda m: paths[m.group()], expected)
    if command.startswith("python: "):
        with pytest.raises(Exception) as info:
            eval(command[len("python: "):], {"tl": tl, "BPETokenizer": BPETokenizer})  # noqa: S307
        assert expected in f"{type(info.value).__name__}: {info.value}"
        return
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINYLLM_DATA", str(tmp_path / "data"))  # where a default dataset would go
    args = [re.sub(r"\b(RUN|DATA)\b", lambda m: paths[m.group()], a) for a in shlex.split(command)[1:]]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli_main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert expected in err, err
    assert snapshot(tmp_path) == before, "the command wrote something"
