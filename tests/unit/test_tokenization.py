"""Assistant-only masks for three chat templates, truncation, packing boundaries, and packed == unpacked logits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.tokenization import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    pack_examples,
    tokenize_batch,
    tokenize_chat,
    tokenize_text,
)

LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
# Llama-2 / Mistral style: system folded into the first user turn, no generation prompt, EOS closes a reply.
LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{%- set msgs = messages[1:] %}"
    "{%- else %}{%- set sys = '' %}{%- set msgs = messages %}{%- endif %}"
    "{%- for m in msgs %}{%- if m['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
# Mistral-v0.3 style: the system prompt goes into the *last* user turn, so prefixes are not stable.
SYSTEM_LAST = (
    "{%- set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- set msgs = messages[1:] if sys else messages %}{%- set last = namespace(i=0) %}"
    "{%- for m in msgs %}{%- if m['role'] == 'user' %}{%- set last.i = loop.index %}{%- endif %}{%- endfor %}"
    "{%- for m in msgs %}{%- if m['role'] == 'user' %}"
    "{{- '[INST] ' + (sys + '\\n\\n' if loop.index == last.i and sys else '') + m['content'] + '[/INST]' }}"
    "{%- else %}{{- m['content'] + '</s>' }}{%- endif %}{%- endfor %}"
)

DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "count to three"},
    {"role": "assistant", "content": "Sure: 1, 2, 3."},
]


@pytest.fixture(scope="module")
def tok(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _trained_runs(tok, ex: TokenizedExample) -> list[str]:
    """Decoded text of each maximal run of trained tokens."""
    runs = []
    for trained, group in itertools.groupby(zip(ex.input_ids, ex.labels), key=lambda p: p[1] != IGNORE_INDEX):
        group = list(group)
        if trained:
            assert all(i == lab for i, lab in group)  # a trained label is the token itself
            runs.append(tok.decode([i for i, _ in group]))
    return runs


@pytest.mark.model
@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (None, ["hello there<|im_end|>", "Sure: 1, 2, 3.<|im_end|>"]),  # the embedded model's ChatML
        (LLAMA3, ["hello there<|eot_id|>", "Sure: 1, 2, 3.<|eot_id|>"]),
        (LLAMA2, [" hello there<|im_end|>", " Sure: 1, 2, 3.<|im_end|>"]),  # eos_token of this tokenizer
    ],
    ids=["chatml", "llama3", "llama2"],
)
def test_mask_covers_exactly_the_assistant_turns(model_path, template, expected):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if template == LLAMA3:  # as in a real Llama-3 vocabulary, the turn markers are single special tokens
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                              "<|eot_id|>"]})
    ex = tokenize_chat(tok, DIALOGUE, max_seq_len=512, chat_template=template)
    assert ex is not None and not ex.truncated
    assert _trained_runs(tok, ex) == expected
    # Everything else (system, user turns, headers, the trailing newline) carries no loss.
    n_trained = sum(lab != IGNORE_INDEX for lab in ex.labels)
    assert 0 < n_trained < len(ex.labels)
    full = tok.apply_chat_template(DIALOGUE, tokenize=False, chat_template=template)
    assert tok.decode(ex.input_ids) == full


@pytest.mark.model
def test_marker_split_by_bpe_keeps_the_straddling_token(tok):
    # Without special tokens BPE merges the end of '<|eot_id|>' with the next turn's '<': that token is trained
    # on, because emitting the end-of-turn marker needs it.
    ex = tokenize_chat(tok, DIALOGUE, max_seq_len=512, chat_template=LLAMA3)
    assert _trained_runs(tok, ex) == ["hello there<|eot_id|><", "Sure: 1, 2, 3.<|eot_id|>"]


@pytest.mark.model
def test_template_without_stable_prefixes_is_refused(tok):
    with pytest.raises(ValueError, match="not prefix-stable"):
        tokenize_chat(tok, DIALOGUE, max_seq_len=512, chat_template=SYSTEM_LAST)


@pytest.mark.model
def test_truncation_keeps_the_start_and_drops_examples_without_assistant_tokens(tok):
    full = tokenize_chat(tok, DIALOGUE, max_seq_len=512)
    first_trained = next(j for j, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    cut = tokenize_chat(tok, DIALOGUE, max_seq_len=first_trained + 2)
    assert cut.truncated and cut.input_ids == full.input_ids[: first_trained + 2]
    assert sum(lab != IGNORE_INDEX for lab in cut.labels) == 2
    assert tokenize_chat(tok, DIALOGUE, max_seq_len=first_trained) is None


@pytest.mark.model
def test_text_rows_train_on_every_token_but_the_first(tok):
    ex = tokenize_text(tok, "Water boils at 100 degrees Celsius at sea level.", max_seq_len=512)
    assert ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]


@pytest.mark.model
def test_tokenize_batch_packs_and_counts(tok):
    batch = {
        "messages": [DIALOGUE[1:3], [], DIALOGUE[1:]],
        "text": [None, "Plain text row.", None],
    }
    plain = tokenize_batch(tok, batch, max_seq_len=512, packing=False)
    assert plain["n_examples"] == [1, 1, 1] and plain["n_dropped"] == [0, 0, 0]
    packed = tokenize_batch(tok, batch, max_seq_len=512, packing=True)
    assert packed["n_examples"] == [3]
    assert packed["input_ids"][0] == sum(plain["input_ids"], [])
    assert packed["n_label_tokens"] == [sum(plain["n_label_tokens"])]
    tiny = tokenize_batch(tok, batch, max_seq_len=40, packing=True)
    assert sum(tiny["n_examples"]) + sum(tiny["n_dropped"]) == 3
    assert all(len(r) <= 40 for r in tiny["input_ids"]) and sum(tiny["n_truncated"]) >= 1


def _ex(ids: list[int]) -> TokenizedExample:
    return TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] + ids[1:])


def test_pack_examples_boundaries():
    rows = pack_examples([_ex([1, 2, 3]), _ex([4, 5]), _ex([6, 7, 8, 9]), _ex([10])], max_seq_len=6)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1] and rows[1]["position_ids"] == [0, 1, 2, 3, 0]
    # The first token of each example has no label: no example learns to predict the next one's start.
    assert rows[0]["labels"] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]


def test_collate_block_diagonal_mask():
    batch = {"input_ids": [[1, 2, 3, 4, 5], [6, 7]], "labels": [[-100, 2, 3, -100, 5], [-100, 7]],
             "position_ids": [[0, 1, 2, 0, 1], [0, 1]]}
    out = collate(batch, pad_id=0, packed=True)
    mask = out["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == bool
    expected0 = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], bool)
    assert (mask[0, 0] == expected0).all()
    assert mask[1, 0].any(axis=1).all()  # padding rows attend to themselves: no all-masked softmax rows
    assert out["labels"][1].tolist() == [-100, 7, -100, -100, -100]
    assert out["input_ids"][1].tolist() == [6, 7, 0, 0, 0]
    flat = collate(batch, pad_id=0, packed=False)
    assert flat["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


@pytest.mark.model
def test_packed_forward_equals_unpacked_forward():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 7, 3)]
    rows = pack_examples([_ex(s) for s in seqs], max_seq_len=16)
    assert len(rows) == 1
    batch = collate({k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids")}, pad_id=0,
                    packed=True)
    inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        alone = [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]
        # Control: the same row with only a padding mask lets later examples see earlier ones.
        leaky = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                      attention_mask=torch.ones_like(inputs["input_ids"])).logits[0]
    start = 0
    for s, ref in zip(seqs, alone):
        torch.testing.assert_close(packed[start : start + len(s)], ref, rtol=1e-5, atol=1e-5)
        start += len(s)
    assert not torch.allclose(leaky[5:12], alone[1], atol=1e-3)
