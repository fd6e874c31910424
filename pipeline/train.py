"""The SFT stage driver: domain data + TG corpus -> mix -> tokens -> Ray Train + DeepSpeed -> a Hugging Face folder.

    tgsft train configs/local.yaml      # -> <run>/train/model, <run>/train/manifest.json

Reads ``data.train`` files (or the built-in domain set, :func:`pipeline.domain.build_domain`) and the TG corpus
(``<corpus>/dialogues/part-*.parquet``, minus the retention probe's held-out slice). Writes, under ``out_dir``
(default ``<run>/train``):

- ``mix/part-*.parquet`` + ``mix/manifest.json``: the exact mix (:mod:`pipeline.mix`);
- ``sft-<hash>/checkpoint_*``: Ray Train checkpoints (DeepSpeed state under ``ds/``; the last one also holds the
  export under ``hf/``) in ``train.storage_path`` (default ``out_dir``; a local directory or a cloud URI);
- ``model/``: the exported Hugging Face folder (safetensors, config, tokenizer, chat template), copied from the
  final checkpoint and renamed into place last; for a LoRA run (``train.lora``) the base with the adapter merged in;
- ``adapter/``: a LoRA run's adapter in PEFT format (``adapter_config.json``, ``adapter_model.safetensors``);
- ``manifest.json``: steps, tokens, real tokens/s (``tokens_per_s`` with the first step, ``steady_tokens_per_s``
  after it), ``mfu`` (matmul FLOPs per token, 6 per trained and 4 per frozen weight, times tokens/s, over the
  matmul peak measured in the worker), the precision chosen and why (``precision: auto`` measures bf16 against fp32
  on the worker's CPU), losses, mix and data statistics, the config hash, and for a LoRA run ``lora`` (settings,
  trainable parameters, adapter bytes).

The training stream is every epoch of the mix in its epoch order (``seed + epoch``), tokenized (and packed) on the
driver (:mod:`pipeline.prepare`; pure Python, thousands of examples per second: enough for TG corpora of a CPU or
single-node run), then streamed from a Ray Dataset and split evenly over the workers
(``ray.train.get_dataset_shard``), so every worker runs the same number of steps. A run is named by a key of the
settings that shape the stream and the optimizer state (not ``max_steps``, ``epochs``, logging or checkpoint
cadence; :mod:`pipeline.cachekey`), so re-running the same command resumes from the latest checkpoint, and raising
``max_steps`` / ``epochs`` continues a finished run. Resuming needs the same ``num_workers`` (DeepSpeed's ZeRO
shards are per rank). The per-worker loop is :mod:`actors.train_worker`; it reads only a
:class:`pipeline.schedule.WorkerConfig`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from pipeline.config import TGConfig, TrainConfig
from pipeline.console import follow_progress
from pipeline.corpus import atomic_write_text, read_json
from pipeline.prepare import TOKEN_SCHEMA, Prepared, prepare_tokens, training_stream
from pipeline.schedule import WorkerConfig
from pipeline.tracking import Tracker

__all__ = ["TOKEN_SCHEMA", "deepspeed_config", "prepare_tokens", "train", "training_stream"]


def deepspeed_config(tc: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config for a :class:`TrainConfig` (ZeRO stage, offload, precision, batch sizes, clipping).

    On CPU, bf16 means fp32 weights with bf16 autocast in the worker (DeepSpeed's bf16 mode needs an accelerator),
    and ``auto`` is settled in the worker by measurement; the optimizer is ``torch.optim.AdamW`` (``torch_adam``):
    the fused Adam kernel is CUDA-only. On GPUs ``auto`` means bf16 (set ``fp16`` on GPUs without bf16). Invalid
    combinations (fp16 on CPU, parameter offload below ZeRO-3) are rejected when the config is loaded.
    """
    zero: dict[str, Any] = {
        "stage": tc.zero_stage,
        "reduce_bucket_size": tc.bucket_size,
        "allgather_bucket_size": tc.bucket_size,
    }
    if tc.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = tc.bucket_size
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if tc.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    adam: dict[str, Any] = {"lr": tc.lr, "weight_decay": tc.weight_decay, "betas": [0.9, 0.95], "eps": 1e-8}
    if not tc.use_gpu:
        adam["torch_adam"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * tc.num_workers,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "gradient_clipping": tc.grad_clip,
        "steps_per_print": 1_000_000_000,  # progress lines come from the worker loop
        "wall_clock_breakdown": False,
    }
    if tc.use_gpu and tc.precision in ("bf16", "auto"):
        cfg["bf16"] = {"enabled": True}
    elif tc.precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    return cfg


