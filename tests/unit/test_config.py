"""Typed config: valid files load, presets apply, and each kind of nonsense is rejected naming its key."""

from pathlib import Path

import pytest

from pipeline.config import PRESET_DIR, ConfigError, TGConfig, config_hash, load_config

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_embedded_balance_tree():
    cfg = load_config(None)
    assert cfg.model.source == "embedded"
    assert cfg.tree.preset == "balance" and cfg.tree.branching == [4, 1, 2, 1]
    assert cfg.serve.host == "127.0.0.1" and cfg.model.trust_remote_code is False


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TGConfig)


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_presets(preset):
    cfg = load_config(None, overrides=[f"tree.preset={preset}"])
    assert len(cfg.tree.branching) == len(cfg.tree.max_new_tokens) and len(cfg.tree.branching) % 2 == 0


def test_wide_preset_and_explicit_override():
    wide = load_config(None, overrides=["tree.preset=wide"]).tree
    assert wide.branching[0] > 1 and wide.branching[1:] == [1] * (len(wide.branching) - 1)
    mine = load_config(None, overrides=["tree.preset=balance", "tree.branching=[3,1,2,1]"]).tree
    assert mine.branching == [3, 1, 2, 1] and mine.max_new_tokens == [48, 160, 48, 160]


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(_write(tmp_path, "name: x\n"), overrides=["mix.tg_ratio=0.25", "train.packing=true"])
    assert cfg.mix.tg_ratio == 0.25 and cfg.train.packing is True and cfg.name == "x"


INVALID = {
    "unknown top key": ("colour: blue\n", "colour: unknown key"),
    "unknown nested key": ("tree:\n  preset: balance\n  brnaching: [2, 1]\n", "tree.brnaching: unknown key"),
    "negative N_i": ("tree:\n  branching: [2, -1]\n  max_new_tokens: [8, 8]\n", "every N_i must be >= 1"),
    "zero N_i": ("tree:\n  branching: [0, 1]\n  max_new_tokens: [8, 8]\n", "every N_i must be >= 1"),
    "L_i wrong length": ("tree:\n  branching: [2, 1]\n  max_new_tokens: [8]\n", "max_new_tokens has 1 entries"),
    "odd sft depth": ("tree:\n  branching: [2, 1, 2]\n  max_new_tokens: [8, 8, 8]\n", "depth is even"),
    "unknown preset": ("tree:\n  preset: bushy\n", "unknown preset 'bushy'"),
    "ratio above 1": ("mix:\n  tg_ratio: 1.5\n", "mix.tg_ratio"),
    "ratio negative": ("mix:\n  tg_ratio: -0.1\n", "mix.tg_ratio"),
    "bad zero stage": ("train:\n  zero_stage: 4\n", "train.zero_stage"),
    "string for int": ("train:\n  epochs: many\n", "train.epochs"),
    "bad dedup threshold": ("tree:\n  preset: wide\n  dedup:\n    threshold: 1.5\n", "tree.dedup.threshold"),
    "bad port": ("serve:\n  port: 70000\n", "serve.port"),
    "bad run name": ("name: ../escape\n", "name"),
    "section not a mapping": ("train: 3\n", "train"),
    "top level list": ("- a\n- b\n", "top level must be a mapping"),
    "bad truncation policy": ("tree:\n  preset: deep\n  filters:\n    truncated: maybe\n", "tree.filters.truncated"),
    "kv cache fraction": ("engine:\n  kv_cache_gib: 0.5\n", "engine.kv_cache_gib"),
    "fp16 on CPU": ("train:\n  precision: fp16\n", "train.precision: fp16 needs GPUs (train.use_gpu: true); on "
                    "CPU use bf16 or fp32 (got 'fp16')"),
    "parameter offload below ZeRO-3": ("train:\n  offload_param: true\n",
                                       "train.offload_param: parameter offload needs train.zero_stage: 3, not 2"),
    "optimizer offload at ZeRO-0": ("train:\n  zero_stage: 0\n  offload_optimizer: true\n",
                                    "train.offload_optimizer: optimizer offload needs train.zero_stage: 1, 2 or 3"),
    "GPUs per replica != tensor parallel size": (
        "engine:\n  gpus_per_replica: 1\n  tensor_parallel_size: 2\n",
        "engine.gpus_per_replica: one GPU per tensor-parallel rank: must equal engine.tensor_parallel_size (2)"),
    "CPU as a custom resource": ("engine:\n  resources: {CPU: 1}\n",
                                 "engine.resources: 'CPU' is one of Ray's own resources, not a custom one"),
    "negative resource amount": ("train:\n  resources_per_worker: {pool: -1}\n",
                                 "train.resources_per_worker: 'pool': amount -1 must be at least 0.0001"),
    "memory as a custom resource": ("serve:\n  resources: {memory: 1000000}\n",
                                    "serve.resources: 'memory' is one of Ray's own resources"),
    "resource amount not a number": ("engine:\n  resources: {pool: lots}\n", "engine.resources.pool"),
    "served GPUs != tensor parallel size": (
        "serve:\n  gpus_per_replica: 4\n",
        "serve.gpus_per_replica: one GPU per tensor-parallel rank: must equal "
        "serve.engine_kwargs.tensor_parallel_size (1)"),
}


