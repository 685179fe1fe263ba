"""Paged KV cache, KV quantization and DistAttention on SmolLM2-135M, one run.

    python -m benchmarks.kv                 # everything (about 20-30 minutes on 2 cores)
    python -m benchmarks.kv --only quant    # one part: exact, capacity, traffic, quant, throughput

Parts (all greedy, fp32, CPU, prompts cut from the shakespeare *test* split):
- ``exact``: generation with the KV spread over 1, 2 and 4 processes (DistAttention, gloo,
  rank 0's block budget a fraction of what the requests need) against transformers' own
  ``generate`` (default dynamic cache) and the single-process paged cache, token by token.
- ``capacity``: a fixed budget of blocks per process; the longest request (prompt + 8 new tokens)
  actually served with 1, 2 and 4 processes, and the first length refused.
- ``traffic``: bytes rank 0 sends and receives in one decode step, per layer, at several
  context lengths, with the KV spread over 2 and 4 processes.
- ``quant``: perplexity with the KV cache stored fp32 / int8 / int4 (per token, and keys per
  channel) — the scoreboard's protocol: shakespeare test split, seq_len 512, 128 windows — and
  the bytes per cached token.
- ``throughput``: a batch of requests of mixed prompt and output lengths: the paged engine
  (continuous batching) against transformers' ``generate`` with its default cache (one padded
  batch, and one request at a time), interleaved rounds, medians.

Writes ``benchmarks/results/kv/kv.json``, ``KV.md`` and ``kv.png``. Processes on 2 cores share
them: DistAttention wall times here measure overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import llmdeploy
from llmdeploy.data.calibration import tokenize_text
from llmdeploy.data.corpora import load_text
from llmdeploy.errors import KVCacheFullError
from llmdeploy.eval import perplexity
from llmdeploy.kv import KVQuantConfig, PagedEngine, PagedKVCache, generate
from llmdeploy.kv.distributed import generate_distributed, launch

RESULTS = Path(__file__).resolve().parent / "results" / "kv"
MODEL = "smollm2-135m"
BLOCK = 16
log = logging.getLogger("benchmarks.kv")


def _test_ids(tok, n: int) -> list[int]:
    return tokenize_text(tok, load_text("shakespeare", "test")[: n * 8])[:n].tolist()


def _prompts(tok, lengths: list[int]) -> list[list[int]]:
    ids = _test_ids(tok, sum(lengths) + 10)
    out, at = [], 0
    for n in lengths:
        out.append(ids[at : at + n])
        at += n
    return out


# --- jobs run on rank 0 of a DistAttention group (module level: spawned processes import them) ---
def _capacity_job(cache, ids, chunk):
    """Serve the longest request that fits (prompt + 8 tokens), then check one token more is refused."""
    model, _ = llmdeploy.load(MODEL)
    capacity_tokens = cache.blocks.capacity * cache.block_size
    eng = PagedEngine(model.eval(), cache, prefill_chunk=chunk)
    n_prompt = capacity_tokens - 8
    t0 = time.perf_counter()
    eng.add_request(ids[:n_prompt], 8)
    out = eng.run()
    seconds = time.perf_counter() - t0
    refused = False
    try:
        eng.add_request(ids[: n_prompt + 1], 8)
    except KVCacheFullError:
        refused = True
    return {"served_tokens": n_prompt + 8, "generated": len(next(iter(out.values()))), "refused_next": refused,
            "seconds": seconds}


def _traffic_job(cache, ids, lengths, chunk):
    """Bytes of one decode step at each context length (the KV spread over every rank)."""
    model, _ = llmdeploy.load(MODEL)
    n_layers = model.config.num_hidden_layers
    rows = []
    for i, n in enumerate(lengths):
        eng = PagedEngine(model.eval(), cache, prefill_chunk=chunk)
        eng._ids = iter(range(1000 * i, 1000 * i + 1000))
        eng.add_request(ids[:n], 3)
        eng.step()
        before = (cache.comm.sent, cache.comm.received)
        eng.step()
        sent, recv = cache.comm.sent - before[0], cache.comm.received - before[1]
        lenders = cache.lender_stats().values()
        remote = sum(v["used"] for v in lenders)
        eng.run()
        rows.append({"context": n + 1, "bytes_per_layer": (sent + recv) / n_layers, "sent": sent, "received": recv,
                     "remote_blocks": remote, "lending_ranks": sum(v["used"] > 0 for v in lenders)})
    return {"rows": rows}


def part_exact(tok, model) -> dict:
    prompts = _prompts(tok, [40, 200, 90, 310])
    new = 32
    ref = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        ref.append(out[0, len(p):].tolist())
    paged = generate(model, prompts, new, block_size=BLOCK)
    need = sum(-(-(len(p) + new) // BLOCK) for p in prompts)
    rows = [{"processes": "1 (paged cache, no DistAttention)", "identical_to_hf": paged == ref}]
    for world in (1, 2, 4):
        per_rank = -(-need // world) + 1
        res = generate_distributed(functools.partial(llmdeploy.load, MODEL), prompts, new, world_size=world,
                                   blocks_per_rank=per_rank, block_size=BLOCK, prefill_chunk=128, timeout=300)
        rows.append({"processes": world, "blocks_per_rank": per_rank, "blocks_needed": need,
                     "peak_borrowed_blocks": res["peak_borrowed_blocks"], "identical_to_hf": res["tokens"] == ref,
                     "seconds": round(res["seconds"], 2), "bytes_moved": res["bytes_moved"]})
        log.info("exact %s", rows[-1])
    return {"prompt_lengths": [len(p) for p in prompts], "new_tokens": new, "rows": rows}


def part_capacity(tok, blocks_per_rank: int) -> dict:
    ids = _test_ids(tok, 4 * blocks_per_rank * BLOCK + 16)
    rows = []
    for world in (1, 2, 4):
        res = launch(_capacity_job, world, blocks_per_rank=blocks_per_rank, block_size=BLOCK, args=(ids, 256),
                     timeout=600)
        rows.append({"processes": world, "blocks_per_rank": blocks_per_rank, **res})
        log.info("capacity %s", rows[-1])
    return {"block_size": BLOCK, "rows": rows}


def part_traffic(tok, lengths: list[int]) -> dict:
    ids = _test_ids(tok, max(lengths) + 16)
    rows = []
    for world in (2, 4):
        # rank 0 keeps 4 blocks: nearly all of every context lives on the other ranks
        per_rank = -(-(max(lengths) + 8) // BLOCK) // (world - 1) + 2
        res = launch(_traffic_job, world, blocks_per_rank=per_rank, local_blocks=4, block_size=BLOCK,
                     args=(ids, lengths, 256), timeout=600)
        for r in res["rows"]:
            rows.append({"processes": world, **r})
            log.info("traffic %s", rows[-1])
    return {"rows": rows}


def part_quant(tok, model, windows: int) -> dict:
    configs = [("fp32", None), ("int8 (token)", KVQuantConfig(8)),
               ("int8 (keys per channel)", KVQuantConfig(8, key_axis="channel")),
               ("int4 (token)", KVQuantConfig(4)), ("int4 (keys per channel)", KVQuantConfig(4, key_axis="channel"))]
    rows = []
    base = None
    for label, cfg in configs:
        res = perplexity(model, tok, "shakespeare", seq_len=512, max_windows=windows, kv_quant=cfg)
        cache = PagedKVCache(64, BLOCK, quant=cfg)
        with torch.no_grad():
            model(torch.tensor([_test_ids(tok, 32)]), use_cache=True, cache=cache)
        base = base or res.ppl
        rows.append({"kv": label, "ppl": round(res.ppl, 4), "vs_fp32": round(res.ppl / base, 5),
                     "bytes_per_token": cache.bytes_per_token(), "windows": res.n_windows,
                     "seconds": round(res.seconds, 1)})
        log.info("quant %s", rows[-1])
    fp = rows[0]["bytes_per_token"]
    for r in rows:
        r["memory_vs_fp32"] = round(r["bytes_per_token"] / fp, 4)
    return {"seq_len": 512, "corpus": "shakespeare", "rows": rows}


def part_throughput(tok, model, rounds: int) -> dict:
    prompt_lens = [32, 256, 64, 384, 128, 48, 192, 96]
    new_tokens = [64, 16, 128, 32, 48, 96, 24, 80]
    prompts = _prompts(tok, prompt_lens)
    useful = sum(new_tokens)

    def paged():
        cache = PagedKVCache(sum(-(-(p + n) // BLOCK) for p, n in zip(prompt_lens, new_tokens)), BLOCK)
        eng = PagedEngine(model, cache, max_batch=8)
        for p, n in zip(prompts, new_tokens):
            eng.add_request(p, n)
        eng.run()

    def hf_batch():
        width = max(prompt_lens)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        model.generate(ids, attention_mask=mask, max_new_tokens=max(new_tokens), do_sample=False, pad_token_id=0)

    def hf_one_by_one():
        for p, n in zip(prompts, new_tokens):
            model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)

    runs = {"paged engine (continuous batching)": paged, "transformers generate, one padded batch": hf_batch,
            "transformers generate, one request at a time": hf_one_by_one}
    times = {k: [] for k in runs}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                log.info("throughput %s %.2f s", name, times[name][-1])
    base = statistics.median(times["transformers generate, one padded batch"])
    rows = [{"method": k, "median_s": round(statistics.median(v), 3), "tokens_per_s": round(useful / statistics.median(v), 2),
             "vs_hf_batch": round(base / statistics.median(v), 3), "all_s": [round(t, 3) for t in v]}
            for k, v in times.items()]
    return {"prompt_lengths": prompt_lens, "new_tokens": new_tokens, "useful_tokens": useful, "rounds": rounds,
            "rows": rows}


def write_markdown(res: dict) -> str:
    lines = [f"# KV cache benchmarks (`python -m benchmarks.kv`, {res['meta']['date']})", "",
             f"Model `{MODEL}`, fp32, CPU ({res['meta']['threads']} threads), block size {BLOCK} tokens, greedy.", ""]
    if "exact" in res:
        e = res["exact"]
        lines += ["## Exactness: KV spread across processes", "",
                  f"Prompts of {e['prompt_lengths']} tokens, {e['new_tokens']} new tokens each, against transformers' "
                  "`generate` with its default cache.", "",
                  "| processes | blocks per rank | blocks needed | peak borrowed | identical | seconds | bytes moved |",
                  "|---|---|---|---|---|---|---|"]
        for r in e["rows"]:
            lines.append(f"| {r['processes']} | {r.get('blocks_per_rank', '')} | {r.get('blocks_needed', '')} | "
                         f"{r.get('peak_borrowed_blocks', '')} | {r['identical_to_hf']} | {r.get('seconds', '')} | "
                         f"{r.get('bytes_moved', '')} |")
        lines.append("")
    if "capacity" in res:
        lines += ["## Capacity: fixed KV budget per process", "",
                  "| processes | blocks per process | longest request served (tokens) | one more token refused | seconds |",
                  "|---|---|---|---|---|"]
        for r in res["capacity"]["rows"]:
            lines.append(f"| {r['processes']} | {r['blocks_per_rank']} | {r['served_tokens']} | {r['refused_next']} | "
                         f"{r['seconds']:.1f} |")
        lines.append("")
    if "traffic" in res:
        lines += ["## Traffic: bytes moved per decode step and layer", "",
                  "Rank 0 keeps 4 blocks; the rest of the request's KV is borrowed from the other ranks "
                  "(each lends room for about 2056 / (processes - 1) tokens; placement: a rank already holding "
                  "blocks of the request first, then the one with the most free blocks). Per lending rank that holds blocks of the request, "
                  "a decode step moves one query and one partial per layer (plus the new token's key and value "
                  "when its block is remote): the bytes depend on how many ranks hold blocks, not on the context "
                  "length.", "",
                  "| processes | context (tokens) | blocks on other ranks | ranks holding them | bytes per layer | "
                  "sent (all layers) | received (all layers) |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["traffic"]["rows"]:
            lines.append(f"| {r['processes']} | {r['context']} | {r['remote_blocks']} | {r.get('lending_ranks', '')} | "
                         f"{r['bytes_per_layer']:.0f} | {r['sent']} | {r['received']} |")
        lines.append("")
    if "quant" in res:
        q = res["quant"]
        lines += ["## KV quantization", "",
                  f"Perplexity on the {q['corpus']} test split, seq_len {q['seq_len']}, {q['rows'][0]['windows']} windows "
                  "(every token attends to the quantized keys and values of its whole window).", "",
                  "| KV cache | perplexity | vs fp32 | bytes per token (all layers) | memory vs fp32 |",
                  "|---|---|---|---|---|"]
        for r in q["rows"]:
            lines.append(f"| {r['kv']} | {r['ppl']:.3f} | {r['vs_fp32']:.4f} | {r['bytes_per_token']:.0f} | "
                         f"{r['memory_vs_fp32']:.3f} |")
        lines.append("")
    if "throughput" in res:
        t = res["throughput"]
        lines += ["## Throughput: mixed-length batch", "",
                  f"{len(t['prompt_lengths'])} requests, prompts {t['prompt_lengths']} tokens, outputs {t['new_tokens']} "
                  f"tokens ({t['useful_tokens']} in all; the padded batch computes every row to the longest output but "
                  f"only requested tokens count); medians of {t['rounds']} interleaved rounds.", "",
                  "| method | median s | requested tokens/s | speed vs padded batch |", "|---|---|---|---|"]
        for r in t["rows"]:
            lines.append(f"| {r['method']} | {r['median_s']} | {r['tokens_per_s']} | {r['vs_hf_batch']}x |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if "capacity" in res:
        rows = res["capacity"]["rows"]
        axes[0].plot([r["processes"] for r in rows], [r["served_tokens"] for r in rows], "o-")
        axes[0].set(xlabel="processes", ylabel="longest request served (tokens)",
                    title=f"{rows[0]['blocks_per_rank']} blocks of {BLOCK} tokens per process")
    if "traffic" in res:
        for world in sorted({r["processes"] for r in res["traffic"]["rows"]}):
            rows = [r for r in res["traffic"]["rows"] if r["processes"] == world]
            axes[1].plot([r["context"] for r in rows], [r["bytes_per_layer"] / max(1, r.get("lending_ranks", 1))
                                                        for r in rows], "o-", label=f"{world} processes")
        axes[1].set(xlabel="context (tokens)", ylabel="bytes per decode step and layer\nper rank holding blocks",
                    ylim=(0, None), title="what moves: queries and partials")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "kv.png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["exact", "capacity", "traffic", "quant", "throughput"])
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--blocks-per-rank", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--render", action="store_true", help="rewrite KV.md and kv.png from kv.json only")
    args = p.parse_args(argv)
    if args.render:
        res = json.loads((RESULTS / "kv.json").read_text())
        (RESULTS / "KV.md").write_text(write_markdown(res))
        plot(res)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = llmdeploy.load(MODEL)
    model.eval()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "kv.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res["meta"] = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "model": MODEL}
    parts = args.only or ["exact", "capacity", "traffic", "quant", "throughput"]
    if "exact" in parts:
        res["exact"] = part_exact(tok, model)
    if "capacity" in parts:
        res["capacity"] = part_capacity(tok, args.blocks_per_rank)
    if "traffic" in parts:
        res["traffic"] = part_traffic(tok, args.contexts)
    if "quant" in parts:
        res["quant"] = part_quant(tok, model, args.windows)
    if "throughput" in parts:
        res["throughput"] = part_throughput(tok, model, args.rounds)
    path.write_text(json.dumps(res, indent=2))
    (RESULTS / "KV.md").write_text(write_markdown(res))
    plot(res)
    print(write_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
