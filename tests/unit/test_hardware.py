"""Precision by measurement (pipeline.hardware) and the typed worker settings (pipeline.schedule)."""

import pytest

from pipeline.config import load_config
from pipeline.schedule import WorkerConfig


def test_resolve_dtype_keeps_explicit_values_and_gpu_auto():
    from pipeline.hardware import resolve_dtype

    assert resolve_dtype("float32", use_gpu=False) == ("float32", "set in the config")
    assert resolve_dtype("bfloat16", use_gpu=True) == ("bfloat16", "set in the config")
    assert resolve_dtype("auto", use_gpu=True)[0] == "auto"  # vLLM's own: the checkpoint's dtype


@pytest.mark.model  # torch
def test_cpu_auto_picks_the_measured_faster_precision():
    from pipeline.hardware import choose_precision, resolve_dtype

    choice = choose_precision()
    assert set(choice["tflops"]) == {"bf16", "fp32"} and all(v > 0 for v in choice["tflops"].values())
    assert choice["precision"] == max(choice["tflops"], key=choice["tflops"].get)
    assert choice["reason"].startswith(f"{choice['precision']} matmul measured")
    dtype, reason = resolve_dtype("auto", use_gpu=False)
    assert dtype in ("bfloat16", "float32") and "faster than" in reason


@pytest.mark.model  # torch (the CPU capability in the reason)
def test_cpu_auto_keeps_each_precisions_best_of_alternating_measurements(monkeypatch):
    """A burst of other load during one measurement (here bf16's first) must not flip the choice."""
    import pipeline.hardware as hw

    readings = {"bf16": [0.10, 0.80, 0.78], "fp32": [0.20, 0.19, 0.21]}
    order = []

    def fake(precision, **_):
        order.append(precision)
        return readings[precision].pop(0)

    monkeypatch.setattr(hw, "matmul_tflops", fake)
    choice = hw.choose_precision()
    assert choice["precision"] == "bf16" and choice["tflops"] == {"bf16": 0.8, "fp32": 0.21}
    assert order == ["bf16", "fp32"] * 3  # interleaved, so a slow spell hits both or neither
    assert choice["reason"].startswith("bf16 matmul measured 3.8x faster than fp32")


def test_worker_config_is_built_from_the_run_config():
    from pipeline.train import Prepared, worker_config

    cfg = load_config(None, overrides=["train.num_workers=2", "train.cpus_per_worker=3", "train.micro_batch_size=2",
                                       "train.grad_accum=4", "train.warmup_ratio=0.1", "train.packing=true"])
    prep = Prepared(model_path="/m", tokens=None, pad_id=7, total_steps=40, data_stats={}, mix_stats={}, tok_stats={})
    wc = worker_config(cfg, prep)
    assert (wc.total_steps, wc.warmup_steps, wc.pad_id, wc.threads, wc.precision) == (40, 4, 7, 3, "auto")
    assert (wc.micro_batch_size, wc.grad_accum, wc.zero_stage, wc.packing) == (2, 4, 2, True)
    assert wc.ds_config["train_batch_size"] == 2 * 4 * 2
    assert WorkerConfig(**wc.as_dict()) == wc  # what Ray Train carries to the workers comes back whole
    gpu = worker_config(load_config(None, overrides=["train.use_gpu=true"]), prep)
    assert gpu.threads == 0 and gpu.ds_config["bf16"] == {"enabled": True}  # auto on GPUs: bf16
