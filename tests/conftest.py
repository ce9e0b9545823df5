"""Shared fixtures: the embedded model, loaded once per test session, its tokenizer, one torch thread for a module
of tiny models, and the `slow` marker."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; `make test-fast` skips it")


@pytest.fixture(scope="session")
def embedded_model():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in float32 on CPU, shared by all tests.

    The first session on a machine converts the GGUF into the user's cache (about 20 s); later ones load the
    cached copy in seconds. Tests must not modify the weights. An Engine switches the model's attention to
    InfLLM's (and back on its next feed): a test that calls the plain model sets the stock attention itself.
    """
    from inf_llm.model.loading import load_model  # here, not at the top: GPU machines run tests/test_cuda.py without it

    return load_model()


@pytest.fixture(scope="session")
def tokenizer(embedded_model):
    """The embedded model's tokenizer."""
    return embedded_model[1]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models
    run far faster on one (a busy machine makes a thread pool spin); the previous count is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
