"""The incremental form of parallel-thought attention, used while sampling: thought step j at every position
at once, against the cached real keys and each position's own cached thoughts, without any (T, T) score
matrix. A Triton kernel (forward only: sampling needs no gradients) and its plain-PyTorch reference; it reuses
the full form's block helpers, tiles and launcher (parallel_thought.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import parallel_thought as pt
from .parallel_thought import LOG2E, _fwd_block, _head_base, _launch, _store_tile, _tile
from .tiles import interpreting, resolve_tiles


def check_decode_inputs(q, k_text, v_text, k_thought, v_thought) -> None:
    b, h, t, d = q.shape
    if k_text.shape != q.shape or v_text.shape != q.shape:
        raise ValueError(f"q, k_text, v_text must share (batch, heads, num_text, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k_text.shape)}, {tuple(v_text.shape)}")
    if k_thought.dim() != 5 or k_thought.shape != v_thought.shape or k_thought.shape[:3] != (b, h, t) \
            or k_thought.shape[4] != d or k_thought.shape[3] < 1:
        raise ValueError(f"k_thought, v_thought must be (batch, heads, num_text, steps >= 1, head_dim) "
                         f"matching q, got {tuple(k_thought.shape)}, {tuple(v_thought.shape)}")


def parallel_thought_decode_reference(q, k_text, v_text, k_thought, v_thought,
                                      scale: float | None = None) -> torch.Tensor:
    """The incremental form, in plain PyTorch: thought step j at every position at once. Query t (B, H, T, D)
    attends real keys <= t and its own position's thoughts 0..j (B, H, T, j+1, D); one softmax over both."""
    check_decode_inputs(q, k_text, v_text, k_thought, v_thought)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t = q.shape[2]
    real = torch.einsum("bhtd,bhkd->bhtk", q.float(), k_text.float()) * scale  # (B, H, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    real = real.masked_fill(~causal, float("-inf"))
    own = torch.einsum("bhtd,bhtjd->bhtj", q.float(), k_thought.float()) * scale  # (B, H, T, j+1)
    p = torch.cat([real, own], dim=-1).softmax(-1)
    out = torch.einsum("bhtk,bhkd->bhtd", p[..., :t], v_text.float())
    out = out + torch.einsum("bhtj,bhtjd->bhtd", p[..., t:], v_thought.float())
    return out.to(q.dtype)


@triton.jit
def _decode_kernel(Q, KR, VR, KT, VT, O, stride_b, stride_h, stride_n, tstride_b, tstride_h, tstride_n,
                   tstride_j,
                   H, T, J, qk_scale, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Incremental form: rows are positions t; a causal sweep over the cached real keys (the forward's own
    blocks, unmasked below the row block), then each row's own J cached thoughts, one key per row and step
    (a gather, so a row-wise dot product, not a tile matmul)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    base = _head_base(pid_bh, H, stride_b, stride_h)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = _tile(Q + base, offs_m, offs_d, T, D, stride_n)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = ((pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, KR + base, VR + base, stride_n, offs_m, offs_m, start_n,
                                   T, T, T, 1, qk_scale, offs_d, D, BLOCK_N, False, PRECISION)
    for start_n in range(full_end, tl.minimum(T, pid_m * BLOCK_M + BLOCK_M), BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, KR + base, VR + base, stride_n, offs_m, offs_m, start_n,
                                   T, T, T, 1, qk_scale, offs_d, D, BLOCK_N, True, PRECISION)
    tbase = _head_base(pid_bh, H, tstride_b, tstride_h)
    qf = q.to(tl.float32)
    for j in range(0, J):
        ptr = tbase + offs_m[:, None] * tstride_n + j * tstride_j + offs_d[None, :]
        k = tl.load(KT + ptr, mask=q_mask, other=0.0).to(tl.float32)
        v = tl.load(VT + ptr, mask=q_mask, other=0.0).to(tl.float32)
        s = tl.sum(qf * k, 1) * qk_scale  # (BM,)
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_tile(O + base, acc, offs_m, offs_d, T, D, stride_n)


pt._TUNED[_decode_kernel] = pt._tuned(_decode_kernel, ["D", "T"])

def parallel_thought_decode(q, k_text, v_text, k_thought, v_thought, scale: float | None = None,
                            tiles: str | dict | None = None) -> torch.Tensor:
    """The incremental form used while sampling: thought step j at every position at once, without any
    (T, T) score matrix. q, k_text, v_text (B, H, T, D); k_thought, v_thought (B, H, T, j+1, D) -> (B, H, T,
    D).

    CUDA tensors (or TRITON_INTERPRET=1) run the Triton kernel, CPU tensors the reference. Forward only:
    sampling needs no gradients (the learner's recompute is the full form). tiles: as in
    parallel_thought_attention."""
    check_decode_inputs(q, k_text, v_text, k_thought, v_thought)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not (q.is_cuda or interpreting()):
        return parallel_thought_decode_reference(q, k_text, v_text, k_thought, v_thought, scale)
    q, k_text, v_text, k_thought, v_thought = (x.contiguous() for x in (
        q, k_text, v_text, k_thought, v_thought))
    b, h, t, d = q.shape
    o = pt._empty(q)  # through the module: tests poison it there
    args = (q, k_text, v_text, k_thought, v_thought, o, q.stride(0), q.stride(1), q.stride(2),
            *k_thought.stride()[:4], h, t, k_thought.shape[3], scale * LOG2E, d)
    _launch(_decode_kernel, t, "BLOCK_M", b * h, args, q.dtype, d, resolve_tiles(tiles))
    return o
