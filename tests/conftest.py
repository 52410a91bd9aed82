import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import titan_dsv4  # noqa: E402,F401  (CPU support before torchtitan, registers the spec)


@pytest.fixture
def debug_args():
    """A private copy of the debugmodel flavor (Titan's flavors are shared, mutable singletons)."""
    from titan_dsv4.flavors import deepseek_v4_args

    return deepseek_v4_args["debugmodel"].replace()


@pytest.fixture
def one_thread():
    """Bit-exact comparisons: CPU scatter-add backward sums in thread order, so run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
