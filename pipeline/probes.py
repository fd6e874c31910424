"""Data-free drift probes: KL(base || model) on built-in generic dialogues and NLL on human-written reference text.

Reads model folders (the base model's tokenizer is used for every model: the tuned ones share its vocabulary) and,
optionally, ``eval.reference_text``. Returns per-item values that :mod:`pipeline.evaluate` stores in each model's
eval JSON; writes nothing itself.

- **KL probe.** :data:`GENERIC_DIALOGUES` are short everyday questions with plain answers, written for this project
  (not TG output, so the probe favours no arm). At every assistant-content token of each rendered dialogue, the
  next-token distribution of base (P) and of the model (Q) give ``KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))``
  over the full vocabulary, in nats; an item's value is the mean over its tokens.
- **Reference text.** Mean NLL per scored token (assistant content of dialogues, every token of plain text) of
  each model on the user's own text, lower is better.

Both run here, with transformers in fp32 on the driver's CPU, one sequence per forward pass, rather than through the
endpoint: the endpoint returns only the top-k logprobs of a position, so it cannot give a full-vocabulary KL, and its
numerics change with batching. Computed this way the probes are exact and deterministic, so a model compared with
itself gives exactly 0 and the probes have no batching noise floor. For the embedded 135M model both take seconds;
for models too large for the driver's memory set ``eval.kl_prompts: 0`` and leave ``eval.reference_text`` unset.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from pipeline.chat import renderer
from pipeline.tokenization import assistant_spans

__all__ = ["GENERIC_DIALOGUES", "drift_probes", "generic_rows", "load_reference_text", "scored_tokens"]

# (question, answer): generic everyday requests with plain answers, written for this project.
GENERIC_DIALOGUES: list[tuple[str, str]] = [
    ("How do I boil an egg?", "Put the egg in a pot of cold water, bring it to a boil, then let it cook for about "
     "nine minutes. Cool it in cold water before peeling."),
    ("What should I pack for a weekend trip?", "Pack clothes for two days, a toothbrush, a phone charger, any "
     "medicine you take, and a light jacket in case the weather changes."),
    ("Can you suggest a name for a grey cat?", "You could call her Misty, Smokey or Pebble. Short names are easy "
     "for a cat to learn."),
    ("Why is the sky blue?", "Sunlight is scattered by the air, and blue light is scattered much more than red "
     "light, so the sky looks blue from the ground."),
    ("How can I sleep better?", "Go to bed at the same time each night, keep the room dark and cool, and avoid "
     "screens and coffee late in the evening."),
    ("What is a good way to learn a new language?", "Practise a little every day, listen to native speakers, and "
     "try to speak from the start, even if you make mistakes."),
    ("Write a short thank-you note to a neighbour.", "Dear Sam, thank you so much for watering my plants while I "
     "was away. It was very kind of you. Best wishes, Alex."),
    ("How do plants grow?", "Plants take in water through their roots and use sunlight to turn carbon dioxide and "
     "water into sugar, which gives them energy to grow."),
    ("What is the difference between weather and climate?", "Weather is what the air is like on a given day. "
     "Climate is the usual pattern of weather in a place over many years."),
    ("Give me a tip for saving money.", "Write down everything you spend for a month. Seeing where the money goes "
     "makes it easier to cut the things you do not need."),
    ("How do I make a cup of tea?", "Boil fresh water, pour it over a tea bag in a cup, wait three to five minutes, "
     "then remove the bag and add milk or sugar if you like."),
    ("Why do we need to drink water?", "Water keeps the body at the right temperature, carries nutrients to cells "
     "and helps remove waste. Without it the body cannot work properly."),
    ("What is a noun?", "A noun is a word for a person, place, thing or idea, such as teacher, city, chair or "
     "freedom."),
    ("How many players are on a football team?", "A football team has eleven players on the field, including the "
     "goalkeeper."),
    ("Suggest a simple dinner for two.", "Try pasta with tomato sauce, garlic and fresh basil, served with a green "
     "salad. It takes about twenty minutes."),
    ("How do I clean a wooden table?", "Wipe it with a soft cloth and a little warm, soapy water, then dry it "
     "straight away. Avoid soaking the wood."),
    ("What does a doctor do?", "A doctor examines people who are ill or hurt, finds out what is wrong and treats "
     "them, for example with medicine or advice."),
    ("Tell me a fun fact about octopuses.", "An octopus has three hearts and blue blood, and it can change the "
     "colour of its skin to hide from other animals."),
    ("How can I stay focused while studying?", "Put your phone in another room, work in short blocks of about "
     "twenty-five minutes, and take a short break after each one."),
    ("What is recycling?", "Recycling means collecting used materials such as paper, glass and plastic and turning "
     "them into new products instead of throwing them away."),
    ("How do I say hello in Spanish?", "You say hola. In the morning you can also say buenos dias, which means good "
     "morning."),
    ("Why do leaves change colour in autumn?", "As days get shorter, trees stop making green chlorophyll, so the "
     "yellow and orange colours already in the leaves show through."),
    ("What is a healthy breakfast?", "Oatmeal with fruit, or wholegrain toast with an egg, gives you energy and "
     "keeps you full until lunch."),
    ("How do I write a good email subject line?", "Keep it short and specific, and say what the email is about, "
     "for example Meeting moved to Friday at ten."),
    ("What causes rain?", "Water evaporates, rises and cools into tiny droplets that form clouds. When the droplets "
     "join and grow heavy, they fall as rain."),
    ("Can you explain what a budget is?", "A budget is a plan for your money. It lists what you expect to earn and "
     "how much you will spend on each thing."),
    ("How do I take care of a houseplant?", "Give it light, water it when the top of the soil feels dry, and do not "
     "let it stand in water."),
    ("What is the moon made of?", "The moon is made of rock. Its surface is covered in dust and craters made by "
     "objects that hit it long ago."),
    ("How do I introduce myself at a new job?", "Smile, say your name and your role, and ask your colleagues a "
     "little about their work. People like to be asked."),
    ("Why is exercise good for you?", "Exercise makes the heart and muscles stronger, helps you sleep, and can "
     "improve your mood."),
    ("What is a map used for?", "A map shows where places are and how to get from one to another, so you can plan "
     "a route."),
    ("How long should I brush my teeth?", "Brush for about two minutes, twice a day, and reach every surface of "
     "each tooth."),
]


def generic_rows(n: int) -> list[dict[str, Any]]:
    """The first ``n`` of :data:`GENERIC_DIALOGUES` as dialogue rows (all of them when ``n`` is larger)."""
    return [{"dialogue_id": f"generic-{i:02d}", "messages": [{"role": "user", "content": q},
                                                            {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(GENERIC_DIALOGUES[:n])]


def scored_tokens(tok: Any, row: dict[str, Any], max_len: int) -> tuple[list[int], list[bool]]:
    """Token ids of a dialogue (``messages``) or plain text (``text``) and which of them are scored.

    Scored: the tokens the SFT loss applies to (assistant turns with their end-of-turn marker, as
    :func:`pipeline.tokenization.assistant_spans` finds them; user turns and template text are context only), or
    every token of plain text. At most ``max_len - 1`` tokens are kept.

    Raises:
        ValueError: the chat template is not prefix-stable, so assistant spans cannot be located.
    """
    if row.get("messages"):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        text, spans = assistant_spans(renderer(tok), messages)
    else:
        text = row.get("text") or ""
        spans = [(0, len(text))]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][: max_len - 1]  # leave room for 1 generated token when sent to an endpoint
    mask = [any(s < end and e > start for start, end in spans) for s, e in enc["offset_mapping"][: len(ids)]]
    return ids, mask


def load_reference_text(path: str | Path, *, fmt: str = "auto") -> list[dict[str, Any]]:
    """Rows ``{"dialogue_id", "messages"}`` or ``{"dialogue_id", "text"}`` of a reference-text file.

    ``.jsonl``, ``.json`` and ``.parquet`` files are dialogues in any ``data.format``; any other file is plain text
    cut into paragraphs at blank lines.

    Raises:
        FileNotFoundError: the file does not exist.
        pipeline.data.DataError: a malformed dialogue row (file, row, field).
        ValueError: the file holds no text.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"eval.reference_text: {path} is not a file")
    if path.suffix in (".jsonl", ".json", ".parquet"):
        from pipeline.data import load_examples

        examples = load_examples([path], fmt=fmt, bad_rows="error").examples
        rows = [{"dialogue_id": f"ref-{i:05d}", "messages": m} for i, m in enumerate(examples)]
    else:
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        rows = [{"dialogue_id": f"ref-{i:05d}", "text": p} for i, p in enumerate(paragraphs)]
    if not rows:
        raise ValueError(f"eval.reference_text: {path} holds no text")
    return rows


