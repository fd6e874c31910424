"""Serve base and tuned models behind one OpenAI-compatible endpoint with Ray Serve LLM (vLLM engines).

    tgsft serve CONFIG                               # base + <run>/train/model if it exists; Ctrl-C stops
    tgsft serve CONFIG --model base=/m/a --model tuned=/m/b

Reads: model folders (or hub ids). Writes nothing; the app listens on ``serve.host:serve.port`` under
``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, each model under its own id.

CPU accounting (see ServeConfig): each model takes ``cpus_per_replica`` logical CPUs for its engine worker plus
``server_cpus`` for its LLMServer replica actor (one placement group), and the ingress takes ``ingress_cpus``. A
local Ray (``pipeline.runtime.init_ray``) has more logical CPUs than cores, so this fits on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

from pipeline.config import ModelConfig, ServeConfig, TGConfig, model_folder_problem
from pipeline.hardware import cpu_engine_env

__all__ = ["APP_NAME", "ServeError", "build_app_args", "default_models", "free_port", "request_json",
           "required_cpus", "serve_forever", "serving", "wait_ready"]

APP_NAME = "tgsft"


class ServeError(RuntimeError):
    """The endpoint answered with an HTTP error, or the app failed to deploy."""


def default_models(cfg: TGConfig, *, log: Callable[[str], None] = print) -> dict[str, str]:
    """The models a run serves by default: ``base`` (model.source) and ``tuned`` (<run>/train/model) if trained."""
    from pipeline.model import resolve_model

    models = {"base": resolve_model(cfg.model, log=log)}
    tuned = cfg.run_dir / "train" / "model"
    if (tuned / "config.json").is_file():
        models["tuned"] = str(tuned.resolve())
    return models


def required_cpus(n_models: int, *, serve: ServeConfig) -> float:
    """Logical CPUs the app reserves: per model engine + server actor, plus the ingress."""
    return n_models * (serve.cpus_per_replica + serve.server_cpus) + serve.ingress_cpus


def build_app_args(models: dict[str, str], *, serve: ServeConfig, model: ModelConfig) -> dict[str, Any]:
    """``LLMServingArgs`` for ``ray.serve.llm.build_openai_app`` as plain data (no Ray import).

    Args:
        models: model id -> Hugging Face folder or hub id.
        serve: replica resources, KV cache and engine options.
        model: dtype, context length and remote-code policy shared by every served model.

    Returns:
        ``{"llm_configs": [...], "ingress_deployment_config": {...}}``.

    Raises:
        ValueError: no models.
    """
    if not models:
        raise ValueError("serve: no models to serve")
    bundles: list[dict[str, float]] = [{"CPU": serve.cpus_per_replica}]
    engine_kwargs: dict[str, Any] = {
        "dtype": model.dtype,
        "max_model_len": model.max_model_len,
        "enforce_eager": serve.enforce_eager,
        "trust_remote_code": model.trust_remote_code,
    }
    if serve.gpus_per_replica > 0:
        # vLLM's Ray executor places one tensor-parallel rank per GPU bundle: n GPUs are n bundles of one.
        ranks = int(serve.engine_kwargs.get("tensor_parallel_size", 1))
        bundles[0]["GPU"] = 1.0 if ranks > 1 else serve.gpus_per_replica
        bundles += [{"GPU": 1.0} for _ in range(ranks - 1)]
        engine_kwargs["gpu_memory_utilization"] = serve.gpu_memory_utilization
    engine_kwargs.update(serve.engine_kwargs)
    # vLLM's CPU backend sizes its KV cache from this variable; GPU engines ignore it.
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(serve.kv_cache_gib))), **cpu_engine_env(serve.reserved_cpus)}
    configs = [
        {
            "model_loading_config": {"model_id": model_id, "model_source": source},
            "engine_kwargs": dict(engine_kwargs),
            "placement_group_config": {"bundles": [dict(b) for b in bundles]},
            "deployment_config": {
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                # Serve LLM adds the replica actor's resources to the engine's first bundle: both land on a
                # node that has them.
                "ray_actor_options": {"num_cpus": serve.server_cpus, "resources": dict(serve.resources)},
            },
            "runtime_env": {"env_vars": env},
            "log_engine_metrics": False,
        }
        for model_id, source in models.items()
    ]
    ingress = {"ray_actor_options": {"num_cpus": serve.ingress_cpus}}
    return {"llm_configs": configs, "ingress_deployment_config": ingress}


def request_json(url: str, *, payload: dict | None = None, timeout: float = 300) -> dict:
    """GET (no payload) or POST JSON to ``url`` and decode the JSON answer.

    Raises:
        ServeError: the server answered with an HTTP error (status and body in the message).
        urllib.error.URLError: the server is unreachable.
    """
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise ServeError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def wait_ready(
    base_url: str, *, model_ids: list[str], timeout_s: float, check: Callable[[], None] | None = None
) -> None:
    """Poll ``/v1/models`` until every id is listed, then ask each model for a 1-token completion.

    Args:
        base_url: ``http://host:port`` (no ``/v1``).
        model_ids: ids that must answer.
        timeout_s: overall deadline in seconds.
        check: called between polls; raises to abort early (e.g. the deployment failed).

    Raises:
        TimeoutError: not every model answered within ``timeout_s``; names the models still missing.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(model_ids)
    last_error = "no answer yet"
    while pending:
        try:
            listed = {m["id"] for m in request_json(f"{base_url}/v1/models", timeout=30)["data"]}
            for model_id in [m for m in pending if m in listed]:
                payload = {"model": model_id, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
                request_json(f"{base_url}/v1/completions", payload=payload, timeout=120)
                pending.remove(model_id)
            last_error = f"not listed yet: {pending}"
        except (OSError, ServeError, KeyError, ValueError) as e:
            last_error = str(e)
        if not pending:
            return
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}: models {pending} not ready after {timeout_s:.0f} s ({last_error})")
        time.sleep(2)


