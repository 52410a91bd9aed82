"""Each deliberate difference from transformers' DeepseekV4ForCausalLM, pinned by its own test.

(HCA alignment's synthetic window: test_hca_alignment.py; the fp32 compute choices, each a no-op in fp32:
test_fp32_compute.py; the frozen indexer's absence from the optimizer: test_checkpoint_resume.py.)
"""

from __future__ import annotations

import torch


def test_router_scores_in_fp32_even_for_bf16_activations(debug_args):
    """transformers scores in the model dtype; we score in fp32 (the selection bias is added in fp32)."""
    from titan_dsv4.model.moe import DeepSeekV4Router

    router = DeepSeekV4Router(debug_args.replace(), hash_routed=False).bfloat16()
    x = torch.randn(16, debug_args.dim, dtype=torch.bfloat16)
    top, selected, counts = router(x, torch.zeros(debug_args.moe_args.num_experts))
    assert top.dtype == torch.float32 and int(counts.sum()) == 16 * debug_args.moe_args.top_k
    logits = router.gate(x).float()
    scores = torch.nn.functional.softplus(logits).sqrt()
    chosen = scores.gather(1, selected)
    torch.testing.assert_close(top, chosen / chosen.sum(-1, keepdim=True) * 1.5, rtol=0, atol=1e-6)


def test_hash_table_for_training_from_scratch_routes_to_distinct_experts(debug_args):
    """transformers initialises tid2eid to zeros (every token to expert 0); ours is a fixed random table of
    top_k distinct experts per token (checkpoints bring their own table)."""
    from titan_dsv4.model import DeepSeekV4Model

    model = DeepSeekV4Model(debug_args.replace(max_seq_len=64))
    model.init_weights()
    table = model.layers["0"].moe.router.tid2eid
    assert table.shape == (2048, 2) and table.dtype == torch.int64
    assert (table[:, 0] != table[:, 1]).all() and table.unique().numel() == 8
    again = DeepSeekV4Model(debug_args.replace(max_seq_len=64))
    again.init_weights()
    assert torch.equal(again.layers["0"].moe.router.tid2eid, table)  # deterministic


def test_fp32_islands_keep_lm_head_and_compressor_projections_in_fp32(debug_args):
    """transformers keeps mHC, sinks, ape and norms fp32 in bf16; we also keep lm_head and the compressor and
    indexer projections fp32 (NeMo's islands), and norms compute in the block's dtype.

    Checked on the debug model's own modules, by the rule FSDP sharding applies (``fp32_islands``): each
    island becomes an fp32 unit, everything else computes in the job's dtype."""
    from titan_dsv4.infra.fsdp_units import fp32_islands
    from titan_dsv4.model import DeepSeekV4Model

    with torch.device("meta"):
        model = DeepSeekV4Model(debug_args)
    islands = {id(m) for m in fp32_islands(model)}
    names = {name for name, m in model.named_modules() if id(m) in islands}
    compressors = [n for n, _ in model.named_modules() if n.endswith("self_attn.compressor")]
    indexers = [n for n, _ in model.named_modules() if n.endswith("self_attn.compressor.indexer")]
    assert compressors and indexers  # the debug model has CSA (with indexer) and HCA layers
    expected = {"lm_head"}
    expected |= {f"{c}.{p}" for c in compressors for p in ("wkv", "wgate")}
    expected |= {f"{i}.{p}" for i in indexers for p in ("wkv", "wgate")}
    assert expected <= names, sorted(expected - names)
    norms = [n for n, m in model.named_modules() if type(m).__name__.lower().endswith("norm")]
    assert norms and not names & set(norms), sorted(names & set(norms))
