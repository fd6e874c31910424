"""Builders that turn config sections into plain data for the heavy libraries: the DeepSpeed config, Ray Serve LLM's
app arguments and the CPUs they reserve. Pure: nothing heavy is imported."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.hardware import cpu_engine_env
from pipeline.serve import build_app_args, required_cpus
from pipeline.train import deepspeed_config


def _train(*overrides: str):
    return load_config(None, overrides=list(overrides)).train


def test_deepspeed_config_on_cpu():
    ds = deepspeed_config(_train("train.micro_batch_size=3", "train.grad_accum=2", "train.num_workers=2",
                                 "train.lr=0.001", "train.grad_clip=0.5", "train.bucket_size=2000000"))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 12  # micro-batch x accumulation x workers
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 0.001, "weight_decay": 0.0, "betas": [0.9, 0.95],
                                                           "eps": 1e-8, "torch_adam": True}}  # fused Adam is CUDA-only
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000}
    assert ds["gradient_clipping"] == 0.5
    assert "bf16" not in ds and "fp16" not in ds  # bf16 on CPU is autocast in the worker, not DeepSpeed's mode


def test_deepspeed_config_zero3_offload_on_gpus():
    ds = deepspeed_config(_train("train.use_gpu=true", "train.zero_stage=3", "train.offload_optimizer=true",
                                 "train.offload_param=true", "train.bucket_size=5000000"))
    assert ds["zero_optimization"] == {
        "stage": 3, "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000,
        "stage3_prefetch_bucket_size": 5_000_000, "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds


@pytest.mark.parametrize(("precision", "key"), [("fp16", "fp16"), ("fp32", None)])
def test_deepspeed_precision_on_gpus(precision, key):
    ds = deepspeed_config(_train("train.use_gpu=true", f"train.precision={precision}"))
    assert [k for k in ("bf16", "fp16") if k in ds] == ([key] if key else [])


def test_required_cpus_counts_engine_server_and_ingress():
    serve = load_config(None, overrides=["serve.cpus_per_replica=2", "serve.server_cpus=0.5",
                                         "serve.ingress_cpus=0.25"]).serve
    assert required_cpus(1, serve=serve) == 2.75
    assert required_cpus(2, serve=serve) == 5.25  # 2 x (2 + 0.5) + 0.25


def test_build_app_args_on_cpu(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # a 2-core host: no core kept from compute
    cfg = load_config(None, overrides=["model.dtype=bfloat16", "model.max_model_len=1024", "serve.kv_cache_gib=3",
                                       "serve.engine_kwargs={max_num_seqs: 8}"])
    args = build_app_args({"base": "/m/base", "tuned": "/m/tuned"}, serve=cfg.serve, model=cfg.model)
    base, tuned = args["llm_configs"]
    assert base["model_loading_config"] == {"model_id": "base", "model_source": "/m/base"}
    assert tuned["model_loading_config"] == {"model_id": "tuned", "model_source": "/m/tuned"}
    assert base["engine_kwargs"] == {"dtype": "bfloat16", "max_model_len": 1024, "enforce_eager": True,
                                     "trust_remote_code": False, "max_num_seqs": 8}
    assert base["placement_group_config"] == {"bundles": [{"CPU": 1.0}]}  # no GPU key: it would wait for a GPU
    assert base["deployment_config"] == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                                         "ray_actor_options": {"num_cpus": 0.25, "resources": {}}}
    assert base["runtime_env"] == {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}
    assert args["ingress_deployment_config"] == {"ray_actor_options": {"num_cpus": 0.25}}
    base["engine_kwargs"]["dtype"] = "float32"
    assert tuned["engine_kwargs"]["dtype"] == "bfloat16"  # every model gets its own copy


def test_custom_resources_reach_the_engines_and_the_replicas():
    """Custom resources pin the engine actors and served replicas (whose engine shares the replica's first bundle,
    which Serve LLM merges from ray_actor_options) to the nodes that have them."""
    from pipeline.generate import engine_options

    cfg = load_config(None, overrides=["engine.resources={gen_pool: 1}", "serve.resources={serve_pool: 0.5}"])
    assert engine_options(cfg.model, cfg.engine)["resources"] == {"gen_pool": 1.0}
    assert engine_options(cfg.model, load_config(None).engine)["resources"] == {}
    (llm,) = build_app_args({"m": "/m"}, serve=cfg.serve, model=cfg.model)["llm_configs"]
    assert llm["deployment_config"]["ray_actor_options"] == {"num_cpus": 0.25, "resources": {"serve_pool": 0.5}}


@pytest.mark.parametrize(("cpus", "reserved", "env"), [
    (2, None, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
    (8, None, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
    (64, None, {}),  # vLLM's own default (one core for its scheduler)
    (64, 2, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "2"}),
    (2, 1, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}),
])
def test_cpu_engine_env_reserves_no_core_on_small_hosts(monkeypatch, cpus, reserved, env):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    assert cpu_engine_env(reserved) == env


def test_build_app_args_on_gpus_and_without_models():
    cfg = load_config(None, overrides=["serve.gpus_per_replica=1", "serve.gpu_memory_utilization=0.5"])
    (llm,) = build_app_args({"m": "org/model"}, serve=cfg.serve, model=cfg.model)["llm_configs"]
    assert llm["placement_group_config"] == {"bundles": [{"CPU": 1.0, "GPU": 1.0}]}
    assert llm["engine_kwargs"]["gpu_memory_utilization"] == 0.5
    cfg = load_config(None, overrides=["serve.gpus_per_replica=4", "serve.cpus_per_replica=4",
                                       "serve.engine_kwargs={tensor_parallel_size: 4}"])
    (llm,) = build_app_args({"m": "org/model"}, serve=cfg.serve, model=cfg.model)["llm_configs"]
    # vLLM's Ray executor puts one tensor-parallel rank on each bundle: four bundles of one GPU
    assert llm["placement_group_config"] == {"bundles": [{"CPU": 4.0, "GPU": 1.0}] + [{"GPU": 1.0}] * 3}
    assert llm["engine_kwargs"]["tensor_parallel_size"] == 4
    with pytest.raises(ValueError, match="no models to serve"):
        build_app_args({}, serve=cfg.serve, model=cfg.model)