def _start_ray(cfg: TGConfig, n_models: int) -> bool:
    """Join or start Ray (``pipeline.runtime.init_ray``); True when this call started it (so it must stop it).

    Raises:
        ValueError: a local Ray has fewer logical CPUs than the app reserves (it would wait forever).
    """
    import ray

    from pipeline.runtime import init_ray

    if ray.is_initialized():
        return False
    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard_host=cfg.ray.dashboard_host)
    need, have = required_cpus(n_models, serve=cfg.serve), ray.cluster_resources().get("CPU", 0)
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")) and have < need:
        ray.shutdown()
        raise ValueError(f"serve: {n_models} model(s) reserve {need:g} logical CPUs but the local Ray has {have:g}; "
                         "raise ray.num_cpus or lower serve.cpus_per_replica / server_cpus / ingress_cpus")
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the OS picks it), for a server about to start."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _deploy_failed() -> None:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is not None and app.status == "DEPLOY_FAILED":  # ApplicationStatus is a str enum
        raise ServeError(f"serve: application {APP_NAME!r} failed to deploy: {app.message}")


@contextlib.contextmanager
def serving(cfg: TGConfig, models: dict[str, str], *, access_log: bool = False) -> Iterator[str]:
    """Serve ``models`` for the duration of a ``with`` block.

    Starts Ray if needed, deploys the OpenAI app, waits until every model answers, and on exit (also on error or
    Ctrl-C) shuts Serve down (and Ray, if started here).

    Args:
        cfg: run config (serve, model and ray sections are read).
        models: model id -> folder or hub id.
        access_log: log every request (a long-running server wants it; an evaluation's thousands of requests not).

    Yields:
        The base URL, ``http://host:port`` (append ``/v1/...``).

    Raises:
        ValueError: no models.
        TimeoutError: the models did not answer within ``serve.ready_timeout_s``.
    """
    if not models:
        raise ValueError("serve: no models to serve")
    started_ray = _start_ray(cfg, len(models))
    if started_ray and not _port_free(cfg.serve.host, cfg.serve.port):
        import ray

        ray.shutdown()
        raise ValueError(f"serve: {cfg.serve.host}:{cfg.serve.port} is already in use; choose another serve.port")
    from ray import serve
    from ray.serve.llm import build_openai_app

    base_url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    try:
        logging_config = {"enable_access_log": access_log}
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=logging_config)
        app = build_openai_app(build_app_args(models, serve=cfg.serve, model=_resolved(cfg)))
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=logging_config)
        wait_ready(base_url, model_ids=list(models), timeout_s=cfg.serve.ready_timeout_s, check=_deploy_failed)
        yield base_url
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        if started_ray:
            import ray

            ray.shutdown()


def _resolved(cfg: TGConfig) -> ModelConfig:
    """The model section with ``dtype: auto`` settled for CPU replicas: bf16 or fp32, whichever this machine (the
    driver's; set ``model.dtype`` when CPU replicas run on another kind of CPU) multiplies faster."""
    from pipeline.hardware import resolve_dtype

    dtype, _ = resolve_dtype(cfg.model.dtype, use_gpu=cfg.serve.gpus_per_replica > 0)
    return cfg.model.model_copy(update={"dtype": dtype})


def serve_forever(cfg: TGConfig, *, models: dict[str, str]) -> None:
    """Serve until Ctrl-C, then shut down cleanly.

    Args:
        cfg: run config.
        models: model id -> folder; empty serves :func:`default_models`.
    """
    models = models or default_models(cfg)
    for model_id, source in models.items():
        if problem := model_folder_problem(source):
            raise FileNotFoundError(f"serve: model {model_id!r}: {problem}")
    with serving(cfg, models, access_log=True) as base_url:
        print(f"serving {', '.join(models)} at {base_url}/v1 (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("shutting down", flush=True)