def test_all_errors_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "mix:\n  tg_ratio: 2\ntrain:\n  epochs: 0\n  lr: -1\n"))
    msg = str(e.value)
    assert "3 invalid setting(s)" in msg and "mix.tg_ratio" in msg and "train.epochs" in msg and "train.lr" in msg
    text = "engine:\n  gpus_per_replica: 3\ntrain:\n  precision: fp16\n  offload_param: true\n"
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text), overrides=["mix.tg_ratio=2"])
    lines = str(e.value).splitlines()[1:]
    assert "4 invalid setting(s)" in str(e.value)
    assert [line.split(":")[0].strip() for line in lines] == [
        "engine.gpus_per_replica", "mix.tg_ratio", "train.precision", "train.offload_param"]


def test_cross_field_rules_accept_valid_combinations():
    cfg = load_config(None, overrides=["train.use_gpu=true", "train.precision=fp16", "train.zero_stage=3",
                                       "train.offload_param=true", "engine.gpus_per_replica=2",
                                       "engine.tensor_parallel_size=2"])
    assert cfg.train.offload_param and cfg.engine.gpus_per_replica == 2
    assert load_config(None, overrides=["engine.gpus_per_replica=0.5"]).engine.gpus_per_replica == 0.5  # shared GPU
    with pytest.raises(ValueError, match="train.zero_stage: 3"):  # assignments are validated too
        cfg.train.zero_stage = 2


def test_custom_resources_per_stage():
    cfg = load_config(None, overrides=["engine.resources={gen_pool: 1}", "train.resources_per_worker={gpu_a100: 0.5}",
                                       "serve.resources={'node:10.0.0.2': 0.01}"])
    assert cfg.engine.resources == {"gen_pool": 1.0} and cfg.train.resources_per_worker == {"gpu_a100": 0.5}
    assert cfg.serve.resources == {"node:10.0.0.2": 0.01}
    assert load_config(None).engine.resources == {}  # none by default: any node with CPUs will do


def test_preset_override_replaces_the_files_layer_lists():
    """`tgsft run configs/local.yaml -o tree.preset=wide` (the README's example) runs the wide tree."""
    wide = load_config(None, overrides=["tree.preset=wide"]).tree
    local = load_config(REPO / "configs" / "local.yaml", overrides=["tree.preset=wide"]).tree
    assert local.branching == wide.branching and local.max_new_tokens == wide.max_new_tokens
    assert load_config(REPO / "configs" / "local.yaml").tree.branching == [12, 1, 2, 1]  # the file's own lists
    later = load_config(REPO / "configs" / "local.yaml", overrides=["tree.preset=wide", "tree.branching=[5,1,1,1]"])
    assert later.tree.branching == [5, 1, 1, 1] and later.tree.max_new_tokens == wide.max_new_tokens


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "tree: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, overrides=["tree.branching"])


def test_yaml_is_loaded_safely(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: !!python/object/apply:os.system ['echo hacked']\n"))


def test_config_hash_tracks_content():
    a, b = load_config(None), load_config(None, overrides=["tree.seed=1"])
    assert config_hash(a.tree) != config_hash(b.tree)
    assert config_hash(a.tree) == config_hash(load_config(None).tree)


def test_lora_is_off_by_default_and_defaults_to_llama_projections():
    assert load_config(None).train.lora is None
    lora = load_config(None, overrides=["train.lora={}"]).train.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.load_in_4bit) == (16, 32, 0.05, False)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert load_config(None, overrides=["train.lora.r=8"]).train.lora.r == 8  # a nested override creates the section
    # ZeRO-3 partitions the frozen base; the adapters are gathered with it at export
    assert load_config(None, overrides=["train.lora={}", "train.zero_stage=3"]).train.lora.r == 16
    gpu = load_config(None, overrides=["train.use_gpu=true", "train.lora.load_in_4bit=true"])
    assert gpu.train.lora.load_in_4bit


LORA_INVALID = {
    "rank 0": ("train:\n  lora:\n    r: 0\n", "train.lora.r: Input should be greater than or equal to 1 (got 0)"),
    "dropout 1": ("train:\n  lora:\n    dropout: 1\n", "train.lora.dropout: Input should be less than 1 (got 1)"),
    "no targets": ("train:\n  lora:\n    target_modules: []\n", "train.lora.target_modules: List should have at least "
                   "1 item"),
    "unknown key": ("train:\n  lora:\n    rank: 8\n", "train.lora.rank: unknown key (got 8)"),
    "4-bit on CPU": ("train:\n  lora:\n    load_in_4bit: true\n", "train.lora.load_in_4bit: 4-bit base weights use "
                     "bitsandbytes, which needs CUDA GPUs (train.use_gpu: true)"),
    "4-bit with ZeRO-3": ("train:\n  use_gpu: true\n  zero_stage: 3\n  lora:\n    load_in_4bit: true\n",
                          "train.lora.load_in_4bit: 4-bit base weights cannot be partitioned by ZeRO-3; use "
                          "train.zero_stage 0, 1 or 2 (got True)"),
}


@pytest.mark.parametrize("text,needle", [*INVALID.values(), *LORA_INVALID.values()],
                         ids=[*INVALID.keys(), *(f"lora {k}" for k in LORA_INVALID)])
def test_invalid_configs_name_the_key(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and needle in str(e.value)
