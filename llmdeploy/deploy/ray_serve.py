"""Live autoscaling on Ray Serve: replicas of ``llmdeploy serve`` scaled by this library's policies.

Ray Serve is the engine people already run in production for this; it starts, routes to and stops
replicas. This module gives it two things:

* :func:`ray_app` — a Ray Serve application whose every replica is the server of ``llmdeploy
  serve`` (the same FastAPI app: OpenAI endpoints, streaming, ``/metrics``), built on the replica
  from a model name or path, and reporting the window of metrics an autoscaler reads
  (``ServingEngine.window_stats``: arrivals per second, p95 time to first token, running and
  waiting requests, KV usage) through Ray Serve's custom autoscaling metrics.
* :class:`ServePolicy` — a Ray Serve custom autoscaling policy that turns those metrics (summed
  over replicas; requests queued in Ray's router count as waiting) into the
  :class:`~llmdeploy.deploy.autoscale.Observation` the simulator's policies read, once per
  ``interval_s``, and answers with the replicas :class:`~llmdeploy.deploy.autoscale.ENOVAPolicy`
  (or ``Static``/``ENOVARules``) asks for, within the deployment's bounds. The policy tested in the
  simulator is the one that runs live.

Ray Serve drains a replica it stops (no new requests; the ones it holds finish), as the simulator
assumes. ``ray`` is an optional dependency (``pip install "ray[serve]"``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict
from typing import Any

from ..errors import ConfigError
from .autoscale import ENOVAPolicy, ENOVARules, Observation, Static
from .recommend import Profile, Workload


def _serve():
    try:
        from ray import serve
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError('live autoscaling needs Ray Serve: pip install "ray[serve]"') from e
    return serve


class ServePolicy:
    """A Ray Serve custom autoscaling policy (``policy_function``) running an llmdeploy policy.

    ``kind``: ``"enova"`` (:class:`ENOVAPolicy` from ``profile``, ``workload`` and
    ``memory_bytes``, ``options`` passed on), ``"rules"`` (:class:`ENOVARules` with
    ``max_batch``) or ``"static"`` (``replicas``). Arguments are JSON values, as Ray Serve's
    ``policy_kwargs`` require (``profile``/``workload`` as dicts: ``dataclasses.asdict``)."""

    def __init__(self, kind: str = "enova", *, profile: dict | None = None, workload: dict | None = None,
                 memory_bytes: int | None = None, max_batch: int = 16, replicas: int = 1,
                 interval_s: float = 5.0, **options: Any) -> None:
        if kind == "enova":
            if profile is None or workload is None or memory_bytes is None:
                raise ConfigError("the ENOVA policy needs profile, workload and memory_bytes "
                                  "(deploy.measure_profile, deploy.Workload, the replica's memory)")
            self.policy = ENOVAPolicy(Profile(**profile), Workload(**workload), int(memory_bytes),
                                      interval_s=interval_s, **options)
        elif kind == "rules":
            self.policy = ENOVARules(max_batch=max_batch, interval_s=interval_s, **options)
        elif kind == "static":
            self.policy = Static(replicas)
        else:
            raise ConfigError(f"policy kind must be enova, rules or static, got {kind!r}")
        self.interval = interval_s
        self._last: float | None = None
        self._decision: int | None = None
        self.observations: deque[Observation] = deque(maxlen=10_000)  # the recent ones, for inspection

    def observe(self, ctx) -> Observation:
        """The interval's :class:`Observation` from a Ray Serve ``AutoscalingContext``."""
        metrics = ctx.aggregated_metrics or {}

        def per_replica(name: str) -> list[float]:
            return [float(v) for v in (metrics.get(name) or {}).values()]

        kv = per_replica("kv_usage")
        queued = float(ctx.total_queued_requests or 0.0)
        return Observation(time=getattr(ctx, "current_time", None) or time.time(), replicas=int(ctx.target_num_replicas),
                           serving=len(ctx.running_replicas), arrivals_per_s=sum(per_replica("request_rate")),
                           waiting=int(round(sum(per_replica("waiting")) + queued)),
                           running=int(round(sum(per_replica("running")))),
                           kv_usage=sum(kv) / len(kv) if kv else 0.0,
                           p95_ttft_s=max(per_replica("ttft_p95_s"), default=0.0))

    def __call__(self, ctx) -> tuple[int, dict]:
        now = getattr(ctx, "current_time", None) or time.time()
        if self._decision is None or now - (self._last or 0.0) >= self.interval:
            obs = self.observe(ctx)
            self.observations.append(obs)
            self._decision, self._last = int(self.policy(obs)), now
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        return max(lo, min(hi, self._decision)), ctx.policy_state


