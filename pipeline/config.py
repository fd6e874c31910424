"""Typed configuration for every tgsft stage.

One YAML file holds one :class:`TGConfig`. Every section is a pydantic model with ``extra="forbid"``, so an
unknown key is an error, and validators name the key path, the bad value and what is allowed; rules across fields
(fp16 needs GPUs, parameter offload needs ZeRO-3, one GPU per tensor-parallel rank) are checked at load time too.
All errors of a file are reported at once (:class:`ConfigError`).

Tree presets (``tree.preset: balance``) are YAML files in ``pipeline/presets/``; explicit ``branching`` /
``max_new_tokens`` in the same file override them. Overrides apply in order, later ones win: ``-o tree.preset=wide``
replaces the layer lists set before it (the file's included), ``-o tree.branching=...`` after it refines it.

The sections of the stages that build a model (model, engine, tree, data, mix, train) are in
:mod:`pipeline.sections` and importable from here; this module holds the serving, evaluation and run-wide ones,
:class:`TGConfig` and the loading. Importing it is cheap: it pulls in pydantic and yaml only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.sections import (
    PRESET_DIR,
    DataConfig,
    EngineConfig,
    MixConfig,
    ModelConfig,
    Resources,
    Section,
    TrainConfig,
    TreeConfig,
    chat_template_file,
    gpu_rank_problems,
    model_folder_problem,
)

__all__ = [
    "ConfigError",
    "TGConfig",
    "chat_template_file",
    "config_hash",
    "load_config",
    "model_folder_problem",
    "PRESET_DIR",
]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message lists every problem with its key path."""


# ----------------------------------------------------------------------------- serving and evaluation


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="HTTP bind address; keep loopback for local runs.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible app.")
    cpus_per_replica: float = Field(1.0, gt=0, description="Logical CPUs per model replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per model replica.")
    resources: Resources = Field(
        default_factory=dict, description="Extra Ray resources per model replica (its LLMServer actor and engine "
        "share one placement-group bundle), e.g. {serve_pool: 1}: custom resources pin the replicas to such nodes."
    )
    enforce_eager: bool = Field(True, description="See engine.enforce_eager.")
    kv_cache_gib: int = Field(1, ge=1, description="CPU only: KV cache whole GiB per served model.")
    reserved_cpus: int | None = Field(None, ge=0, description="See engine.reserved_cpus.")
    ready_timeout_s: float = Field(600, gt=0, description="Seconds to wait for every model to answer.")
    server_cpus: float = Field(
        0.25, ge=0, description="Logical CPUs of each model's LLMServer replica actor (the engine has its own)."
    )
    ingress_cpus: float = Field(
        0.25, ge=0, description="Logical CPUs of the OpenAI ingress replica; it only routes requests."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only: memory fraction per model.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine keyword arguments.")

    @model_validator(mode="after")
    def _check_gpus(self) -> "ServeConfig":
        self._reject(gpu_rank_problems(self.gpus_per_replica, int(self.engine_kwargs.get("tensor_parallel_size", 1)),
                                       "serve.engine_kwargs.tensor_parallel_size"))
        return self


class DomainTaskConfig(Section):
    max_new_tokens: int = Field(128, ge=1, description="Generation budget per domain eval item.")
    limit: int | None = Field(None, ge=1, description="Score at most this many domain eval items.")


class EvalConfig(Section):
    tasks: list[str] = Field(
        default_factory=lambda: ["tgsft_general"],
        description="lm-eval task names: standard ones, the offline mirrors (tgsft_arc_easy, ...) or the "
        "project's own tgsft_general.",
    )
    data_dir: str | None = Field(None, description="Directory with upstream-format files for the offline mirrors.")
    include_path: str | None = Field(
        None, description="A folder of your own lm-eval task YAMLs (searched recursively, as lm_eval's "
        "--include_path); name its tasks or groups in eval.tasks."
    )
    limit: int | None = Field(None, ge=1, description="Items per task (None = all).")
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per item; None: each task's default (0 for most, 5 for gsm8k)."
    )
    apply_chat_template: bool = Field(
        False, description="Render lm-eval prompts (and few-shot examples, as turns) with the model's chat template "
        "(model.chat_template if set), as instruct models expect; off: plain-text prompts as the tasks define them.",
    )
    num_concurrent: int = Field(
        16, ge=1, description="Parallel requests to the endpoint; the engine batches concurrent requests itself."
    )
    batch_size: int = Field(
        1, ge=1, description="lm-eval requests per HTTP call; 1 with many concurrent calls was the fastest through "
        "Serve on CPU."
    )
    domain: DomainTaskConfig = Field(default_factory=DomainTaskConfig, description="The run's domain task.")
    retention_dialogues: int = Field(
        32, ge=0, description="Held-out TG dialogues (never trained on) for the retention probe; 0 disables it."
    )
    noise_floor_concurrent: int = Field(
        8, ge=0, description="Score base a second time (lm-eval tasks and the retention probe) with this many "
        "parallel requests: the engine's numerics change with batching, and this A/A comparison is the noise floor "
        "shown beside every delta; 0 skips it."
    )
    kl_prompts: int = Field(
        0, ge=0, le=32, description="Built-in generic dialogues (pipeline/probes.py, 32 in all) on which "
        "KL(base || model) of the next-token distributions is measured; 0 disables the probe. It loads every model "
        "in fp32 on the driver's CPU (seconds for the embedded 135M model, too much memory for multi-billion ones)."
    )
    reference_text: str | None = Field(
        None, description="Human-written held-out text whose NLL every model gets: a .jsonl/.json/.parquet file of "
        "dialogues (any data.format) or a plain-text file (paragraphs split at blank lines)."
    )


