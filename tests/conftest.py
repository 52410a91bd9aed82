import os

import pytest
import torch

# Triton kernels run in Triton's interpreter without CUDA (read when @triton.jit decorates: set before import)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from titan_dsv4.cpu import apply_cpu_support

# run_train.sh's rank count, worked out once here rather than by a torch import in every launch (1-2 s
# each): its own rule, the GPU count or 2 CPU ranks. test_train_e2e's default-config launch still leaves
# it to run_train.sh.
os.environ.setdefault("NGPU", str(torch.cuda.device_count() or 2))

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


@pytest.fixture(scope="session")
def ranks():
    """``ranks.run(fn, world_size, *args, timeout=...)``: ``run_on_ranks`` on ranks kept between tests
    (tests/helpers/rank_pool.py); they end when the tests of a folder are done."""
    from tests.helpers.rank_pool import POOL

    yield POOL
    POOL.close()


def pytest_runtest_teardown(item, nextitem):
    """Idle ranks hold memory: end them after the last test of each folder (the next folder's first
    ``ranks.run`` starts its own)."""
    import sys

    pool = sys.modules.get("tests.helpers.rank_pool")
    if pool is not None and (nextitem is None or nextitem.path.parent != item.path.parent):
        pool.POOL.close()
