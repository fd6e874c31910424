"""What one training worker needs to know, as typed data, and the learning-rate schedule it follows.

:class:`WorkerConfig` is built by ``pipeline.train`` from the run config and handed to the Ray Train worker loop
(``actors.train_worker``), which reads nothing else. Pure: no Ray, torch or DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["WorkerConfig", "lr_multiplier"]


def lr_multiplier(
    step: int, *, total_steps: int, warmup_steps: int, schedule: Literal["cosine", "linear", "constant"]
) -> float:
    """LR factor for optimizer step ``step`` (0-based): linear warm-up to 1, then cosine / linear decay or constant.

    Decay reaches 0 one step after the last step, so every step trains.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the per-worker SFT loop reads.

    Attributes:
        model_path: Hugging Face folder of the model to fine-tune.
        ds_config: the DeepSpeed config (``pipeline.train.deepspeed_config``).
        total_steps: optimizer steps to run in all.
        warmup_steps: steps of linear LR warm-up.
        schedule: LR decay after warm-up.
        packing: rows hold several examples (block-diagonal attention mask).
        pad_id: padding token id.
        precision: 'auto' (the faster of bf16 and fp32, measured on rank 0), 'bf16', 'fp16' or 'fp32'.
        threads: torch threads per worker on CPU (the worker's logical CPUs); 0 leaves torch's default.
        use_gpu: one GPU per worker.
        gradient_checkpointing: recompute activations in the backward pass.
        checkpoint_every: optimizer steps between checkpoints; 0 = only the final one.
        log_every: optimizer steps between progress lines.
        export_dtype: torch dtype name of the exported weights.
        seed: torch seed.
        lora: LoRA settings (``pipeline.sections.LoraConfig`` as a dict: r, alpha, dropout, target_modules,
            load_in_4bit); None trains every weight.
        tracking_uri: MLflow store rank 0 logs every progress step to (``pipeline.tracking``); None: no MLflow.
        tracking_run_id: the MLflow run of this ``tgsft run``.
        tracking_prefix: metric key prefix (``train``; ``train_domain_only`` for the control arm).
        tensorboard_dir: folder for rank 0's TensorBoard event files; None: none.
        progress_file: JSON-lines file rank 0 appends every progress step to (step, total_steps, loss, lr,
            tokens_per_s), which the driver follows for its console; None: none.
    """

    model_path: str
    ds_config: dict[str, Any]
    total_steps: int
    warmup_steps: int
    schedule: Literal["cosine", "linear", "constant"]
    packing: bool
    pad_id: int
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    threads: int
    use_gpu: bool
    gradient_checkpointing: bool
    checkpoint_every: int
    log_every: int
    export_dtype: str
    seed: int
    lora: dict[str, Any] | None
    tracking_uri: str | None = None
    tracking_run_id: str | None = None
    tracking_prefix: str = "train"
    tensorboard_dir: str | None = None
    progress_file: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``TorchTrainer(train_loop_config=...)``; the worker rebuilds it with ``WorkerConfig(**d)``."""
        return asdict(self)

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"]["stage"])

    @property
    def micro_batch_size(self) -> int:
        return int(self.ds_config["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.ds_config["gradient_accumulation_steps"])
