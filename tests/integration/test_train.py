"""SFT end to end on real Ray Train + DeepSpeed (2 CPU workers) with the embedded model: loss falls, the export
loads and generates in transformers (vLLM serves it in test_run_job.py), ZeRO-3 export equals the gathered weights,
a finished export is reused, a stopped run resumes with its optimizer state, and so does a run whose worker is
killed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.corpus import DIALOGUE_SCHEMA, heldout_ids, write_table

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sft"
N_TG = 12
HELDOUT = 2


def _corpus(root: Path) -> Path:
    rows = [{"dialogue_id": f"tg{i:02d}",
             "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
             "text": None, "node_ids": [f"n{i}"], "n_turns": 1, "n_tokens": 12, "tree": "t"} for i in range(N_TG)]
    write_table(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA), root / "dialogues", shard_rows=100)
    return root


def _cfg(tmp: Path, **train):
    overrides = {
        "output_root": str(tmp / "runs"), "data.train": [str(FIXTURES / "domain.jsonl")],
        "mix.tg_ratio": 0.2, "eval.retention_dialogues": HELDOUT,
        "train.max_seq_len": 128, "train.micro_batch_size": 2, "train.epochs": 10, "train.lr": 1e-4,
        "train.warmup_ratio": 0.0, "train.schedule": "constant", "train.log_every": 1,
        **{f"train.{k}": v for k, v in train.items()},
    }
    return load_config(None, overrides=[f"{k}={json.dumps(v)}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, ray_session, model_path):
    """One ZeRO-2 run of 4 steps with a checkpoint at step 2 (the fixture the other tests continue from)."""
    from pipeline.train import train

    tmp = tmp_path_factory.mktemp("sft2")
    corpus = _corpus(tmp / "corpus")
    cfg = _cfg(tmp, zero_stage=2, max_steps=4, checkpoint_every=2, storage_path=str(tmp / "ckpt"))
    logs: list[str] = []
    model = train(cfg, corpus_dir=corpus, out_dir=tmp / "a", log=logs.append)
    return {"tmp": tmp, "corpus": corpus, "cfg": cfg, "model": model, "logs": logs,
            "manifest": json.loads((tmp / "a" / "manifest.json").read_text())}


def test_loss_falls_and_mix_is_recorded(zero2):
    m = zero2["manifest"]
    assert m["steps"] == 4 and len(m["losses"]) == 4
    assert m["final_loss"] < 0.5 * m["initial_loss"], m["losses"]
    assert m["tokens"] > 0 and m["tokens_per_s"] > 0
    assert 0.3 < m["peak_rss_gib"] < 16  # a 135M model + DeepSpeed state, measured in the workers
    # 8 domain examples + 2 TG rows (0.2 share) per epoch, drawn afresh each epoch over 10 epochs (the 10 usable rows
    # twice each); the held-out TG dialogues are not in the mix.
    assert (m["mix"]["domain_examples"], m["mix"]["tg_examples_per_epoch"], m["mix"]["tg_heldout_excluded"]) == (
        8, [2] * 10, HELDOUT)
    assert (m["mix"]["tg_unique"], m["mix"]["tg_max_uses"]) == (N_TG - HELDOUT, 2)
    mix = pa.concat_tables([pq.read_table(p) for p in sorted((zero2["tmp"] / "a" / "mix").glob("part-*.parquet"))])
    assert sorted(set(mix.column("source").to_pylist())) == ["domain", "tg"]
    held = heldout_ids([f"tg{i:02d}" for i in range(N_TG)], HELDOUT)
    assert not held & set(mix.column("id").to_pylist())
    assert m["tokenization"]["n_examples"] == 100 and m["tokenization"]["n_truncated"] == 0


def test_export_loads_in_transformers(zero2, model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = zero2["model"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()}
    tuned = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    assert tuned.lm_head.weight.data_ptr() == tuned.model.embed_tokens.weight.data_ptr()  # still tied
    diffs = [(a - b).abs().max().item() for a, b in zip(tuned.parameters(), base.parameters())]
    assert all(a.shape == b.shape for a, b in zip(tuned.parameters(), base.parameters())) and max(diffs) > 0
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Give the capital of Italy as JSON."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = tuned.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Rome" in answer  # trained on this very example


def test_finished_export_is_reused(zero2):
    from pipeline.train import train

    logs: list[str] = []
    assert train(zero2["cfg"], corpus_dir=zero2["corpus"], out_dir=zero2["tmp"] / "a", log=logs.append) == zero2[
        "model"]
    assert any("reusing the finished export" in line for line in logs)


def _train_worker_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if " ".join(p.info["cmdline"] or []).startswith("ray::RayTrainWorker")]


def _registered_checkpoint(run_dir: Path) -> str | None:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or caught mid-write
        return None


def test_a_stopped_run_resumes_and_a_killed_worker_resumes_from_its_checkpoint(zero2):
    """The 4-step run stopped after its checkpoint at step 4; a budget of 10 steps continues it from there with its
    optimizer state. One DeepSpeed worker is then SIGKILLed once checkpoint 6 is registered: Ray Train
    (FailureConfig) restarts the worker group, which resumes from step 6, finishes, and exports a model that loads."""
    import threading
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.train import train

    cfg = zero2["cfg"].model_copy(deep=True)
    cfg.train.max_steps, cfg.train.max_failures = 10, 1
    run_dir = next(Path(zero2["cfg"].train.storage_path).glob("sft-*"))
    killed: list[int] = []

    def kill_once_checkpoint_6_is_registered() -> None:
        deadline = time.monotonic() + 900
        while _registered_checkpoint(run_dir) != "checkpoint_000006" and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in _train_worker_pids()[:1]:
            os.kill(pid, 9)
            killed.append(pid)

    killer = threading.Thread(target=kill_once_checkpoint_6_is_registered, daemon=True)
    killer.start()
    folder = train(cfg, corpus_dir=zero2["corpus"], out_dir=zero2["tmp"] / "b", log=lambda _: None)
    killer.join(timeout=5)
    assert killed, "no train worker was found to kill"
    m = json.loads((zero2["tmp"] / "b" / "manifest.json").read_text())
    # the first attempt resumed from step 4; the restarted group (the one that finished) from step 6
    assert m["resumed_from_step"] == 6 and m["steps"] == 10
    assert m["optimizer_step_at_resume"] == 6  # Adam's own step counter came back with the checkpoint
    assert m["losses"][:4] == zero2["manifest"]["losses"] and len(m["losses"]) == 10
    tuned = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in tuned.parameters())


def test_zero3_export_equals_gathered_weights(tmp_path, ray_session, model_path):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.train import train

    cfg = _cfg(tmp_path, zero_stage=3, max_steps=2, storage_path=str(tmp_path / "ckpt"))
    cfg.mix.tg_ratio = 0.0
    folder = train(cfg, out_dir=tmp_path / "out", log=lambda _: None)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["steps"] == 2 and manifest["mix"]["tg_examples"] == 0

    ckpt = Path(manifest["checkpoints"]) / "checkpoint_000002"
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")  # from the per-rank partitions
    exported = load_file(folder / "model.safetensors")
    assert set(exported) <= set(gathered) and "model.embed_tokens.weight" in exported
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, gathered[name].to(torch.bfloat16)), name
    tuned = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    assert {k: v.shape for k, v in tuned.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
