"""Run under torchrun by tests/test_kv.py: DistAttention greedy generation on 2 processes."""

import json
import sys

import torch

import llmdeploy
from llmdeploy.kv import PagedEngine
from llmdeploy.kv.distributed import run


def job(cache, prompts):
    model, _ = llmdeploy.load("tiny-llama")
    eng = PagedEngine(model.eval(), cache)
    ids = [eng.add_request(p, 8) for p in prompts]
    out = eng.run()
    return {"out": [out[i] for i in ids], "borrowed": sum(v["used"] for v in cache.lender_stats().values())}


if __name__ == "__main__":
    torch.set_num_threads(1)
    prompts = json.loads(sys.argv[2])
    res = run(job, blocks_per_rank=6, block_size=4, args=(prompts,), timeout=60)
    if res is not None:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f)
