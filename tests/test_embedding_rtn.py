"""EmbeddingRTN: the token embedding and the LM head stored as RTN codes (tied or not)."""

import pytest
import torch
from safetensors import safe_open

import llmdeploy
from llmdeploy.errors import ConfigError
from llmdeploy.eval.footprint import footprint
from llmdeploy.io.checkpoint import load_saved
from llmdeploy.kernels import use_reference
from llmdeploy.quant import RTN, EmbeddingRTN, RTNEmbedding, RTNLinear, RTNTiedHead

from .conftest import FAMILIES, ids_for


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_and_head_compute_with_the_quantized_matrix(family, bits):
    model, tok = llmdeploy.load(family)
    model.eval()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    w_emb, w_head = emb.weight.detach().clone(), head.weight.detach().clone()
    step = EmbeddingRTN(bits=bits, group_size=32)
    model = step(model)
    q_emb, q_head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(q_emb, RTNEmbedding)
    assert isinstance(q_head, RTNTiedHead if tied else RTNLinear) and step.report_.tied is tied
    w_hat = q_emb.dequantize()
    s = q_emb.scales.float().repeat_interleave(32, dim=1)
    assert ((w_emb - w_hat).abs() <= s / 2 * (1 + 1e-5) + 1e-7).all()  # RTN's bound, every entry
    ids = ids_for(tok, n=2, seq=7)
    with torch.no_grad():
        assert torch.equal(q_emb(ids), w_hat[ids])  # the looked-up rows are exactly the matrix's
        head_w = q_head.weight if tied else q_head.dequantize()
        if tied:
            assert torch.equal(head_w, w_hat)
        else:
            assert not torch.equal(head_w, w_hat) and (head_w - w_head).abs().max() < 0.1
        for rows in (1, 3, 40):  # the kernel's row path and its dequantize + BLAS path
            x = torch.randn(rows, emb.embedding_dim)
            torch.testing.assert_close(q_head(x), x @ head_w.T, atol=1e-4, rtol=1e-4)
        fast = model(ids).logits
        with use_reference():
            ref = model(ids).logits
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_tied_matrix_is_stored_once_and_round_trips(tmp_path):
    model, tok = llmdeploy.load("tiny-qwen2")
    dense_fp = footprint(model.eval())
    model = RTN(bits=4, group_size=32)(EmbeddingRTN(bits=8, group_size=32)(model))
    fp = footprint(model)
    assert fp.params == dense_fp.params  # the tied matrix counted once, as in the dense model
    emb_bits = model.get_input_embeddings().storage_bits()
    assert fp.compressed_bits_per_param < 5.5 and emb_bits < 9 * model.get_input_embeddings().nominal_params()
    ids = ids_for(tok, n=2, seq=9)
    with torch.no_grad():
        logits = model(ids).logits
    llmdeploy.save(model, tok, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("embed_tokens.qweight") for k in keys)
    assert not any(k.startswith("lm_head") for k in keys)  # the head reads the embedding's codes
    loaded, _ = load_saved(tmp_path / "q")
    assert isinstance(loaded.lm_head, RTNTiedHead) and loaded.lm_head.embedding is loaded.get_input_embeddings()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
        out = loaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
        with use_reference():
            ref = loaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


def test_embedding_rtn_refuses_what_it_cannot_do():
    model, _ = llmdeploy.load("tiny-qwen2")  # tied
    with pytest.raises(ConfigError, match="tied"):
        EmbeddingRTN(head=False)(model)
    with pytest.raises(ConfigError, match="group_size=48"):
        EmbeddingRTN(group_size=48)(model)
    with pytest.raises(ConfigError, match="bits"):
        EmbeddingRTN(bits=1)(model)
    model = EmbeddingRTN(bits=8, group_size=32)(model)
    with pytest.raises(ConfigError, match="already quantized"):
        EmbeddingRTN()(model)
    untied, _ = llmdeploy.load("tiny-llama")
    model = EmbeddingRTN(bits=8, group_size=32, head=False)(untied)  # untied: the head may stay dense
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    head = RTNTiedHead(64, 259, tied_to="model.embed_tokens")
    with pytest.raises(ConfigError, match="not bound"):
        head(torch.randn(1, 64))
    with pytest.raises(ConfigError, match="is not the 259x64 RTNEmbedding"):
        head.bind(llmdeploy.load("tiny-llama")[0])
