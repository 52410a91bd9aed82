import pytest
import torch

from titan_dsv4.cpu import apply_cpu_support

apply_cpu_support()  # on a machine without an accelerator: Titan's device is the CPU, its groups gloo


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
