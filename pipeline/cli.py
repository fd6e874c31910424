"""The ``tgsft`` command line. Arguments only choose files and override typed config fields (``-o key=value``);
the schema lives in :mod:`pipeline.config`.

    tgsft model prepare                 # convert the embedded model once
    tgsft config show [CONFIG]          # effective config, defaults filled in
    tgsft config show [CONFIG] --resources  # CPUs, GPUs and memory each stage asks of the cluster
    tgsft generate [CONFIG]             # tree generation -> <run>/corpus
    tgsft train [CONFIG]                # mix + SFT -> <run>/train/model
    tgsft serve [CONFIG]                # OpenAI-compatible endpoint for base and tuned models
    tgsft eval [CONFIG]                 # lm-eval against the endpoint -> <run>/eval
    tgsft report RUN_DIR                # forgetting report from stored eval results
    tgsft inspect CORPUS [--compare C2] # corpus quality and coverage metrics -> inspect.{json,png}
    tgsft push CORPUS REPO_ID           # upload a corpus and its dataset card to the Hugging Face Hub
    tgsft run [CONFIG] [--verbose]      # all of the above, resumable; libraries' output in <run>/logs/
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import TGConfig

__all__ = ["main"]


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (see configs/); default: the built-in defaults")
    p.add_argument(
        "-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. -o tree.branching=[2,1,2,1] (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tgsft", description="Tree Generation SFT: fine-tune without forgetting.")
    sub = ap.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="action", required=True)
    prep = model.add_parser("prepare", help="convert the embedded SmolLM2-135M-Instruct GGUF to a HF folder")
    prep.add_argument("--cache-dir", help="cache directory (default $TGSFT_CACHE or $XDG_CACHE_HOME/tgsft)")
    prep.add_argument("--force", action="store_true", help="convert again even if a cached folder matches")

    cfg = sub.add_parser("config", help="configuration utilities").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print the effective config with defaults filled in")
    _add_config(show)
    show.add_argument("--resources", action="store_true",
                      help="print what each stage asks of the cluster (CPUs, GPUs, training memory) instead")

    gen = sub.add_parser("generate", help="tree generation: self-decompress the model into a corpus")
    _add_config(gen)
    gen.add_argument("--out", help="output directory (default <run>/corpus)")
    gen.add_argument("--overwrite", action="store_true", help="replace an output made with another config")

    train = sub.add_parser("train", help="mix domain data with the TG corpus and fine-tune (Ray Train + DeepSpeed)")
    _add_config(train)
    train.add_argument("--corpus", help="TG corpus directory (default <run>/corpus)")
    train.add_argument("--out", help="output directory (default <run>/train)")

    serve = sub.add_parser("serve", help="serve base and tuned models OpenAI-style (Ray Serve LLM); Ctrl-C stops")
    _add_config(serve)
    serve.add_argument(
        "--model", action="append", default=[], metavar="ID=PATH",
        help="model id and folder to serve (repeatable; default: base and <run>/train/model)",
    )

    ev = sub.add_parser("eval", help="evaluate served models with lm-eval")
    _add_config(ev)
    ev.add_argument("--base-url", help="an already running endpoint (default: serve the models for this eval)")
    ev.add_argument("--model", action="append", default=[], metavar="ID=PATH", help="as for serve")
    ev.add_argument("--data-dir", help="directory with upstream-format eval files (overrides eval.data_dir)")
    ev.add_argument("--out", help="output directory (default <run>/eval)")

    rep = sub.add_parser("report", help="forgetting report (JSON, Markdown, PNG) from stored eval results")
    rep.add_argument("run_dir", help="run directory holding eval/")
    rep.add_argument("--out", help="output directory (default <run_dir>/report)")

    ins = sub.add_parser("inspect", help="quality and knowledge-coverage metrics of a TG corpus (-> inspect.json/png)")
    ins.add_argument("corpus", help="corpus directory (e.g. runs/local/corpus)")
    ins.add_argument("--compare", metavar="CORPUS2", help="a second corpus directory, shown side by side")
    ins.add_argument("--reference", metavar="FILE_OR_DIR",
                     help="reference questions for coverage: .txt (one per line), .json/.jsonl rows, or an eval data "
                          "directory (default: the tgsft_general questions)")
    ins.add_argument("--threshold", type=float, default=None,
                     help="cosine at or above which a reference question counts as covered (default 0.5)")
    ins.add_argument("--out", help="output directory for inspect.json and inspect.png (default: the corpus)")

    push = sub.add_parser("push", help="upload a corpus with its dataset card to the Hugging Face Hub")
    push.add_argument("corpus", help="complete corpus directory")
    push.add_argument("repo_id", help="dataset repository, owner/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")

    run = sub.add_parser("run", help="generate, mix, train, serve, eval and report in one resumable run")
    _add_config(run)
    run.add_argument("--verbose", action="store_true",
                     help="show what Ray, vLLM, DeepSpeed and lm-eval print (default: <run>/logs/tgsft.log)")
    return ap


def _models(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"tgsft: --model {item!r}: expected ID=PATH")
        out[name] = path
    return out


def _os_error(e: OSError) -> str:
    """``path: reason`` for errors the OS raised; the message itself for the project's own."""
    if e.strerror and e.filename:
        hint = " (the disk is full)" if e.errno == errno.ENOSPC else ""
        return f"{e.filename}: {e.strerror}{hint}"
    return str(e)


