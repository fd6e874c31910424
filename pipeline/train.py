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
driver (pure Python, thousands of examples per second: enough for TG corpora of a CPU or single-node run), then
streamed from a Ray Dataset and split evenly over the workers (``ray.train.get_dataset_shard``), so every worker runs
the same number of steps. A run is named by a key of the settings that shape the stream and the optimizer state
(not ``max_steps``, ``epochs``, logging or checkpoint cadence; :mod:`pipeline.cachekey`), so re-running the same
command resumes from the latest checkpoint, and raising ``max_steps`` / ``epochs`` continues a finished run.
Resuming needs the same ``num_workers`` (DeepSpeed's ZeRO shards are per rank). The per-worker loop is
:mod:`actors.train_worker`; it reads only a :class:`pipeline.schedule.WorkerConfig`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import TGConfig, TrainConfig
from pipeline.console import follow_progress
from pipeline.corpus import atomic_write_text, read_json
from pipeline.schedule import WorkerConfig
from pipeline.tracking import Tracker

__all__ = ["TOKEN_SCHEMA", "deepspeed_config", "prepare_tokens", "train", "training_stream"]

TOKEN_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("n_examples", pa.int32()),
        ("n_truncated", pa.int32()),
        ("n_dropped", pa.int32()),
        ("n_tokens", pa.int32()),
        ("n_label_tokens", pa.int32()),
    ]
)
_COUNTERS = ("n_examples", "n_truncated", "n_dropped", "n_tokens", "n_label_tokens")
_CHUNK = 1024  # examples tokenized (and packed) together


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


def training_stream(mix: pa.Table, *, epochs: int, seed: int) -> pa.Table:
    """Every epoch of the mix in its epoch order (:func:`pipeline.mix.epoch_order`), one after the other."""
    from pipeline.mix import epoch_order

    parts = [mix.take(epoch_order(mix.num_rows, seed=seed, epoch=e)) for e in range(epochs)]
    return pa.concat_tables(parts).select(["messages", "text"])


def _count_tokens(tokenizer: Any) -> Callable[[list[dict] | None, str | None], int]:
    def count(messages: list[dict] | None, text: str | None) -> int:
        if messages:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False)
        return len(tokenizer(text or "", add_special_tokens=False)["input_ids"])

    return count


def _domain_files(cfg: TGConfig, log: Callable[[str], None]) -> list[str]:
    if cfg.data.train:
        return list(cfg.data.train)
    from pipeline.domain import build_domain

    train_file, _ = build_domain(cfg.run_dir / "domain")
    log(f"data.train is empty: using the built-in domain set {train_file}")
    return [str(train_file)]


def _check_lengths(domain: Any, tokenizer: Any, *, max_seq_len: int, bad_rows: str) -> None:
    """Treat domain rows with no assistant token within ``max_seq_len`` as bad rows (raise, or skip and count).

    Raises:
        DataError: the first such row (file, row, ``messages``) when ``bad_rows="error"``, or no row is left.
    """
    from pipeline.data import DataError
    from pipeline.tokenization import tokenize_chat

    bad = {}
    for i, messages in enumerate(domain.examples):
        if tokenize_chat(tokenizer, messages, max_seq_len=max_seq_len) is None:
            n = len(tokenize_chat(tokenizer, messages, max_seq_len=1 << 30).input_ids)
            err = domain.row_error(i, "messages", f"{n} tokens, and none of the assistant's within "
                                   f"train.max_seq_len={max_seq_len}: nothing to train on (raise train.max_seq_len "
                                   "or shorten the prompt)")
            if bad_rows != "skip":
                raise err
            bad[i] = err
    if bad:
        domain.drop(bad)
        if not domain.examples:
            raise DataError(", ".join(domain.files), f"no row fits train.max_seq_len={max_seq_len}")


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


