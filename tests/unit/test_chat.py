"""Template probing and prompt rendering on four template families, without any tokenizer or model."""

import pytest

from pipeline import chat
from tests.unit.templates import SPECIALS, jinja_renderer

SYS = [{"role": "system", "content": "Be brief."}]
TURN = [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Rayleigh scattering."}]


def _fmt(name):
    return chat.probe(jinja_renderer(name), special_tokens=list(SPECIALS[name].values()))


def test_chatml_probe_finds_default_system_and_ends():
    fmt = _fmt("chatml")
    assert fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert (fmt.user_end, fmt.assistant_end) == ("<|im_end|>", "<|im_end|>")
    assert "<|im_start|>" in fmt.markers and fmt.supports_system


def test_chatml_question_prompt_ends_with_user_opener():
    render = jinja_renderer("chatml")
    history = chat.root_messages(None, _fmt("chatml"))
    assert chat.question_prompt(render, history) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n"
    )
    second = chat.question_prompt(render, SYS + TURN)
    assert second.endswith("Rayleigh scattering.<|im_end|>\n<|im_start|>user\n")


def test_llama3_probe_and_prompts():
    fmt, render = _fmt("llama3"), jinja_renderer("llama3")
    assert fmt.default_system is None
    assert (fmt.user_end, fmt.assistant_end) == ("<|eot_id|>", "<|eot_id|>")
    assert chat.question_prompt(render, SYS) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert chat.answer_prompt(render, SYS + TURN[:1]).endswith(
        "Why is the sky blue?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert fmt.stops("question") == ["<|eot_id|>"]


def test_mistral_folds_system_into_first_user_turn():
    fmt, render = _fmt("mistral"), jinja_renderer("mistral")
    assert fmt.default_system is None
    assert (fmt.user_end, fmt.assistant_end) == ("[/INST]", "</s>")
    # The question prompt is a real prefix: the system prompt sits inside the user turn being written.
    assert chat.question_prompt(render, SYS) == "<s>[INST] Be brief.\n\n"
    assert chat.question_prompt(render, SYS + TURN) == "<s>[INST] Be brief.\n\nWhy is the sky blue? [/INST] Rayleigh scattering.</s>[INST] "
    assert "[INST]" in " ".join(fmt.markers)


def test_gemma_has_no_system_role():
    fmt, render = _fmt("gemma"), jinja_renderer("gemma")
    assert not fmt.supports_system and fmt.default_system is None
    assert chat.root_messages(None, fmt) == []
    assert chat.question_prompt(render, []) == "<bos><start_of_turn>user\n"
    assert fmt.assistant_end == "<end_of_turn>"
    with pytest.raises(ValueError, match="no system role"):
        chat.root_messages("Be brief.", fmt)


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "gemma"])
def test_prompt_is_prefix_of_the_rendered_turn(name):
    """Whatever the template, question prompt + question + user end = the rendered dialogue with that question."""
    render, fmt = jinja_renderer(name), _fmt(name)
    history = chat.root_messages(None, fmt)
    prompt = chat.question_prompt(render, history)
    full = render(history + [{"role": "user", "content": "What is a prime?"}], False)
    assert full.startswith(prompt + "What is a prime?")
    assert full[len(prompt + "What is a prime?"):].strip().startswith(fmt.user_end)


def test_empty_system_prompt_means_none():
    assert chat.root_messages("", _fmt("chatml")) == []
    assert chat.root_messages("Hi", _fmt("chatml")) == [{"role": "system", "content": "Hi"}]
