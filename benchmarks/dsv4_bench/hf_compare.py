"""Section d: our model vs transformers' DeepseekV4ForCausalLM (eager), same shape, weights and threads.

One process, fp32, ``torch.set_num_threads(2)`` for both. Our debugmodel is initialised from a fixed
seed and converted to transformers through ``hf_config_from_args`` and the state-dict adapter; the logits
of the two are compared first, so the timing is known to compare the same computation. Timed:
forward + next-token cross-entropy + backward, one warmup each, then alternating repetitions so that
any drift of the machine hits both models alike.
"""

from __future__ import annotations

THREADS = 2


def build_pair(seq_len: int):
    """(ours, hf, args): the debugmodel shape, our seeded init, the same weights loaded into transformers."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from titan_dsv4.model import DeepSeekV4Model
    from titan_dsv4.model.hf_config import hf_config_from_args
    from titan_dsv4.model.state_dict_adapter import DeepSeekV4StateDictAdapter

    from .shapes import shape_args

    args = shape_args("debugmodel", seq_len)
    torch.manual_seed(0)
    ours = DeepSeekV4Model(args)
    ours.init_weights()
    config = hf_config_from_args(args)
    config.pop("model_type")
    hf_config = DeepseekV4Config(**config)
    hf_config._attn_implementation = "eager"
    hf = DeepseekV4ForCausalLM(hf_config).float()
    hf_sd = DeepSeekV4StateDictAdapter(args, None).to_hf(ours.state_dict())
    hf.load_state_dict(hf_sd, strict=True)
    return ours.train(), hf.train(), args


def _loss(logits, tokens):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def run(quick: bool) -> dict:
    import torch

    from titan_dsv4.cpu import apply_cpu_support

    from .measure import median, timed

    apply_cpu_support()
    torch.set_num_threads(THREADS)
    seq_len, reps = 2048, (2 if quick else 3)
    ours, hf, args = build_pair(seq_len)
    tokens = torch.randint(0, args.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        diff = (ours(tokens)[0] - hf(input_ids=tokens).logits).abs().max().item()

    def ours_step():
        ours.zero_grad(set_to_none=True)
        _loss(ours(tokens)[0], tokens).backward()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        _loss(hf(input_ids=tokens).logits, tokens).backward()

    ours_step()  # warmup: first-call allocations and library loading
    hf_step()
    ours_s, hf_s = [], []
    for _ in range(reps):
        ours_s.append(timed(ours_step))
        hf_s.append(timed(hf_step))
    return {
        "seq_len": seq_len,
        "batch": 1,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "max_abs_logit_diff": diff,
        "ours_s": median(ours_s),
        "hf_s": median(hf_s),
        "ours_all_s": ours_s,
        "hf_all_s": hf_s,
        "speedup": median(hf_s) / median(ours_s),
    }
