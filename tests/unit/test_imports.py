"""Importing the package, its stage modules or the CLI loads no heavy library (checked in a fresh interpreter)."""

import subprocess
import sys

import pytest

HEAVY = ("vllm", "torch", "deepspeed", "ray", "transformers", "lm_eval", "sentence_transformers")
MODULES = ["pipeline", "pipeline.config", "pipeline.cachekey", "pipeline.cli", "pipeline.chat", "pipeline.tree",
           "pipeline.dedup", "pipeline.corpus", "pipeline.generate", "pipeline.run", "pipeline.model", "pipeline.runtime",
           "pipeline.quality", "pipeline.reference", "pipeline.card", "pipeline.sections", "pipeline.levels",
           "pipeline.inspect_corpus", "pipeline.storage", "actors.engine", "actors.embedder"]


@pytest.mark.parametrize("module", MODULES)
def test_import_is_light(module):
    code = (
        f"import sys, {module}\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"


def test_cli_help_is_light():
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
        f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "usage: tgsft generate" in proc.stdout and proc.stderr.strip() == ""
