"""vLLM engine actors for tree generation.

A :class:`GenerationEngine` wraps one ``vllm.LLM``; :func:`start_engines` starts ``replicas`` of them as Ray actors
once per run, and every level's Ray Data ``map_batches`` routes its rows to them (see ``pipeline.generate``), so an
engine's start-up (~20-100 s on CPU) is paid once per run instead of once per level, and the prefix cache stays warm
across levels. Actors restart on failure and calls are retried, so a killed engine costs a restart, not the level.
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["GenerationEngine", "start_engines", "stop_engines"]


class GenerationEngine:
    """One vLLM engine: prompts + per-row seeds in, texts + token counts out.

    Args:
        model: Hugging Face folder or hub id.
        engine_kwargs: ``vllm.LLM`` keyword arguments (dtype, max_model_len, enable_prefix_caching, ...).
        env: environment variables to set before vLLM starts (e.g. ``VLLM_CPU_KVCACHE_SPACE``).
    """

    def __init__(self, model: str, *, engine_kwargs: dict[str, Any], env: dict[str, str] | None = None):
        os.environ.update(env or {})
        import torch
        from vllm import LLM

        from pipeline.hardware import resolve_dtype

        t0 = time.monotonic()
        kwargs = dict(engine_kwargs)
        # 'auto' on CPU: bf16 or fp32, measured here, on the CPU and threads this engine gets.
        kwargs["dtype"], self.dtype_reason = resolve_dtype(kwargs.get("dtype", "auto"),
                                                           use_gpu=torch.cuda.is_available())
        self.dtype = kwargs["dtype"]
        self._llm = LLM(model=model, **kwargs)
        self.start_seconds = time.monotonic() - t0
        self.calls = 0

    def ready(self) -> float:
        """Seconds the engine took to start."""
        return self.start_seconds

    def describe(self) -> dict[str, Any]:
        """The engine's dtype, why it was chosen, and its start-up seconds."""
        return {"dtype": self.dtype, "dtype_reason": self.dtype_reason, "start_seconds": self.start_seconds}

    def generate(
        self, prompts: list[str], seeds: list[int], *, max_tokens: int, stop: list[str], sampling: dict[str, Any]
    ) -> dict[str, list]:
        """Generate one completion per prompt, each with its own seed.

        Args:
            prompts: rendered prompts.
            seeds: one sampling seed per prompt.
            max_tokens: new-token cap (L_i).
            stop: stop strings (the end-of-turn text); the model's EOS token always stops too.
            sampling: shared ``SamplingParams`` fields (temperature, top_p, top_k, repetition_penalty).

        Returns:
            Columns ``text``, ``n_tokens``, ``finish_reason`` ('stop' | 'length'), ``prompt_tokens``, in prompt order.
        """
        from vllm import SamplingParams

        params = [
            SamplingParams(n=1, seed=int(s), max_tokens=max_tokens, stop=list(stop), **sampling) for s in seeds
        ]
        outs = self._llm.generate(list(prompts), params, use_tqdm=False)
        self.calls += 1
        return {
            "text": [o.outputs[0].text for o in outs],
            "n_tokens": [len(o.outputs[0].token_ids) for o in outs],
            "finish_reason": [o.outputs[0].finish_reason or "stop" for o in outs],
            "prompt_tokens": [len(o.prompt_token_ids or ()) for o in outs],
        }

    def metrics(self) -> dict[str, float]:
        """vLLM's own counters (prefix-cache queries/hits, tokens), summed over the engine's lifetime."""
        out: dict[str, float] = {"calls": self.calls, "start_seconds": self.start_seconds}
        for m in self._llm.get_metrics():
            if hasattr(m, "value") and isinstance(m.value, (int, float)):
                out[m.name] = out.get(m.name, 0.0) + float(m.value)
        return out


def start_engines(
    model: str,
    *,
    replicas: int,
    num_cpus: float,
    num_gpus: float,
    engine_kwargs: dict[str, Any],
    env: dict[str, str] | None = None,
    resources: dict[str, float] | None = None,
    engine_cls: type = GenerationEngine,
) -> list:
    """Start ``replicas`` engine actors and wait until each has loaded its model.

    ``resources``: extra (custom) Ray resources each actor reserves besides ``num_cpus`` and ``num_gpus``.

    Returns:
        Actor handles. Each restarts after a crash (``max_restarts=-1``) and its calls are retried.
    """
    import ray

    remote = ray.remote(engine_cls).options(
        num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or {}, max_restarts=-1, max_task_retries=3
    )
    actors = [remote.remote(model, engine_kwargs=engine_kwargs, env=env) for _ in range(replicas)]
    ray.get([a.ready.remote() for a in actors])
    return actors


def stop_engines(actors: list) -> None:
    """Kill engine actors (frees their memory for the next stage)."""
    import ray

    for a in actors:
        ray.kill(a, no_restart=True)
