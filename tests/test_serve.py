"""The OpenAI-compatible server (issue #19): the official client, greedy parity, streaming,
metrics, limits, cancellation. Every server runs on a free port in a thread of the test."""

from __future__ import annotations

import copy
import http.client
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import llmdeploy
from llmdeploy.serve import BackgroundServer, build_app, free_port
from llmdeploy.serve.app import TextStream

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny():
    model, tok = llmdeploy.load("tiny-llama")
    return model.eval(), tok


def greedy_text(model, tok, ids: list[int], n: int) -> str:
    """Plain transformers greedy decoding, cut at the end-of-sequence token."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    return tok.decode(out, skip_special_tokens=True)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics, by name and labels (the Prometheus text parser)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[key] = s.value
    return out


def post(url: str, path: str, body: bytes, timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=timeout)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"{}")


def wait_for(cond, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def slowed(model, seconds: float):
    return model.register_forward_pre_hook(lambda *a: time.sleep(seconds))


def test_openai_client_completions_chat_and_streams_equal_greedy_decoding(tiny):
    model, tok = tiny
    app = build_app(model, tok, model_name="tiny", chat_template=TEMPLATE, max_batch=4, kv_blocks=64)
    prompts = ["To be, or not to be", "Now is the winter of our discontent", "Friends, Romans"]
    with BackgroundServer(app) as url:
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        for p in prompts:
            want = greedy_text(model, tok, tok(p).input_ids, 12)
            r = c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
            assert r.choices[0].text == want
            assert r.usage.prompt_tokens == len(tok(p).input_ids) and r.usage.completion_tokens <= 12
            chunks = list(c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0, stream=True))
            assert "".join(ch.choices[0].text for ch in chunks) == want
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        messages = [{"role": "user", "content": "Speak the speech, I pray you"}]
        ids = tok(tok.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False).input_ids
        want = greedy_text(model, tok, ids, 10)
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        assert chunks[-1].usage.prompt_tokens == len(ids)
        # several at once: the batch changes nothing for greedy requests
        results: dict[int, str] = {}

        def ask(i: int) -> None:
            results[i] = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results[i] for i in range(len(prompts))] == [greedy_text(model, tok, tok(p).input_ids, 12)
                                                            for p in prompts]
        # sampling: n choices, reproducible with a seed
        a = c.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, temperature=1.0, n=2, seed=5)
        b = c.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, temperature=1.0, n=2, seed=5)
        assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 2


def test_stop_strings_end_the_text_before_them(tiny):
    model, tok = tiny
    ids = tok("abc def abc").input_ids
    ts = TextStream(tok, ["c d"])
    text = "".join(ts.add(t) for t in ids) + ts.flush()
    assert text == tok.decode(ids, skip_special_tokens=True).split("c d")[0] and ts.stopped
    ts = TextStream(tok, ["zzz"])  # never appears: everything comes out, held-back tails included
    assert "".join(ts.add(t) for t in ids) + ts.flush() == tok.decode(ids, skip_special_tokens=True)
    app = build_app(model, tok, model_name="tiny", kv_blocks=32)
    with BackgroundServer(app) as url:
        full = client(url).completions.create(model="tiny", prompt="To be", max_tokens=12, temperature=0).choices[0]
        stop = full.text[3:5]
        r = client(url).completions.create(model="tiny", prompt="To be", max_tokens=12, temperature=0, stop=[stop])
        assert r.choices[0].text == full.text[: full.text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_metrics_parse_and_count_what_was_sent(tiny):
    model, tok = tiny
    app = build_app(model, tok, model_name="tiny", kv_blocks=32)
    with BackgroundServer(app) as url:
        c = client(url)
        usage = [c.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).usage
                 for p, n in (("a", 3), ("bb cc", 5), ("dd ee ff", 7))]
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt="a", max_tokens=3, temperature=-1)
        m = metrics(url)
        assert m["vllm:request_success_total,finished_reason=length"] + m.get(
            "vllm:request_success_total,finished_reason=stop", 0) == 3
        assert m["vllm:prompt_tokens_total"] == sum(u.prompt_tokens for u in usage)
        assert m["vllm:generation_tokens_total"] == sum(u.completion_tokens for u in usage)
        assert m["vllm:time_to_first_token_seconds_count"] == 3
        assert m["vllm:e2e_request_latency_seconds_count"] == 3
        assert m["vllm:inter_token_latency_seconds_count"] == sum(u.completion_tokens - 1 for u in usage)
        assert m["llmdeploy:request_errors_total,code=400"] == 1
        assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0


def test_bad_requests_are_rejected_and_the_server_survives(tiny):
    model, tok = tiny
    app = build_app(model, tok, model_name="tiny", kv_blocks=32, max_model_len=64)
    with BackgroundServer(app) as url:
        c = client(url)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            c.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
            c.completions.create(model="tiny", prompt="word " * 80, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="top_p"):
            c.completions.create(model="tiny", prompt="hi", max_tokens=2, top_p=0)
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            c.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=2)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        for body in (b"{not json", b'{"model": "tiny"}', b'{"model": "tiny", "prompt": "x", "max_tokens": "many"}'):
            status, err = post(url, "/v1/completions", body)
            assert status == 400 and err["error"]["type"] == "invalid_request_error"
        assert c.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).choices[0].text is not None


def test_overload_answers_429_and_loses_no_accepted_request(tiny):
    model, tok = tiny
    app = build_app(model, tok, model_name="tiny", kv_blocks=32, max_batch=1, max_waiting=1)
    engine = app.state.engine
    hook = slowed(model, 0.02)
    try:
        with BackgroundServer(app) as url:
            c = client(url)
            done: dict[str, str] = {}

            def ask(name: str, n: int) -> None:
                done[name] = c.completions.create(model="tiny", prompt=name, max_tokens=n, temperature=0,
                                                  extra_body={"ignore_eos": True}).choices[0].finish_reason

            first = threading.Thread(target=ask, args=("first", 60))
            first.start()
            wait_for(lambda: engine.num_running == 1 and engine.num_waiting == 0)  # admitted, first token out
            second = threading.Thread(target=ask, args=("second", 5))
            second.start()
            wait_for(lambda: engine.num_waiting == 1)
            with pytest.raises(openai.RateLimitError, match="overloaded"):
                c.completions.create(model="tiny", prompt="third", max_tokens=5)
            first.join(60)
            second.join(60)
            assert set(done) == {"first", "second"}  # both accepted requests finished
            assert metrics(url)["llmdeploy:request_errors_total,code=429"] == 1
    finally:
        hook.remove()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_client_that_goes_away_frees_its_kv(tiny, stream):
    model, tok = tiny
    app = build_app(model, tok, model_name="tiny", kv_blocks=32)
    engine = app.state.engine
    hook = slowed(model, 0.05)  # 480 tokens would take > 24 s: only the cancellation frees the KV in time
    try:
        with BackgroundServer(app) as url:
            conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
            body = json.dumps({"model": "tiny", "prompt": "To be", "max_tokens": 480, "stream": stream,
                               "temperature": 0, "ignore_eos": True})
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            r = None
            if stream:
                r = conn.getresponse()
                assert r.status == 200
                r.fp.readline()  # the first event arrived
            wait_for(lambda: engine.num_running == 1 and engine.num_waiting == 0)
            assert engine.cache.num_free_blocks < engine.cache.blocks.capacity  # the request holds KV blocks
            conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away
            conn.sock.close()
            if r is not None:
                r.close()
            wait_for(lambda: engine.num_running == 0 and engine.cache.num_free_blocks == engine.cache.blocks.capacity,
                     timeout=5)
            assert metrics(url).get("vllm:e2e_request_latency_seconds_count", 0) == 0  # aborted, not finished
            # the server goes on
            assert client(url).completions.create(model="tiny", prompt="a", max_tokens=2).choices
    finally:
        hook.remove()


def test_a_failing_step_fails_its_requests_not_the_server(tiny):
    model, tok = tiny
    app = build_app(model, tok, model_name="tiny", kv_blocks=32)
    broken = {"on": True}

    def fail(*args):
        if broken["on"]:
            raise RuntimeError("the device fell over")

    hook = model.register_forward_pre_hook(fail)
    try:
        with BackgroundServer(app) as url:
            c = client(url)
            with pytest.raises(openai.InternalServerError, match="fell over"):
                c.completions.create(model="tiny", prompt="a", max_tokens=3)
            broken["on"] = False
            assert c.completions.create(model="tiny", prompt="a", max_tokens=3).choices  # still serving
            assert metrics(url)["llmdeploy:request_errors_total,code=500"] == 1
            assert app.state.engine.cache.num_free_blocks == 32
    finally:
        hook.remove()


def test_bitdelta_tenants_share_the_batch_and_answer_as_themselves(tiny, tmp_path):
    from llmdeploy.delta import BitDelta, save_delta

    base, tok = tiny
    tenants = {}
    for name, seed in (("poet", 0), ("coder", 1)):
        ft = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, m in ft.named_modules():
                if isinstance(m, torch.nn.Linear) and "layers" in n:
                    m.weight += 0.05 * torch.randn(m.weight.shape, generator=g)
        tenants[name] = BitDelta(base=base).compress(ft)
    app = build_app(base, tok, model_name="tiny", tenants=tenants, kv_blocks=64, max_batch=8)
    prompt = "To be, or not to be"
    ids = tok(prompt).input_ids
    want = {"tiny": greedy_text(base, tok, ids, 10), **{n: greedy_text(m, tok, ids, 10) for n, m in tenants.items()}}
    assert len(set(want.values())) == 3  # three different models
    with BackgroundServer(app) as url:
        c = client(url)
        assert sorted(m.id for m in c.models.list().data) == ["coder", "poet", "tiny"]
        got: dict[str, str] = {}

        def ask(name: str) -> None:
            got[name] = c.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(n,)) for n in want]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == want  # rows of three models in the same batches, each answered by its own
    # the CLI's --tenants loads delta files
    path = save_delta(tenants["poet"], tmp_path / "poet.safetensors", base)
    from llmdeploy.cli.main import build_parser

    args = build_parser().parse_args(["serve", "tiny-llama", "--tenants", f"poet={path}"])
    assert args.tenants == f"poet={path}"


def test_cli_serve_answers_the_openai_client(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmdeploy", "serve", "tiny-llama", "--port", str(port),
                             "--kv-blocks", "32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                conn = http.client.HTTPConnection(f"127.0.0.1:{port}", timeout=2)
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                return False

        wait_for(up, timeout=120)
        r = client(url).completions.create(model="tiny-llama", prompt="hello", max_tokens=3, temperature=0)
        assert r.model == "tiny-llama" and r.usage.completion_tokens <= 3
    finally:
        proc.terminate()
        proc.wait(30)


def test_readme_serve_commands_are_valid():
    """The README's two commands: the CLI parses the first, the server's schema the second's body."""
    from pathlib import Path

    from llmdeploy.cli.main import _cmd_serve, build_parser
    from llmdeploy.serve.app import ChatRequest

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serve it", 1)[1].split("```")[1]
    serve_line = next(line for line in section.splitlines() if line.startswith("llmdeploy serve"))
    args = build_parser().parse_args(shlex.split(serve_line)[1:])
    assert args.func is _cmd_serve and args.model == "smollm2-135m"
    curl = shlex.split(section.split("curl", 1)[1].replace("\\\n", " "))
    assert curl[0] == f"http://127.0.0.1:{args.port}/v1/chat/completions"
    body = ChatRequest.model_validate_json(curl[curl.index("-d") + 1])
    assert body.model == args.model and body.messages[0]["role"] == "user"


def test_a_drafter_speeds_greedy_requests_without_changing_them(tiny, tmp_path):
    """``--drafter``: speculative decoding inside the server's continuous batching; greedy texts
    equal plain decoding's (streamed or not, alone or together), the spec-decode counters move."""
    from llmdeploy import decode

    model, tok = tiny
    torch.manual_seed(0)
    drafter = decode.ReDrafter.for_model(model, beam_width=3, beam_length=3)
    drafter.save(tmp_path / "drafter")
    app = build_app(model, tok, model_name="tiny", max_batch=4, kv_blocks=64,
                    drafter=decode.load_drafter(tmp_path / "drafter"))
    prompts = ["To be, or not to be", "Now is the winter of our discontent", "Friends, Romans"]
    with BackgroundServer(app) as url:
        c = client(url)
        results: dict[int, str] = {}

        def ask(i: int) -> None:
            results[i] = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=14,
                                              temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        want = [greedy_text(model, tok, tok(p).input_ids, 14) for p in prompts]
        assert [results[i] for i in range(len(prompts))] == want
        spec = decode.generate(model, tok, [tok(p).input_ids for p in prompts], 14, drafter=drafter)
        assert [tok.decode(s, skip_special_tokens=True) for s in spec.sequences] == want  # = decode.generate
        chunks = list(c.completions.create(model="tiny", prompt=prompts[0], max_tokens=14, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == want[0]
        sampled = c.completions.create(model="tiny", prompt=prompts[1], max_tokens=6, temperature=1.0, seed=3)
        assert sampled.usage.completion_tokens <= 6
        m = metrics(url)
        assert m["vllm:spec_decode_num_draft_tokens_total"] > 0
        assert 0 <= m["vllm:spec_decode_num_accepted_tokens_total"] <= m["vllm:spec_decode_num_draft_tokens_total"]
        assert m["vllm:request_success_total,finished_reason=length"] + m.get(
            "vllm:request_success_total,finished_reason=stop", 0) == 5
        assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0


def test_readme_quotes_the_load_test():
    from pathlib import Path

    from benchmarks.loadtest import readme_paragraph

    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/serve/loadtest.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    assert " ".join(readme_paragraph(res).split()) in readme
    for r in res["modes"].values():
        assert r["failed_or_lost"] == 0 and r["malformed_rejected_4xx"] == r["malformed_sent"]
        assert r["server_alive_after"] and r["server_running_after"] == 0 and r["server_kv_usage_after"] == 0
