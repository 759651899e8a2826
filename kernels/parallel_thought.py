"""Masked attention of parallel thought rollouts (a thought at every position at once, Quiet-STaR style),
as a fused Triton kernel (FlashAttention-2 forward, separate dK/dV and dQ backward kernels) and a
plain-PyTorch reference with an explicit mask. The incremental form used while sampling is in
parallel_decode.py; it shares this module's tiles, launcher and block helpers.

Layout: T real tokens first, then T*L thought tokens position-major, thought (t, j) at T + t*L + j.
  * real query q attends real keys k <= q (causal);
  * thought (t, j) attends real keys k <= t and the thoughts (t, j') of its own position with j' <= j.

Why a kernel: the allowed pairs are ~T^2*L/2 out of (T(L+1))^2, so a dense mask wastes almost all of its
work, and Quiet-STaR's dense `torch.cat` mask is what made its inference 8x slower than the base model.
A query block of thought rows covers only BLOCK_M/L positions, so it needs the real-key prefix (a causal
sweep, unmasked up to its smallest position) plus one or two blocks of its own positions' thoughts.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .tiles import _tuned, interpreting, resolve_tiles


def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor, num_text: int, thought_len: int) -> torch.Tensor:
    """The pattern as a rule on index tensors (broadcasting); also FlexAttention's mask_mod in the
    benchmark."""
    # real index or position t
    q_pos = torch.where(q_idx < num_text, q_idx, (q_idx - num_text) // thought_len)
    kv_pos = torch.where(kv_idx < num_text, kv_idx, (kv_idx - num_text) // thought_len)
    text_key = (kv_idx < num_text) & (kv_idx <= q_pos)
    own_thought = (kv_idx >= num_text) & (q_idx >= num_text) & (kv_pos == q_pos) & (kv_idx <= q_idx)
    return text_key | own_thought


def parallel_thought_mask(num_text: int, thought_len: int, device=None) -> torch.Tensor:
    """(N, N) bool, True where query row may attend key column; N = num_text * (1 + thought_len)."""
    idx = torch.arange(num_text * (1 + thought_len), device=device)
    return allowed(idx[:, None], idx[None, :], num_text, thought_len)


@functools.lru_cache(maxsize=8)
def cached_mask(num_text: int, thought_len: int, device: torch.device) -> torch.Tensor:
    return parallel_thought_mask(num_text, thought_len, device)


def check_inputs(q, k, v, num_text: int, thought_len: int) -> None:
    if num_text < 1 or thought_len < 1:
        raise ValueError(f"num_text and thought_len must be >= 1, got {num_text}, {thought_len}")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (batch, heads, seq, head_dim) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != num_text * (1 + thought_len):
        raise ValueError(f"sequence length {q.shape[2]} != num_text * (1 + thought_len) = "
                         f"{num_text * (1 + thought_len)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must be one of fp32/fp16/bf16 and share it, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")


def parallel_thought_attention_reference(q, k, v, num_text: int, thought_len: int,
                                         scale: float | None = None) -> torch.Tensor:
    """Ground truth: explicit (N, N) mask, softmax in fp32, output in the input dtype."""
    check_inputs(q, k, v, num_text, thought_len)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = parallel_thought_mask(num_text, thought_len, q.device)
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(q.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton kernels. Scores live in the log2 domain (exp2 is the fast path); LSE is stored in it too.


@triton.jit
def _row_pos(offs_m, N, T, L):
    """Position of each index (query row or key): itself for real tokens, t for thought (t, j)."""
    rows = tl.minimum(offs_m, N - 1)
    return tl.where(rows < T, rows, (rows - T) // L)


@triton.jit
def _allowed(offs_m, pos_m, offs_n, pos_n, T):
    """The pattern, for a (rows, cols) tile."""
    text_key = (offs_n[None, :] < T) & (offs_n[None, :] <= pos_m[:, None])
    own = (offs_n[None, :] >= T) & (offs_m[:, None] >= T) & (pos_n[None, :] == pos_m[:, None]) \
        & (offs_n[None, :] <= offs_m[:, None])
    return text_key | own


@triton.jit
def _head_base(pid_bh, H, stride_b, stride_h):
    """Offset of program axis 1's (batch, head) slice, in int64 (large tensors overflow int32)."""
    return (pid_bh // H).to(tl.int64) * stride_b + (pid_bh % H).to(tl.int64) * stride_h


@triton.jit
def _tile(ptr, offs, offs_d, n, D, stride):
    """Rows `offs` of a (n, D) row-major matrix at ptr, as (len(offs), HEAD_DIM); zeros outside it."""
    mask = (offs[:, None] < n) & (offs_d[None, :] < D)
    return tl.load(ptr + offs[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, x, offs, offs_d, n, D, stride):
    """Write x into rows `offs` of a (n, D) row-major matrix at ptr, nothing outside it."""
    mask = (offs[:, None] < n) & (offs_d[None, :] < D)
    tl.store(ptr + offs[:, None] * stride + offs_d[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K_ptr, V_ptr, stride_kn, offs_m, pos_m, start_n, n_end, N, T, L, qk_scale,
               offs_d, D, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _tile(K_ptr, offs_n, offs_d, N, D, stride_kn)
    v = _tile(V_ptr, offs_n, offs_d, N, D, stride_kn)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN), log2 domain
    if MASKED:
        pos_n = _row_pos(offs_n, N, T, L)
        # n_end: the real-prefix sweep stops at T so that no thought key is counted twice
        s = tl.where(_allowed(offs_m, pos_m, offs_n, pos_n, T) & (offs_n[None, :] < n_end), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, stride_b, stride_h, stride_n, H, N, T, L, qk_scale, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                PRECISION: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    base = _head_base(pid_bh, H, stride_b, stride_h)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _tile(Q + base, offs_m, offs_d, N, D, stride_n)
    pos_m = _row_pos(offs_m, N, T, L)
    pos_lo, pos_hi = tl.min(pos_m, 0), tl.max(pos_m, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    Kb, Vb = K + base, V + base
    # real keys every row may see (k <= smallest position): no mask
    full_end = ((pos_lo + 1) // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, Kb, Vb, stride_n, offs_m, pos_m, start_n, T, N, T, L,
                                   qk_scale, offs_d, D, BLOCK_N, False, PRECISION)
    # the rest of the real prefix, then the block's own positions' thoughts: masked
    for start_n in range(full_end, tl.minimum(T, pos_hi + 1), BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, Kb, Vb, stride_n, offs_m, pos_m, start_n, T, N, T, L,
                                   qk_scale, offs_d, D, BLOCK_N, True, PRECISION)
    last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, N) - 1
    if last_row >= T:
        first_thought_pos = (tl.maximum(pid_m * BLOCK_M, T) - T) // L
        for start_n in range(T + first_thought_pos * L, last_row + 1, BLOCK_N):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, Kb, Vb, stride_n, offs_m, pos_m, start_n, N, N, T, L,
                                       qk_scale, offs_d, D, BLOCK_N, True, PRECISION)
    acc = acc / l_i[:, None]
    _store_tile(O + base, acc, offs_m, offs_d, N, D, stride_n)
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


@triton.jit
def _dkdv_block(dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, stride_n, offs_n, pos_n, start_m, row_end,
                N, T, L,
                qk_scale, offs_d, D, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows_ok = offs_m < row_end
    q = _tile(Q_ptr, offs_m, offs_d, row_end, D, stride_n)
    do = _tile(DO_ptr, offs_m, offs_d, row_end, D, stride_n)
    lse = tl.load(LSE_ptr + offs_m, mask=rows_ok, other=0.0)
    delta = tl.load(DELTA_ptr + offs_m, mask=rows_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BN, BM)
    p_t = tl.exp2(s_t - lse[None, :])
    if MASKED:
        pos_m = _row_pos(offs_m, N, T, L)
        ok = tl.trans(_allowed(offs_m, pos_m, offs_n, pos_n, T)) & rows_ok[None, :] & (offs_n[:, None] < N)
        p_t = tl.where(ok, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, stride_b, stride_h, stride_n, H, N, T, L, qk_scale,
                 sm_scale, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PRECISION: tl.constexpr):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    base = _head_base(pid_bh, H, stride_b, stride_h)
    row_base = pid_bh.to(tl.int64) * N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _tile(K + base, offs_n, offs_d, N, D, stride_n)
    v = _tile(V + base, offs_n, offs_d, N, D, stride_n)
    pos_n = _row_pos(offs_n, N, T, L)
    first_key = pid_n * BLOCK_N
    last_key = tl.minimum(first_key + BLOCK_N, N) - 1
    pos_lo, pos_hi = tl.min(pos_n, 0), tl.max(pos_n, 0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    Qb, DOb, LSEb, DELTAb = Q + base, DO + base, LSE + row_base, DELTA + row_base
    if first_key < T:
        # real rows q >= k
        for start_m in range(first_key, T, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_n, offs_n, pos_n, start_m, T, N,
                                 T, L, qk_scale, offs_d, D, BLOCK_M, True, PRECISION)
    # thought rows whose position reaches this block's keys
    if last_key < T:
        # pure real keys: rows of positions >= every key here see the whole block (no mask)
        full_start = T + (last_key + 1) * L
        end = tl.minimum(full_start, N)
        for start_m in range(T + pos_lo * L, full_start, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_n, offs_n, pos_n, start_m, end,
                                 N, T, L, qk_scale, offs_d, D, BLOCK_M, True, PRECISION)
        for start_m in range(full_start, N, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_n, offs_n, pos_n, start_m, N, N,
                                 T, L, qk_scale, offs_d, D, BLOCK_M, False, PRECISION)
    else:
        row_end = N if first_key < T else tl.minimum(N, T + (pos_hi + 1) * L)
        start = T if first_key < T else T + pos_lo * L
        for start_m in range(start, row_end, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_n, offs_n, pos_n, start_m,
                                 row_end, N, T, L, qk_scale, offs_d, D, BLOCK_M, True, PRECISION)
    _store_tile(DK + base, dk * sm_scale, offs_n, offs_d, N, D, stride_n)
    _store_tile(DV + base, dv, offs_n, offs_d, N, D, stride_n)


@triton.jit
def _dq_block(dq, q, do, lse, delta, K_ptr, V_ptr, stride_n, offs_m, pos_m, start_n, n_end, N, T, L,
              qk_scale, offs_d, D, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _tile(K_ptr, offs_n, offs_d, N, D, stride_n)
    v = _tile(V_ptr, offs_n, offs_d, N, D, stride_n)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        pos_n = _row_pos(offs_n, N, T, L)
        p = tl.where(_allowed(offs_m, pos_m, offs_n, pos_n, T) & (offs_n[None, :] < n_end), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, stride_b, stride_h, stride_n, H, N, T, L, qk_scale, sm_scale, D,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    base = _head_base(pid_bh, H, stride_b, stride_h)
    row_base = pid_bh.to(tl.int64) * N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _tile(Q + base, offs_m, offs_d, N, D, stride_n)
    do = _tile(DO + base, offs_m, offs_d, N, D, stride_n)
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < N, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < N, other=0.0)
    pos_m = _row_pos(offs_m, N, T, L)
    pos_lo, pos_hi = tl.min(pos_m, 0), tl.max(pos_m, 0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    Kb, Vb = K + base, V + base
    full_end = ((pos_lo + 1) // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, Kb, Vb, stride_n, offs_m, pos_m, start_n, T, N, T, L, qk_scale,
                       offs_d, D, BLOCK_N, False, PRECISION)
    for start_n in range(full_end, tl.minimum(T, pos_hi + 1), BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, Kb, Vb, stride_n, offs_m, pos_m, start_n, T, N, T, L, qk_scale,
                       offs_d, D, BLOCK_N, True, PRECISION)
    last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, N) - 1
    if last_row >= T:
        first_thought_pos = (tl.maximum(pid_m * BLOCK_M, T) - T) // L
        for start_n in range(T + first_thought_pos * L, last_row + 1, BLOCK_N):
            dq = _dq_block(dq, q, do, lse, delta, Kb, Vb, stride_n, offs_m, pos_m, start_n, N, N, T, L,
                           qk_scale, offs_d, D, BLOCK_N, True, PRECISION)
    _store_tile(DQ + base, dq * sm_scale, offs_m, offs_d, N, D, stride_n)


# ---------------------------------------------------------------------------------------------------
# Launchers and autograd.

LOG2E = 1.4426950408889634
_empty = torch.empty_like  # outputs the kernels must fill completely (tests poison them through this name)


def _launch(kernel, rows: int, block: str, bh: int, args: tuple, dtype: torch.dtype, head_dim: int,
            tiles) -> None:
    """kernel[grid](*args), one program per `block` (BLOCK_M or BLOCK_N) of `rows` rows and per batch*head."""
    const = dict(HEAD_DIM=max(16, triton.next_power_of_2(head_dim)),
                 PRECISION="ieee" if dtype == torch.float32 else "tf32")
    if tiles == "autotune":
        _TUNED[kernel][lambda meta: (triton.cdiv(rows, meta[block]), bh)](*args, **const)
        return
    if tiles == "fixed":
        size = 32 if interpreting() else 64
        tiles = dict(BLOCK_M=size, BLOCK_N=size)
    kernel[(triton.cdiv(rows, tiles[block]), bh)](*args, **const, **tiles)


# autotuned wrappers, keyed by kernel (parallel_decode.py adds its own)
_TUNED = {k: _tuned(k, ["D", "T", "L"]) for k in (_fwd_kernel, _dkdv_kernel, _dq_kernel)}


def _forward(q, k, v, T, L, scale, tiles):
    b, h, n, d = q.shape
    o = _empty(q)
    lse = torch.empty(b * h, n, device=q.device, dtype=torch.float32)  # an unwritten row shows in the grads
    args = (q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), h, n, T, L, scale * LOG2E, d)
    _launch(_fwd_kernel, n, "BLOCK_M", b * h, args, q.dtype, d, tiles)
    return o, lse


def _backward(q, k, v, o, lse, do, T, L, scale, tiles):
    b, h, n, d = q.shape
    do = do.contiguous()
    # delta_i = rowsum(dO_i * O_i): one elementwise reduction, not worth a kernel of its own
    delta = (do.float() * o.float()).sum(-1).reshape(b * h, n)
    dq, dk, dv = _empty(q), _empty(k), _empty(v)
    strides, rest = (q.stride(0), q.stride(1), q.stride(2)), (h, n, T, L, scale * LOG2E, scale, d)
    grads = (q, k, v, do, lse, delta)
    _launch(_dkdv_kernel, n, "BLOCK_N", b * h, (*grads, dk, dv, *strides, *rest), q.dtype, d, tiles)
    _launch(_dq_kernel, n, "BLOCK_M", b * h, (*grads, dq, *strides, *rest), q.dtype, d, tiles)
    return dq, dk, dv


class _ParallelThoughtAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, num_text, thought_len, scale, tiles):
        o, lse = _forward(q, k, v, num_text, thought_len, scale, tiles)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.shape = (num_text, thought_len, scale, tiles)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, *ctx.shape)
        return dq, dk, dv, None, None, None, None


def parallel_thought_attention(q, k, v, num_text: int, thought_len: int, scale: float | None = None,
                               tiles: str | dict | None = None) -> torch.Tensor:
    """Attention of the parallel-thought pattern. q, k, v: (batch, heads, num_text * (1 + thought_len),
    head_dim).

    CUDA tensors run the Triton kernel; CPU tensors run the reference's explicit mask through PyTorch's SDPA,
    or the Triton kernel in the interpreter when TRITON_INTERPRET=1. Differentiable (Triton backward on the
    kernel path). tiles: "fixed" | "autotune" | a forced config (see TUNE_SPACE); None reads THINKTOK_TILES
    (default fixed).
    """
    check_inputs(q, k, v, num_text, thought_len)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not (q.is_cuda or interpreting()):
        # the reference's semantics through PyTorch's fused SDPA with a cached boolean mask: still dense, but
        # 2-3x faster on a CPU than the reference's einsums and a mask rebuilt every call
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=cached_mask(num_text, thought_len, q.device), scale=scale)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _ParallelThoughtAttention.apply(q, k, v, num_text, thought_len, scale, resolve_tiles(tiles))
