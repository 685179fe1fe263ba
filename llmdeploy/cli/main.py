"""``llmdeploy compress | eval | info | demo | serve | export | drafter``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("llmdeploy.cli")


def _cmd_compress(args: argparse.Namespace) -> int:
    import llmdeploy
    from llmdeploy import recipe as recipes
    from llmdeploy.compress.distributed import init_from_env, is_main
    from llmdeploy.compress.streaming import engine_options
    from llmdeploy.data import calibration
    from llmdeploy.errors import ConfigError
    from llmdeploy.io import compress_streaming, fits_in_memory

    init_from_env()  # under torchrun: the processes share the calibration windows
    compose, settings = recipes.load_with_settings(args.recipe)
    source = Path(args.model).expanduser()
    stream = args.stream
    if stream is None:  # automatic: stream a model directory that would not fit in memory
        stream = source.is_dir() and _has_safetensors(source) and not fits_in_memory(source)
        if stream:
            log.warning("%s would not fit in memory: compressing it block by block from disk (--no-stream to "
                        "load it whole)", source)
    if stream and not (source.is_dir() and _has_safetensors(source)):
        raise ConfigError(f"--stream reads a model directory with safetensors weights; {args.model} is not one "
                          "(save it first: llmdeploy.save or save_pretrained)")

    def calibration_for(tok):
        if not compose.needs_calibration:
            return None
        return calibration(
            tok,
            args.calib_corpus or settings.get("corpus", "shakespeare"),
            n_samples=args.n_samples or settings.get("n_samples", 128),
            seq_len=args.seq_len or settings.get("seq_len", 512),
            seed=args.seed if args.seed is not None else settings.get("seed", 0),
        )

    if stream:
        from llmdeploy.io.loading import _tokenizer

        tok = _tokenizer(source, args.tokenizer)
        out = compress_streaming(source, compose, calibration_for(tok), args.output, tokenizer=tok,
                                 work_dir=args.checkpoint_dir, resume=args.resume)
        if is_main():
            size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
            print(f"saved {out} (streamed block by block): {size / 2**20:.1f} MiB of weights")
        return 0
    model, tok = llmdeploy.load(args.model, tokenizer=args.tokenizer)
    calib = calibration_for(tok)
    # long methods checkpoint their progress next to the output, so an interrupted run resumes;
    # the engine checkpoints every block when a folder is given (it writes the activations each time)
    progress = Path(args.checkpoint_dir or f"{Path(args.output).resolve()}.progress")
    for step in compose.steps:
        step.before_recipe(model, calib)
    for i, step in enumerate(compose.steps):
        folder = progress / f"step{i}-{step.method}"
        if getattr(step, "supports_resume", False):
            step.checkpoint_dir = step.checkpoint_dir or str(folder)
            step.resume = step.resume or args.resume
            log.info("%s checkpoints to %s%s", step.method, step.checkpoint_dir, " (resuming)" if step.resume else "")
        blocks = str(folder / "blocks") if args.checkpoint_dir and not getattr(step, "supports_resume", False) else None
        with engine_options(model, checkpoint_dir=blocks, resume=args.resume):
            model = step(model, calib)
    if not is_main():
        return 0
    out = llmdeploy.save(model, tok, args.output)
    fp = llmdeploy.eval.footprint(model)
    print(f"saved {out}: {fp.bits_per_param:.3f} bits/param overall, "
          f"{fp.compressed_bits_per_param:.3f} in compressed modules")
    return 0


def _has_safetensors(path: Path) -> bool:
    return (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists() \
        or (path / "llmdeploy.json").exists()


def _cmd_eval(args: argparse.Namespace) -> int:
    import llmdeploy

    model, tok = llmdeploy.load(args.model, tokenizer=args.tokenizer)
    speed = False
    if args.speed:
        speed = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    result = llmdeploy.eval.evaluate(
        model, tok, name=args.name, model_name=args.model, ppl=args.ppl or [], seq_len=args.seq_len,
        max_windows=args.max_windows, tasks=",".join(args.tasks or []), limit=args.limit,
        speed=speed, batch_size=args.batch_size,
    )
    for corpus, r in result.perplexity.items():
        print(f"{corpus}: ppl {r['ppl']:.3f} over {r['n_tokens']} tokens ({r['n_windows']} windows "
              f"of {r['seq_len']}) in {r['seconds']:.1f}s")
    for task, metrics in result.zero_shot.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "stderr" not in k))
    if result.speed:
        s = result.speed
        print("speed: prefill " + ", ".join(f"b{b} {v:.0f} tok/s" for b, v in s["prefill_tokens_per_s"].items())
              + "; decode " + ", ".join(f"b{b} {v:.1f} tok/s" for b, v in s["decode_tokens_per_s"].items())
              + f"; p50 {s['latency_ms_p50']:.1f} ms/token, p95 {s['latency_ms_p95']:.1f}; "
              f"peak memory +{s['peak_memory_mb']:.0f} MiB")
    fp = result.footprint
    print(f"bits/param: {fp['bits_per_param']:.3f} overall; parameters: {fp['params']:,}; "
          f"memory: {fp['bytes'] / 2**20:.1f} MiB; disk: {fp['disk_bytes'] / 2**20:.1f} MiB")
    if args.json:
        result.save(args.json)
        print(f"results written to {args.json}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from llmdeploy.report import build_report

    md = build_report(args.results_dir, args.out)
    print(md.read_text())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import llmdeploy
    from llmdeploy.io.checkpoint import load_saved, read_manifest

    path = Path(args.dir)
    manifest = read_manifest(path)
    model, _ = load_saved(path)  # no tokenizer needed to describe a checkpoint
    fp = llmdeploy.eval.footprint(model)
    disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"{path}")
    print(f"  architecture: {model.config.model_type} ({type(model).__name__})")
    print("  applied:" + ("" if manifest["recipe"] else " nothing (dense)"))
    for step in manifest["recipe"]:
        args_ = ", ".join(f"{k}={v}" for k, v in step.items() if k != "method")
        print(f"    - {step['method']}({args_})")
    print(f"  compressed modules: {len(manifest['modules'])}")
    print(f"  parameters (dense equivalent): {fp.params:,}")
    print(f"  bits/param: {fp.bits_per_param:.3f} overall, "
          f"{fp.compressed_bits_per_param:.3f} in compressed modules")
    print(f"  size: {fp.bytes / 2**20:.1f} MiB in memory, {disk / 2**20:.1f} MiB on disk")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from llmdeploy.errors import ConfigError
    from llmdeploy.serve import serve

    template = Path(args.chat_template).read_text() if args.chat_template else None
    tenants = {}
    for item in (args.tenants or "").split(","):
        if item.strip():
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"--tenants takes NAME=DELTA_FILE,... (got {item!r})")
            tenants[name.strip()] = path.strip()
    options = dict(max_batch=args.max_batch, kv_blocks=args.kv_blocks, block_size=args.block_size,
                   max_model_len=args.max_model_len, max_waiting=args.max_waiting,
                   max_waiting_tokens=args.max_waiting_tokens)
    if args.replicas:
        from llmdeploy.deploy import Workload
        from llmdeploy.deploy.ray_serve import serve_replicas

        lo, sep, hi = args.replicas.partition(":")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ConfigError(f"--replicas takes MIN:MAX or N (got {args.replicas!r})")
        workload = Workload(request_rate=1.0, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                            ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo)
        memory = int(args.replica_memory_gib * 2**30) if args.replica_memory_gib else None
        serve_replicas(args.model, min_replicas=int(lo), max_replicas=int(hi or lo), autoscale=args.autoscale,
                       host=args.host, port=args.port, served_model_name=args.served_model_name, workload=workload,
                       replica_memory_bytes=memory, chat_template=template, tenants=tenants or None,
                       drafter=args.drafter, **options)
        return 0
    serve(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
          chat_template=template, tenants=tenants or None, drafter=args.drafter, **options)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import llmdeploy
    from llmdeploy.io import export_onnx

    model, tok = llmdeploy.load(args.model, tokenizer=args.tokenizer)
    report = export_onnx(model, tok, args.output, int4=not args.no_int4, opset=args.opset)
    print(report.summary())
    return 0


def _make_drafter(args: argparse.Namespace, model):
    from llmdeploy import decode

    if args.kind == "medusa":
        return decode.MedusaHeads.for_model(model, args.heads, tree=args.tree, topk=args.topk)
    if args.kind == "redrafter":
        return decode.ReDrafter.for_model(model, beam_width=args.beam_width, beam_length=args.heads)
    return decode.HiddenTransfer.for_model(model, layer=args.layer, n_future=args.heads, tree=args.tree, topk=args.topk)


def _cmd_drafter_train(args: argparse.Namespace) -> int:
    import llmdeploy
    from llmdeploy import decode

    model, tok = llmdeploy.load(args.model)
    model.eval()
    out = Path(args.output)
    data = decode.self_distill_data(model, tok, corpus=args.corpus, n=args.prompts, prompt_len=args.prompt_len,
                                    new_tokens=args.new_tokens, cache_dir=out / "cache")
    drafter = _make_drafter(args, model)
    rep = decode.train_drafter(drafter, model, data, steps=args.steps, lr=args.lr, batch=args.batch,
                               checkpoint_dir=out / "checkpoints")
    if args.kind != "redrafter":
        val = decode.self_distill_data(model, tok, corpus=args.corpus, n=16, prompt_len=args.prompt_len,
                                       new_tokens=args.new_tokens, seed=1, cache_dir=out / "cache")
        acc = decode.measure_accuracy(drafter, model, val)
        print("top-1 accuracy per future position: " + ", ".join(f"{a:.3f}" for a in acc[:, 0].tolist()))
    drafter.save(out)
    print(f"{args.kind}: {rep.trend()}; saved to {out}")
    return 0


def _cmd_drafter_bench(args: argparse.Namespace) -> int:
    import time

    import llmdeploy
    from llmdeploy import decode
    from llmdeploy.eval.perplexity import test_windows

    model, tok = llmdeploy.load(args.model)
    model.eval()
    drafter = decode.load_drafter(args.drafter) if args.drafter else None
    if drafter is not None and args.tree is not None and hasattr(drafter, "set_tree"):
        drafter.set_tree(args.tree)
    prompts = test_windows(tok, args.corpus, args.prompt_len, args.prompts).tolist()
    groups = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    rows = []
    for name, d in (("plain", None), ("drafter", drafter)):
        if name == "drafter" and d is None:
            continue
        t0, stats, outs = time.perf_counter(), decode.DecodeStats(), []
        for g in groups:
            res = decode.generate(model, None, g, args.new_tokens, drafter=d)
            stats.tokens_per_step += res.stats.tokens_per_step
            stats.candidates_per_step += res.stats.candidates_per_step
            outs += res.sequences
        rows.append((name, len(prompts) * args.new_tokens / (time.perf_counter() - t0), stats, outs))
    for name, rate, stats, outs in rows:
        same = "" if name == "plain" else f", output {'=' if outs == rows[0][3] else '!='} plain greedy"
        print(f"{name}: {rate:.1f} tok/s ({rate / rows[0][1]:.2f}x), {stats.mean_accepted:.3f} tokens/step, "
              f"{stats.mean_tree:.1f} candidates/step{same}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, model_name=args.model, seq_len=args.seq_len, max_windows=args.windows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmdeploy", description="Compress, evaluate and deploy LLMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="apply a recipe to a model and save it")
    c.add_argument("model", help="zoo name, HF directory/id, .gguf file or saved directory")
    c.add_argument("--recipe", required=True, help="YAML recipe file or built-in recipe name")
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.add_argument("--calib-corpus", default=None, help="calibration corpus (default: shakespeare)")
    c.add_argument("--n-samples", type=int, default=None, help="calibration windows (default 128)")
    c.add_argument("--seq-len", type=int, default=None, help="calibration window length (default 512)")
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--tokenizer", default=None, help="tokenizer directory, hub id or zoo name (for models saved without one)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoints (methods that support it, e.g. aqlm)")
    c.add_argument("--checkpoint-dir", default=None,
                   help="where progress is checkpointed (default: OUTPUT.progress; for --stream, .OUTPUT.stream); "
                        "given, in-memory runs also checkpoint every finished block")
    c.add_argument("--stream", dest="stream", action="store_true", default=None,
                   help="compress block by block from disk (a model directory with safetensors weights); the "
                        "default when the model would not fit in memory")
    c.add_argument("--no-stream", dest="stream", action="store_false", help="load the whole model even if large")
    c.set_defaults(func=_cmd_compress)

    e = sub.add_parser("eval", help="evaluate a model (perplexity, footprint)")
    e.add_argument("model")
    e.add_argument("--ppl", action="append", metavar="CORPUS", help="perplexity on CORPUS's test split")
    e.add_argument("--seq-len", type=int, default=2048, help="perplexity window (default 2048, the protocol's)")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory, hub id or zoo name (for models saved without one)")
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--tasks", action="append", metavar="T1,T2",
                   help="zero-shot lm-eval tasks (e.g. shakespeare_nextline,shakespeare_lastword,piqa)")
    e.add_argument("--limit", type=int, default=None, help="items per zero-shot task")
    e.add_argument("--speed", action="store_true", help="measure prefill/decode speed and memory")
    e.add_argument("--prompt-len", type=int, default=128)
    e.add_argument("--new-tokens", type=int, default=32)
    e.add_argument("--name", default=None, help="name of this row in reports")
    e.add_argument("--json", default=None, help="write the results to this JSON file")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("report", help="Markdown table and plots from a folder of result JSON files")
    r.add_argument("results_dir")
    r.add_argument("--out", default=None, help="output folder (default: the results folder)")
    r.set_defaults(func=_cmd_report)

    i = sub.add_parser("info", help="what was applied to a saved model, its size and bits/param")
    i.add_argument("dir")
    i.set_defaults(func=_cmd_info)

    d = sub.add_parser("demo", help="dense vs RTN 8/4/3-bit vs mixed precision on the embedded model")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--out", default="demo_results")
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--windows", type=int, default=16, help="perplexity windows per configuration")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming, /metrics)")
    s.add_argument("model", help="a zoo name, a saved llmdeploy model, a Hugging Face folder or GGUF file")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="the name clients send as 'model' (default: MODEL)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    s.add_argument("--kv-blocks", type=int, default=None,
                   help="KV-cache blocks (default: max-batch full-context requests, at most 1 GiB)")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    s.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion (default: the model's)")
    s.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    s.add_argument("--max-waiting-tokens", type=int, default=None,
                   help="queued prompt tokens before answering 429 (default: 64 contexts)")
    s.add_argument("--chat-template", default=None, help="a Jinja chat template file (default: the tokenizer's)")
    s.add_argument("--tenants", default=None,
                   help="NAME=DELTA,... BitDelta fine-tunes of MODEL (delta files of delta.save_delta) served beside "
                        "it; a request's 'model' picks one")
    s.add_argument("--drafter", default=None,
                   help="a drafter folder (llmdeploy drafter train): speculative decoding of greedy requests")
    r = s.add_argument_group("replicas on Ray Serve (pip install 'llmdeploy[ray]')")
    r.add_argument("--replicas", default=None, metavar="MIN:MAX",
                   help="serve MIN to MAX replicas of this server on Ray Serve, scaled by --autoscale")
    r.add_argument("--autoscale", choices=("enova", "rules", "static"), default="enova",
                   help="enova: measure the model here, then detection + the recommender (default); rules: ENOVA's "
                        "open-code rules; static: MIN replicas")
    r.add_argument("--ttft-slo", type=float, default=2.0, help="p95 time to first token to keep (s)")
    r.add_argument("--tpot-slo", type=float, default=0.2, help="time per output token to keep (s)")
    r.add_argument("--prompt-tokens", type=float, default=256, help="mean prompt length of the traffic")
    r.add_argument("--output-tokens", type=float, default=128, help="mean completion length of the traffic")
    r.add_argument("--replica-memory-gib", type=float, default=None,
                   help="memory of one replica (default: available memory / MAX)")
    s.set_defaults(func=_cmd_serve)

    x = sub.add_parser("export", help="export a model for another runtime (ONNX: onnxruntime)")
    x.add_argument("model", help="a zoo name, a saved llmdeploy model, a Hugging Face folder or GGUF file")
    x.add_argument("--format", choices=["onnx"], default="onnx")
    x.add_argument("-o", "--output", required=True, help="output folder (model.onnx, tokenizer, onnx_export.json)")
    x.add_argument("--tokenizer", default=None)
    x.add_argument("--opset", type=int, default=18)
    x.add_argument("--no-int4", action="store_true",
                   help="export 4-bit RTN/GPTQ layers as dense MatMuls instead of onnxruntime's MatMulNBits")
    x.set_defaults(func=_cmd_export)

    dr = sub.add_parser("drafter", help="train or benchmark a drafter for faster decoding (llmdeploy.decode)")
    dsub = dr.add_subparsers(dest="drafter_command", required=True)
    t = dsub.add_parser("train", help="train Medusa heads, a ReDrafter or hidden transfer on the model's own text")
    t.add_argument("model", help="a zoo name, a saved llmdeploy model, a Hugging Face folder or GGUF file")
    t.add_argument("--kind", choices=["medusa", "redrafter", "hidden_transfer"], default="medusa")
    t.add_argument("-o", "--output", required=True, help="folder for the drafter (and its data cache, checkpoints)")
    t.add_argument("--corpus", default="shakespeare", help="where the prompts come from (train split)")
    t.add_argument("--prompts", type=int, default=128, help="prompts continued by the model")
    t.add_argument("--prompt-len", type=int, default=32)
    t.add_argument("--new-tokens", type=int, default=96, help="greedy tokens generated per prompt")
    t.add_argument("--heads", type=int, default=4, help="Medusa heads / ReDrafter steps / hidden-transfer positions")
    t.add_argument("--beam-width", type=int, default=4, help="ReDrafter beams")
    t.add_argument("--layer", type=int, default=None, help="hidden transfer's block (default 3/4 of the depth)")
    t.add_argument("--tree", type=int, default=16, help="candidate nodes per step (Medusa, hidden transfer)")
    t.add_argument("--topk", type=int, default=8)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch", type=int, default=4, help="sequences per step (16 anchors each)")
    t.set_defaults(func=_cmd_drafter_train)
    b = dsub.add_parser("bench", help="tokens/s and tokens per step of a drafter against plain greedy decoding")
    b.add_argument("model")
    b.add_argument("--drafter", default=None, help="a folder written by 'drafter train' (none: plain only)")
    b.add_argument("--tree", type=int, default=None, help="another tree size for Medusa / hidden transfer")
    b.add_argument("--corpus", default="shakespeare", help="prompts from its test split")
    b.add_argument("--prompts", type=int, default=8)
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--batch", type=int, default=1)
    b.set_defaults(func=_cmd_drafter_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from llmdeploy.errors import LLMDeployError

    try:
        return args.func(args)
    except LLMDeployError as e:
        print(f"llmdeploy: error: {e}", file=sys.stderr)
        return 2
