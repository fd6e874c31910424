"""The generation tests' shared engine."""

import pytest


@pytest.fixture(scope="package")
def engines(ray_session, model_path):
    """One vLLM engine actor on the embedded model, shared by the generation tests (each start costs 20-100 s).
    Package scope, not session: an idle vLLM CPU engine keeps polling (~20-30 % of a core), which the training and
    serving tests need."""
    from actors.engine import start_engines, stop_engines
    from pipeline.config import EngineConfig, ModelConfig
    from pipeline.generate import engine_options

    opts = engine_options(ModelConfig(), EngineConfig(enforce_eager=True, kv_cache_gib=1))
    handles = start_engines(model_path, **opts)
    yield handles
    stop_engines(handles)
