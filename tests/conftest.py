"""Shared fixtures. Pure unit tests need none of them but the small HTTP stub (unit tests marked ``model`` use the
prepared model); integration tests share one Ray cluster and one prepared embedded model per session (the generation
tests also one vLLM engine: tests/integration/generation/conftest.py)."""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Logical CPUs for the test cluster: more than the 2 cores, so an engine actor, Ray Data tasks, 2 train workers
# and Serve replicas can all be placed; they time-share the cores.
TEST_RAY_CPUS = 8


@pytest.fixture(scope="session")
def model_path() -> str:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder (converted once, then cached)."""
    from pipeline.model import prepare_embedded

    return str(prepare_embedded(log=lambda *_: None))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session, bound to loopback."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=TEST_RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_data() -> Path:
    """The benchmark data folder beside the checkout, when it exists (never needed by unit tests)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip("shared data folder not present")
    return path


@pytest.fixture
def no_logprobs_endpoint():
    """An OpenAI-style server (like many hosted APIs) that lists model 'base' and completes, but never returns
    prompt logprobs."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self._send({"object": "list", "data": [{"id": "base", "object": "model"}]})

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"choices": [{"index": 0, "text": " blue", "logprobs": None}]})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
