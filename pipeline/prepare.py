"""The SFT stage's data preparation, on the driver: domain data + TG corpus -> mix -> token rows.

Reads ``data.train`` files (or the built-in domain set, :func:`pipeline.domain.build_domain`), the TG corpus
(minus the retention probe's held-out slice) and the model's tokenizer. Writes the mix (``<out>/mix/``,
:mod:`pipeline.mix`) and returns every epoch of it in its epoch order, tokenized (and packed) as
:data:`TOKEN_SCHEMA` rows, with the counts gathered on the way (:class:`Prepared`); :mod:`pipeline.train` streams
them to the workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import TGConfig, TrainConfig

__all__ = ["TOKEN_SCHEMA", "Prepared", "prepare_tokens", "training_stream"]

TOKEN_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("n_examples", pa.int32()),
        ("n_truncated", pa.int32()),
        ("n_dropped", pa.int32()),
        ("n_tokens", pa.int32()),
        ("n_label_tokens", pa.int32()),
    ]
)
_COUNTERS = ("n_examples", "n_truncated", "n_dropped", "n_tokens", "n_label_tokens")
_CHUNK = 1024  # examples tokenized (and packed) together


def training_stream(mix: pa.Table, *, epochs: int, seed: int) -> pa.Table:
    """Every epoch of the mix (:func:`pipeline.mix.epoch_rows`: the domain rows and that epoch's TG rows, in the
    epoch's order), one after the other."""
    from pipeline.mix import epoch_rows

    parts = [epoch_rows(mix, seed=seed, epoch=e) for e in range(epochs)]
    return pa.concat_tables(parts).select(["messages", "text"])


def _count_tokens(tokenizer: Any) -> Callable[[list[dict] | None, str | None], int]:
    def count(messages: list[dict] | None, text: str | None) -> int:
        if messages:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False)
        return len(tokenizer(text or "", add_special_tokens=False)["input_ids"])

    return count


def _domain_files(cfg: TGConfig, log: Callable[[str], None]) -> list[str]:
    if cfg.data.train:
        return list(cfg.data.train)
    from pipeline.domain import build_domain

    train_file, _ = build_domain(cfg.run_dir / "domain")
    log(f"data.train is empty: using the built-in domain set {train_file}")
    return [str(train_file)]


def _check_lengths(domain: Any, tokenizer: Any, *, max_seq_len: int, bad_rows: str) -> None:
    """Treat domain rows with no assistant token within ``max_seq_len`` as bad rows (raise, or skip and count).

    Raises:
        DataError: the first such row (file, row, ``messages``) when ``bad_rows="error"``, or no row is left.
    """
    from pipeline.data import DataError
    from pipeline.tokenization import tokenize_chat

    bad = {}
    for i, messages in enumerate(domain.examples):
        if tokenize_chat(tokenizer, messages, max_seq_len=max_seq_len) is None:
            n = len(tokenize_chat(tokenizer, messages, max_seq_len=1 << 30).input_ids)
            err = domain.row_error(i, "messages", f"{n} tokens, and none of the assistant's within "
                                   f"train.max_seq_len={max_seq_len}: nothing to train on (raise train.max_seq_len "
                                   "or shorten the prompt)")
            if bad_rows != "skip":
                raise err
            bad[i] = err
    if bad:
        domain.drop(bad)
        if not domain.examples:
            raise DataError(", ".join(domain.files), f"no row fits train.max_seq_len={max_seq_len}")


def _tokenize(stream: pa.Table, *, tokenizer: Any, tc: TrainConfig) -> tuple[pa.Table, dict[str, int]]:
    """Token rows of the stream, in order (packs never cross chunks of ``_CHUNK`` examples), and their counts."""
    from pipeline.tokenization import tokenize_batch

    parts = []
    for start in range(0, stream.num_rows, _CHUNK):
        chunk = stream.slice(start, _CHUNK).to_pydict()
        out = tokenize_batch(tokenizer, chunk, max_seq_len=tc.max_seq_len, packing=tc.packing)
        parts.append(pa.table(out, schema=TOKEN_SCHEMA))
    table = pa.concat_tables(parts)
    counts = {name: int(pc.sum(table.column(name)).as_py() or 0) for name in _COUNTERS}
    return table, {"rows": table.num_rows, **counts}


