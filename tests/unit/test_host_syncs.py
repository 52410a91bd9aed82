"""No host synchronisation in a training forward and backward (one rank, no EP): a dispatch mode records
every op that makes the host wait for the device; the only one left is the token-id check, which reads
host tensors only (on a GPU the ids are device tensors and it returns without reading them)."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense.default,  # .item(), int(), float(), bool(), a tensor in an `if`
    aten.equal.default,
    aten.nonzero.default,
    aten.is_nonzero.default,
    aten._unique2.default,
    aten.masked_select.default,
    aten.repeat_interleave.Tensor,
}


class SyncRecorder(TorchDispatchMode):
    """Counts syncing ops by the package function that called them."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            ours = [f for f in traceback.extract_stack() if "/titan_dsv4/" in f.filename]
            self.sites[ours[-1].name if ours else "<outside titan_dsv4>"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mask", ["causal", "block_causal"])
def test_a_training_step_makes_the_host_wait_only_to_check_host_token_ids(debug_args, mask):
    from titan_dsv4.infra.loss import deepseek_v4_loss
    from titan_dsv4.model import DeepSeekV4Model

    args = debug_args.replace(max_seq_len=256, attn_mask_type=mask, indexer_loss_weight=1.0, mtp_layers=1)
    model = DeepSeekV4Model(args)
    model.init_weights()
    model.train()
    tokens = torch.randint(2, args.vocab_size, (1, 257), generator=torch.Generator().manual_seed(0))
    tokens[:, [60, 150]] = args.eos_id  # packed documents under block_causal
    with SyncRecorder() as recorder:
        deepseek_v4_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    assert set(recorder.sites) == {"check_token_ids"}, recorder.sites
    model.step_metrics.close_step()
    assert model.step_metrics.closed["indexer_recall_total"] > 0  # the sampled recall ran
