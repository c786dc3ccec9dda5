import pytest

import tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny_model"))
