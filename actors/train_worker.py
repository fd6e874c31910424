"""The Ray Train per-worker SFT loop: DeepSpeed ZeRO on one worker's dataset shard.

:func:`train_loop_per_worker` is what ``pipeline.train`` hands to ``TorchTrainer``, with a
:class:`pipeline.schedule.WorkerConfig` as plain data. It builds the model and the DeepSpeed engine once (reusing
Ray's process group: gloo on CPU, NCCL on GPU), settles ``precision: auto`` by measuring on rank 0, resumes from
``ray.train.get_checkpoint()`` when there is one (weights, optimizer and LR-scheduler state, step counter), streams
micro-batches from ``ray.train.get_dataset_shard("train")``, and reports checkpoints every ``checkpoint_every``
steps. The final checkpoint also carries the Hugging Face export under ``hf/`` (ZeRO-3 weights are gathered from
every rank first). torch, DeepSpeed and transformers are imported inside the functions.

Checkpoint layout (every rank writes its own files into its own temporary directory; Ray Train merges them)::

    ds/                  DeepSpeed checkpoint (tag "ds"): module states, per-rank ZeRO optimizer partitions
    state.json           step, loss history, tokens (rank 0)
    hf/                  final checkpoint only: the exported model folder (rank 0); merged base + adapter for LoRA
    adapter/             final checkpoint of a LoRA run only: the adapter in PEFT format (rank 0)
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.console import append_progress
from pipeline.schedule import WorkerConfig, lr_multiplier
from pipeline.tracking import Tracker

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


def _choose_precision(wc: WorkerConfig, rank: int) -> dict[str, Any]:
    """The precision every rank uses: the configured one, or rank 0's measurement for 'auto' (broadcast), plus the
    measured matmul peak of that precision (for MFU)."""
    import torch.distributed as dist

    from pipeline.hardware import choose_precision, matmul_tflops

    if wc.use_gpu:  # DeepSpeed's config holds the GPU precision (pipeline.train.deepspeed_config)
        mode = next((m for m in ("bf16", "fp16") if wc.ds_config.get(m, {}).get("enabled")), "fp32")
        return {"precision": mode, "reason": "the DeepSpeed config (GPU)"}
    choice = [None]
    if rank == 0:
        if wc.precision == "auto":
            choice[0] = choose_precision()
        else:
            choice[0] = {"precision": wc.precision, "reason": "set in the config"}
        # The peak larger matmuls reach at this worker's threads, for MFU.
        choice[0]["peak_tflops"] = round(max(matmul_tflops(choice[0]["precision"], size=n, min_seconds=0.5)
                                             for n in (1024, 2048, 1024, 2048)), 4)
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def _with_lora(model: Any, lora: dict[str, Any], *, gradient_checkpointing: bool) -> Any:
    """``model`` with LoRA adapters on ``lora["target_modules"]`` (PEFT); only the adapters keep requires_grad."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora["load_in_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["target_modules"]), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _build(wc: WorkerConfig) -> Any:
    """The model (with LoRA adapters for a LoRA run) wrapped in a DeepSpeed engine, with the LR schedule."""
    import deepspeed
    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import AutoModelForCausalLM

    hf_ds = None
    if wc.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(wc.ds_config)  # noqa: F841  (kept alive: from_pretrained loads weights partitioned)
    load: dict[str, Any] = {}
    if wc.lora and wc.lora["load_in_4bit"]:  # QLoRA, CUDA only (checked when the config is loaded)
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype=torch.bfloat16)
    # sdpa: the 4-D block-diagonal packing mask is passed to it unchanged (see pipeline.tokenization); the PEFT
    # wrapper forwards it as it is.
    model = AutoModelForCausalLM.from_pretrained(wc.model_path, dtype=torch.float32, attn_implementation="sdpa",
                                                 **load)
    if wc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if wc.lora:
        model = _with_lora(model, wc.lora, gradient_checkpointing=wc.gradient_checkpointing)
    schedule = partial(lr_multiplier, total_steps=wc.total_steps, warmup_steps=wc.warmup_steps,
                       schedule=wc.schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=wc.ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
    )
    return engine


def _merge_lora(peft_model: Any, state: dict[str, Any], *, model_path: str, adapter_dir: Path, dtype: Any) -> Any:
    """Save the trained adapter in PEFT format (``adapter_config.json``, ``adapter_model.safetensors`` in ``dtype``)
    and return it merged into a fresh CPU copy of the base (the frozen base weights never changed, so the copy is
    loaded from ``model_path``; this also holds when training used a 4-bit base)."""
    import copy

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = {k: v.detach().to("cpu", torch.float32) for k, v in state.items() if "lora_" in k}
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cpu = get_peft_model(base, copy.deepcopy(peft_model.peft_config["default"]))
    loaded = cpu.load_state_dict(adapter, strict=False)
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if loaded.unexpected_keys or missing or not adapter:
        raise RuntimeError(f"LoRA export: {len(adapter)} adapter tensors; unexpected {loaded.unexpected_keys[:3]}, "
                           f"missing {missing[:3]}")
    cpu.save_pretrained(adapter_dir, state_dict={k: v.to(dtype) for k, v in adapter.items()},
                        safe_serialization=True)
    return cpu.merge_and_unload()