def _summary(ids: list[str], values: list[float], *, higher_is_better: bool) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"n": n, "value": mean, "stderr": math.sqrt(var / n) if n else None,
            "higher_is_better": higher_is_better, "items": {"ids": ids, "values": values}}


def drift_probes(
    models: dict[str, str], *, reference_id: str, kl_rows: list[dict[str, Any]], text_rows: list[dict[str, Any]],
    max_len: int, trust_remote_code: bool = False, log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """KL(reference || model) on ``kl_rows`` and NLL on ``text_rows`` for every model (see the module docstring).

    Args:
        models: model id -> Hugging Face folder or hub id; must include ``reference_id``.
        reference_id: the model whose distribution is P (``base``).
        kl_rows: dialogues (``{"dialogue_id", "messages"}``) for the KL probe; empty skips it.
        text_rows: reference-text rows for the NLL probe; empty skips it.
        max_len: tokens per item at most.
        trust_remote_code: passed to transformers.
        log: progress lines.

    Returns:
        ``{model_id: {"kl": summary, "reference_nll": summary}}`` (keys only for probes that ran); a summary is
        ``{"n", "value", "stderr", "higher_is_better", "items": {"ids", "values"}}`` (KL in nats per token).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[reference_id], trust_remote_code=trust_remote_code)
    def encode(rows: list[dict[str, Any]]) -> list[tuple[str, list[int], list[bool]]]:
        encoded = [(r["dialogue_id"], *scored_tokens(tok, r, max_len)) for r in rows]
        return [e for e in encoded if any(e[2][1:])]  # position 0 has no prediction

    kl_enc, text_enc = encode(kl_rows), encode(text_rows)

    def load(path: str) -> Any:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
        return model.eval()

    @torch.no_grad()
    def next_token_logprobs(model: Any, ids: list[int], mask: list[bool]) -> torch.Tensor:
        """(scored positions, vocab) log-probabilities of each scored token's position, predicted one step back."""
        logits = model(torch.tensor([ids])).logits[0, :-1].float()  # logits[t] predicts token t + 1
        keep = torch.tensor(mask[1:])
        return torch.log_softmax(logits[keep], dim=-1)

    reference = load(models[reference_id])
    ref_lp = [next_token_logprobs(reference, ids, mask) for _, ids, mask in kl_enc]
    out: dict[str, dict[str, Any]] = {}
    for model_id, path in models.items():
        model = reference if model_id == reference_id else load(path)
        result: dict[str, Any] = {}
        if kl_enc:
            values = []
            for (_, ids, mask), p_log in zip(kl_enc, ref_lp):
                q_log = p_log if model is reference else next_token_logprobs(model, ids, mask)
                kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1)  # per scored position, nats
                values.append(float(kl.mean()))
            result["kl"] = {"reference": reference_id,
                            **_summary([i for i, _, _ in kl_enc], values, higher_is_better=False)}
        if text_enc:
            values = []
            for _, ids, mask in text_enc:
                lp = next_token_logprobs(model, ids, mask)
                targets = torch.tensor([t for t, m in zip(ids[1:], mask[1:]) if m])
                values.append(float(-lp.gather(1, targets[:, None]).mean()))
            result["reference_nll"] = _summary([i for i, _, _ in text_enc], values, higher_is_better=False)
        out[model_id] = result
        log(f"probes: {model_id}: " + ", ".join(f"{k} {v['value']:.4f}" for k, v in result.items()))
        if model is not reference:
            del model
    return out
