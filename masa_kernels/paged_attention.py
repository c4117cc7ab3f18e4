"""Triton kernel for decode attention over a paged KV pool: one query token per sequence, attending
to that sequence's live keys only, wherever its blocks lie in the pool (the sampler's decode step).

Layout (one layer):
    q            [B, H, D]                 the new token's queries (H = Hkv x rep query heads)
    k_pool       [blocks, BS, Hkv, D]      keys in fixed-size blocks of BS positions; v_pool alike
    block_table  [B, max_blocks] int32     the pool block of each sequence's i-th BS positions
    seq_lens     [B] int32                 live positions of each sequence (the new token included)
    -> out       [B, H, D]                 softmax(q k^T / sqrt(D)) v over positions < seq_lens[b]

Grid (B, Hkv, splits). A program takes one sequence, one key-value head and all `rep` query heads
that share it (grouped-query attention reads each key once, not rep times), and one contiguous
run of the sequence's blocks: splitting the blocks lets a few long sequences still occupy every
multiprocessor (split-K, as in FlashDecoding). It walks its run one block at a time: the block's
pool index is one scalar load from the table, and the offsets inside a block are the same for every
block, so addressing costs no registers per position. An online softmax keeps a running max m, sum
l and unnormalized output acc in float32; both products run on tensor cores in the pool's dtype with
float32 accumulation (float32 pools take the exact "ieee" path, not TF32), the query heads padded
to tl.dot's 16 rows. Positions at or past seq_lens are masked, never read. A second small kernel
combines the splits: with M = max m_s, out = sum acc_s e^(m_s - M) / sum l_s e^(m_s - M).

masa_kernels/aot.py compiles it for sm_90a and sm_80 (127 registers, no spills at head_dim 128). An
earlier version that gathered 64 positions per iteration with a broadcast product instead of
tl.dot spilled 144-50,000 bytes there, which the interpreter never shows.

Why this kernel rather than FlexAttention (which the issue allowed): it reads the block table as
the sampler keeps it, with no per-step block-mask conversion and no torch.compile, and the whole
computation fits in ~100 lines that a reader can check against the PyTorch twin
(reference.paged_decode_attention, which gathers the blocks). Their speeds have not been compared:
no GPU has run either yet. Prefill does not come here: it is dense (SDPA) over the prompt.
"""

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 16  # positions per KV block: at most 15 unused per sequence (under 1% at 2k-10k tokens),
#                 and a short block table (640 entries for the paper's 10240-position budget)
MIN_POSITIONS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it adds


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, acc_ptr, ml_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kp, stride_tb,
                         blocks_per_split, scale,
                         REP: tl.constexpr, REP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                         BS: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    length = tl.load(lens_ptr + b)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(length, BS))

    r = tl.arange(0, REP_PAD)  # query heads of this key-value head (padded: tl.dot needs 16 rows)
    d = tl.arange(0, D_PAD)
    j = tl.arange(0, BS)  # positions within a block
    heads = kv_head * REP + r
    q_mask = (r[:, None] < REP) & (d[None, :] < D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)  # [REP_PAD, D_PAD], in the pool's dtype
    within = kv_head * stride_kh + j[:, None] * stride_kp + d[None, :]  # [BS, D_PAD], the same in every block

    m = tl.full([REP_PAD], -float("inf"), dtype=tl.float32)
    l = tl.zeros([REP_PAD], dtype=tl.float32)
    acc = tl.zeros([REP_PAD, D_PAD], dtype=tl.float32)
    for i in range(first, last):
        block = tl.load(table_ptr + b * stride_tb + i).to(tl.int64)
        live = i * BS + j < length  # [BS]
        kv_mask = live[:, None] & (d[None, :] < D)
        k = tl.load(k_ptr + block * stride_kb + within, mask=kv_mask, other=0.0)  # [BS, D_PAD]
        v = tl.load(v_ptr + block * stride_kb + within, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [REP_PAD, BS], float32
        scores = tl.where(live[None, :], scores, -float("inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)  # m = -inf only before the first block, where l and acc are 0
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    # partial results of this split: acc [B, H, splits, D], (m, l) [B, H, splits, 2]
    row = (b * (tl.num_programs(1) * REP) + heads) * splits + split  # [REP_PAD]
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=q_mask)
    tl.store(ml_ptr + row * 2, m, mask=r < REP)
    tl.store(ml_ptr + row * 2 + 1, l, mask=r < REP)


@triton.jit
def _combine_kernel(acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, H, splits,
                    D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    row = (b * H + h) * splits + s
    m = tl.load(ml_ptr + row * 2, mask=s < splits, other=-float("inf"))
    l = tl.load(ml_ptr + row * 2 + 1, mask=s < splits, other=0.0)
    M = tl.max(m, axis=0)  # finite: the first split always holds at least one position
    w = tl.where(s < splits, tl.exp(m - M), 0.0)  # an empty split (m = -inf) weighs 0
    acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=(s[:, None] < splits) & (d[None, :] < D), other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def split_count(batch: int, kv_heads: int, max_len: int, multiprocessors: int) -> int:
    """Splits per (sequence, kv head): enough programs for about two waves over the GPU, but no split
    shorter than MIN_POSITIONS_PER_SPLIT positions."""
    want = -(-2 * multiprocessors // max(1, batch * kv_heads))
    return max(1, min(want, -(-max_len // MIN_POSITIONS_PER_SPLIT)))


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, max_len: int, splits: int | None = None) -> torch.Tensor:
    """See the module docstring. `max_len` bounds seq_lens (a host-side number, so that the split
    count needs no device sync); `splits` overrides split_count."""
    B, H, D = q.shape
    _, BS, Hkv, _ = k_pool.shape
    rep = H // Hkv
    assert q.stride(2) == 1 and k_pool.is_contiguous() and v_pool.is_contiguous() and block_table.stride(1) == 1
    assert BS >= 16 and BS & (BS - 1) == 0, "blocks of 16, 32, ... positions: tl.dot's smallest tile is 16"
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        splits = split_count(B, Hkv, max_len, sms)
    blocks = -(-max(max_len, 1) // BS)
    blocks_per_split = -(-blocks // splits)
    acc = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B, H, splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    _paged_decode_kernel[(B, Hkv, splits)](
        q, k_pool, v_pool, block_table, seq_lens, acc, ml,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(2), k_pool.stride(1), block_table.stride(0),
        blocks_per_split, D ** -0.5,
        REP=rep, REP_PAD=max(triton.next_power_of_2(rep), 16), D=D, D_PAD=max(triton.next_power_of_2(D), 16),
        BS=BS, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    _combine_kernel[(B, H)](acc, ml, out, out.stride(0), out.stride(1), H, splits,
                            D=D, D_PAD=triton.next_power_of_2(D), SPLITS_PAD=max(triton.next_power_of_2(splits), 2))
    return out
