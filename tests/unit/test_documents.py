"""Packed documents (attn_mask_type "block_causal"): a row of documents A, B, C gives, at each document's
positions, the logits and gradients of that document run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# Debug model: window 64, CSA ratio 4 (top-k 16), HCA ratio 128. A completes one HCA window and 37 CSA
# entries (top-k selects), B no HCA window (22 CSA entries), C two HCA windows; each ends with eos (1).
LENGTHS = (150, 90, 272)
EOS = 1


def _documents() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(2, 2048, (n,), generator=g) for n in LENGTHS]
    for d in docs:
        d[-1] = EOS
    return docs


def _models(debug_args, impl: str):
    from titan_dsv4.model import DeepSeekV4Model

    torch.manual_seed(0)
    packed = DeepSeekV4Model(
        debug_args.replace(max_seq_len=sum(LENGTHS), attn_impl=impl, attn_mask_type="block_causal")
    )
    packed.init_weights()
    alone = DeepSeekV4Model(debug_args.replace(max_seq_len=sum(LENGTHS), attn_impl=impl))
    alone.load_state_dict(packed.state_dict())
    return packed.eval(), alone.eval()


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_packed_row_equals_each_document_alone(debug_args, impl):
    packed, alone = _models(debug_args, impl)
    docs = _documents()
    row = torch.cat(docs)[None]
    packed_logits, _ = packed(row)
    separate = [alone(d[None])[0] for d in docs]
    starts = [0, LENGTHS[0], LENGTHS[0] + LENGTHS[1]]
    for start, logits in zip(starts, separate):
        got = packed_logits[:, start : start + logits.shape[1]]
        torch.testing.assert_close(got, logits, rtol=0, atol=1e-5)
    # the same for gradients: the packed row's loss is the sum of the documents' losses (next-token
    # targets inside each document)
    packed_loss = sum(
        F.cross_entropy(packed_logits[0, start : start + len(d) - 1], d[1:], reduction="sum")
        for start, d in zip(starts, docs)
    )
    alone_loss = sum(F.cross_entropy(lg[0, :-1], d[1:], reduction="sum") for lg, d in zip(separate, docs))
    packed_loss.backward()
    alone_loss.backward()
    alone_grads = dict(alone.named_parameters())
    for name, p in packed.named_parameters():
        other = alone_grads[name].grad
        assert (p.grad is None) == (other is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, other, rtol=1e-4, atol=1e-5, msg=name)


def test_documents_restart_positions_and_align_windows():
    from titan_dsv4.model.documents import Documents

    tokens = torch.tensor([[5, 6, 7, 1, 8, 9, 4, 3, 2, 1, 6]])
    docs = Documents.from_tokens(tokens, EOS)
    assert docs.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2]]
    assert docs.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0]]
    windows = docs.windows(4)  # doc 0: one window at 0; doc 1 (6 tokens): one window at 4; doc 2: none
    assert windows.start[windows.valid].tolist() == [0, 4] and windows.index[windows.valid].tolist() == [0, 0]
    visible = windows.visible(docs)[0]
    assert visible[3].tolist() == [True, False] and visible[7].tolist() == [False, True]
    assert not visible[10].any() and not visible[6].any()  # doc 1's window ends at 7


def test_causal_rows_attend_across_documents_as_transformers_does(debug_args):
    """Under "causal" (the default; transformers' behaviour, parity unchanged) B's logits in the packed row
    see A: they differ from B alone, which is what block_causal removes."""
    packed, alone = _models(debug_args, "sparse")
    causal = alone  # the same weights without document masking
    docs = _documents()
    row = torch.cat(docs)[None]
    with torch.no_grad():
        b_in_row = causal(row)[0][:, LENGTHS[0] : LENGTHS[0] + LENGTHS[1]]
        assert not torch.allclose(b_in_row, alone(docs[1][None])[0], atol=1e-3)
