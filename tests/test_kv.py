"""Paged KV cache, KV quantization, split-KV attention and DistAttention (issue #18)."""

import functools
import os
import random
import signal

import pytest
import torch
import torch.nn.functional as F

import llmdeploy
from llmdeploy.errors import ConfigError, DistributedKVError, KVCacheFullError
from llmdeploy.kv import (
    BlockAllocator,
    BlockStore,
    BlockTables,
    KVQuantConfig,
    PagedEngine,
    PagedKVCache,
    generate,
    merge_partials,
    partial_attention,
)
from llmdeploy.kv.distributed import generate_distributed, launch
from llmdeploy.kv.engine import sample_token
from llmdeploy.kv.quant import dequantize, quantize

from .conftest import FAMILIES


def _prompts(seed=0, lengths=(5, 17, 33)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in FAMILIES:
        m, _ = llmdeploy.load(name)
        out[name] = m.eval()
    return out


# --- allocator -------------------------------------------------------------------------------
def test_allocator_invariants_under_random_traffic():
    rng = random.Random(0)
    tables = BlockTables(BlockAllocator(40), block_size=4)
    live = set()
    for step in range(2000):
        op = rng.random()
        if op < 0.2 or not live:
            seq = step
            tables.add(seq)
            live.add(seq)
        elif op < 0.8:
            seq = rng.choice(sorted(live))
            before = {s: list(t) for s, t in tables.tables.items()}
            free_before = tables.allocator.num_free
            try:
                tables.grow(seq, rng.randint(1, 9))
            except KVCacheFullError:  # all-or-nothing: nothing changed
                assert tables.tables == before and tables.allocator.num_free == free_before
        else:  # finish or cancel
            seq = rng.choice(sorted(live))
            tables.remove(seq)
            live.discard(seq)
        tables.allocator.check()
        owned = [b for t in tables.tables.values() for _, b in t]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        for s, t in tables.tables.items():
            assert len(t) == -(-tables.lengths[s] // 4)
            assert all(tables.allocator.owner(b) == s for _, b in t)
    for s in list(live):
        tables.remove(s)
    assert tables.allocator.num_free == 40
    tables.allocator.check()


def test_allocator_errors():
    a = BlockAllocator(2)
    with pytest.raises(KVCacheFullError, match="raise num_blocks"):
        a.allocate("x", 3)
    assert a.num_free == 2
    with pytest.raises(ConfigError):
        BlockAllocator(0)
    t = BlockTables(a, 4)
    with pytest.raises(ConfigError, match="add it"):
        t.grow("nope", 1)


# --- split attention -----------------------------------------------------------------------------
@pytest.mark.parametrize("Tq,Tk,groups", [(7, 7, 1), (5, 23, 3), (1, 40, 2)])
def test_split_attention_merge_equals_sdpa(Tq, Tk, groups):
    g = torch.Generator().manual_seed(Tq * 100 + Tk)
    B, Hkv, D = 2, 2, 16
    q = torch.randn(B, Hkv * groups, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    q_pos = torch.arange(Tk - Tq, Tk).expand(B, -1)  # the queries are the last Tq positions (causal)
    k_pos = torch.arange(Tk).expand(B, -1)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         attn_mask=(k_pos[:, None, None, :] <= q_pos[:, None, :, None]))
    for n_splits in (1, 2, 3, 5):
        # a random partition of the keys into n_splits disjoint (non-contiguous) subsets
        owner = torch.randint(0, n_splits, (Tk,), generator=g)
        partials = []
        for s in range(n_splits):
            sel = (owner == s).nonzero(as_tuple=True)[0]
            partials.append(partial_attention(q, k[:, :, sel], v[:, :, sel], scale=D ** -0.5,
                                              q_pos=q_pos, k_pos=k_pos[:, sel]))
        out, mx, lse = merge_partials(partials)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        scores = (q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * D ** -0.5
        scores = scores.masked_fill(~(k_pos[:, None, None, :] <= q_pos[:, None, :, None]), float("-inf"))
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mx, scores.amax(-1))


def test_partial_that_sees_nothing_weighs_zero():
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    empty = partial_attention(q, k, v, scale=1.0, k_valid=torch.zeros(1, 3, dtype=torch.bool))
    assert torch.isinf(empty[2]).all() and (empty[0] == 0).all()
    full = partial_attention(q, k, v, scale=1.0)
    out = merge_partials([empty, full])[0]
    torch.testing.assert_close(out, full[0])


# --- storage and quantization ------------------------------------------------------------------------
def test_store_reads_back_what_was_written():
    store = BlockStore(6, 4)
    x = torch.randn(10, 2, 8)
    blocks = torch.tensor([3] * 4 + [0] * 4 + [5] * 2)
    offsets = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    store.write(0, blocks, offsets, x, -x)
    k, v = store.read(0, torch.tensor([[3, 0, 5]]))
    torch.testing.assert_close(k[0, :, :10], x.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(v[0, :, :10], -x.transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [-1, -2])
def test_quantize_error_is_within_half_a_step(bits, dim):
    x = torch.randn(3, 16, 8) * torch.linspace(0.1, 5, 8)
    q, s, z = quantize(x, bits, dim)
    assert q.dtype == torch.uint8 and q.shape[-1] == (8 if bits == 8 else 4)
    err = (dequantize(q, s, z, bits, torch.float32) - x).abs()
    assert (err <= s / 2 + 1e-5).all()


def test_per_channel_blocks_stay_exact_until_full_then_quantize():
    cfg = KVQuantConfig(bits=4, key_axis="channel", value_axis="token")
    store = BlockStore(2, 4, quant=cfg)
    x = torch.randn(4, 2, 8)
    store.write(0, torch.tensor([1, 1]), torch.tensor([0, 1]), x[:2], x[:2])
    k, v = store.read(0, torch.tensor([[1]]))
    torch.testing.assert_close(k[0, :, :2], x[:2].transpose(0, 1), rtol=0, atol=0)  # residual in full precision
    assert (v[0, :, :2] - x[:2].transpose(0, 1)).abs().max() > 0  # per-token values are quantized at once
    store.write(0, torch.tensor([1, 1]), torch.tensor([2, 3]), x[2:], x[2:])
    k, _ = store.read(0, torch.tensor([[1]]))
    err = (k[0] - x.transpose(0, 1)).abs()
    assert 0 < err.max() and not store.keys[0].tails  # quantized now, the copy dropped
    _, s, _ = quantize(x.transpose(0, 1), 4, dim=-2)
    assert (err <= s / 2 + 1e-5).all()


def test_quantized_cache_saves_memory():
    x = torch.randn(4, 3, 64)
    sizes = {}
    for name, cfg in [("fp32", None), ("int8", KVQuantConfig(8)), ("int4", KVQuantConfig(4))]:
        store = BlockStore(8, 16, quant=cfg)
        store.write(0, torch.tensor([0] * 4), torch.arange(4), x, x)
        sizes[name] = store.bytes_per_token()
    assert sizes["int8"] < sizes["fp32"] / 3 and sizes["int4"] < sizes["int8"] * 0.6
    with pytest.raises(ConfigError):
        KVQuantConfig(bits=3)
    with pytest.raises(ConfigError):
        KVQuantConfig(key_axis="head")


# --- the cache in transformers models -------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_paged_generation_equals_default_cache(models, name):
    model = models[name]
    prompts = _prompts()
    ref = [_hf_greedy(model, p, 10) for p in prompts]
    for block_size, num_blocks, max_batch in [(1, None, 3), (4, None, 2), (16, None, 3), (4, 12, 3)]:
        # num_blocks=12 is too small for all three at once: requests wait and get preempted
        out = generate(model, prompts, 10, block_size=block_size, num_blocks=num_blocks, max_batch=max_batch)
        assert out == ref, (block_size, num_blocks)
    # chunked prefill gives the same tokens
    assert generate(model, prompts, 10, block_size=4, prefill_chunk=7) == ref


@pytest.mark.parametrize("name", FAMILIES)
def test_drop_in_cache_with_transformers_generate(models, name):
    model = models[name]
    ids = torch.tensor([p[:9] for p in _prompts(1, (9, 12, 20))])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cache = PagedKVCache(64, 4)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         cache=cache)
    assert torch.equal(ref, got)
    with torch.no_grad():  # logits of a forward through the cache equal a cache-free forward
        ref_logits = model(ids).logits
        logits = model(ids, cache=PagedKVCache(64, 4)).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_engine_cancel_frees_blocks_and_rest_is_unchanged(models):
    model = models["tiny-llama"]
    prompts = _prompts()
    ref = generate(model, prompts, 8, block_size=4)
    cache = PagedKVCache(40, 4)
    eng = PagedEngine(model, cache)
    ids = [eng.add_request(p, 8) for p in prompts]
    eng.step()
    eng.step()
    used = 40 - cache.num_free_blocks
    eng.cancel(ids[1])
    assert 40 - cache.num_free_blocks == used - -(-(17 + 2) // 4)
    out = eng.run()
    assert out[ids[0]] == ref[0] and out[ids[2]] == ref[2]
    assert eng.finished[ids[1]].cancelled and len(out[ids[1]]) == 2
    assert cache.num_free_blocks == 40 and not cache.sequences
    cache.blocks.allocator.check()


def test_sampling_is_per_request_and_follows_the_distribution(models):
    model = models["tiny-llama"]
    prompts = _prompts(lengths=(6, 11, 20))
    alone = PagedEngine(model, PagedKVCache(40, 4))
    rid = alone.add_request(prompts[0], 10, temperature=0.8, top_p=0.9, seed=7)
    batched = PagedEngine(model, PagedKVCache(40, 4))
    ids = [batched.add_request(prompts[0], 10, temperature=0.8, top_p=0.9, seed=7),
           batched.add_request(prompts[1], 10),  # greedy beside it
           batched.add_request(prompts[2], 10, temperature=1.0, seed=3)]
    out = batched.run()
    assert alone.run()[rid] == out[ids[0]]  # a seeded request's tokens do not depend on its batch-mates
    assert out[ids[1]] == generate(model, [prompts[1]], 10, block_size=4)[0]
    # the sampler's frequencies follow softmax(logits / T) over the nucleus
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([sample_token(logits, 0.7, 1.0, g) for _ in range(n)]), minlength=5)
    expect = torch.softmax(logits / 0.7, -1)
    assert (counts / n - expect).abs().max() < 0.015
    p = torch.softmax(logits, -1)  # 0.61, 0.22, 0.14, ...: top_p 0.8 keeps the first two tokens
    nucleus = {sample_token(logits, 1.0, 0.8, g) for _ in range(300)}
    assert nucleus == {0, 1} and p[:1].sum() < 0.8 <= p[:2].sum()
    assert {sample_token(logits, 1.0, 1e-6, g) for _ in range(50)} == {0}  # a tiny nucleus is greedy
    with pytest.raises(ConfigError, match="top_p"):
        alone.add_request(prompts[0], 4, top_p=0.0)


def test_engine_errors(models):
    model = models["tiny-llama"]
    eng = PagedEngine(model, PagedKVCache(2, 4))
    with pytest.raises(KVCacheFullError, match="raise num_blocks"):
        eng.add_request(list(range(3, 20)), 4)
    with pytest.raises(ConfigError):
        eng.add_request([], 4)
    cache = PagedKVCache(4, 4)
    with pytest.raises(ConfigError, match="add"):
        cache.prepare([7], [1])
    with pytest.raises(ConfigError, match="KVQuantConfig"):
        PagedKVCache(4, quant="int8")


def test_int8_cache_logits_close_int4_further(models):
    model = models["tiny-qwen2"]
    ids = torch.tensor(_prompts(2, (40, 40)))
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)
        errs = {}
        for cfg in (KVQuantConfig(8), KVQuantConfig(4), KVQuantConfig(4, key_axis="channel")):
            out = model(ids, cache=PagedKVCache(32, 8, quant=cfg)).logits.log_softmax(-1)
            errs[cfg.label] = (out - ref).abs().max().item()
    assert 0 < errs["int8-ktoken-vtoken"] < 0.05
    assert errs["int4-ktoken-vtoken"] > errs["int8-ktoken-vtoken"]


# --- DistAttention ------------------------------------------------------------------------------------
def _decode_bytes_job(cache, name, lengths):
    """Bytes rank 0 moves for one decode step of one sequence, at several context lengths."""
    model, _ = llmdeploy.load(name)
    model.eval()
    out = []
    for i, n in enumerate(lengths):
        eng = PagedEngine(model, cache)
        eng._ids = iter(range(100 * i, 100 * i + 100))
        eng.add_request(list(range(3, 3 + n)), 3)
        eng.step()  # prefill + first decode
        before = cache.comm.sent + cache.comm.received
        eng.step()  # one decode step
        out.append(cache.comm.sent + cache.comm.received - before)
        eng.run()
    return {"bytes": out}


def _death_job(cache, name):
    model, _ = llmdeploy.load(name)
    model.eval()
    eng = PagedEngine(model, cache)
    eng.add_request(list(range(3, 40)), 20)
    eng.step()
    pid = cache.lender_stats()[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    try:
        eng.run()
    except DistributedKVError as e:
        return {"error": str(e)}
    return {"error": ""}


@pytest.mark.parametrize("name,quant", [("tiny-llama", None), ("tiny-qwen2", KVQuantConfig(8))])
def test_distattention_two_processes_equals_single_process(models, name, quant):
    prompts = _prompts()
    ref = generate(models[name], prompts, 10, block_size=4, quant=quant)
    if quant is None:
        assert ref == [_hf_greedy(models[name], p, 10) for p in prompts]
    # rank 0 holds 6 blocks of 4 tokens: most of the 25 blocks the requests need are borrowed
    res = generate_distributed(functools.partial(llmdeploy.load, name), prompts, 10, world_size=2,
                               blocks_per_rank=20, local_blocks=6, block_size=4, quant=quant,
                               prefill_chunk=None, timeout=60, run_timeout=300)
    assert res["tokens"] == ref
    assert res["peak_borrowed_blocks"] > 0 and res["borrowed_after"] == 0 and res["local_free_after"] == 6


def test_distattention_decode_traffic_independent_of_context():
    res = launch(_decode_bytes_job, 2, blocks_per_rank=8, block_size=4, args=("tiny-llama", [40, 60]),
                 timeout=60, run_timeout=300)
    a, b = res["bytes"]
    assert a > 0 and a == b  # only queries and partials move, whatever the context length


def test_distattention_dead_rank_raises_clear_error():
    res = launch(_death_job, 2, blocks_per_rank=10, block_size=4, args=("tiny-llama",), timeout=30, run_timeout=120)
    assert "stopped answering" in res["error"] and "restart" in res["error"]


def test_perplexity_with_quantized_kv(text_corpus):
    from llmdeploy.eval import perplexity
    model, tok = llmdeploy.load("tiny-llama")
    base = perplexity(model, tok, text_corpus, seq_len=64, max_windows=3)
    fp = perplexity(model, tok, text_corpus, seq_len=64, max_windows=3, kv_quant=None)
    int8 = perplexity(model, tok, text_corpus, seq_len=64, max_windows=3, kv_quant=KVQuantConfig(8))
    int4 = perplexity(model, tok, text_corpus, seq_len=64, max_windows=3, kv_quant=KVQuantConfig(4))
    assert fp.ppl == base.ppl
    assert int8.ppl != base.ppl and abs(int8.ppl / base.ppl - 1) < 0.01
    assert abs(int4.ppl / base.ppl - 1) > abs(int8.ppl / base.ppl - 1)


def test_distattention_under_torchrun(models, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from llmdeploy.kv.distributed import free_port
    prompts = _prompts(3, (9, 30))
    ref = generate(models["tiny-llama"], prompts, 8, block_size=4)
    out = tmp_path / "out.json"
    script = Path(__file__).with_name("_torchrun_kv.py")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), str(script), str(out), json.dumps(prompts)],
                   check=True, timeout=180, capture_output=True)
    assert json.loads(out.read_text())["out"] == ref


