"""Live autoscaling on Ray Serve (issue #19): replicas of llmdeploy's server on a local Ray
instance, scaled up under load and back down by the same ENOVA-style policy the simulator tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch

import llmdeploy
from llmdeploy.deploy import Profile, Workload
from llmdeploy.deploy.ray_serve import ServePolicy, enova_policy, ray_app
from llmdeploy.errors import ConfigError
from llmdeploy.serve import free_port

# A replica that serves 0.25 requests/s (2 at a time, 8 s each): any real load needs more of them.
SLOW = Profile(weight_bytes=10**6, kv_bytes_per_token=1000, prefill_s_per_token=1e-3, decode_a=0.9, decode_c=0.05,
               max_model_len=2048)
LOAD = Workload(request_rate=0.1, prompt_tokens=8, output_tokens=8, ttft_slo=5.0, tpot_slo=1.0)


def _ctx(**metrics) -> SimpleNamespace:
    return SimpleNamespace(aggregated_metrics={k: dict(enumerate(v)) for k, v in metrics.items()},
                           total_queued_requests=3, target_num_replicas=2, running_replicas=["a", "b"],
                           capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3, policy_state={},
                           current_time=1000.0)


def test_serve_policy_reads_ray_metrics_and_stays_in_bounds():
    p = ServePolicy(**enova_policy(SLOW, LOAD, 2**30, interval_s=1.0, hold_s=2.0))
    ctx = _ctx(request_rate=[2.0, 3.0], waiting=[1, 0], running=[2, 2], kv_usage=[0.5, 0.7], ttft_p95_s=[0.1, 0.4])
    n, state = p(ctx)
    obs = p.observations[-1]
    assert (obs.arrivals_per_s, obs.waiting, obs.running, obs.replicas, obs.serving) == (5.0, 4, 4, 2, 2)
    assert obs.kv_usage == pytest.approx(0.6) and obs.p95_ttft_s == 0.4
    assert n == 3 and state == {}  # 5 requests/s need 20 replicas of 0.25/s: capped at the deployment's max
    quiet = _ctx(request_rate=[0.0, 0.0], waiting=[0, 0], running=[0, 0], kv_usage=[0, 0], ttft_p95_s=[0, 0])
    quiet.total_queued_requests, quiet.target_num_replicas = 0, 3
    calm = ServePolicy(**enova_policy(SLOW, LOAD, 2**30, interval_s=1.0, hold_s=2.0))
    decisions = []
    for t in (1000.0, 1000.5, 1001.0):
        quiet.current_time = t
        decisions.append(calm(quiet)[0])
    assert decisions == [3, 3, 1]  # one decision per interval; down only after 2 s of asking for fewer
    assert len(calm.observations) == 2
    with pytest.raises(ConfigError, match="profile, workload and memory_bytes"):
        ServePolicy(kind="enova")
    with pytest.raises(ConfigError, match="enova, rules or static"):
        ServePolicy(kind="magic")


def _running(serve, app: str) -> int:
    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return status.deployments["llmdeploy"].replica_states.get("RUNNING", 0)


def _wait(pred, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)
    print(f"{what}: {time.monotonic() - t0:.1f} s")


def test_ray_serve_scales_llmdeploy_replicas_up_under_load_and_back_down(tmp_path):
    import ray
    from ray import serve

    model, tok = llmdeploy.load("tiny-llama")
    llmdeploy.save(model, tok, tmp_path / "ckpt")
    prompt = "To be, or not to be"
    with torch.no_grad():
        ids = tok(prompt).input_ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    want = tok.decode(out, skip_special_tokens=True)

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # the policy reads 1-s intervals and forgets load after 3 s, without jump headroom, so that the
        # test is short; the same policy at its defaults is what the simulator tests measure
        app = ray_app(str(tmp_path / "ckpt"), served_model_name="tiny", min_replicas=1, max_replicas=2,
                      interval_s=1.0, policy=enova_policy(SLOW, LOAD, 2**30, hold_s=3.0, window_s=3.0, headroom=0.0),
                      ray_actor_options={"num_cpus": 0.5}, max_batch=4)
        serve.run(app, name="llm", route_prefix="/", blocking=False)
        _wait(lambda: _running(serve, "llm") == 1, 180, "the first replica")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)
        _wait(lambda: _models_ok(client), 60, "the HTTP proxy")
        assert client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text == want

        answers, errors, stop = [], [], threading.Event()

        def user() -> None:
            while not stop.is_set():
                try:
                    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
                    answers.append(r.choices[0].text)
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    errors.append(repr(e))
                time.sleep(0.1)

        users = [threading.Thread(target=user, daemon=True) for _ in range(3)]
        for t in users:
            t.start()
        try:
            _wait(lambda: _running(serve, "llm") == 2, 120, "a second replica under load")
            n_before = len(answers)
            _wait(lambda: len(answers) >= n_before + 6, 60, "answers while two replicas run")
        finally:
            stop.set()
            for t in users:
                t.join(60)
        _wait(lambda: _running(serve, "llm") == 1, 120, "the scale-down once the load stopped")
        assert not errors, errors[:3]
        assert answers and set(answers) == {want}  # every replica answers as greedy decoding does
    finally:
        serve.shutdown()
        ray.shutdown()


def _models_ok(client: openai.OpenAI) -> bool:
    try:
        return [m.id for m in client.models.list().data] == ["tiny"]
    except Exception:  # noqa: BLE001 - the proxy is still starting
        return False


def test_cli_serves_replicas_on_ray(tmp_path):
    """``llmdeploy serve MODEL --replicas 1:2`` (the ENOVA policy on a profile measured here) answers
    as greedy decoding does; bad --replicas values are one-line errors."""
    import shutil
    import signal
    import subprocess
    import sys

    script = Path(sys.executable).with_name("llmdeploy")  # the venv's entry point, on PATH or not
    exe = [str(script)] if script.exists() else [shutil.which("llmdeploy") or "llmdeploy"]
    bad = subprocess.run([*exe, "serve", "tiny-llama", "--replicas", "two"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "MIN:MAX" in bad.stderr

    model, tok = llmdeploy.load("tiny-llama")
    llmdeploy.save(model, tok, tmp_path / "ckpt")
    ids = tok("Now is the winter").input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=0,
                             eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    port = free_port()
    proc = subprocess.Popen([*exe, "serve", str(tmp_path / "ckpt"), "--replicas", "1:2", "--port", str(port),
                             "--served-model-name", "tiny", "--replica-memory-gib", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"llmdeploy serve --replicas exited: {proc.stderr.read()[-2000:]}")
            return _models_ok(client)

        _wait(up, 240, "the Ray Serve replicas of the CLI")
        r = client.completions.create(model="tiny", prompt="Now is the winter", max_tokens=5, temperature=0)
        assert r.choices[0].text == tok.decode(out, skip_special_tokens=True)
    finally:
        proc.send_signal(signal.SIGINT)  # serve.run's loop exits and the driver shuts its Ray instance down
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def test_a_replica_is_llmdeploy_serve_with_its_options_and_reports_its_window():
    """What every Ray Serve replica runs, without Ray: ``load_app`` with the server's options, and
    the metrics window the autoscaler reads (one request in: one arrival, one first token)."""
    import http.client
    import json

    from llmdeploy.deploy.ray_serve import LLMDeployReplica
    from llmdeploy.serve import BackgroundServer

    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    rep = LLMDeployReplica("tiny-llama", "tiny", 30.0, {"max_batch": 3, "chat_template": template})
    assert rep._app.state.engine.max_batch == 3 and rep.__serve_build_asgi_app__() is rep._app
    assert rep.record_autoscaling_stats()["request_rate"] == 0.0
    with BackgroundServer(rep._app) as url:
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": "tiny", "max_tokens": 3, "messages": [
            {"role": "user", "content": "hi"}]}), {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        stats = rep.record_autoscaling_stats()
    assert stats["request_rate"] == pytest.approx(1 / 30) and stats["ttft_p95_s"] > 0
    assert stats["running"] == stats["waiting"] == 0 and stats["kv_usage"] == 0
