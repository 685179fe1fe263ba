"""Every sensible order of compressors works (and round-trips through save/load), or fails before
doing anything with a clear error; docs/composition.md's table is checked against what happens.

Regenerate the table after a change with ``LLMDEPLOY_WRITE_DOCS=1 pytest tests/test_composition.py``.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch

import llmdeploy
from llmdeploy.errors import LLMDeployError
from llmdeploy.finetune import LoRAFinetune
from llmdeploy.prune import LaCo, ShortGPT, SliceGPT, SparseGPT, SparseLLM, Wanda
from llmdeploy.quant import AQLM, RTN
from tests.conftest import ids_for

DOC = Path(__file__).resolve().parent.parent / "docs" / "composition.md"


def _aqlm():
    return AQLM(num_codebooks=1, nbits_per_codebook=6, in_group_size=8, max_iter=1, steps_per_round=4,
                kmeans_iters=4, finetune_epochs=1, batch_size=4, finetune_batch_size=4)


FIRST = {
    "SparseGPT 50%": lambda: SparseGPT(sparsity=0.5),
    "SparseGPT 2:4": lambda: SparseGPT(pattern="2:4", sparsity=None),
    "Wanda 50%": lambda: Wanda(sparsity=0.5),
    "SparseLLM 2:4": lambda: SparseLLM(pattern="2:4", sparsity=None, iterations=1),
    "SparseLLM 50%": lambda: SparseLLM(sparsity=0.5, iterations=1),
    "SliceGPT 25%": lambda: SliceGPT(sparsity=0.25),
    "ShortGPT": lambda: ShortGPT(n_remove=1),
    "LaCo": lambda: LaCo(merge_layers=3, interval=1, threshold=-1.0, lowest=0, target_layers=2),
    "AQLM": _aqlm,
    "RTN 4-bit": lambda: RTN(bits=4, group_size=16),
}
SECOND = {
    "RTN 4-bit": lambda: RTN(bits=4, group_size=16),
    "AQLM": _aqlm,
    "LoRA": lambda: LoRAFinetune(rank=4, max_steps=2, batch_size=2),
    "SparseGPT 50%": lambda: SparseGPT(sparsity=0.5),
    "SliceGPT 25%": lambda: SliceGPT(sparsity=0.25),
}


def _outcome(first: str, second: str, tmp_path: Path, cache: dict) -> str:
    if first not in cache:
        model, tok = llmdeploy.load("tiny-llama")
        calib = ids_for(tok, n=8, seq=32)
        model = FIRST[first]()(model, calib)
        cache[first] = (model, tok, calib)
    model, tok, calib = cache[first]
    model = copy.deepcopy(model)
    ids = calib[:2, :16]
    with torch.no_grad():
        before = model(ids).logits
    try:
        out = SECOND[second]()(model, calib)
    except LLMDeployError as e:
        with torch.no_grad():  # refused before doing anything
            assert torch.equal(model(ids).logits, before), f"{first} -> {second} changed the model, then failed"
        return f"✗ {_short(str(e))}"
    path = tmp_path / re.sub(r"\W+", "-", f"{first}-{second}")
    llmdeploy.save(out, tok, path)
    again, _ = llmdeploy.load(path)
    with torch.no_grad():
        a, b = out(ids).logits, again(ids).logits
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), f"{first} -> {second}: save/load changed the logits"
    assert [s["method"] for s in llmdeploy.applied_recipe(again)][-1] == SECOND[second]().method
    return "✓"


def _short(msg: str) -> str:
    """The reason an order is refused, in a few words (what the docs table shows)."""
    for key, text in [("already sliced", "already sliced"), ("already compressed", "already compressed"),
                      ("already quantized", "already quantized"), ("compressed modules", "already compressed"),
                      ("would change nothing", "nothing left to change")]:
        if key in msg:
            return text
    return msg[:40]


def _table(results: dict[tuple[str, str], str]) -> str:
    head = "| first \\ then | " + " | ".join(SECOND) + " |"
    sep = "|---" * (len(SECOND) + 1) + "|"
    rows = [f"| {f} | " + " | ".join(results[f, s] for s in SECOND) + " |" for f in FIRST]
    return "\n".join([head, sep, *rows])


def test_composition_table(tmp_path):
    cache: dict = {}
    results = {(f, s): _outcome(f, s, tmp_path, cache) for f in FIRST for s in SECOND}
    table = _table(results)
    text = DOC.read_text()
    begin, end = "<!-- table:begin -->\n", "\n<!-- table:end -->"
    start, stop = text.index(begin) + len(begin), text.index(end)
    current = text[start:stop]
    if os.environ.get("LLMDEPLOY_WRITE_DOCS") == "1":
        DOC.write_text(text[:start] + table + text[stop:])
    else:
        assert current == table, "docs/composition.md is out of date: rerun with LLMDEPLOY_WRITE_DOCS=1\n" + table
    # the orders the design promises
    for first in ("SparseGPT 50%", "SparseGPT 2:4", "Wanda 50%", "SparseLLM 50%", "SparseLLM 2:4", "SliceGPT 25%",
                  "ShortGPT", "LaCo"):
        assert results[first, "RTN 4-bit"] == "✓" and results[first, "LoRA"] == "✓", first
    for first in ("SliceGPT 25%", "ShortGPT", "LaCo"):
        assert results[first, "AQLM"] == "✓", first
    assert results["AQLM", "LoRA"] == "✓"
