"""Ray-facing classes: thin shells that build heavy state once (an engine, an embedder) and delegate to
``pipeline``. Nothing here is imported by ``pipeline`` at module import time."""
