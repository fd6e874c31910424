"""The stage reuse key: it changes with every field that shapes a stage's output and ignores runtime-only ones."""

from pipeline.cachekey import RUNTIME_FIELDS, stage_key
from pipeline.config import TGConfig, load_config


def test_stage_key_counts_what_shapes_the_output():
    base = load_config(None)
    key = stage_key(base, "model", "engine", "tree")
    for override in ("model.dtype=float32", "model.max_model_len=1024", "engine.tensor_parallel_size=2",
                     "engine.engine_kwargs={quantization: fp8}", "tree.seed=1", "tree.dedup.threshold=0.8"):
        assert stage_key(load_config(None, overrides=[override]), "model", "engine", "tree") != key, override
    for override in ("model.cache_dir=/tmp/x", "engine.replicas=4", "engine.enforce_eager=true", "engine.resources={a: 1}",
                     "engine.batch_size=8", "tree.shard_rows=10", "ray.num_cpus=8", "train.lr=0.1"):
        assert stage_key(load_config(None, overrides=[override]), "model", "engine", "tree") == key, override
    steps = load_config(None, overrides=["train.max_steps=5"])
    assert stage_key(steps, "train") != stage_key(base, "train")
    resumable = {"train.max_steps"}  # a key that survives raising max_steps, as a checkpoint directory's name needs
    assert stage_key(steps, "train", exclude=resumable) == stage_key(base, "train", exclude=resumable)
    held = "eval.retention_dialogues"
    assert stage_key(base, held, model_path="a") != stage_key(base, held, model_path="b")


def test_runtime_fields_name_real_fields():
    for dotted in RUNTIME_FIELDS:
        node, *names = dotted.split(".")
        model = TGConfig.model_fields[node].annotation
        for name in names[:-1]:
            model = model.model_fields[name].annotation
        assert names[-1] in model.model_fields, dotted


def test_every_lora_field_changes_the_train_key():
    """The train stage keys the whole train section, so turning LoRA on and each LoRA setting count."""
    full = load_config(None)
    lora = load_config(None, overrides=["train.lora={}"])
    assert stage_key(lora, "train") != stage_key(full, "train")
    keys = {stage_key(lora, "train")}
    for override in ("train.lora.r=8", "train.lora.alpha=16", "train.lora.dropout=0",
                     "train.lora.target_modules=[q_proj]"):
        keys.add(stage_key(load_config(None, overrides=[override]), "train"))
    assert len(keys) == 5
    assert stage_key(lora, "model", "engine", "tree") == stage_key(full, "model", "engine", "tree")


def test_eval_stamp_ignores_speed_fields_and_counts_the_models():
    from pipeline.run import _eval_stamp

    base = load_config(None)
    assert _eval_stamp(load_config(None, overrides=["eval.num_concurrent=4", "serve.port=8123"])) == _eval_stamp(base)
    for change in ("train.lr=0.001", "mix.tg_ratio=0.2", "eval.limit=7", "run.control=domain_only", "tree.seed=3"):
        assert _eval_stamp(load_config(None, overrides=[change])) != _eval_stamp(base), change
