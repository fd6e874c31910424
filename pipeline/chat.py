"""Chat-template probing and prompt rendering, model-agnostic.

Nothing here knows ChatML or any other format. :func:`probe` renders probe dialogues through the model's own chat
template and diffs them to find: the default system prompt (if the template injects one), the text that ends a user
turn and an assistant turn, and the role markers that must never appear inside generated text.

A *question prompt* is the dialogue so far plus the opener of a user turn, so the model writes the user's question
itself. It is found by rendering the dialogue with a sentinel user message and cutting at the sentinel, which also
works for templates that fold the system prompt into the first user turn.

``render`` everywhere is ``render(messages, add_generation_prompt) -> str``; :func:`renderer` builds one from a
Hugging Face tokenizer. Pure functions: no Ray, vLLM or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = [
    "ChatFormat", "Render", "TemplateRender", "answer_prompt", "probe", "question_prompt", "renderer", "root_messages",
]

Render = Callable[[Sequence[dict], bool], str]

_S_USER = "TGSFTPROBEUSER"
_S_ASSISTANT = "TGSFTPROBEASSISTANT"
_S_SYSTEM = "TGSFTPROBESYSTEM"


@dataclass(frozen=True)
class ChatFormat:
    """What :func:`probe` learned about a chat template."""

    default_system: str | None
    user_end: str  # text that closes a user turn, stripped ('' when the template adds nothing)
    assistant_end: str  # text that closes an assistant turn, stripped
    markers: tuple[str, ...] = field(default_factory=tuple)  # role/turn markers that must not leak into text
    supports_system: bool = True

    def stops(self, kind: str) -> list[str]:
        """Stop strings for a layer kind ('question' or 'answer')."""
        end = self.user_end if kind == "question" else self.assistant_end
        return [end] if end else []


def renderer(tokenizer, chat_template: str | None = None) -> Render:
    """``render`` for a Hugging Face tokenizer's chat template (text, not token ids), as ``apply_chat_template``
    renders it. The result is picklable and needs neither torch nor the tokenizer: Ray workers get it by value
    instead of loading the tokenizer (seconds of CPU per process)."""
    try:
        template = tokenizer.get_chat_template(chat_template)
    except ValueError as e:  # no template: fails when used, as apply_chat_template would
        return TemplateRender(None, {}, error=str(e))
    return TemplateRender(template, dict(tokenizer.special_tokens_map))


@dataclass(frozen=True)
class TemplateRender:
    """A chat template and the special tokens it sees, rendered by transformers' ``render_jinja_template`` (what
    ``apply_chat_template`` calls with the same arguments)."""

    template: str | None
    special_tokens: dict
    error: str | None = None

    def __call__(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        if self.template is None:
            raise ValueError(self.error)
        rendered, _ = render_jinja_template(conversations=[list(messages)], chat_template=self.template,
                                            add_generation_prompt=add_generation_prompt, **self.special_tokens)
        return rendered[0]


def _cut(text: str, sentinel: str) -> tuple[str, str]:
    i = text.find(sentinel)
    if i < 0:
        raise ValueError("the chat template dropped the message content; it cannot be probed")
    return text[:i], text[i + len(sentinel) :]


def _try(render: Render, messages: list[dict], gen: bool) -> str | None:
    try:
        return render(messages, gen)
    except Exception:  # templates raise on shapes they do not support (e.g. no system role)
        return None


def probe(render: Render, *, special_tokens: Sequence[str] = ()) -> ChatFormat:
    """Learn a template's turn structure by rendering probe dialogues and diffing them.

    Args:
        render: the template renderer.
        special_tokens: the tokenizer's special tokens; any of them inside generated text counts as a leak.

    Returns:
        The :class:`ChatFormat`.
    """
    one = [{"role": "user", "content": _S_USER}]
    two = one + [{"role": "assistant", "content": _S_ASSISTANT}]
    three = two + [{"role": "user", "content": _S_USER + "2"}]

    before_user, after_user = _cut(render(one, False), _S_USER)
    with_answer = render(two, False)
    _, after_answer = _cut(with_answer, _S_ASSISTANT)
    between = _cut(with_answer, _S_USER)[1]
    assistant_open = between[: between.find(_S_ASSISTANT)]
    # The user opener of a later turn: what the third message adds after the assistant turn closes.
    later_user_open = _cut(_cut(render(three, False), _S_ASSISTANT)[1], _S_USER + "2")[0]

    user_end = after_user.strip()
    assistant_end = after_answer.strip()

    default_system = None
    supports_system = True
    with_sys = _try(render, [{"role": "system", "content": _S_SYSTEM}] + one, False)
    if with_sys is None or _S_SYSTEM not in with_sys:
        supports_system = False
    else:
        sys_open, rest = _cut(with_sys, _S_SYSTEM)
        sys_close_user_open = rest[: rest.find(_S_USER)]
        if (
            before_user.startswith(sys_open)
            and before_user.endswith(sys_close_user_open)
            and len(before_user) > len(sys_open) + len(sys_close_user_open)
        ):
            default_system = before_user[len(sys_open) : len(before_user) - len(sys_close_user_open)] or None

    pieces = {assistant_open, later_user_open, user_end, assistant_end, *special_tokens}
    markers = tuple(sorted({p.strip() for p in pieces if p and len(p.strip()) >= 2}))
    return ChatFormat(
        default_system=default_system,
        user_end=user_end,
        assistant_end=assistant_end,
        markers=markers,
        supports_system=supports_system,
    )


def root_messages(system_prompt: str | None, fmt: ChatFormat) -> list[dict]:
    """The root P0 as a message list: the configured prompt, else the template default, else nothing.

    ``system_prompt=''`` means "no system prompt" even if the template has a default.
    """
    p0 = fmt.default_system if system_prompt is None else system_prompt
    if not p0:
        return []
    if not fmt.supports_system:
        raise ValueError("tree.system_prompt is set but this model's chat template has no system role")
    return [{"role": "system", "content": p0}]


def question_prompt(render: Render, history: Sequence[dict]) -> str:
    """Dialogue so far + the opener of a user turn: the model continues by writing the user's question."""
    text = render(list(history) + [{"role": "user", "content": _S_USER}], False)
    return _cut(text, _S_USER)[0]


def answer_prompt(render: Render, history: Sequence[dict]) -> str:
    """Dialogue so far + the assistant generation prompt (the normal chat path)."""
    return render(list(history), True)