class RunConfig(Section):
    control: Literal["none", "domain_only"] = Field(
        "none", description="'domain_only': `tgsft run` also trains a control model on the domain data alone (same "
        "data, epochs, learning-rate schedule and seed; mix.tg_ratio 0), serves and evaluates it beside base and "
        "tuned, and the report credits TG with the share of the control's forgetting it prevented."
    )


class RayConfig(Section):
    address: str | None = Field(None, description="Cluster address; None starts or joins a local Ray.")
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local Ray; more than the cores lets small actors share them."
    )
    dashboard_host: str = Field("127.0.0.1", description="Local dashboard bind address.")


class TrackingConfig(Section):
    mlflow: bool = Field(
        True, description="Log the config, generation statistics, per-step training metrics, eval metrics and the "
        "report to one MLflow run per `tgsft run`."
    )
    tracking_uri: str | None = Field(
        None, description="MLflow store (a tracking server URL or a database URI). None: a SQLite database in the "
        "run directory, <run_dir>/mlflow/mlflow.db; view it with `mlflow ui --backend-store-uri "
        "sqlite:///<run_dir>/mlflow/mlflow.db`."
    )
    experiment: str | None = Field(None, description="MLflow experiment name; None: the run name.")
    tensorboard: bool = Field(
        False, description="Also write the metrics as TensorBoard event files to <run_dir>/tensorboard."
    )


class TGConfig(Section):
    name: str = Field("tgsft", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name: the folder under output_root.")
    output_root: str = Field("runs", description="Runs are written to <output_root>/<name>/.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    tree: TreeConfig = Field(default_factory=TreeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("output_root")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output_root is empty")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / self.name


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | os.PathLike | None = None, *, overrides: list[str] | None = None) -> TGConfig:
    """Load a YAML config (or the defaults) and apply ``key.path=value`` overrides.

    Args:
        path: YAML file; None gives the defaults (the embedded local run).
        overrides: ``section.key=value`` strings, applied in order; values are parsed as YAML
            (``tree.branching=[2,1]``). ``tree.preset=NAME`` drops the layer lists set before it.

    Returns:
        The validated config.

    Raises:
        ConfigError: unreadable file, bad YAML, or any invalid setting (all listed, each with its key path).
    """
    source = str(path) if path else "default config"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
        if key.strip() == "tree.preset":  # a preset chosen later replaces the layer lists set before it
            for name in ("branching", "max_new_tokens"):
                data["tree"].pop(name, None)
    try:
        return TGConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def config_hash(section: BaseModel | dict) -> str:
    """Stable 16-hex-digit hash of a config (section), used to refuse resuming a run with another config."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
