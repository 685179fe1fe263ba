"""Load test of ``llmdeploy serve smollm2-135m`` on this machine: continuous batching against the
same server taking one request at a time (issue #19).

    python -m benchmarks.loadtest                      # both modes
    python -m benchmarks.loadtest --requests 24 --concurrency 8

For each mode a server process is started (``llmdeploy serve smollm2-135m --max-batch B``; B = 16,
then B = 1 — the same server handling one request at a time) and ``--concurrency`` client threads
send ``--requests`` streamed completions in a seeded order (prompts: windows of 48 tokens of the
Shakespeare test split; ``max_tokens`` 32, ``ignore_eos`` so every answer has the same length;
greedy). Mid-load, every 6th request is a client that disconnects after its second chunk, and 6
malformed requests (bad JSON, negative ``max_tokens``, unknown model) are sent among the others.

Recorded per mode: completed requests (each must carry exactly ``max_tokens`` tokens), failed or
lost ones, rejected malformed ones (must all get 4xx), throughput (completion tokens of completed
requests / wall seconds of the load), TTFT p50/p95 (client side: request sent to first token
chunk) and end-to-end latency, and after the load the server's own ``/metrics`` (nothing running,
KV usage back to 0: the disconnected clients' blocks were freed). Writes
``results/serve/loadtest.json`` and ``LOADTEST.md``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import llmdeploy
from llmdeploy.eval.perplexity import test_windows
from llmdeploy.serve import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "serve"
MODEL = "smollm2-135m"
MODES = {"continuous batching (max-batch 16)": 16, "one request at a time (max-batch 1)": 1}


def _bad(model: str) -> list[bytes]:
    return [b"{not json", json.dumps({"model": model, "prompt": "x", "max_tokens": -3}).encode(),
            json.dumps({"model": "no-such-model", "prompt": "x", "max_tokens": 3}).encode()]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def _request(url: str, method: str, path: str, body: bytes | None = None, timeout: float = 600):
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=timeout)
    conn.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
    return conn, conn.getresponse()


def _start(model: str, batch: int, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llmdeploy", "serve", model, "--port", str(port), "--max-batch", str(batch),
           "--kv-blocks", "256", "--max-waiting", "512"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    t0 = time.monotonic()
    while True:
        try:
            conn, r = _request(f"http://127.0.0.1:{port}", "GET", "/health", timeout=2)
            ok = r.status == 200
            conn.close()
            if ok:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            proc.kill()
            raise RuntimeError(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)


def _stream(url: str, model: str, prompt: str, max_tokens: int, disconnect_after: int | None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, finish, chunks = None, 0, None, 0
    conn, r = _request(url, "POST", "/v1/completions", json.dumps(body).encode())
    try:
        if r.status != 200:
            return {"status": r.status, "error": r.read().decode()[:200]}
        while True:
            line = r.readline().decode().strip()
            if not line:
                if r.closed or r.isclosed():
                    break
                continue
            if line == "data: [DONE]":
                break
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            for ch in chunk.get("choices", []):
                if ch.get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    chunks += 1
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if disconnect_after is not None and chunks >= disconnect_after:
                return {"status": "disconnected", "ttft": ttft}  # the finally closes the socket mid-stream
    finally:
        conn.close()
    return {"status": 200, "ttft": ttft, "e2e": time.perf_counter() - t0, "finish": finish, "tokens": tokens}


def _metrics(url: str) -> dict[str, float]:
    conn, r = _request(url, "GET", "/metrics", timeout=10)
    text = r.read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def run_mode(batch: int, prompts: list[str], args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(args.model, batch, port)
    try:
        _stream(url, args.model, prompts[0], 4, None)  # warm-up
        rng = random.Random(args.seed)
        jobs = [("disconnect" if i % 6 == 5 else "normal", prompts[rng.randrange(len(prompts))])
                for i in range(args.requests)]
        bad_at = set(rng.sample(range(args.requests), 6))
        results: list[dict] = []
        rejected: list[int] = []
        lock = threading.Lock()
        nxt = iter(enumerate(jobs))

        def client() -> None:
            while True:
                with lock:
                    item = next(nxt, None)
                if item is None:
                    return
                i, (kind, prompt) = item
                if i in bad_at:  # a malformed request among the others
                    conn, r = _request(url, "POST", "/v1/completions", _bad(args.model)[i % 3], timeout=60)
                    r.read()
                    conn.close()
                    with lock:
                        rejected.append(r.status)
                try:
                    res = _stream(url, args.model, prompt, args.max_tokens, 2 if kind == "disconnect" else None)
                except (OSError, http.client.HTTPException) as e:
                    res = {"status": f"error: {type(e).__name__}"}
                res["kind"] = kind
                with lock:
                    results.append(res)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        m = _metrics(url)
        conn, r = _request(url, "GET", "/health", timeout=5)
        alive = r.status == 200
        conn.close()
    finally:
        proc.terminate()
        proc.wait(30)
    done = [r for r in results if r["kind"] == "normal" and r["status"] == 200]
    complete = [r for r in done if r["tokens"] == args.max_tokens]
    normal = [r for r in results if r["kind"] == "normal"]
    ttft = [r["ttft"] for r in done]
    return {
        "max_batch": batch, "requests": len(results), "normal": len(normal), "completed": len(complete),
        "failed_or_lost": len(normal) - len(complete),
        "disconnected": sum(r["status"] == "disconnected" for r in results),
        "malformed_sent": len(rejected), "malformed_rejected_4xx": sum(400 <= c < 500 for c in rejected),
        "wall_s": wall, "throughput_tok_s": sum(r["tokens"] for r in complete) / wall,
        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p95_s": _pct(ttft, 0.95),
        "e2e_p50_s": _pct([r["e2e"] for r in done], 0.5), "e2e_p95_s": _pct([r["e2e"] for r in done], 0.95),
        "server_alive_after": alive,
        "server_running_after": m.get(f'vllm:num_requests_running{{model_name="{args.model}"}}'),
        "server_kv_usage_after": m.get(f'vllm:kv_cache_usage_perc{{model_name="{args.model}"}}'),
    }


def markdown(res: dict) -> str:
    meta = res["meta"]
    out = [f"# Load test: `llmdeploy serve {meta['model']}` (2 CPU cores)", "",
           f"{meta['requests']} streamed completions from {meta['concurrency']} concurrent clients (seed {meta['seed']}), "
           f"prompts of 48 tokens, max_tokens {meta['max_tokens']} (ignore_eos), greedy; every 6th client disconnects "
           "after its second chunk; 6 malformed requests sent mid-load. Generated by `python -m benchmarks.loadtest`.",
           "", "| mode | completed | failed or lost | disconnected | malformed → 4xx | throughput tok/s | "
           "TTFT p50 / p95 s | e2e p50 / p95 s | after: running, KV usage |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["modes"].items():
        out.append(f"| {name} | {r['completed']}/{r['normal']} | {r['failed_or_lost']} | {r['disconnected']} | "
                   f"{r['malformed_rejected_4xx']}/{r['malformed_sent']} | {r['throughput_tok_s']:.1f} | "
                   f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | {r['e2e_p50_s']:.2f} / {r['e2e_p95_s']:.2f} | "
                   f"{r['server_running_after']:.0f}, {r['server_kv_usage_after']:.2f} |")
    if "ratio" in res:
        out += ["", f"Throughput, continuous batching / one at a time: **{res['ratio']:.2f}x** (same run)."]
    return "\n".join(out) + "\n"


def readme_paragraph(res: dict) -> str:
    """The README's sentence on the load test, from ``loadtest.json`` (tests check the README)."""
    (cn, c), (on, o) = list(res["modes"].items())
    m = res["meta"]
    return (f"Load test ({m['requests']} streamed completions from {m['concurrency']} concurrent clients, "
            f"{m['max_tokens']} tokens each, with disconnecting clients and malformed requests mid-load): "
            f"continuous batching {c['throughput_tok_s']:.1f} tok/s against {o['throughput_tok_s']:.1f} tok/s one "
            f"request at a time ({res['ratio']:.2f}x), TTFT p50/p95 {c['ttft_p50_s']:.2f}/{c['ttft_p95_s']:.2f} s "
            f"against {o['ttft_p50_s']:.2f}/{o['ttft_p95_s']:.2f} s; {c['completed']}/{c['normal']} and "
            f"{o['completed']}/{o['normal']} requests complete, {c['failed_or_lost'] + o['failed_or_lost']} failed "
            f"or lost, every malformed request answered 4xx, no request running and no KV block held afterwards "
            "([benchmarks/results/serve/LOADTEST.md](benchmarks/results/serve/LOADTEST.md), "
            "`python -m benchmarks.loadtest`).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    _, tok = llmdeploy.load(args.model)
    prompts = [tok.decode(w) for w in test_windows(tok, "shakespeare", 48, 32).tolist()]
    res = {"meta": {"date": time.strftime("%Y-%m-%d"), "model": args.model, "requests": args.requests, "concurrency": args.concurrency,
                    "max_tokens": args.max_tokens, "seed": args.seed}, "modes": {}}
    for name, batch in MODES.items():
        res["modes"][name] = run_mode(batch, prompts, args)
        print(name, res["modes"][name], flush=True)
    a, b = (res["modes"][n]["throughput_tok_s"] for n in MODES)
    res["ratio"] = a / b
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loadtest.json").write_text(json.dumps(res, indent=1))
    (out / "LOADTEST.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