def _notes(e: BaseException) -> str:
    """The notes an error picked up on its way (such as where a run's full logs are), one per line."""
    return "".join(f"\n{note}" for note in getattr(e, "__notes__", []))


def _print_resources(cfg: TGConfig) -> None:
    """The table of :func:`pipeline.resources.resources`: one row per stage, then the peak and training memory."""
    from pipeline.resources import resources

    res = resources(cfg)
    head = ("stage", "count", "CPUs each", "GPUs each", "CPUs", "GPUs", "")
    rows = [head] + [(s["stage"], str(s["count"]), f"{s['cpus_each']:g}", f"{s['gpus_each']:g}", f"{s['cpus']:g}",
                      f"{s['gpus']:g}", s["note"]) for s in res["stages"]]
    rows.append(("peak", "", "", "", f"{res['peak_cpus']:g}", f"{res['peak_gpus']:g}", "stages run one at a time"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    mem, params = res["train_memory"], res["params"]
    if mem is None:
        print("training memory per worker: unknown (parameter count needs a local model folder)")
    else:
        where = "GPU" if cfg.train.use_gpu else "RAM"
        print(f"training memory per worker (estimate, {params / 1e9:.2f} B params, model states only, no "
              f"activations): ~{mem['device'] / 1e9:.1f} GB {where} + ~{mem['host'] / 1e9:.1f} GB offloaded to RAM")


def _show_config(cfg: TGConfig, *, resources: bool) -> None:
    """``tgsft config show``: the effective config as YAML, or with ``--resources`` what each stage reserves."""
    if resources:
        _print_resources(cfg)
        return
    import yaml

    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")


def _check_storage(cfg: TGConfig) -> None:
    """On a multi-node cluster, every node must see the run's shared folders (:mod:`pipeline.storage`)."""
    from pipeline.storage import check_shared_storage

    check_shared_storage(cfg, log=print)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pipeline.config import ConfigError, load_config
    from pipeline.serve import ServeError

    try:
        if args.command == "model":
            from pipeline.model import prepare_embedded

            prepare_embedded(cache=args.cache_dir, force=args.force)
            return 0
        if args.command == "report":
            from pipeline.report import write_report

            write_report(Path(args.run_dir), out_dir=Path(args.out) if args.out else None)
            return 0
        if args.command == "inspect":
            from pipeline.inspect_corpus import inspect_corpora
            from pipeline.quality import COVERAGE_THRESHOLD

            corpora = [Path(args.corpus), *([Path(args.compare)] if args.compare else [])]
            inspect_corpora(corpora, reference=args.reference, out_dir=Path(args.out) if args.out else None,
                            threshold=COVERAGE_THRESHOLD if args.threshold is None else args.threshold)
            return 0
        if args.command == "push":
            from pipeline.card import push_corpus

            push_corpus(Path(args.corpus), args.repo_id, private=args.private)
            return 0

        cfg = load_config(args.config, overrides=args.overrides)
        if args.command in ("generate", "train"):  # `tgsft run` checks once its Ray is up
            _check_storage(cfg)
        if args.command == "config":
            _show_config(cfg, resources=args.resources)
        elif args.command == "generate":
            from pipeline.generate import generate

            generate(cfg, out_dir=Path(args.out) if args.out else None, overwrite=args.overwrite)
        elif args.command == "train":
            from pipeline.train import train

            train(
                cfg,
                corpus_dir=Path(args.corpus) if args.corpus else None,
                out_dir=Path(args.out) if args.out else None,
            )
        elif args.command == "serve":
            from pipeline.serve import serve_forever

            serve_forever(cfg, models=_models(args.model))
        elif args.command == "eval":
            from pipeline.evaluate import evaluate

            if args.data_dir:
                cfg.eval.data_dir = args.data_dir
            evaluate(
                cfg,
                models=_models(args.model),
                base_url=args.base_url,
                out_dir=Path(args.out) if args.out else None,
            )
        elif args.command == "run":
            from pipeline.run import run

            run(cfg, config_path=args.config, verbose=args.verbose)
    except ConfigError as e:
        print(f"tgsft: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # missing files, permissions, a full disk, a timed-out endpoint
        print(f"tgsft: error: {_os_error(e)}{_notes(e)}", file=sys.stderr)
        return 1
    except (ValueError, ServeError) as e:  # bad data (file, row, field), settings found wrong at run time, endpoints
        print(f"tgsft: error: {e}{_notes(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tgsft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