class LLMDeployReplica:
    """One replica: ``llmdeploy serve``'s app for ``model``, with its metrics window for the
    autoscaler (Ray Serve calls :meth:`record_autoscaling_stats`)."""

    def __init__(self, model: str, served_model_name: str | None = None, window_s: float = 5.0,
                 options: dict | None = None) -> None:
        from ..serve import load_app

        self._app = load_app(model, served_model_name=served_model_name, **(options or {}))
        self.window = window_s

    def __serve_build_asgi_app__(self):
        return self._app

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self._app.state.engine.window_stats(self.window)


def ray_app(model: str, *, served_model_name: str | None = None, policy: ServePolicy | dict | None = None,
            min_replicas: int = 1, max_replicas: int = 4, initial_replicas: int | None = None,
            interval_s: float = 5.0, ray_actor_options: dict | None = None, deployment_name: str = "llmdeploy",
            **options: Any):
    """A Ray Serve application serving ``model`` (a name or path :func:`llmdeploy.load` takes),
    scaled between ``min_replicas`` and ``max_replicas`` by ``policy`` — the keyword arguments of
    :class:`ServePolicy` (default: ``{"kind": "static", "replicas": min_replicas}``). Run it with
    ``ray.serve.run(app)``; ``options`` go to every replica's server (:func:`llmdeploy.serve.load_app`:
    ``tenants``, ``drafter``, ``chat_template``, ``max_batch``, ``kv_blocks``...)."""
    serve = _serve()
    if isinstance(policy, ServePolicy):
        raise ConfigError("pass the policy as ServePolicy's keyword arguments (a dict): Ray Serve builds it "
                          "in its controller from JSON values")
    kwargs = dict(policy or {"kind": "static", "replicas": min_replicas})
    kwargs.setdefault("interval_s", interval_s)
    ServePolicy(**kwargs)  # fail here, not in Ray's controller, on a bad policy
    if not 1 <= min_replicas <= max_replicas:
        raise ConfigError(f"need 1 <= min_replicas <= max_replicas, got {min_replicas} and {max_replicas}")
    autoscaling = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                   "initial_replicas": initial_replicas or min_replicas,
                   "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
                   "metrics_interval_s": min(interval_s, 10.0) / 2, "look_back_period_s": min(interval_s, 10.0),
                   "policy": {"policy_function": ServePolicy, "policy_kwargs": kwargs}}
    cls = serve.ingress()(LLMDeployReplica)
    deployment = serve.deployment(cls, name=deployment_name, autoscaling_config=autoscaling,
                                  ray_actor_options=ray_actor_options or {"num_cpus": 1})
    return deployment.bind(model, served_model_name, interval_s, options)


def enova_policy(profile: Profile, workload: Workload, memory_bytes: int, **options: Any) -> dict:
    """:func:`ray_app`'s ``policy`` for the ENOVA-style policy (JSON values, as Ray Serve needs)."""
    return {"kind": "enova", "profile": asdict(profile), "workload": asdict(workload),
            "memory_bytes": int(memory_bytes), **options}


def serve_replicas(model: str, *, min_replicas: int, max_replicas: int, autoscale: str = "enova",
                   host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
                   workload: Workload | None = None, replica_memory_bytes: int | None = None,
                   interval_s: float = 5.0, blocking: bool = True, **options: Any):
    """What ``llmdeploy serve MODEL --replicas MIN:MAX`` runs: a local Ray instance (or the one
    ``RAY_ADDRESS`` names), Ray Serve's proxy on ``host:port``, and :func:`ray_app` scaled by
    ``autoscale`` — ``"enova"`` measures the model on this machine first
    (:func:`~llmdeploy.deploy.measure_profile`) for the recommender, against ``workload``'s mean
    prompt and output lengths and SLOs and ``replica_memory_bytes`` per replica (default: the
    machine's available memory shared by ``max_replicas``). ``options`` go to every replica's
    server (:func:`llmdeploy.serve.load_app`); the files they name (tenants' deltas, a drafter)
    must be readable where the replicas run."""
    import psutil

    serve = _serve()
    import ray

    if autoscale == "enova":
        from ..io import load
        from .recommend import measure_profile

        m, _ = load(model)
        profile = measure_profile(m.eval(), batch_sizes=(1, 4), prompt_len=64, decode_steps=8, repeats=1)
        memory = replica_memory_bytes or int(psutil.virtual_memory().available // max_replicas)
        policy = enova_policy(profile, workload or Workload(request_rate=1.0), memory)
        del m
    elif autoscale == "rules":
        policy = {"kind": "rules", "max_batch": int(options.get("max_batch", 16))}
    elif autoscale == "static":
        policy = {"kind": "static", "replicas": min_replicas}
    else:
        raise ConfigError(f"--autoscale must be enova, rules or static, got {autoscale!r}")
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    app = ray_app(model, served_model_name=served_model_name or model, policy=policy, min_replicas=min_replicas,
                  max_replicas=max_replicas, interval_s=interval_s, **options)
    return serve.run(app, name="llmdeploy", route_prefix="/", blocking=blocking)