def _keys(cfg: TGConfig, *, model_path: str, corpus_dir: Path | None) -> tuple[str, str]:
    """(run key, full key). The run key names the checkpoint directory and leaves out ``max_steps`` and ``epochs``
    (raising them continues a run); the full key decides whether a finished export is reused. Both include the TG
    corpus's own key, so a regenerated corpus trains anew."""
    from pipeline.cachekey import stage_key

    corpus_key = None
    if cfg.mix.tg_ratio > 0:
        corpus = Path(corpus_dir or cfg.mix.tg_corpus or cfg.run_dir / "corpus")
        corpus_key = (read_json(corpus / "manifest.json") or {}).get("config_hash")
    what = ("model.source", "model.dtype", "model.trust_remote_code", "data", "mix", "train",
            "eval.retention_dialogues")
    run_key = stage_key(cfg, *what, exclude={"train.max_steps", "train.epochs"}, model_path=model_path,
                        corpus=corpus_key)
    return run_key, stage_key(cfg, *what, model_path=model_path, corpus=corpus_key)


def _storage(tc: TrainConfig, out_dir: Path) -> str:
    path = tc.storage_path or str(out_dir)
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _place(src: Path, dst: Path) -> None:
    """Copy the folder ``src`` to ``dst`` through a temporary sibling and a rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_export(checkpoint: Any, model_dir: Path, adapter_dir: Path) -> None:
    """Copy ``hf/`` of the final checkpoint to ``model_dir`` and, for a LoRA run, ``adapter/`` to ``adapter_dir``
    (an adapter left by an earlier LoRA run is removed otherwise)."""
    with checkpoint.as_directory() as d:
        src = Path(d) / "hf"
        if not (src / "config.json").is_file():
            raise RuntimeError(f"the final checkpoint {checkpoint.path} holds no exported model (hf/)")
        if (Path(d) / "adapter" / "adapter_config.json").is_file():
            _place(Path(d) / "adapter", adapter_dir)
        elif adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        _place(src, model_dir)


def _lora_stats(tc: TrainConfig, *, adapter_dir: Path, model_dir: Path) -> dict[str, Any]:
    """What the train manifest records of a LoRA run: its settings, trainable parameters and adapter size on disk
    (bytes, and as a share of the merged model's weight files)."""
    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", framework="numpy") as f:
        trainable = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    adapter_bytes = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return {**tc.lora.model_dump(mode="json"), "trainable_params": trainable, "adapter": str(adapter_dir),
            "adapter_bytes": adapter_bytes, "model_bytes": model_bytes,
            "adapter_share": round(adapter_bytes / model_bytes, 5)}


def worker_config(cfg: TGConfig, prep: Prepared) -> WorkerConfig:
    """The typed settings of the per-worker loop."""
    tc = cfg.train
    return WorkerConfig(
        model_path=prep.model_path, ds_config=deepspeed_config(tc), total_steps=prep.total_steps,
        warmup_steps=int(round(tc.warmup_ratio * prep.total_steps)), schedule=tc.schedule, packing=tc.packing,
        pad_id=prep.pad_id, precision=tc.precision, threads=0 if tc.use_gpu else max(1, int(tc.cpus_per_worker)),
        use_gpu=tc.use_gpu, gradient_checkpointing=tc.gradient_checkpointing, checkpoint_every=tc.checkpoint_every,
        log_every=tc.log_every, export_dtype="bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype,
        seed=tc.seed, lora=tc.lora.model_dump() if tc.lora else None,
    )


def _fit(cfg: TGConfig, prep: Prepared, *, storage: str, run_name: str, monitor: dict[str, Any]) -> Any:
    """Run the Ray Train + DeepSpeed job over the token rows; returns Ray Train's result. ``monitor``: the
    tracking and progress fields of the :class:`WorkerConfig`."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from actors.train_worker import train_loop_per_worker
    from pipeline.runtime import init_ray

    tc = cfg.train
    ray = init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard_host=cfg.ray.dashboard_host)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    # Ray Train both prints and logs a worker's print() (every progress line twice on the driver); print only.
    # The variable travels from the driver to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(cfg, prep).as_dict() | monitor,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker, **tc.resources_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ray.data.from_arrow(prep.tokens)},
        dataset_config=DataConfig(execution_options=ingest),
    )
    return trainer.fit()


_METRICS = ("steps", "tokens", "tokens_per_s", "steady_tokens_per_s", "mfu", "peak_matmul_tflops", "precision",
            "precision_reason", "n_params", "world_size", "threads", "initial_loss", "final_loss", "losses",
            "resumed_from_step", "optimizer_step_at_resume", "train_seconds", "peak_rss_gib")


def train(
    cfg: TGConfig, *, corpus_dir: Path | None = None, out_dir: Path | None = None, log: Callable[[str], None] = print,
    tracker: Tracker | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Mix, tokenize and fine-tune with Ray Train + DeepSpeed; export a Hugging Face folder.

    Args:
        cfg: the run config (sections data, mix, train, model, eval.retention_dialogues, ray).
        corpus_dir: TG corpus directory; default ``mix.tg_corpus`` or ``<run>/corpus`` (unused when tg_ratio=0).
        out_dir: output directory; default ``<run>/train``.
        log: where progress lines go.
        tracker: rank 0 logs loss, lr, tokens/s and MFU of every progress step (``train.log_every``) to its run.
        on_step: called on the driver with each progress step's record (step, total_steps, loss, lr, tokens_per_s,
            mfu), which rank 0 appends to ``<out_dir>/progress.jsonl``.

    Returns:
        The exported model folder (``<out_dir>/model``); an existing export made with the same config is reused.

    Raises:
        ValueError: bad data (:class:`pipeline.data.DataError`) or a mix too small for one optimizer step.
        FileNotFoundError: a data file or the TG corpus is missing.
    """
    from pipeline.model import resolve_model

    tc = cfg.train
    out_dir = Path(out_dir or cfg.run_dir / "train")
    model_dir = out_dir / "model"
    model_path = resolve_model(cfg.model, log=log)
    run_hash, full_hash = _keys(cfg, model_path=model_path, corpus_dir=corpus_dir)
    done = read_json(out_dir / "manifest.json")
    if done and (model_dir / "config.json").is_file():
        if done.get("config_hash") == full_hash:
            log(f"train: reusing the finished export {model_dir} (config {full_hash}, {done['steps']} steps)")
            return model_dir
        log(f"train: {model_dir} was made with another config; training again (it is replaced at the end)")

    prep = prepare_tokens(cfg, corpus_dir=corpus_dir, out_dir=out_dir, log=log)
    storage, run_name = _storage(tc, out_dir), f"sft-{run_hash}"
    lora = f", LoRA r={tc.lora.r} alpha={tc.lora.alpha:g}" if tc.lora else ""
    log(f"train: {tc.num_workers} worker(s) x {tc.cpus_per_worker:g} CPU(s), ZeRO-{tc.zero_stage}, precision "
        f"{tc.precision}{lora}, checkpoints in {storage}/{run_name}")
    progress = out_dir / "progress.jsonl"
    monitor = {**(tracker.worker_fields() if tracker else {}), "progress_file": str(progress) if on_step else None}
    with follow_progress(progress, on_step) if on_step else nullcontext():
        result = _fit(cfg, prep, storage=storage, run_name=run_name, monitor=monitor)
    metrics = dict(result.metrics or {})
    adapter_dir = out_dir / "adapter"
    _copy_export(result.checkpoint, model_dir, adapter_dir)

    manifest = {
        "config_hash": full_hash,
        "run_hash": run_hash,
        "model_source": prep.model_path,
        "model": str(model_dir),
        "checkpoints": f"{storage}/{run_name}",
        **{k: metrics[k] for k in _METRICS if k in metrics},
        "total_steps": prep.total_steps,
        "data": prep.data_stats,
        "mix": prep.mix_stats,
        "tokenization": prep.tok_stats,
        "train": tc.model_dump(mode="json"),
        "lora": _lora_stats(tc, adapter_dir=adapter_dir, model_dir=model_dir) if tc.lora else None,
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    mfu = f", MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""
    log(f"train: done, {metrics.get('steps')} steps, final loss {metrics.get('final_loss', float('nan')):.4f}, "
        f"{metrics.get('steady_tokens_per_s', 0):.0f} tokens/s ({metrics.get('precision')}{mfu}) -> {model_dir}")
    return model_dir
