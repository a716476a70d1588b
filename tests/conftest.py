import pytest

from egm.models.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The embedded demo model (random weights, seed 0), built once per test session."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    write_tiny_model(out, seed=0)
    return out
