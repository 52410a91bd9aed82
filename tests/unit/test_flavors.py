"""Flavors: the debug model covers every layer kind; Flash and Pro match the published sizes on meta."""

from __future__ import annotations

import pytest
import torch

from titan_dsv4.flavors import deepseek_v4_args
from titan_dsv4.model import DeepSeekV4Model
from titan_dsv4.model.accounting import analytic_nparams, count_param_groups, train_flops_per_token
from titan_dsv4.model.args import CSA, HASH_MOE, HCA, MOE, SLIDING


def test_debugmodel_has_every_attention_and_moe_kind():
    a = deepseek_v4_args["debugmodel"]
    assert {a.layer_type(i) for i in range(a.n_layers)} == {SLIDING, CSA, HCA}
    assert {a.mlp_type(i) for i in range(a.n_layers)} == {HASH_MOE, MOE}


@pytest.mark.parametrize(
    "flavor, backbone, active_range_b, with_mtp_t",
    [
        # published: DeepSeek-V4-Flash 284B total / 13B active; -Pro 1.6T total (with MTP) / 49B active
        ("flash", 284_332_230_231, (13.0, 14.0), None),
        ("pro", 1_572_997_179_491, (49.0, 50.0), 1.6),
    ],
)
def test_released_shapes_match_published_parameter_counts(flavor, backbone, active_range_b, with_mtp_t):
    args = deepseek_v4_args[flavor].replace()
    assert args.mtp_layers == 1  # the released checkpoints carry one MTP depth
    with torch.device("meta"):
        model = DeepSeekV4Model(args)
    counts = count_param_groups(args, model)
    assert counts.total == analytic_nparams(args)
    assert counts.backbone_total == backbone
    assert counts.mtp_total > 0 and all(
        n.startswith("mtp.layers.0.") for n, _ in model.named_parameters() if n.startswith("mtp")
    )
    if with_mtp_t is not None:
        assert round(counts.total / 1e12, 1) == with_mtp_t
    assert active_range_b[0] * 1e9 <= counts.backbone_active < active_range_b[1] * 1e9
    nparams, flops = args.get_nparams_and_flops(model, 4096)
    assert nparams == counts.total and flops > 6 * counts.active  # attention adds to 6 N_active


def test_released_schedules():
    flash, pro = deepseek_v4_args["flash"], deepseek_v4_args["pro"]
    assert flash.compress_ratios[:4] == [0, 0, 4, 128] and flash.compress_ratios.count(4) == 21
    assert flash.compress_ratios.count(128) == 20
    assert pro.compress_ratios[:4] == [128, 128, 4, 128] and pro.compress_ratios.count(4) == 30
    assert pro.compress_ratios.count(128) == 31
    assert flash.n_hash_layers == pro.n_hash_layers == 3


def test_flops_per_token_follow_the_spec_table():
    # The DeepSeek-V4 architecture spec (section 10, shared notes): train GFLOP/token at S=4096 without
    # MTP is 85.6 (Flash) and 312.3 (Pro).
    for flavor, gflops in (("flash", 85.6), ("pro", 312.3)):
        backbone = deepseek_v4_args[flavor].replace(mtp_layers=0)
        assert round(train_flops_per_token(backbone, 4096) / 1e9, 1) == gflops
        with_mtp = train_flops_per_token(deepseek_v4_args[flavor], 4096)
        assert with_mtp > train_flops_per_token(backbone, 4096)
