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
}


@pytest.mark.parametrize("text,needle", INVALID.values(), ids=INVALID.keys())
def test_invalid_configs_name_the_key(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_all_errors_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "mix:\n  tg_ratio: 2\ntrain:\n  epochs: 0\n  lr: -1\n"))
    msg = str(e.value)
    assert "3 invalid setting(s)" in msg and "mix.tg_ratio" in msg and "train.epochs" in msg and "train.lr" in msg


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