def _export(engine: Any, out: Path, *, model_path: str, dtype_name: str, zero_stage: int, rank: int) -> None:
    """Write the full model as a Hugging Face folder ``out/hf`` on rank 0 (a collective call under ZeRO-3). A LoRA
    run also writes its adapter to ``out/adapter``, and ``hf`` holds the base with the adapter merged in."""
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
        module = engine.module
        if hasattr(module, "peft_config"):  # a LoRA run (PEFT wrapper)
            module = _merge_lora(module, state, model_path=model_path, adapter_dir=out / "adapter", dtype=dtype)
            state = module.state_dict()
        # Tied weights (embeddings / LM head) share one tensor: keep its first name only; loaders re-tie it.
        seen: set[int] = set()
        shared = [k for k, v in state.items() if v.data_ptr() in seen or seen.add(v.data_ptr())]
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items() if k not in shared}
        module.config.dtype = dtype
        module.config.use_cache = True
        hf = out / "hf"
        module.save_pretrained(hf, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(hf)  # tokenizer + chat template
        gen = Path(model_path) / "generation_config.json"
        if gen.is_file():
            shutil.copy(gen, hf / "generation_config.json")
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
            _export(engine, Path(tmp), rank=rank, **export)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")


def _resume(engine: Any, rank: int) -> tuple[dict[str, Any], int, int]:
    """(loop state, step resumed from, Adam's step counter then) from Ray Train's checkpoint, if there is one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return {"step": 0, "tokens": 0, "losses": []}, 0, 0
    with checkpoint.as_directory() as d:
        path, client = engine.load_checkpoint(d, tag=_TAG)
    if path is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {checkpoint.path}")
    resumed_from, opt_step = engine.global_steps, _optimizer_step_count(engine)
    if rank == 0:
        print(f"resumed from step {resumed_from} (optimizer step {opt_step})", flush=True)
    return client["tgsft"], resumed_from, opt_step


def _peak_rss_gib() -> float:
    """The largest worker process's peak resident memory, in GiB (a collective call)."""
    import torch
    import torch.distributed as dist

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # ru_maxrss is in KiB on Linux
    return round(peak.item(), 3)


class _Meter:
    """Real tokens and time of this attempt: overall, and after its first optimizer step (warm-up excluded)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.tokens = 0
        self.steady_t0: float | None = None
        self.steady_tokens = 0

    def step(self, tokens: int) -> float:
        now = time.monotonic()
        self.tokens += tokens
        if self.steady_t0 is None:
            self.steady_t0 = now
        else:
            self.steady_tokens += tokens
        return now

    def rates(self, now: float) -> dict[str, float]:
        seconds = now - self.t0
        overall = self.tokens / max(seconds, 1e-9)
        steady = self.steady_tokens / (now - self.steady_t0) if self.steady_tokens else overall
        return {"tokens_per_s": overall, "steady_tokens_per_s": steady, "train_seconds": seconds}


def _flops_per_token(module: Any) -> float:
    """Matmul FLOPs per trained token: 6 per trained weight (forward, input and weight gradients), 4 per frozen one
    (a frozen LoRA base needs no weight gradient)."""
    trained = frozen = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        trained, frozen = (trained + n, frozen) if p.requires_grad else (trained, frozen + n)
    return 6.0 * trained + 4.0 * frozen


def _mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the matmul FLOPs trained per second over the measured peak (attention not counted)."""
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


def _metrics(state: dict[str, Any], *, loss: float, meter: _Meter, now: float, chosen: dict[str, Any],
             n_params: int, flops_per_token: float, resumed: tuple[int, int], world: int) -> dict[str, Any]:
    """What a checkpoint reports to Ray Train (and the driver writes to the train manifest)."""
    import torch

    rates = meter.rates(now)
    out = {
        "step": state["step"], "loss": loss, "steps": state["step"], "tokens": state["tokens"], **rates,
        "initial_loss": state["losses"][0], "final_loss": loss, "losses": state["losses"],
        "resumed_from_step": resumed[0], "optimizer_step_at_resume": resumed[1], "peak_rss_gib": _peak_rss_gib(),
        "precision": chosen["precision"], "precision_reason": chosen["reason"], "n_params": n_params,
        "world_size": world, "threads": torch.get_num_threads(),
    }
    if "peak_tflops" in chosen:
        out["peak_matmul_tflops"] = chosen["peak_tflops"] * world
        out["mfu"] = round(_mfu(flops_per_token, rates["steady_tokens_per_s"], out["peak_matmul_tflops"]), 4)
    return out


def _log_progress(wc: WorkerConfig, tracker: Tracker, *, step: int, loss: float, lr: float, rate: float,
                  chosen: dict[str, Any], flops_per_token: float, world: int) -> None:
    """Rank 0's progress line, tracked metrics and progress record of one logging interval (``rate``: its
    tokens/s)."""
    print(f"step {step}/{wc.total_steps} loss {loss:.4f} lr {lr:.2e} tokens/s {rate:.0f}", flush=True)
    record = {"step": step, "total_steps": wc.total_steps, "loss": loss, "lr": lr, "tokens_per_s": rate}
    if "peak_tflops" in chosen:  # as in _metrics, over this logging interval
        record["mfu"] = _mfu(flops_per_token, rate, chosen["peak_tflops"] * world)
    tracker.metrics({k: v for k, v in record.items() if k not in ("step", "total_steps")}, step=step)
    if wc.progress_file:
        append_progress(wc.progress_file, record)


def _init_distributed(wc: WorkerConfig, rank: int) -> None:
    """Load DeepSpeed's JIT ops where a stale build lock cannot hang (``actors.ds_ops``), then let DeepSpeed wrap
    Ray's process group now: HfDeepSpeedConfig (ZeRO-3) needs the world size."""
    import deepspeed

    from actors.ds_ops import preload_ops

    preload_ops(wc.ds_config, log=lambda msg: print(f"rank {rank}: {msg}", flush=True))
    deepspeed.init_distributed(dist_backend="nccl" if wc.use_gpu else "gloo", dist_init_required=False)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train on this worker's shard until ``total_steps`` optimizer steps; checkpoint, export, report.

    Args:
        config: a :class:`pipeline.schedule.WorkerConfig` as a dict (``WorkerConfig.as_dict``).
    """
    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.tokenization import collate

    wc = WorkerConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if wc.threads and not wc.use_gpu:
        torch.set_num_threads(wc.threads)
    torch.manual_seed(wc.seed)
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if wc.use_gpu else torch.device("cpu")
    _init_distributed(wc, rank)
    chosen = _choose_precision(wc, rank)
    autocast = chosen["precision"] == "bf16" and not wc.use_gpu  # CPU: fp32 weights, bf16 matmuls
    if rank == 0:
        print(f"precision {chosen['precision']}: {chosen['reason']}", flush=True)
    engine = _build(wc)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    flops_per_token = _flops_per_token(engine.module)
    state, *resumed = _resume(engine, rank)

    batches = ray.train.get_dataset_shard("train").iter_batches(
        batch_size=wc.micro_batch_size, batch_format="numpy", drop_last=True)
    skip = engine.global_steps * wc.grad_accum  # micro-batches consumed before the checkpoint
    # Loss sum, micro-batches, real tokens of the current optimizer step on this rank (one all-reduce per step).
    step_acc = torch.zeros(3, dtype=torch.float64, device=device)
    meter = _Meter()
    t_log, tok_log = meter.t0, 0
    tracker = Tracker(uri=wc.tracking_uri, run_id=wc.tracking_run_id, prefix=wc.tracking_prefix,
                      tensorboard_dir=wc.tensorboard_dir)  # rank 0 logs; it opens the store on first use
    for i, batch in enumerate(batches):
        if engine.global_steps >= wc.total_steps:
            break
        if i < skip:
            continue
        inputs = {k: torch.from_numpy(v).to(device) for k, v in
                  collate(batch, pad_id=wc.pad_id, packed=wc.packing).items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
        step_acc[0] += loss.detach().double()  # no host sync per micro-batch
        step_acc[1] += 1.0
        step_acc[2] += float(sum(len(r) for r in batch["input_ids"]))
        if engine.global_steps == state["step"]:
            continue  # still accumulating gradients
        # An optimizer step finished: average the loss over ranks and micro-batches.
        dist.all_reduce(step_acc)
        step = engine.global_steps
        loss_avg, tokens = step_acc[0].item() / step_acc[1].item(), int(step_acc[2].item())
        step_acc.zero_()
        state["step"], state["tokens"] = step, state["tokens"] + tokens
        state["losses"].append(round(loss_avg, 5))
        now = meter.step(tokens)
        tok_log += tokens
        if rank == 0 and (step % wc.log_every == 0 or step == wc.total_steps):
            _log_progress(wc, tracker, step=step, loss=loss_avg, lr=engine.get_lr()[0],
                          rate=tok_log / max(now - t_log, 1e-9), chosen=chosen, flops_per_token=flops_per_token,
                          world=world)
            t_log, tok_log = now, 0
        final = step >= wc.total_steps
        if final or (wc.checkpoint_every and step % wc.checkpoint_every == 0):
            metrics = _metrics(state, loss=loss_avg, meter=meter, now=now, chosen=chosen, n_params=n_params,
                               flops_per_token=flops_per_token, resumed=tuple(resumed), world=world)
            export = ({"model_path": wc.model_path, "dtype_name": wc.export_dtype, "zero_stage": wc.zero_stage}
                      if final else None)
            _save(engine, step=step, state=state, metrics=metrics, export=export, rank=rank)
    tracker.close()
    if engine.global_steps < wc.total_steps:
        raise RuntimeError(f"the data shard ran out after {engine.global_steps} of {wc.total_steps} steps")
