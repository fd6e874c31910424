"""``model.chat_template``: validated at load, applied by a linked model folder that every stage loads."""

from __future__ import annotations

import json

import pytest

from pipeline import chat
from pipeline.config import ConfigError, load_config
from pipeline.model import resolve_model, with_chat_template
from tests.unit.templates import SPECIALS


def _model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "chat_template.jinja").write_text("{{ 'own template' }}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "old"}))
    return folder


def test_unknown_template_is_rejected_at_load():
    with pytest.raises(ConfigError, match="model.chat_template.*shipped template name.*chatml"):
        load_config(None, overrides=["model.chat_template=no-such-template"])


def test_shipped_name_and_file_are_accepted(tmp_path):
    assert load_config(None, overrides=["model.chat_template=chatml"]).model.chat_template == "chatml"
    own = tmp_path / "mine.jinja"
    own.write_text("{{ messages[0]['content'] }}")
    assert load_config(None, overrides=[f"model.chat_template={own}"]).model.chat_template == str(own)


def test_templated_folder_links_weights_and_replaces_the_template(tmp_path):
    own = tmp_path / "mine.jinja"
    own.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    out = with_chat_template(str(_model(tmp_path)), own, cache=str(tmp_path / "cache"))
    out_dir = tmp_path / "cache" / "models" / "templated"
    assert out.startswith(str(out_dir))
    folder = out_dir / out.rsplit("/", 1)[1]
    assert (folder / "model.safetensors").is_symlink() and (folder / "model.safetensors").read_bytes() == b"weights"
    assert (folder / "chat_template.jinja").read_text() == own.read_text()
    assert json.loads((folder / "tokenizer_config.json").read_text()) == {"eos_token": "<|im_end|>"}
    assert with_chat_template(str(tmp_path / "model"), own, cache=str(tmp_path / "cache")) == out  # same model and template: same folder
    own.write_text("{{ 'changed' }}")
    assert with_chat_template(str(tmp_path / "model"), own, cache=str(tmp_path / "cache")) != out


def test_resolve_model_applies_the_option(tmp_path):
    cfg = load_config(None, overrides=[f"model.source={_model(tmp_path)}", "model.chat_template=chatml",
                                       f"model.cache_dir={tmp_path / 'cache'}"])
    folder = resolve_model(cfg.model, log=lambda *_: None)
    assert "templated" in folder
    plain = load_config(None, overrides=[f"model.source={tmp_path / 'model'}"])
    assert resolve_model(plain.model, log=lambda *_: None) == str((tmp_path / "model").resolve())


def test_shipped_chatml_has_no_default_system_prompt():
    from jinja2 import Template

    from pipeline.config import chat_template_file

    template = Template(chat_template_file("chatml").read_text())

    def render(messages, add_generation_prompt):
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    fmt = chat.probe(render, special_tokens=list(SPECIALS["chatml"].values()))
    assert fmt.default_system is None and fmt.user_end == fmt.assistant_end == "<|im_end|>"
    assert chat.question_prompt(render, chat.root_messages(None, fmt)) == "<|im_start|>user\n"


@pytest.mark.model
def test_embedded_model_with_chatml_renders_and_tokenizes_with_it(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.tokenization import tokenize_chat

    cfg = load_config(None, overrides=["model.chat_template=chatml"])
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model, log=lambda *_: None))
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
    own = AutoTokenizer.from_pretrained(resolve_model(load_config(None).model, log=lambda *_: None))
    assert "named SmolLM" in own.apply_chat_template(messages, tokenize=False)  # the model's own one is unchanged
    ex = tokenize_chat(tok, messages, max_seq_len=64)
    trained = tok.decode([t for t in ex.labels if t >= 0])
    assert trained.startswith("Blue.") and "Name a colour" not in trained


@pytest.mark.model
@pytest.mark.parametrize("template", [None, "chatml"])
def test_generation_reads_the_template_and_special_tokens_autotokenizer_reads(template):
    """Generation loads a local folder's tokenizer without AutoTokenizer (no torch import); what it reads from it,
    the rendered prompts and the special tokens, is what AutoTokenizer gives."""
    from transformers import AutoTokenizer

    from pipeline.generate import _chat_tokenizer

    cfg = load_config(None, overrides=[f"model.chat_template={template}"] if template else [])
    path = resolve_model(cfg.model, log=lambda *_: None)
    light, auto = _chat_tokenizer(path, trust_remote_code=False), AutoTokenizer.from_pretrained(path)
    assert chat.renderer(light) == chat.renderer(auto)
    assert (light.all_special_tokens, light.bos_token, light.eos_token) == (
        auto.all_special_tokens, auto.bos_token, auto.eos_token)
    messages = [{"role": "user", "content": "Hi."}]
    assert chat.renderer(light)(messages, True) == auto.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)
