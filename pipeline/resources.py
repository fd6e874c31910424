"""What each stage of a run asks of the Ray cluster, computed from the config alone (``tgsft config show
--resources``): logical CPUs and GPUs per actor or worker and in total, and an estimate of training memory.

Pure: reads at most a local model folder's ``config.json``; imports neither Ray nor torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.compare import CONTROL_ID
from pipeline.config import ServeConfig, TGConfig
from pipeline.serve import required_cpus

__all__ = ["EMBEDDER_CPUS", "count_params", "local_param_count", "resources", "train_memory"]

EMBEDDER_CPUS = 1.0  # what the question-dedup embedder actor reserves (pipeline.levels.QuestionDedup)


def count_params(hf_config: dict[str, Any]) -> int | None:
    """Parameters of a Llama-style decoder from its ``config.json`` fields: embeddings (twice when untied),
    per layer q/k/v/o projections, a gated MLP (3 matrices) and two norms, and the final norm. Biases ignored.

    Returns:
        The count, or None when a needed field is missing.
    """
    try:
        h, layers, vocab = hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["vocab_size"]
        inter, heads = hf_config["intermediate_size"], hf_config["num_attention_heads"]
    except KeyError:
        return None
    head_dim = hf_config.get("head_dim") or h // heads
    kv = hf_config.get("num_key_value_heads") or heads
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    per_layer = attn + 3 * h * inter + 2 * h
    embed = vocab * h * (1 if hf_config.get("tie_word_embeddings", False) else 2)
    return embed + layers * per_layer + h


def local_param_count(source: str) -> int | None:
    """:func:`count_params` of a local model folder; None for a hub id, 'embedded' or an unreadable config."""
    path = Path(source).expanduser() / "config.json"
    if not source.startswith(("/", ".", "~")) or not path.is_file():
        return None
    try:
        return count_params(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def train_memory(cfg: TGConfig, params: int) -> dict[str, float]:
    """Estimated model-state bytes per training worker (activations, buffers and logits not included).

    Full fine-tuning with AdamW holds 16 B/param: 2 weights, 2 gradients, 12 optimizer state (4 fp32 master, 8
    Adam moments). ZeRO-1 splits the optimizer state over the workers, ZeRO-2 also the gradients, ZeRO-3 also the
    weights. ``offload_optimizer`` moves the optimizer state to host RAM, ``offload_param`` the weights. LoRA holds
    only the frozen base: 2 B/param (0.5 B in 4-bit); its adapters are negligible.

    Returns:
        ``{"device": bytes on the worker's GPU (or in RAM on CPU), "host": bytes offloaded to RAM}``.
    """
    t = cfg.train
    if t.lora is not None:
        return {"device": params * (0.5 if t.lora.load_in_4bit else 2.0), "host": 0.0}
    n = t.num_workers
    weights = 2.0 / (n if t.zero_stage >= 3 else 1)
    grads = 2.0 / (n if t.zero_stage >= 2 else 1)
    optim = 12.0 / (n if t.zero_stage >= 1 else 1)
    host = (optim if t.offload_optimizer else 0.0) + (weights if t.offload_param else 0.0)
    device = weights + grads + optim - host
    return {"device": params * device, "host": params * host}


def _stage(name: str, count: int, cpus: float, gpus: float, note: str = "",
           custom: dict[str, float] | None = None) -> dict[str, Any]:
    """One stage's row; ``custom``: the extra Ray resources each reserves, listed in the note."""
    extra = "".join(f"; + {amount:g} {res} each" for res, amount in sorted((custom or {}).items()))
    return {"stage": name, "count": count, "cpus_each": cpus, "gpus_each": gpus,
            "cpus": count * cpus, "gpus": count * gpus, "note": note + extra}


def _serve_models(cfg: TGConfig) -> int:
    """Models a run serves: base and tuned, and the domain-only control when ``run.control`` asks for it."""
    return 3 if cfg.run.control == CONTROL_ID else 2


def _serve_stage(cfg: TGConfig) -> dict[str, Any]:
    s: ServeConfig = cfg.serve
    n = _serve_models(cfg)
    row = _stage("serving", n, s.cpus_per_replica + s.server_cpus, s.gpus_per_replica,
                 f"{n} models; + {s.ingress_cpus:g} ingress CPU", s.resources)
    row["cpus"] = required_cpus(n, serve=s)
    return row


def resources(cfg: TGConfig, *, params: int | None = None) -> dict[str, Any]:
    """Per stage what it reserves from Ray; stages run one after another, so the peak is the largest stage.

    Args:
        cfg: the run's config.
        params: the model's parameter count; None reads it from a local model folder (see
            :func:`local_param_count`) and leaves the memory estimate unknown otherwise.

    Returns:
        ``{"stages": [{"stage", "count", "cpus_each", "gpus_each", "cpus", "gpus", "note"}, ...],
        "peak_cpus", "peak_gpus", "params", "train_memory": {"device", "host"} bytes per worker or None}``.
        Generation's engines and dedup embedder run together; their rows are summed in the peak.
    """
    e, t = cfg.engine, cfg.train
    params = params if params is not None else local_param_count(cfg.model.source)
    stages = [_stage("generation", e.replicas, e.cpus_per_replica, e.gpus_per_replica,
                     f"vLLM engines, TP={e.tensor_parallel_size}", e.resources)]
    if cfg.tree.dedup.enabled:
        stages.append(_stage("dedup embedder", 1, EMBEDDER_CPUS, 0.0, "runs beside the engines"))
    memory = train_memory(cfg, params) if params else None
    stages.append(_stage("training", t.num_workers, t.cpus_per_worker, 1.0 if t.use_gpu else 0.0,
                         f"ZeRO-{t.zero_stage}", t.resources_per_worker))
    stages.append(_serve_stage(cfg))
    gen = [s for s in stages if s["stage"] in ("generation", "dedup embedder")]
    rest = [s for s in stages if s not in gen]
    return {
        "stages": stages,
        "peak_cpus": max([sum(s["cpus"] for s in gen)] + [s["cpus"] for s in rest]),
        "peak_gpus": max([sum(s["gpus"] for s in gen)] + [s["gpus"] for s in rest]),
        "params": params,
        "train_memory": memory,
    }
