"""The preflight refuses every layout the ranks would refuse, with a ConfigError and nothing else: a property
test over small degree products (no ZeroDivisionError, no Titan assertion, on any combination)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from torchtitan.config import ConfigManager

from titan_dsv4.job_config import job_model_args
from titan_dsv4.model.errors import ConfigError
from titan_dsv4.preflight import refuse_layout_of_job

ROOT = Path(__file__).resolve().parents[2]
DEGREES = {
    "data_parallel_replicate_degree": (1, 2),
    "data_parallel_shard_degree": (-1, 1, 2, 4),
    "context_parallel_degree": (1, 2),
    "tensor_parallel_degree": (1, 2),
    "pipeline_parallel_degree": (1, 2),
    "expert_parallel_degree": (1, 2, 4, 8),
    "expert_tensor_parallel_degree": (1, 2),
}


@pytest.fixture(scope="module")
def job():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        job = ConfigManager().parse_args(["--job.config_file", "train_configs/debug_model.toml"])
    finally:
        os.chdir(cwd)
    job.training.seq_len = 512  # a multiple of every cp chunk granularity above
    return job


def test_every_small_degree_combination_is_accepted_or_refused_with_a_config_error(job):
    args = job_model_args(job)
    args.update_from_config(job)
    outcomes = {"accepted": 0, "refused": 0}
    tp_refused = []
    for world in (1, 2, 4, 8):
        for values in itertools.product(*DEGREES.values()):
            for name, value in zip(DEGREES, values):
                setattr(job.parallelism, name, value)
            try:
                refuse_layout_of_job(args, job, world)
                outcomes["accepted"] += 1
                assert job.parallelism.tensor_parallel_degree == 1
            except ConfigError as error:  # anything else (ZeroDivisionError, AssertionError) fails the test
                outcomes["refused"] += 1
                if "tensor_parallel_degree=2 yet" in str(error):
                    tp_refused.append(values)
    assert outcomes["accepted"] > 50 and outcomes["refused"] > 1000, outcomes
    assert tp_refused  # TP (and EP borrowing from TP: the case that divided by zero) is named as TP


def test_ep_borrowing_from_tp_is_refused_as_tp_not_a_division_by_zero(job):
    """The reported case: NGPU=4 --tensor_parallel_degree 2 --expert_parallel_degree 4."""
    args = job_model_args(job)
    for name in DEGREES:
        setattr(job.parallelism, name, 1)
    job.parallelism.data_parallel_shard_degree = -1
    job.parallelism.tensor_parallel_degree, job.parallelism.expert_parallel_degree = 2, 4
    with pytest.raises(ConfigError, match="does not implement parallelism.tensor_parallel_degree=2"):
        refuse_layout_of_job(args, job, 4)
