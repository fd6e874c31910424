"""Chat-template tokenization with assistant-only labels, truncation, packing and collation.

Reads mix rows (``messages`` lists, or ``text`` for TG-PT rows) and returns token rows ``input_ids`` / ``labels`` /
``position_ids`` (plus counters). Writes nothing.

**Assistant-only loss without ``{% generation %}`` tags.** For each assistant message ``i`` the dialogue is rendered
three ways with the model's own template: ``messages[:i]`` with the generation prompt, ``messages[:i+1]`` and the
whole dialogue. The assistant span is the text that ``messages[:i+1]`` adds beyond its common prefix with the
generation-prompt rendering (the assistant content plus its end-of-turn marker; trailing whitespace such as
ChatML's newline after ``<|im_end|>`` is not part of it). Character spans become token labels through the fast
tokenizer's offset mapping: a token is trained on iff it starts inside a span (a token that straddles the span's
end, possible only when the end-of-turn marker is not one special token, is trained on: emitting the marker needs
it). This works for any template whose
rendering of a dialogue prefix is a prefix of the whole rendering (ChatML, Llama-2/3, Mistral, ...); other templates
raise a ValueError rather than train on the wrong tokens.

**Truncation.** Examples longer than ``max_seq_len`` tokens are truncated from the right (and counted); an example
with no trained token left after truncation is dropped (and counted). The first token of every example never carries
a label, so in a packed row no example learns to predict the next example's first token.

**Packing.** :func:`pack_examples` concatenates consecutive examples into rows of at most ``max_seq_len`` tokens,
with ``position_ids`` restarting at 0 for each example. :func:`collate` then builds a 4-D boolean attention mask
``(B, 1, T, T)`` that is causal *and* block-diagonal (a query attends to a key iff both lie in the same example and
the key is not later). Transformers passes a 4-D mask to the attention kernel unchanged (``masking_utils.
_preprocess_mask_arguments``: "If the mask is already 4D, simply return as-is"), and SDPA reads ``True`` as "may
attend", so no token sees another example; RoPE sees the per-example positions. Models must therefore be loaded
with ``attn_implementation="sdpa"`` when packing (the eager kernel adds masks and needs an additive float mask).
``tests/unit/test_tokenization.py`` checks that a packed forward pass gives the unpacked logits.

Pure Python and numpy: no Ray, torch or DeepSpeed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.chat import Render, renderer

__all__ = [
    "IGNORE_INDEX",
    "TokenizedExample",
    "assistant_spans",
    "collate",
    "pack_examples",
    "tokenize_batch",
    "tokenize_chat",
    "tokenize_text",
]

IGNORE_INDEX = -100  # label of tokens that carry no loss (the Hugging Face convention)


@dataclass(frozen=True)
class TokenizedExample:
    """One example's tokens; ``labels[j]`` is ``input_ids[j]`` where the loss applies, else ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def assistant_spans(render: Render, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered dialogue and the character spans of its assistant turns (content + end-of-turn marker).

    Args:
        render: ``render(messages, add_generation_prompt) -> str`` (see :func:`pipeline.chat.renderer`).
        messages: the dialogue.

    Returns:
        ``(text, [(start, end), ...])``: the full rendering and one half-open span per assistant message.

    Raises:
        ValueError: the template is not prefix-stable (a rendered prefix is not a prefix of the whole rendering).
    """
    full = render(list(messages), False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(list(messages[:i]), True)
        upto = render(list(messages[: i + 1]), False)
        if not full.startswith(upto):
            raise ValueError(
                f"chat template is not prefix-stable: the rendering of messages[:{i + 1}] is not a prefix of the "
                "whole dialogue's rendering, so assistant spans cannot be located"
            )
        start = len(os.path.commonprefix([prompt, upto]))
        end = len(upto.rstrip())
        if end <= start:
            raise ValueError(f"chat template rendered assistant message {i} as nothing")
        spans.append((start, end))
    return full, spans


def _finish(ids: list[int], labels: list[int], *, max_seq_len: int) -> TokenizedExample | None:
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if labels:
        labels[0] = IGNORE_INDEX
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return TokenizedExample(input_ids=ids, labels=labels, truncated=truncated)


def tokenize_chat(
    tokenizer: Any, messages: Sequence[dict], *, max_seq_len: int, chat_template: str | None = None
) -> TokenizedExample | None:
    """Tokenize a dialogue through the chat template with labels on assistant tokens only.

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (offset mappings are needed).
        messages: the dialogue (``role`` / ``content`` dicts).
        max_seq_len: tokens kept (from the start).
        chat_template: a Jinja template overriding the tokenizer's own.

    Returns:
        The example, or None when truncation left no assistant token.

    Raises:
        ValueError: the template is not prefix-stable (see :func:`assistant_spans`).
    """
    text, spans = assistant_spans(renderer(tokenizer, chat_template), messages)
    # The template already writes BOS and other specials as text; adding them again would duplicate them.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for j, (s, e) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= s < spans[k][1] and e > s:
            labels[j] = ids[j]
    return _finish(ids, labels, max_seq_len=max_seq_len)


def tokenize_text(tokenizer: Any, text: str, *, max_seq_len: int) -> TokenizedExample | None:
    """Tokenize plain text (TG-PT rows) with the loss on every token, ending with EOS.

    Returns:
        The example, or None for text that yields fewer than two tokens.
    """
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return _finish(ids, list(ids), max_seq_len=max_seq_len)


def pack_examples(examples: Sequence[TokenizedExample], *, max_seq_len: int) -> list[dict[str, Any]]:
    """Concatenate consecutive examples into rows of at most ``max_seq_len`` tokens (order kept, no splitting).

    Returns:
        Rows with ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 per example) and ``n_examples``.
    """
    rows: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    for ex in examples:
        if cur and len(cur["input_ids"]) + len(ex.input_ids) > max_seq_len:
            rows.append(cur)
            cur = {}
        if not cur:
            cur = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0}
        cur["input_ids"] += ex.input_ids
        cur["labels"] += ex.labels
        cur["position_ids"] += list(range(len(ex.input_ids)))
        cur["n_examples"] += 1
    if cur:
        rows.append(cur)
    return rows


def tokenize_batch(
    tokenizer: Any,
    batch: dict[str, Sequence],
    *,
    max_seq_len: int,
    packing: bool,
    chat_template: str | None = None,
) -> dict[str, list]:
    """Tokenize a batch of mix rows (columns ``messages`` and ``text``) into training rows.

    A row with a non-empty ``messages`` list is a dialogue (assistant-only loss); otherwise its ``text`` is trained
    on in full. With ``packing`` the batch's examples are packed in order (packs never cross batches).

    Returns:
        Columns ``input_ids``, ``labels``, ``position_ids``, ``n_examples``, ``n_truncated``, ``n_dropped``,
        ``n_tokens``, ``n_label_tokens``. Dropped examples are counted on the batch's first output row.
    """
    examples, flags, dropped = [], [], 0
    for msgs, text in zip(batch["messages"], batch["text"]):
        msgs = [] if msgs is None else list(msgs)
        if msgs:
            ex = tokenize_chat(tokenizer, msgs, max_seq_len=max_seq_len, chat_template=chat_template)
        else:
            ex = tokenize_text(tokenizer, text or "", max_seq_len=max_seq_len)
        if ex is None:
            dropped += 1
            continue
        examples.append(ex)
        flags.append(ex.truncated)
    if packing:
        rows = pack_examples(examples, max_seq_len=max_seq_len)
    else:
        rows = [
            {"input_ids": e.input_ids, "labels": e.labels, "position_ids": list(range(len(e.input_ids))),
             "n_examples": 1}
            for e in examples
        ]
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "position_ids", "n_examples")}
    for r in rows:
        for k in out:
            out[k].append(r[k])
    # Truncation counts per row: with packing, the examples of row r are the next n_examples flags.
    out["n_truncated"], i = [], 0
    for n in out["n_examples"]:
        out["n_truncated"].append(sum(flags[i : i + n]))
        i += n
    out["n_tokens"] = [len(ids) for ids in out["input_ids"]]
    out["n_label_tokens"] = [sum(t != IGNORE_INDEX for t in lab) for lab in out["labels"]]
    out["n_dropped"] = [dropped if j == 0 else 0 for j in range(len(rows))]
    return out


def collate(batch: dict[str, Sequence], *, pad_id: int, packed: bool) -> dict[str, np.ndarray]:
    """Right-pad token rows to the batch's longest row.

    Args:
        batch: columns ``input_ids``, ``labels``, ``position_ids`` (one sequence per row).
        pad_id: token id used for padding (its label is ``IGNORE_INDEX``).
        packed: build the block-diagonal 4-D mask (rows hold several examples) instead of a 2-D padding mask.

    Returns:
        int64 arrays ``input_ids``, ``labels``, ``position_ids`` of shape (B, T), and ``attention_mask``:
        (B, T) int64 (1 = real token) when not packed, (B, 1, T, T) bool (True = may attend) when packed.
        Padding acts as one more example, so every query row of the 4-D mask attends to at least itself.
    """
    n = len(batch["input_ids"])
    t = max(len(r) for r in batch["input_ids"])
    ids = np.full((n, t), pad_id, dtype=np.int64)
    labels = np.full((n, t), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((n, t), dtype=np.int64)
    real = np.zeros((n, t), dtype=np.int64)
    for b in range(n):
        m = len(batch["input_ids"][b])
        ids[b, :m] = batch["input_ids"][b]
        labels[b, :m] = batch["labels"][b]
        pos[b, :m] = batch["position_ids"][b]
        pos[b, m:] = np.arange(t - m)
        real[b, :m] = 1
    out = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not packed:
        out["attention_mask"] = real
        return out
    seg = np.cumsum(pos == 0, axis=1)  # (B, T): example index of each token
    same = seg[:, :, None] == seg[:, None, :]  # (B, Tq, Tk)
    causal = np.tril(np.ones((t, t), dtype=bool))
    out["attention_mask"] = (same & causal)[:, None, :, :]
    return out