def test_beam_search_on_paged_cache_is_a_clear_error(models):
    model = models["tiny-llama"]
    with pytest.raises(ConfigError, match="paged KV cache does not support"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, num_beams=2, do_sample=False,
                       cache=PagedKVCache(16, 4))


def test_gmanager_keeps_a_request_on_few_lenders():
    from llmdeploy.kv.distributed import GManager
    g = GManager({1: 10, 2: 12, 3: 11})
    assert g.place(4) == [(2, 4)]  # most free first
    g.free[2] -= 4
    g.borrowed[7][2] += 4
    assert g.place(3, seq=7) == [(2, 3)]  # the lender already holding seq 7, though rank 3 has more free
    assert g.place(10, seq=7) == [(2, 8), (3, 2)]  # then the most free
    with pytest.raises(RuntimeError):
        g.place(40)


def test_readme_quotes_the_kv_benchmark():
    """The README's KV numbers are those of benchmarks/results/kv/kv.json (regenerate both together)."""
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks" / "results" / "kv" / "kv.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    assert all(r["identical_to_hf"] for r in res["exact"]["rows"])
    served = " / ".join(str(r["served_tokens"]) for r in res["capacity"]["rows"])
    assert f"{served} tokens on 1 / 2 / 4 processes" in readme
    two = [r for r in res["traffic"]["rows"] if r["processes"] == 2]
    assert len({round(r["bytes_per_layer"]) for r in two}) == 1
    assert f"moves {round(two[0]['bytes_per_layer'])} bytes per layer with 2 processes" in readme
    q = {r["kv"]: r for r in res["quant"]["rows"]}
    assert f"perplexity {q['int8 (token)']['ppl']:.3f} against {q['fp32']['ppl']:.3f}" in readme
    t = {r["method"]: r for r in res["throughput"]["rows"]}
    assert f"batching {t['paged engine (continuous batching)']['vs_hf_batch']:.2f}x" in readme
