import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import titan_dsv4  # noqa: E402,F401  (CPU support before torchtitan, registers the spec)


@pytest.fixture
def debug_args():
    """A private copy of the debugmodel flavor (Titan's flavors are shared, mutable singletons)."""
    from titan_dsv4.flavors import deepseek_v4_args

    return deepseek_v4_args["debugmodel"].replace()
