"""The dataset card of a TG corpus: ``README.md`` in the corpus directory, as on the Hugging Face Hub.

Reads the corpus manifest (source model, tree config, per-level counts, quality metrics) and, for the license, the
source model's own card (a folder's ``README.md``, or a hub model's card in the local Hugging Face cache; the
embedded SmolLM2-135M-Instruct is Apache-2.0). Writes ``<corpus>/README.md``, whose YAML header declares two configs,
so the folder (or its Hub copy) loads without further arguments::

    datasets.load_dataset(CORPUS_DIR)             # the dialogues (default config)
    datasets.load_dataset(CORPUS_DIR, "nodes")    # every generated node, kept and dropped

``tgsft push CORPUS_DIR REPO_ID`` uploads the card, manifest and Parquet files to a Hub dataset repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.corpus import DIALOGUE_FILES, NODE_FILES, atomic_write_text

__all__ = ["CARD_NAME", "DATA_FILES", "model_license", "push_corpus", "render_card", "write_card"]

CARD_NAME = "README.md"
# config name -> data files, relative to the corpus directory
DATA_FILES = {"dialogues": DIALOGUE_FILES, "nodes": NODE_FILES}
_EMBEDDED_NAME, _EMBEDDED_LICENSE = "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"


def _front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---"):
        return {}
    head = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def model_license(source: str, model_path: str | None = None) -> str:
    """The license id of the source model's card, or ``unknown``.

    Looks in: the embedded model (Apache-2.0); ``README.md`` of the model folder; the hub card of a hub id in the
    local Hugging Face cache (never the network).
    """
    if source == "embedded":
        return _EMBEDDED_LICENSE
    for folder in (model_path, source):
        if folder and (Path(folder).expanduser() / CARD_NAME).is_file():
            lic = _front_matter((Path(folder).expanduser() / CARD_NAME).read_text(encoding="utf-8")).get("license")
            if lic:
                return str(lic)
    if not source.startswith(("/", ".", "~")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, CARD_NAME)
        if isinstance(cached, str):
            lic = _front_matter(Path(cached).read_text(encoding="utf-8")).get("license")
            if lic:
                return str(lic)
    return "unknown"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _settings(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())


def _header(manifest: dict, license_id: str) -> dict[str, Any]:
    mode = manifest["tree"]["mode"]
    return {
        "license": license_id,
        "pretty_name": f"TG corpus of {_model_name(manifest['model'])}",
        "task_categories": ["text-generation"],
        "tags": ["synthetic", "tree-generation", "self-decompression", "tgsft",
                 "sft" if mode == "sft" else "continued-pretraining"],
        "size_categories": [_size_category(manifest.get("dialogues", 0))],
        "configs": [
            {"config_name": "dialogues", "default": True,
             "data_files": [{"split": "train", "path": DATA_FILES["dialogues"]}]},
            {"config_name": "nodes", "data_files": [{"split": "train", "path": DATA_FILES["nodes"]}]},
        ],
    }


def _model_name(source: str) -> str:
    return _EMBEDDED_NAME if source == "embedded" else source.rstrip("/")


def _levels_table(manifest: dict) -> list[str]:
    lines = ["| level | kind | N_i | L_i (tokens) | generated | kept | dropped (reason: count) | generated tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for key, lv in sorted(manifest.get("levels", {}).items(), key=lambda kv: int(kv[0])):
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(lv["dropped"].items())) or "–"
        lines.append(f"| {key} | {lv['kind']} | {lv['branching']} | {lv['max_new_tokens']} | {lv['generated']} | "
                     f"{lv['kept']} | {drops} | {lv['generated_tokens']} |")
    return lines


def _quality_lines(q: dict | None) -> list[str]:
    if not q:
        return ["No quality metrics were recorded; `tgsft inspect CORPUS_DIR` computes them."]
    rows = [
        ("distinct-1 / 2 / 3 of questions", " / ".join(_fmt(q.get(f"distinct_{n}")) for n in (1, 2, 3))),
        ("distinct-1 / 2 / 3 of answers", " / ".join(_fmt(q.get(f"answer_distinct_{n}")) for n in (1, 2, 3))),
        (f"self-BLEU of questions (0-100, {q.get('self_bleu_sample')} sampled)", _fmt(q.get("self_bleu"))),
        ("mean pairwise cosine of question embeddings", _fmt(q.get("mean_pairwise_cosine"))),
        ("k-means cluster entropy of questions (normalised" + (f", k = {len(q['cluster_sizes'])})"
                                                                if q.get("cluster_sizes") else ")"),
         _fmt(q.get("cluster_entropy"))),
        ("exact / near-duplicate question rate", f"{_fmt(q.get('exact_duplicate_rate'))} / "
                                                 f"{_fmt(q.get('near_duplicate_rate'))}"),
        ("answers ending in a complete sentence", _fmt(q.get("complete_sentence_rate"))),
    ]
    for kind in ("question", "answer", "dialogue"):
        s = (q.get("lengths") or {}).get(kind)
        if s:
            rows.append((f"{kind} length in tokens (mean / p50 / p90 / max)",
                         f"{s['mean']:.1f} / {s['p50']:.0f} / {s['p90']:.0f} / {s['max']:.0f}"))
    cov = q.get("coverage")
    if cov:
        sources = ", ".join(f"{k} {v['value']:.4f}" for k, v in cov["by_source"].items())
        rows.append((f"coverage of {cov['n']} reference questions (nearest TG question at cosine >= "
                     f"{cov['threshold']})", f"{cov['value']:.4f} ({sources})"))
    return ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def render_card(manifest: dict, *, license_id: str) -> str:
    """The dataset card (YAML header + Markdown) of a corpus manifest."""
    tree = manifest["tree"]
    model = _model_name(manifest["model"])
    totals = manifest.get("totals") or {}
    header = yaml.safe_dump(_header(manifest, license_id), sort_keys=False, allow_unicode=True)
    sft = tree["mode"] == "sft"
    body = [
        f"# TG corpus of {model}",
        "",
        f"{manifest.get('dialogues', 0)} synthetic {'dialogues' if sft else 'texts'} that {model} wrote itself by "
        "Tree Generation (self-decompression, arXiv 2406.11354) with tgsft: starting from a system prompt, the model "
        "writes a user question, answers it, asks a follow-up and so on; every root-to-leaf path of the tree is one "
        "example. Mixed into supervised fine-tuning data, it keeps the model close to what it knew before.",
        "",
        "## Load",
        "",
        "```python",
        "from datasets import load_dataset",
        'dialogues = load_dataset("PATH_OR_REPO_ID")["train"]          # one row per root-to-leaf path',
        'nodes = load_dataset("PATH_OR_REPO_ID", "nodes")["train"]     # every generated node, kept and dropped',
        "```",
        "",
        "`dialogues`: `messages` (Hugging Face chat format, system prompt first; empty for plain text), `text` (plain "
        "text corpora), `node_ids` (the path, level 1 first), `n_turns`, `n_tokens` (generated tokens), `tree` "
        "(config hash). `nodes`: `node_id`, `parent_id`, `level`, `branch`, `seed`, `role`, `text`, `n_tokens`, "
        "`prompt_tokens`, `finish_reason`, `status` (kept / dropped), `drop_reason`.",
        "",
        "## Source model and tree",
        "",
        f"- Source model: `{manifest['model']}`" + (f" ({model})" if model != manifest["model"] else "")
        + f"; license of this corpus: `{license_id}` (the source model's).",
        f"- Mode: `{tree['mode']}`; branching N_i = {tree['branching']}; max new tokens L_i = "
        f"{tree['max_new_tokens']}; seed {tree['seed']}.",
        f"- System prompt P0: {manifest.get('system_prompt')!r}.",
        f"- Sampling: questions {_settings(tree['question'])}; answers {_settings(tree['answer'])}.",
        f"- Question dedup: {tree['dedup']['method']} at cosine >= {tree['dedup']['threshold']}"
        + ("" if tree["dedup"]["enabled"] else " (disabled)") + f"; filters: {_settings(tree['filters'])}.",
        f"- Config hash `{manifest.get('config_hash')}`; generated tokens {totals.get('generated_tokens', '–')}, "
        f"prompt tokens {totals.get('prompt_tokens', '–')}.",
        "",
        "## Counts per level",
        "",
        *_levels_table(manifest),
        "",
        "## Quality and coverage",
        "",
        *_quality_lines(manifest.get("quality")),
        "",
        "## Intended use",
        "",
        "Mix into supervised fine-tuning (or continued pre-training) of the same source model to reduce forgetting "
        "of general knowledge (`tgsft train`, `mix.tg_ratio`); compare tree shapes and sizes with `tgsft inspect`.",
        "",
        "## Limitations",
        "",
        "- Every text is model output, unchecked by people: it carries the source model's errors, biases and "
        "hallucinations, and is no source of facts.",
        "- It reflects what this model knows and says; other models gain less from it.",
        "- Filters drop empty, truncated, looping, role-leaking and near-duplicate outputs, but answers that are "
        "wrong or off topic pass them.",
        "- Coverage measures closeness of question embeddings to a reference set, not whether the answers are right.",
        "",
    ]
    return f"---\n{header}---\n\n" + "\n".join(body)


def write_card(corpus_dir: Path, manifest: dict) -> Path:
    """Write ``<corpus_dir>/README.md`` for ``manifest`` (atomically) and return its path."""
    path = Path(corpus_dir) / CARD_NAME
    lic = model_license(manifest["model"], manifest.get("model_path"))
    atomic_write_text(path, render_card(manifest, license_id=lic))
    return path


def push_corpus(corpus_dir: Path, repo_id: str, *, private: bool = False, log=print) -> str:
    """Upload a corpus (card, manifest, dialogue and node Parquet files) to the Hugging Face Hub dataset ``repo_id``.

    The card is written first if the corpus has none. Authentication is huggingface_hub's own (``HF_TOKEN`` or
    ``hf auth login``); the token is never printed.

    Args:
        corpus_dir: a complete corpus directory.
        repo_id: ``owner/name`` of the dataset repository (created if missing).
        private: create the repository private.
        log: where the result line goes.

    Returns:
        The URL of the uploaded commit.

    Raises:
        FileNotFoundError: ``corpus_dir`` holds no complete corpus.
    """
    from huggingface_hub import HfApi

    from pipeline.corpus import read_json

    corpus_dir = Path(corpus_dir)
    manifest = read_json(corpus_dir / "manifest.json")
    if not manifest or manifest.get("status") != "complete":
        raise FileNotFoundError(f"{corpus_dir}: no complete corpus (manifest.json with status complete)")
    if not (corpus_dir / CARD_NAME).is_file():
        write_card(corpus_dir, manifest)
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(corpus_dir), repo_id=repo_id, repo_type="dataset",
        allow_patterns=[CARD_NAME, "manifest.json", DATA_FILES["dialogues"], DATA_FILES["nodes"]],
        commit_message=f"tgsft corpus {manifest.get('config_hash')}",
    )
    url = getattr(commit, "commit_url", str(commit))
    log(f"push: {corpus_dir} -> https://huggingface.co/datasets/{repo_id} ({url})")
    return url
