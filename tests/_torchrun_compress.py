"""Run under torchrun by tests/test_streaming.py: compress on 2 processes (gloo), in memory and
streamed; rank 0 writes the compressed state dicts (and each rank a digest of its own)."""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import llmdeploy
from llmdeploy.prune import SliceGPT, SparseGPT
from llmdeploy.quant import AQLM, GPTQ

STEPS = {"gptq": lambda: GPTQ(bits=4, group_size=32), "sparsegpt": lambda: SparseGPT(sparsity=0.5),
         "slicegpt": lambda: SliceGPT(sparsity=0.25),
         # the beam search split by output groups between the processes
         "aqlm": lambda: AQLM(num_codebooks=1, nbits_per_codebook=4, in_group_size=8, max_iter=2, steps_per_round=5,
                              kmeans_iters=4, finetune_blocks=False),
         # block fine-tuning: losses and gradients summed over the processes
         "aqlm_ft": lambda: AQLM(num_codebooks=1, nbits_per_codebook=4, in_group_size=8, max_iter=2,
                                 steps_per_round=5, kmeans_iters=4, finetune_epochs=2, finetune_batch_size=4,
                                 batch_size=2)}


def digest(sd):
    h = hashlib.sha256()
    for k, v in sorted(sd.items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    src, out, calib_file = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    calib = torch.load(calib_file, weights_only=True)
    digests, histories = {}, {}
    for name, make in STEPS.items():
        model, _ = llmdeploy.load(src)
        step = make()
        model = step(model, calib)
        if name == "aqlm_ft":
            histories = step.report_.finetune
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        digests[name] = digest(sd)
        if rank == 0:
            save_file({k: v.clone() for k, v in sd.items()}, str(out / f"{name}.safetensors"))
    streamed = llmdeploy.compress_streaming(src, [GPTQ(bits=4, group_size=32)], calib, out / "streamed",
                                            work_dir=out / "work")
    (out / f"digests-{rank}.json").write_text(json.dumps(digests))
    (out / f"finetune-{rank}.json").write_text(json.dumps(histories))
    dist.barrier()
    dist.destroy_process_group()