def _tokenize(stream: pa.Table, *, tokenizer: Any, tc: TrainConfig) -> tuple[pa.Table, dict[str, int]]:
    """Token rows of the stream, in order (packs never cross chunks of ``_CHUNK`` examples), and their counts."""
    from pipeline.tokenization import tokenize_batch

    parts = []
    for start in range(0, stream.num_rows, _CHUNK):
        chunk = stream.slice(start, _CHUNK).to_pydict()
        out = tokenize_batch(tokenizer, chunk, max_seq_len=tc.max_seq_len, packing=tc.packing)
        parts.append(pa.table(out, schema=TOKEN_SCHEMA))
    table = pa.concat_tables(parts)
    counts = {name: int(pc.sum(table.column(name)).as_py() or 0) for name in _COUNTERS}
    return table, {"rows": table.num_rows, **counts}


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


@dataclass
class Prepared:
    """The training stream, ready for the workers: token rows and what was counted on the way."""

    model_path: str
    tokens: pa.Table  # TOKEN_SCHEMA rows in stream order
    pad_id: int
    total_steps: int
    data_stats: dict[str, Any]
    mix_stats: dict[str, Any]
    tok_stats: dict[str, int]


def prepare_tokens(cfg: TGConfig, *, corpus_dir: Path | None, out_dir: Path,
                   log: Callable[[str], None] = print) -> Prepared:
    """Load the domain data and the TG corpus, build and write the mix, tokenize (and pack) every epoch of it.

    Raises:
        ValueError: bad data (:class:`pipeline.data.DataError`) or a mix too small for one optimizer step.
        FileNotFoundError: a data file or the TG corpus is missing.
    """
    from transformers import AutoTokenizer

    from pipeline.data import load_examples
    from pipeline.mix import build_mix, load_tg, write_mix
    from pipeline.model import resolve_model

    tc = cfg.train
    model_path = resolve_model(cfg.model, log=log)
    domain = load_examples(_domain_files(cfg, log), fmt=cfg.data.format, bad_rows=cfg.data.bad_rows,
                           max_examples=cfg.data.max_examples)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    _check_lengths(domain, tokenizer, max_seq_len=tc.max_seq_len, bad_rows=cfg.data.bad_rows)
    if domain.skipped:
        log(f"data: skipped {domain.skipped} bad row(s); first: {domain.problems[0]}")
    tg, tg_stats = None, {}
    if cfg.mix.tg_ratio > 0:
        corpus = Path(corpus_dir or cfg.mix.tg_corpus or cfg.run_dir / "corpus")
        tg, tg_stats = load_tg(corpus, retention_dialogues=cfg.eval.retention_dialogues)
    mix, mix_stats = build_mix(domain.examples, tg, tg_ratio=cfg.mix.tg_ratio, by=cfg.mix.by, seed=cfg.mix.seed,
                               count_tokens=_count_tokens(tokenizer))
    mix_stats.update(tg_stats)
    write_mix(mix, mix_stats, out_dir / "mix")
    log(f"mix: {mix_stats['domain_examples']} domain + {mix_stats['tg_examples']} TG rows "
        f"(TG share {mix_stats['tg_share_examples']:.2f} of examples) -> {out_dir / 'mix'}")

    t1 = time.monotonic()
    stream = training_stream(mix, epochs=tc.epochs, seed=cfg.mix.seed)
    tokens, tok_stats = _tokenize(stream, tokenizer=tokenizer, tc=tc)
    per_step = tc.num_workers * tc.micro_batch_size * tc.grad_accum
    total_steps = tok_stats["rows"] // per_step
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    if total_steps < 1:
        raise ValueError(f"{tok_stats['rows']} training rows are fewer than one optimizer step needs ({per_step} = "
                         "num_workers x micro_batch_size x grad_accum); add data or epochs, or shrink the batch")
    log(f"tokens: {tok_stats['rows']} rows, {tok_stats['n_tokens']} tokens ({tok_stats['n_truncated']} examples "
        f"truncated to {tc.max_seq_len}, {tok_stats['n_dropped']} dropped with no assistant token left); "
        f"{total_steps} steps of {per_step} rows ({time.monotonic() - t1:.1f} s)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Prepared(model_path=model_path, tokens=tokens, pad_id=pad_id, total_steps=total_steps,
                    data_stats=domain.stats(), mix_stats=mix_stats, tok_stats=tok_stats)


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
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
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
