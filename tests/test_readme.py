"""The README's Python block runs: verbatim on the embedded model (slow: it loads SmolLM2-135M and
checks the numbers its comments quote), and on a tiny model in the default suite."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
(BLOCK,) = re.findall(r"## Ten lines of Python\n\n```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(code: str) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    return out.getvalue().splitlines()


def test_readme_block_runs_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = _run(BLOCK.replace('"smollm2-135m"', '"tiny-qwen2"'))
    assert len(lines) == 2 and (tmp_path / "smollm2-w4" / "llmdeploy.json").exists()


@pytest.mark.slow
def test_readme_block_verbatim_prints_what_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = [float(x) for x in _run(BLOCK)]
    quoted = [float(m) for m in re.findall(r"print\(.*\)\s+# ([0-9.]+)", BLOCK)]
    assert len(printed) == len(quoted) == 2
    for got, want in zip(printed, quoted):
        assert got == pytest.approx(want, abs=10 ** -(len(str(want).split(".")[1]))), (got, want)
