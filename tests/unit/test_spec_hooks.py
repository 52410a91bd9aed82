"""The train spec's parallelize and pipelining hooks are the package's functions themselves (Titan's
model-spec interface); their refusals raise for library callers and exit with one message at entry points."""

from __future__ import annotations

import pytest

from titan_dsv4 import refusals
from titan_dsv4.infra.parallelize import UnsupportedParallelismError, parallelize_deepseek_v4
from titan_dsv4.infra.pipeline import pipeline_deepseek_v4
from titan_dsv4.spec import get_train_spec


def test_the_hooks_are_parallelize_deepseek_v4_and_pipeline_deepseek_v4():
    spec = get_train_spec()
    assert spec.parallelize_fn is parallelize_deepseek_v4
    assert spec.pipelining_fn is pipeline_deepseek_v4
    assert parallelize_deepseek_v4.__name__ == "parallelize_deepseek_v4"
    assert pipeline_deepseek_v4.__wrapped__.__module__ == "titan_dsv4.infra.pipeline"


def test_a_refusal_raises_for_a_library_caller_and_exits_once_at_an_entry_point(monkeypatch, capsys):
    from tests.helpers.sharded import job
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.model import DeepSeekV4Model

    class Dims:  # a tensor-parallel layout: refused before any module is touched
        dp_replicate, dp_shard, cp, tp, pp, ep, etp = 1, 1, 1, 2, 1, 1, 1

    model = DeepSeekV4Model(deepseek_v4_args["debugmodel"].replace(max_seq_len=256))
    with pytest.raises(UnsupportedParallelismError, match="tensor_parallel_degree=2"):
        parallelize_deepseek_v4(model, Dims(), job())
    monkeypatch.setitem(refusals._AT_ENTRY_POINT, "active", True)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exited:
        parallelize_deepseek_v4(model, Dims(), job())
    assert exited.value.code == refusals.REFUSED_EXIT_CODE
    assert capsys.readouterr().err.count("DeepSeek-V4 refused this job before any work") == 1
