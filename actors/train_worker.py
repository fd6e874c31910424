"""The Ray Train per-worker SFT loop: DeepSpeed ZeRO on one worker's dataset shard.

:func:`train_loop_per_worker` is what ``pipeline.train`` hands to ``TorchTrainer``. It builds the model and the
DeepSpeed engine once (reusing Ray's process group: gloo on CPU, NCCL on GPU), resumes from
``ray.train.get_checkpoint()`` when there is one (weights, optimizer and LR-scheduler state, step counter), streams
micro-batches from ``ray.train.get_dataset_shard("train")``, and reports checkpoints every ``checkpoint_every``
steps. The final checkpoint also carries the Hugging Face export under ``hf/`` (ZeRO-3 weights are gathered from
every rank first). Tokenization, collation and the LR schedule come from ``pipeline``; torch, DeepSpeed and
transformers are imported inside the loop.

Checkpoint layout (every rank writes its own files into its own temporary directory; Ray Train merges them)::

    ds/                  DeepSpeed checkpoint (tag "ds"): module states, per-rank ZeRO optimizer partitions
    state.json           step, loss history, tokens (rank 0)
    hf/                  final checkpoint only: the exported model folder (rank 0)
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["train_loop_per_worker"]

_TAG = "ds"


def _optimizer_step_count(engine: Any) -> int:
    """Adam's own step counter (from the optimizer state), 0 when the state is empty."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    for state in inner.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _export(engine: Any, out: Path, *, model_path: str, dtype_name: str, zero_stage: int, rank: int) -> None:
    """Write the full model as a Hugging Face folder on rank 0 (a collective call under ZeRO-3)."""
    import shutil

    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers layer by layer; full dict on rank 0 only
    else:
        state = engine.module.state_dict() if rank == 0 else None  # ZeRO-0/1/2 keep full weights on every rank
    if rank == 0:
        dtype = getattr(torch, dtype_name)
        # Tied weights (embeddings / LM head) share one tensor: keep its first name only; loaders re-tie it.
        seen: set[int] = set()
        shared = [k for k, v in state.items() if v.data_ptr() in seen or seen.add(v.data_ptr())]
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items() if k not in shared}
        module = engine.module
        module.config.dtype = dtype
        module.config.use_cache = True
        module.save_pretrained(out, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(out)  # tokenizer + chat template
        gen = Path(model_path) / "generation_config.json"
        if gen.is_file():
            shutil.copy(gen, out / "generation_config.json")
    dist.barrier()


def _save(engine: Any, *, step: int, state: dict[str, Any], metrics: dict[str, Any], export: dict | None,
          rank: int) -> None:
    """Save a DeepSpeed checkpoint (+ the export) and report it to Ray Train from every rank."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="tgsft-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=_TAG, client_state={"tgsft": state})
        if rank == 0:
            (Path(tmp) / "state.json").write_text(json.dumps(state))
        if export is not None:
            _export(engine, Path(tmp) / "hf", rank=rank, **export)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train on this worker's shard until ``total_steps`` optimizer steps; checkpoint, export, report.

    Args:
        config: ``model_path``, ``ds_config``, ``total_steps``, ``warmup_steps``, ``schedule``, ``packing``,
            ``pad_id``, ``checkpoint_every``, ``log_every``, ``gradient_checkpointing``, ``autocast_bf16``,
            ``use_gpu``, ``export_dtype``, ``seed`` (built by ``pipeline.train.train``).
    """
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import AutoModelForCausalLM

    from pipeline.tokenization import collate
    from pipeline.train import lr_multiplier

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    ds_config = config["ds_config"]
    zero_stage = ds_config["zero_optimization"]["stage"]
    total = config["total_steps"]
    torch.manual_seed(config["seed"])
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if config["use_gpu"] else torch.device("cpu")

    # Let DeepSpeed wrap Ray's process group now: HfDeepSpeedConfig (below) needs the world size.
    deepspeed.init_distributed(dist_backend="nccl" if config["use_gpu"] else "gloo", dist_init_required=False)
    hf_ds = None
    if zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive: from_pretrained loads weights partitioned)
    # sdpa: the 4-D block-diagonal packing mask is passed to it unchanged (see pipeline.tokenization).
    model = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    schedule = partial(lr_multiplier, total_steps=total, warmup_steps=config["warmup_steps"],
                       schedule=config["schedule"])
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
    )

    # ---- resume
    state: dict[str, Any] = {"step": 0, "tokens": 0, "losses": []}
    resumed_from, opt_step_at_resume = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            path, client = engine.load_checkpoint(d, tag=_TAG)
        if path is None:
            raise RuntimeError(f"could not load the DeepSpeed checkpoint in {checkpoint.path}")
        state = client["tgsft"]
        resumed_from, opt_step_at_resume = engine.global_steps, _optimizer_step_count(engine)
        if rank == 0:
            print(f"resumed from step {resumed_from} (optimizer step {opt_step_at_resume})", flush=True)

    # ---- loop
    shard = ray.train.get_dataset_shard("train")
    grad_accum = ds_config["gradient_accumulation_steps"]
    batches = shard.iter_batches(batch_size=ds_config["train_micro_batch_size_per_gpu"], batch_format="numpy",
                                 drop_last=True)
    skip = engine.global_steps * grad_accum  # micro-batches consumed before the checkpoint
    # Loss sum, micro-batches, tokens of the current optimizer step on this rank.
    step_acc = torch.zeros(3, dtype=torch.float64, device=device)
    run_tokens, t0 = 0, time.monotonic()
    t_log, tok_log = t0, 0
    for i, batch in enumerate(batches):
        if engine.global_steps >= total:
            break
        if i < skip:
            continue
        arrays = collate(batch, pad_id=config["pad_id"], packed=config["packing"])
        inputs = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config["autocast_bf16"]):
            loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
        step_acc += torch.tensor([loss.item(), 1.0, float(sum(len(r) for r in batch["input_ids"]))],
                                 dtype=torch.float64, device=device)
        if engine.global_steps == state["step"]:
            continue  # still accumulating gradients
        # An optimizer step finished: average the loss over ranks and micro-batches.
        dist.all_reduce(step_acc)
        step = engine.global_steps
        loss_avg, tokens = step_acc[0].item() / step_acc[1].item(), int(step_acc[2].item())
        step_acc.zero_()
        state["step"], state["tokens"] = step, state["tokens"] + tokens
        state["losses"].append(round(loss_avg, 5))
        run_tokens += tokens
        tok_log += tokens
        if rank == 0 and (step % config["log_every"] == 0 or step == total):
            now = time.monotonic()
            print(f"step {step}/{total} loss {loss_avg:.4f} lr {engine.get_lr()[0]:.2e} "
                  f"tokens/s {tok_log / max(now - t_log, 1e-9):.0f}", flush=True)
            t_log, tok_log = now, 0
        final = step >= total
        if final or (config["checkpoint_every"] and step % config["checkpoint_every"] == 0):
            seconds = time.monotonic() - t0
            peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], dtype=torch.float64)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # ru_maxrss is in KiB on Linux
            metrics = {
                "step": step,
                "loss": loss_avg,
                "steps": step,
                "tokens": state["tokens"],
                "tokens_per_s": run_tokens / max(seconds, 1e-9),
                "train_seconds": seconds,
                "initial_loss": state["losses"][0],
                "final_loss": loss_avg,
                "losses": state["losses"],
                "resumed_from_step": resumed_from,
                "optimizer_step_at_resume": opt_step_at_resume,
                "peak_rss_gib": round(peak.item(), 3),  # the largest worker process's peak resident memory
            }
            export = None
            if final:
                export = {"model_path": config["model_path"], "dtype_name": config["export_dtype"],
                          "zero_stage": zero_stage}
            _save(engine, step=step, state=state, metrics=metrics, export=export, rank=rank)
    if engine.global_steps < total:
        raise RuntimeError(f"the data shard ran out after {engine.global_steps} of {total} steps")