@dataclass
class Prepared:
    """The training stream, ready for the workers: token rows and what was counted on the way."""

    model_path: str
    tokens: pa.Table  # TOKEN_SCHEMA rows in stream order
    pad_id: int
    total_steps: int
    data_stats: dict[str, Any]
    mix_stats: dict[str, Any]
    tok_stats: dict[str, int]


def prepare_tokens(cfg: TGConfig, *, corpus_dir: Path | None, out_dir: Path,
                   log: Callable[[str], None] = print) -> Prepared:
    """Load the domain data and the TG corpus, build and write the mix, tokenize (and pack) every epoch of it.

    Raises:
        ValueError: bad data (:class:`pipeline.data.DataError`) or a mix too small for one optimizer step.
        FileNotFoundError: a data file or the TG corpus is missing.
    """
    from transformers import AutoTokenizer

    from pipeline.data import load_examples
    from pipeline.mix import build_mix, load_tg, write_mix
    from pipeline.model import resolve_model

    tc = cfg.train
    model_path = resolve_model(cfg.model, log=log)
    domain = load_examples(_domain_files(cfg, log), fmt=cfg.data.format, bad_rows=cfg.data.bad_rows,
                           max_examples=cfg.data.max_examples)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    _check_lengths(domain, tokenizer, max_seq_len=tc.max_seq_len, bad_rows=cfg.data.bad_rows)
    if domain.skipped:
        log(f"data: skipped {domain.skipped} bad row(s); first: {domain.problems[0]}")
    tg, tg_stats = None, {}
    if cfg.mix.tg_ratio > 0:
        corpus = Path(corpus_dir or cfg.mix.tg_corpus or cfg.run_dir / "corpus")
        tg, tg_stats = load_tg(corpus, retention_dialogues=cfg.eval.retention_dialogues)
    mix, mix_stats = build_mix(domain.examples, tg, tg_ratio=cfg.mix.tg_ratio, by=cfg.mix.by, seed=cfg.mix.seed,
                               epochs=tc.epochs, count_tokens=_count_tokens(tokenizer))
    mix_stats.update(tg_stats)
    write_mix(mix, mix_stats, out_dir / "mix")
    log(f"mix: {mix_stats['domain_examples']} domain rows per epoch + {mix_stats['tg_examples']} TG rows over "
        f"{tc.epochs} epoch(s) ({mix_stats['tg_unique']} distinct, each used at most {mix_stats['tg_max_uses']} "
        f"time(s); TG share {mix_stats['tg_share_examples']:.2f} of examples) -> {out_dir / 'mix'}")

    t1 = time.monotonic()
    stream = training_stream(mix, epochs=tc.epochs, seed=cfg.mix.seed)
    tokens, tok_stats = _tokenize(stream, tokenizer=tokenizer, tc=tc)
    per_step = tc.num_workers * tc.micro_batch_size * tc.grad_accum
    total_steps = tok_stats["rows"] // per_step
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    if total_steps < 1:
        raise ValueError(f"{tok_stats['rows']} training rows are fewer than one optimizer step needs ({per_step} = "
                         "num_workers x micro_batch_size x grad_accum); add data or epochs, or shrink the batch")
    log(f"tokens: {tok_stats['rows']} rows, {tok_stats['n_tokens']} tokens ({tok_stats['n_truncated']} examples "
        f"truncated to {tc.max_seq_len}, {tok_stats['n_dropped']} dropped with no assistant token left); "
        f"{total_steps} steps of {per_step} rows ({time.monotonic() - t1:.1f} s)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Prepared(model_path=model_path, tokens=tokens, pad_id=pad_id, total_steps=total_steps,
                    data_stats=domain.stats(), mix_stats=mix_stats, tok_stats=tok_stats)
