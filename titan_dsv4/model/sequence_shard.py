"""Context parallelism: the one place that knows a rank's slice of the global sequence.

Titan's Trainer shards inputs and labels over the ``cp`` mesh (``prepare_context_parallel_input``): the
sequence is cut into chunks, and each rank holds some of them (head-tail: 2 x cp chunks, rank r holds
chunks r and 2cp-1-r, so causal work is balanced; no load balancer: cp contiguous chunks). It passes the
global positions of the rank's tokens (``positions``); a ``SequenceShard`` reads the layout from them.

Where DeepSeek-V4 differs from Titan: Titan's context parallelism is ring attention through the SDPA /
flex dispatcher, which cannot serve V4's attention (a sliding window, compressed entries, an indexer).
V4's attention runs across shards here, exactly:
  * granularity: a chunk is a multiple of lcm(csa_ratio, hca_ratio, sliding_window) tokens (128 for the
    released models), so a causal compression window lies whole in one chunk and a sliding-window block
    never straddles two; ``check_cp_seq_len`` refuses other sequence lengths;
  * the sliding window: each chunk takes the last W rows of its predecessor's K=V (``halo``);
  * compressed entries: every window is pooled on the rank where it completes (a packed document's window
    may start in the previous chunk: its rows come with the halo), then the entries of all ranks are
    all-gathered into global order (``gather_chunks``): each query sees exactly the entries it sees
    unsharded, by global position and global document;
  * every exchange is autograd-correct: the all-gather's backward sums the gradient back to the owner (a
    reduce-scatter, accumulated in fp32; the collectives live in ``cp_collectives.py``).

What one rank exchanges per layer and micro-batch (head-tail: 2 chunks per rank; B rows; d = head_dim,
dI = index_head_dim; backward moves the same volume back, the all-gathers' in fp32):
  * every attention layer (and MTP block): the sliding-window halo, all-to-all, 2 x W x d per row;
  * CSA: the compressor's and the indexer's projection halos (ratio = 4 rows of the kv and gate
    projections, 2d wide each, for 2 chunks: 32 x d + 32 x dI per row; twice that under ``block_causal``),
    then an all-gather receiving S/4 x d entries and S/4 x dI indexer keys per row;
  * HCA: an all-gather receiving S/128 x d entries per row (plus a 2 x 128-row projection halo under
    ``block_causal``, whose document-aligned windows may start in the previous chunk);
  * per forward: the token ids (B x S integers) and the chunk layout; MTP's loss: the labels (B x S).
Flash at S = 1M, bf16: CSA 256 MiB + 64 MiB, HCA 8 MiB per row, halos under 1 MiB.

Pipeline parallelism can reuse this for a stage's global positions and documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .args import ConfigError, DeepSeekV4ModelArgs
from .cp_collectives import AllGather, AllToAll, all_gather_plain
from .documents import CompressionWindows, Documents

LOAD_BALANCERS = {"headtail": 2, None: 1}  # Titan's context_parallel_load_balancer -> chunks per rank


def chunks_per_rank(load_balancer: str | None) -> int:
    """How many contiguous chunks of the sequence a rank holds under Titan's load balancer."""
    if load_balancer not in LOAD_BALANCERS:
        raise ConfigError(
            f"parallelism.context_parallel_load_balancer={load_balancer!r} is not supported by DeepSeek-V4: "
            "'ptrr' balances flex-attention block masks, which V4 does not use. Use 'headtail' (the default, "
            "balanced causal work) or None (contiguous shards)."
        )
    return LOAD_BALANCERS[load_balancer]


def cp_granularity(args: DeepSeekV4ModelArgs) -> int:
    """Tokens a chunk must be a multiple of: whole compression windows and whole sliding-window blocks."""
    return math.lcm(args.csa_ratio, args.hca_ratio, args.sliding_window)


