"""tgsft: Tree Generation SFT.

Driver-side stages, one module each: ``config`` (typed settings), ``model`` (embedded model), ``chat`` (template
probing), ``tree`` (pure tree logic), ``dedup``, ``corpus`` (Parquet + manifest), ``generate`` (tree generation),
``quality`` / ``textmetrics`` / ``reference`` (corpus metrics, coverage reference), ``card`` (dataset card, Hub upload),
``inspect_corpus`` (``tgsft inspect``), ``data`` (domain loaders), ``mix``, ``tokenization`` (masks, packing),
``train``, ``serve``, ``evaluate``, ``compare`` / ``report`` (paired comparisons, the report), ``domain`` (the
built-in domain set), ``runtime`` (joining Ray), ``tracking`` (MLflow), ``console`` (what ``tgsft run`` shows),
``run`` (end to end), ``cli``. Importing this package loads none of ray, vllm, torch or deepspeed.
"""

__version__ = "0.1.0"
