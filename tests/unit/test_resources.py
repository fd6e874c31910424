"""What each stage asks of the cluster (``tgsft config show --resources``), checked against the numbers in the
shipped configs' header arithmetic. Pure: no Ray, vLLM or torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.resources import count_params, resources, train_memory

REPO = Path(__file__).resolve().parents[2]
GPU_8B, GPU_70B, LOCAL = (REPO / "configs" / f for f in ("gpu-8b.yaml", "gpu-2x8-70b.yaml", "local.yaml"))
LLAMA_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "vocab_size": 128256, "intermediate_size": 28672,
             "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False}
LLAMA_8B = {**LLAMA_70B, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
            "num_attention_heads": 32}


def _totals(path: Path) -> dict[str, tuple[float, float]]:
    res = resources(load_config(path))
    return {s["stage"]: (s["cpus"], s["gpus"]) for s in res["stages"]} | {"peak": (res["peak_cpus"],
                                                                                   res["peak_gpus"])}


@pytest.mark.parametrize("path", [GPU_8B, GPU_70B])
def test_gpu_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.use_gpu and cfg.engine.gpus_per_replica == cfg.engine.tensor_parallel_size


def test_gpu_8b_totals():
    assert _totals(GPU_8B) == {
        "generation": (4 * 4, 4 * 2),
        "dedup embedder": (1, 0),
        "training": (8 * 8, 8),
        "serving": (2 * (4 + 0.25) + 0.25, 2 * 1),
        "peak": (64, 8),
    }


def test_gpu_2x8_70b_totals():
    assert _totals(GPU_70B) == {
        "generation": (4 * 4, 4 * 4),
        "dedup embedder": (1, 0),
        "training": (16 * 8, 16),
        "serving": (2 * (4 + 0.25) + 0.25, 2 * 4),
        "peak": (128, 16),
    }


def test_local_config_asks_for_no_gpus():
    res = resources(load_config(LOCAL))
    assert res["peak_gpus"] == 0 and all(s["gpus"] == 0 for s in res["stages"])


def test_param_count_matches_the_published_sizes():
    assert round(count_params(LLAMA_8B) / 1e9, 2) == 8.03
    assert round(count_params(LLAMA_70B) / 1e9, 1) == 70.6
    assert count_params({"hidden_size": 8}) is None


def test_train_memory_of_the_70b_config():
    """ZeRO-3 over 16 workers with the optimizer offloaded: 4 B/param on the GPU, 12 B/param in RAM."""
    mem = train_memory(load_config(GPU_70B), 70.6e9)
    assert mem["device"] == pytest.approx(4 * 70.6e9 / 16)
    assert mem["host"] == pytest.approx(12 * 70.6e9 / 16)
    no_offload = train_memory(load_config(GPU_70B, overrides=["train.offload_optimizer=false"]), 70.6e9)
    assert no_offload == {"device": pytest.approx(16 * 70.6e9 / 16), "host": 0.0}


def test_cli_prints_the_table(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    assert main(["config", "show", str(GPU_70B), "--resources", "-o", f"model.source={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for stage in ("generation", "dedup embedder", "training", "serving", "peak"):
        assert stage in out
    assert "70.55 B params" in out and "~17.6 GB GPU + ~52.9 GB offloaded to RAM" in out
    assert main(["config", "show", str(LOCAL), "--resources"]) == 0
    assert "unknown" in capsys.readouterr().out