def check_cp_seq_len(seq_len: int, cp: int, args: DeepSeekV4ModelArgs, load_balancer="headtail") -> None:
    """Refuse, before any work, a seq_len whose CP chunks are not whole multiples of the granularity."""
    if cp <= 1:
        return
    n_chunks = cp * chunks_per_rank(load_balancer)
    unit = n_chunks * cp_granularity(args)
    if seq_len % unit == 0 and seq_len > 0:
        return
    below, above = (seq_len // unit) * unit, (seq_len // unit + 1) * unit
    nearest = " or ".join(str(s) for s in (below, above) if s > 0)
    raise ConfigError(
        f"training.seq_len={seq_len} cannot be split for context_parallel_degree={cp}: the sequence is cut "
        f"into {n_chunks} chunks ({'head-tail' if load_balancer else 'contiguous'}), and each chunk must be "
        f"a multiple of {cp_granularity(args)} tokens (lcm of csa_ratio {args.csa_ratio}, hca_ratio "
        f"{args.hca_ratio} and sliding_window {args.sliding_window}) so that compression windows and "
        f"sliding-window blocks stay whole. Use --training.seq_len {nearest} (a multiple of {unit})."
    )


def check_context_parallel(job_config, args: DeepSeekV4ModelArgs) -> None:
    """The job's context-parallel options, refused before any work when V4 cannot run them."""
    p = job_config.parallelism
    if p.context_parallel_degree <= 1:
        return
    check_cp_seq_len(
        job_config.training.seq_len, p.context_parallel_degree, args, p.context_parallel_load_balancer
    )
    if job_config.validation.enable:
        raise ConfigError(
            "validation.enable with context_parallel_degree > 1: Titan 0.2.2's validator wraps the model in "
            "its ring-attention context (it shards a llama ``freqs_cis`` buffer that DeepSeek-V4 does not "
            "have). Set --validation.enable false, or validate with --parallelism.context_parallel_degree 1."
        )


@dataclass
class WindowHalo:
    """The keys a chunk's first queries need from the previous chunk (sliding window), for the kernels."""

    kv: torch.Tensor  # [B, n_local_chunks, W, d] the previous chunk's last W K=V rows (zeros for chunk 0)
    key_pos: torch.Tensor  # [n_local_chunks, W] their global positions (< 0: no such key)
    key_docs: torch.Tensor | None  # [B, n_local_chunks, W] their documents (packed; -2 where none)
    query_pos: torch.Tensor  # [S_local] global positions of the local queries
    local_predecessor: torch.Tensor  # [n_local_chunks] bool: the previous chunk is local too (dense dedup)


@dataclass
class SlotLayout:
    """Compression windows of one ratio in "slots": slot s of the global sequence holds the window whose
    last token lies in [s*ratio, (s+1)*ratio) (at most one does), so every chunk owns a fixed range of
    slots and the entries all-gather in global order with equal sizes on every rank."""

    ratio: int
    halo_rows: int  # rows of the previous chunk that windows completing here need
    local: CompressionWindows  # this rank's slots, ``start`` in the halo-extended local rows
    valid: torch.Tensor  # [B, T] global slots holding a window
    last: torch.Tensor  # [B, T] the window's last global position
    doc_ids: torch.Tensor  # [B, T] its document (-1 where none)


class SequenceShard:
    """One rank's chunks of the global sequence and the exchanges that keep V4's attention exact over them."""

    def __init__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        group: dist.ProcessGroup,
        n_local_chunks: int,
        eos_id: int | None,
    ):
        self.group = group
        self.cp = dist.get_world_size(group)
        B, S_l = tokens.shape
        if S_l % n_local_chunks:
            raise ValueError(f"{S_l} local tokens cannot hold {n_local_chunks} equal chunks")
        self.n_local, self.chunk = n_local_chunks, S_l // n_local_chunks
        pos = positions.reshape(-1, S_l)[0].to(device=tokens.device, dtype=torch.long)
        if positions.dim() == 2 and not (positions == positions[:1]).all():
            raise ValueError("context parallelism expects the same positions on every row of the batch")
        starts = pos.view(n_local_chunks, self.chunk)[:, 0]
        if not (pos.view(n_local_chunks, self.chunk) - starts[:, None] == _arange(self.chunk, pos)).all():
            raise ValueError("each of a rank's context-parallel chunks must hold contiguous positions")
        if (starts % self.chunk).any():
            raise ValueError(f"chunk starts {starts.tolist()} are not multiples of the chunk {self.chunk}")
        self.query_pos = pos  # [S_l] global positions
        self.local_chunks = starts // self.chunk  # [n_local] global chunk indices
        gathered = all_gather_plain(self.local_chunks, group).flatten()  # [cp * n_local], rank-major
        self.n_chunks = gathered.numel()
        self.seq_len = self.n_chunks * self.chunk
        if not torch.equal(torch.sort(gathered).values, _arange(self.n_chunks, gathered)):
            raise ValueError(f"the ranks' chunks {gathered.tolist()} do not tile the sequence")
        self.global_order = torch.argsort(gathered)  # rank-major chunk list -> global chunk order
        self._plan_halo_exchange(gathered.tolist(), dist.get_rank(group))
        self.tokens = self.gather_sequence(tokens)  # [B, S] global token ids
        self.docs = Documents.from_tokens(self.tokens, eos_id) if eos_id is not None else None
        self._slots: dict[int, SlotLayout] = {}

    # ---- layout --------------------------------------------------------------------------------------
    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The local rows of a global [B, S, ...] tensor."""
        return t[:, self.query_pos]

    def local_docs(self) -> Documents | None:
        """The global documents at the local positions (a document may span several shards)."""
        if self.docs is None:
            return None
        return Documents(
            *(self.local(t) for t in (self.docs.doc_ids, self.docs.positions, self.docs.lengths))
        )

    def ahead(self, k: int) -> torch.Tensor:
        """The global tokens k positions ahead of each local token (0 past the end), for MTP depth k."""
        padded = F.pad(self.tokens, (0, k))
        return padded[:, self.query_pos + k]

    def ahead_labels(self, labels: torch.Tensor, k: int, fill: int) -> torch.Tensor:
        """labels[t + k] at each local position t (``fill`` past the end): MTP targets on another shard."""
        padded = F.pad(self.gather_sequence(labels), (0, k), value=fill)
        return padded[:, self.query_pos + k]

    # ---- exchanges -------------------------------------------------------------------------------------
    def gather_sequence(self, t: torch.Tensor) -> torch.Tensor:
        """[B, S_local] ints (token ids, labels) -> [B, S] in global order; no gradient (ids are cheap)."""
        B = t.shape[0]
        chunks = all_gather_plain(t, self.group).view(self.cp, B, self.n_local, self.chunk).transpose(0, 1)
        return chunks.reshape(B, self.n_chunks, self.chunk)[:, self.global_order].reshape(B, self.seq_len)

    def gather_chunks(self, t: torch.Tensor) -> torch.Tensor:
        """[B, n_local * K, F] (K rows per local chunk) -> [B, n_chunks * K, F] in global chunk order.

        An all-gather with gradient (reduce-scatter in backward). Used for the compressed entries: per
        rank it receives S / ratio rows of width F per layer (CSA: S/4 x head_dim, plus S/4 x
        index_head_dim for the indexer's keys; HCA: S/128 x head_dim).
        """
        B, rows, width = t.shape
        parts = AllGather.apply(t, self.group)  # [cp, B, rows, F]
        K = rows // self.n_local
        chunks = (
            parts.view(self.cp, B, self.n_local, K, width).transpose(0, 1).reshape(B, self.n_chunks, K, width)
        )
        return chunks[:, self.global_order].reshape(B, self.n_chunks * K, width)

    def _plan_halo_exchange(self, gathered: list[int], me: int) -> None:
        """Who sends which chunk's tail to whom: chunk g's tail goes to the owner of chunk g + 1."""
        owner = {g: i // self.n_local for i, g in enumerate(gathered)}
        local_index = {g: i for i, g in enumerate(gathered[me * self.n_local : (me + 1) * self.n_local])}
        sends = sorted((owner[g + 1], g) for g in local_index if g + 1 < self.n_chunks)
        recvs = sorted((owner[g], g) for g in owner if g + 1 < self.n_chunks and owner[g + 1] == me)
        self._send_index = [local_index[g] for _, g in sends]
        self._send_splits = [sum(dst == r for dst, _ in sends) for r in range(self.cp)]
        self._recv_splits = [sum(src == r for src, _ in recvs) for r in range(self.cp)]
        received = {g: i for i, (_, g) in enumerate(recvs)}
        # per local chunk: the row of the received tails holding its predecessor's (chunk 0 has none)
        self._halo_rows_of = [
            received.get(g - 1, 0) for g in gathered[me * self.n_local : (me + 1) * self.n_local]
        ]

    def halo(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """[B, S_local, F] -> [B, n_local, rows, F]: the last ``rows`` rows of each local chunk's predecessor
        (zeros before the sequence's start), with gradient back to their owner.

        A point-to-point exchange (one all-to-all): each chunk's tail goes only to the rank that holds the
        next chunk, so a rank sends and receives n_local x rows x F elements (head-tail: 2 x W x head_dim
        per layer for the sliding window), independent of the sequence length and of cp.
        """
        if rows > self.chunk:
            raise ValueError(f"a halo of {rows} rows does not fit a chunk of {self.chunk}")
        B, _, width = t.shape
        tails = t.view(B, self.n_local, self.chunk, width)[:, :, self.chunk - rows :].transpose(0, 1)
        send = tails[self._send_index]  # [n_send, B, rows, F] ordered by destination rank
        received = AllToAll.apply(
            send, sum(self._recv_splits), self._send_splits, self._recv_splits, self.group
        )
        if received.shape[0] == 0:  # only chunk 0 here: no halo, but the exchange stays in backward
            return tails.new_zeros(B, self.n_local, rows, width) + received.sum()
        previous = received[self._halo_rows_of].transpose(0, 1)  # [B, n_local, rows, F]
        return torch.where((self.local_chunks > 0).view(1, -1, 1, 1), previous, torch.zeros_like(previous))

    def extend(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """[B, S_local, F] -> [B, n_local * (rows + chunk), F]: each chunk preceded by its halo."""
        B, _, width = t.shape
        local = t.view(B, self.n_local, self.chunk, width)
        if rows:
            local = torch.cat([self.halo(t, rows), local], dim=2)
        return local.reshape(B, self.n_local * (rows + self.chunk), width)

    def window_halo(self, kv: torch.Tensor, window: int, doc_ids: torch.Tensor | None) -> WindowHalo:
        """The sliding window's halo for the kernels: the previous W keys of each chunk and where they lie."""
        key_pos = (self.local_chunks * self.chunk)[:, None] - window + _arange(window, kv)[None, :]
        key_docs = None
        if self.docs is not None:
            key_docs = torch.where(key_pos >= 0, self.docs.doc_ids[:, key_pos.clamp(min=0)], -2)
        local_predecessor = torch.isin(self.local_chunks - 1, self.local_chunks)
        return WindowHalo(self.halo(kv, window), key_pos, key_docs, self.query_pos, local_predecessor)

    # ---- compression windows -------------------------------------------------------------------------
    def slots(self, ratio: int, overlap: bool) -> SlotLayout:
        """The global slot table of ``ratio``-token windows, and this rank's slots (computed once)."""
        key = (ratio, overlap)
        if key not in self._slots:
            self._slots[key] = self._slot_layout(ratio, overlap)
        return self._slots[key]

    def _slot_layout(self, ratio: int, overlap: bool) -> SlotLayout:
        B, S, dev = self.tokens.shape[0], self.seq_len, self.tokens.device
        T = S // ratio
        if self.docs is None:  # one document per row: slot s is window s, aligned to the chunk
            halo_rows = ratio if overlap else 0  # CSA's overlap: the previous window's A halves
            start = (_arange(T, self.tokens) * ratio).expand(B, T)
            valid = torch.ones(B, T, dtype=torch.bool, device=dev)
            doc_ids, index = torch.zeros_like(start), start // ratio
        else:  # packed: windows aligned to their document's start may begin in the previous chunk
            halo_rows = (2 if overlap else 1) * ratio
            windows = self.docs.windows(ratio)
            slot = torch.where(windows.valid, (windows.start + ratio - 1) // ratio, T)  # T: a spare column
            start = _scatter(B, T, slot, windows.start, 0)
            valid = _scatter(B, T, slot, windows.valid, False)
            doc_ids = _scatter(B, T, slot, windows.doc_ids, -1)
            index = _scatter(B, T, slot, windows.index, 0)
        # This rank's slots, with ``start`` in the rows of ``extend(t, halo_rows)``.
        per_chunk = self.chunk // ratio
        mine = (self.local_chunks[:, None] * per_chunk + _arange(per_chunk, start)[None, :]).flatten()
        chunk_of = torch.arange(self.n_local, device=dev).repeat_interleave(per_chunk)
        ext0 = chunk_of * (halo_rows + self.chunk) + halo_rows - self.local_chunks[chunk_of] * self.chunk
        l_valid = valid[:, mine]
        l_start = torch.where(
            l_valid, start[:, mine] + ext0, (ext0 + self.local_chunks[chunk_of] * self.chunk)
        )
        local = CompressionWindows(
            start=l_start,
            valid=l_valid,
            doc_ids=doc_ids[:, mine],
            index=torch.where(l_valid, index[:, mine], 0),
            ratio=ratio,
        )
        return SlotLayout(ratio, halo_rows, local, valid, start + ratio - 1, doc_ids)

    def seen(self, slots: SlotLayout, docs: Documents | None) -> torch.Tensor | None:
        """[B, S_local, T] bool: local query t sees slot s iff it holds a window of t's document that ended
        at or before t; None for one document per row (the causal rule by global position then holds)."""
        if docs is None:
            return None
        t = self.query_pos
        same_doc = docs.doc_ids[:, :, None] == slots.doc_ids[:, None, :]
        return same_doc & (slots.last[:, None, :] <= t[None, :, None]) & slots.valid[:, None, :]


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device)


def _scatter(B: int, T: int, slot: torch.Tensor, values: torch.Tensor, fill) -> torch.Tensor:
    """[B, T] table with ``values`` at ``slot`` (slot T is a spare column for padding), ``fill`` elsewhere."""
    out = torch.full((B, T + 1), fill, dtype=values.dtype, device=values.device)
    return out.scatter_(1, slot, values)[:, :T]
