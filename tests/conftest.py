import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for path in (
    TESTS,
    ROOT,
):  # the tests' shared helpers (kernel_testing.py); train_gpt.py and the other scripts
    if path not in sys.path:
        sys.path.insert(0, path)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (marker cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def arcana():
    """torch.ops.arcana with the Python half registered, or a skip (a failure under
    ARCANA_REQUIRE_KERNELS=1)."""
    import kernel_testing
    import torch

    kernel_testing.require_kernels()
    return torch.ops.arcana


@pytest.fixture
def poison(arcana):
    """While a test runs, every output and scratch buffer of the arcana ops starts as NaN
    (all bits set), so an element a kernel forgets to write fails the comparison instead of passing
    on leftover memory."""
    arcana._set_poison(True)
    yield
    arcana._set_poison(False)


@pytest.fixture
def variant(arcana, request):
    """The kernels every arcana op runs while a test runs (torch.ops.arcana._set_variant: 0 plain, 1
    fast, 2 fast with cross-entropy rows re-read from L2), from the test's
    `@pytest.mark.parametrize("variant", [...], indirect=True)`; 1, the default, is restored
    afterwards whatever happens. (The emulator tests parametrize `variant` directly: they pass it to
    the launchers themselves and never touch the switch.)"""
    arcana._set_variant(request.param)
    yield request.param
    arcana._set_variant(1)
