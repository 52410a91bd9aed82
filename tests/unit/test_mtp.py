"""Multi-token prediction: the layout's invariants, its loss, its FSDP units, its config refusals.

transformers builds no MTP block, so there is no outside numerical reference: these tests pin what the
layout (spec section 6) implies instead.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.sharded import dims, full_grads, job, parallelized_copy, reference_model, sample

SEQ = 96


def _mtp_model(debug_args, **changes):
    torch.manual_seed(0)
    from titan_dsv4.model import DeepSeekV4Model

    model = DeepSeekV4Model(debug_args.replace(max_seq_len=SEQ, mtp_layers=1, **changes))
    model.init_weights()
    return model.train()


def test_depth_1_logits_at_t_depend_only_on_tokens_up_to_t_plus_1(debug_args):
    model = _mtp_model(debug_args)
    tokens = torch.randint(2, 2048, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, out = model(tokens)
        for t in (0, 17, 40, SEQ - 3):
            perturbed = tokens.clone()
            perturbed[:, t + 2 :] = torch.randint(2, 2048, perturbed[:, t + 2 :].shape)
            _, other = model(perturbed)
            assert torch.equal(other.mtp_logits[0][:, : t + 1], out.mtp_logits[0][:, : t + 1]), t
            assert not torch.equal(other.mtp_logits[0][:, t + 1 :], out.mtp_logits[0][:, t + 1 :]), t


def test_loss_weight_0_leaves_the_backbone_gradients_of_a_model_without_mtp(debug_args, one_thread):
    from titan_dsv4.infra.loss import deepseek_v4_loss
    from titan_dsv4.model import DeepSeekV4Model

    with_mtp = _mtp_model(debug_args, mtp_loss_weight=0.0)
    without = DeepSeekV4Model(debug_args.replace(max_seq_len=SEQ, mtp_layers=0)).train()
    without.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")})
    x, y = sample(0, SEQ)
    for model in (with_mtp, without):
        deepseek_v4_loss(model(x), y).backward()
    grads = {n: p.grad for n, p in without.named_parameters() if p.grad is not None}
    assert grads and all(torch.equal(grads[n], p.grad) for n, p in with_mtp.named_parameters() if n in grads)
    assert all(
        p.grad is None and not p.requires_grad for n, p in with_mtp.named_parameters() if n.startswith("mtp.")
    )


def test_mtp_loss_of_a_random_model_is_about_ln_vocab(debug_args):
    from titan_dsv4.infra.loss import deepseek_v4_loss
    from titan_dsv4.infra.metrics import step_figures

    model = _mtp_model(debug_args)
    x, y = sample(0, SEQ)
    loss = deepseek_v4_loss(model(x), y)
    model.step_metrics.close_step()
    figures = step_figures(model.step_metrics.closed)
    assert abs(figures["mtp_loss"] - math.log(2048)) < 0.1 * math.log(2048), figures
    # the returned value is the LM loss alone; the MTP term is in its gradient only
    main = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum")
    assert torch.allclose(loss, main, rtol=1e-6)
    # the last position has no depth-1 target; the others all count
    assert int(model.step_metrics.closed["mtp_targets/1"]) == SEQ - 1


def test_mtp_targets_never_cross_a_document_boundary():
    from titan_dsv4.model.outputs import mtp_targets_in_document

    tokens = torch.tensor([[5, 6, 1, 7, 8, 9, 1, 4]])  # documents end with eos = 1
    assert mtp_targets_in_document(tokens, 1, eos_id=1).tolist() == [
        [True, False, False, True, True, False, False]
    ]
    assert mtp_targets_in_document(tokens, 1, eos_id=None).all()


def test_mtp_config_values_are_refused_by_name():
    from pathlib import Path

    from torchtitan.config import ConfigManager

    from titan_dsv4.job_config import check_job
    from titan_dsv4.model import ConfigError

    root = Path(__file__).parents[2]
    for flags, named in (
        (["--deepseek_v4.mtp_layers", "-1"], "mtp_layers=-1"),
        (["--deepseek_v4.mtp_loss_weight", "-0.5"], "deepseek_v4.mtp_loss_weight=-0.5"),
    ):
        job = ConfigManager().parse_args(
            ["--job.config_file", str(root / "train_configs/debug_model.toml"), *flags]
        )
        job.model.hf_assets_path = str(root / "titan_dsv4/assets/tokenizer")
        with pytest.raises(ConfigError, match=named):
            check_job(job)


# ---- under FSDP, AC and EP: its own unit, gradients equal one process ------------------------------
def _mtp_step(rank, world_size):
    from titan_dsv4.flavors import deepseek_v4_args
    from titan_dsv4.infra.loss import deepseek_v4_loss
    from titan_dsv4.infra.parallelize import parallelize_deepseek_v4
    from titan_dsv4.infra.unit_plan import fsdp_units

    args = deepseek_v4_args["debugmodel"].replace(max_seq_len=256, mtp_layers=1)
    ref = reference_model(args)
    parallel = dims(world_size, dp_shard=world_size, ep=2)
    model = parallelized_copy(ref, parallel, job(ac="full"))
    x, y = sample(rank, 256)
    (deepseek_v4_loss(model(x), y) / (256 * world_size)).backward()
    out = {"grads": full_grads(model)}
    with torch.device("meta"):
        unit_model = type(ref)(args.replace())
    parallelize_deepseek_v4(unit_model, parallel, job("bfloat16", ac="full"))
    out["units"] = fsdp_units(unit_model)
    if rank == 0:
        xs, ys = zip(*(sample(r, 256) for r in range(world_size)))
        (deepseek_v4_loss(ref(torch.cat(xs)), torch.cat(ys)) / (256 * world_size)).backward()
        out["ref"] = {n: p.grad for n, p in ref.named_parameters()}
    return out


@pytest.mark.slow
def test_mtp_is_its_own_fsdp_unit_and_trains_under_ep_and_ac(ranks):
    out = ranks.run(_mtp_step, 2)[0]
    mtp_grads = [n for n, g in out["grads"].items() if n.startswith("mtp.") and g is not None]
    assert "mtp.layers.0.block.moe.experts.w1" in mtp_grads and "mtp.layers.0.e_proj.weight" in mtp_grads
    for name, g in out["grads"].items():
        ref = out["ref"][name]
        assert (g is None) == (ref is None), name
        if g is not None:
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=name)
    units = {u.name: u for u in out["units"]}
    assert units["mtp.layers.0"].kind == "mtp" and units["mtp.layers.0"].compute_dtypes == {torch.bfloat16}
    islands = next(u for u in out["units"] if "mtp.layers.0.hc_head" in u.members)
    assert {"mtp.layers.0.block.attn_hc", "mtp.layers.0.block.ffn_hc"} <= set(islands.members)
    assert islands.compute_dtypes == {torch.float32} and islands.reduce_dtype == torch.float32
    assert units["mtp.layers.0.block.moe.experts"].kind == "experts"
    assert all(len(u.storage_dtypes) == len(u.compute_dtypes) == 1 for u in out["units"])
