"""LoRA end to end on the embedded model: one LoRA run (real Ray Train + DeepSpeed ZeRO-2, 2 CPU workers, packed
rows) on the built-in domain writes a PEFT adapter of a few percent of the model beside a merged Hugging Face folder;
the adapter on the base computes what the merged folder computes (packed rows included), and the merged folder,
served by Ray Serve and scored by pipeline.evaluate like any variant, has learned the domain (one training, one
Serve start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, ray_session, model_path):
    """10 steps of r=16 LoRA at a high learning rate on the built-in domain (no TG corpus: mix.tg_ratio 0): 2
    workers x 1 packed row of 2 examples (~100 tokens each) per step, 40 examples in all. fp32 skips the precision
    measurement (it picks fp32 on this kind of CPU anyway)."""
    from pipeline.train import train

    tmp = tmp_path_factory.mktemp("lora")
    overrides = {
        "output_root": str(tmp / "runs"), "name": "lora", "mix.tg_ratio": 0, "eval.retention_dialogues": 0,
        "train.lora": {"r": 16, "alpha": 32}, "train.lr": 2e-3, "train.max_steps": STEPS,
        "train.warmup_ratio": 0.1, "train.schedule": "cosine", "train.packing": True, "train.max_seq_len": 256,
        "train.micro_batch_size": 1, "train.precision": "fp32", "train.log_every": 5,
    }
    cfg = load_config(None, overrides=[f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    logs: list[str] = []
    model = train(cfg, log=logs.append)
    manifest = json.loads((cfg.run_dir / "train" / "manifest.json").read_text())
    return {"cfg": cfg, "model": model, "adapter": cfg.run_dir / "train" / "adapter", "manifest": manifest,
            "logs": logs}


def _lora_params(config: dict, r: int) -> int:
    """Trainable LoRA parameters of a Llama-style model: r x (in + out features) per targeted projection."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return r * per_layer * layers


def test_manifest_and_adapter_files(lora_run, model_path):
    m, adapter, model = lora_run["manifest"], lora_run["adapter"], lora_run["model"]
    assert m["steps"] == STEPS and m["final_loss"] < 0.3 * m["initial_loss"], m["losses"]
    assert m["tokenization"]["n_examples"] > 1.5 * m["tokenization"]["rows"]  # rows were packed
    lora = m["lora"]
    assert (lora["r"], lora["alpha"], lora["target_modules"]) == (16, 32, TARGETS)
    base_config = json.loads((Path(model_path) / "config.json").read_text())
    assert lora["trainable_params"] == _lora_params(base_config, 16)  # 4.9 M of 134.5 M for SmolLM2-135M
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    base_bytes = sum(p.stat().st_size for p in Path(model_path).glob("*.safetensors"))
    assert lora["adapter_bytes"] == sum(p.stat().st_size for p in adapter.iterdir())
    assert lora["adapter_bytes"] < 0.05 * base_bytes and lora["adapter_share"] < 0.05
    assert lora["model_bytes"] == pytest.approx(base_bytes, rel=0.01)  # model/ is a full (merged) model
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32
    assert sorted(adapter_config["target_modules"]) == sorted(TARGETS)
    assert adapter_config["base_model_name_or_path"] == model_path
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in model.iterdir()}
    assert any("LoRA r=16 alpha=32" in line for line in lora_run["logs"])


def test_adapter_on_base_equals_merged_model_also_on_packed_rows(lora_run, model_path):
    """PeftModel(base, adapter) and the merged folder give the same logits, and the PEFT wrapper honours the packed
    rows' 4-D block-diagonal mask (each example as if alone), as it does in training."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.tokenization import collate, pack_examples, tokenize_chat

    tok = AutoTokenizer.from_pretrained(lora_run["model"])
    rows = [json.loads(line) for line in (lora_run["cfg"].run_dir / "domain" / "eval.jsonl").open()][:3]
    examples = [tokenize_chat(tok, r["messages"], max_seq_len=192) for r in rows]
    packed = pack_examples(examples, max_seq_len=1024)
    assert len(packed) == 1 and packed[0]["n_examples"] == 3
    batch = collate({k: [packed[0][k]] for k in ("input_ids", "labels", "position_ids")}, pad_id=0, packed=True)
    inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k != "labels"}

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    adapted = PeftModel.from_pretrained(base, lora_run["adapter"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run["model"], dtype=torch.float32,
                                                  attn_implementation="sdpa").eval()
    with torch.no_grad():
        row = adapted(**inputs).logits[0]
        alone = [adapted(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
        merged_row = merged(**inputs).logits[0]
    start = 0
    for e, ref in zip(examples, alone):
        torch.testing.assert_close(row[start : start + len(e.input_ids)], ref, rtol=1e-4, atol=1e-4)
        start += len(e.input_ids)
    # The merged weights are stored in bf16 (the export dtype): same predictions, logits within bf16 rounding.
    assert (merged_row.argmax(-1) == row.argmax(-1)).float().mean() > 0.97
    assert (merged_row - row).abs().mean() < 0.05


def test_merged_model_is_served_and_learned_the_domain(lora_run):
    from pipeline.evaluate import evaluate
    from pipeline.serve import free_port, request_json, serving

    cfg = lora_run["cfg"].model_copy(deep=True)
    cfg.serve.port = free_port()
    cfg.eval.tasks = []  # the domain task only: lm-eval tasks are covered by test_serve_eval
    cfg.eval.domain.limit = 20
    cfg.eval.domain.max_new_tokens = 40
    cfg.eval.noise_floor_concurrent = 0
    models = {"tuned": str(lora_run["model"])}
    with serving(cfg, models) as base_url:
        assert [m["id"] for m in request_json(f"{base_url}/v1/models")["data"]] == ["tuned"]
        results = evaluate(cfg, models=models, base_url=base_url, out_dir=cfg.run_dir / "eval")
    domain = results["tuned"]["domain"]
    assert domain["n"] == 20 and domain["primary"] == "json_exact"
    # held-out names, cities and sentence templates: the skill was learned, not strings (base: ~0 exact JSON)
    assert domain["metrics"]["json_exact"]["value"] >= 0.5, domain["examples"]
    assert domain["metrics"]["field_acc"]["value"] >= 0.7, domain["examples"]
    assert json.loads((cfg.run_dir / "eval" / "tuned.json").read_text())["domain"] == domain
