"""The parallel-thought attention kernel against its PyTorch reference (forward and gradients).

On the CPU the Triton kernel runs in the interpreter (TRITON_INTERPRET=1, fp32/fp16: the interpreter gets
bf16 tl.dot wrong); on a GPU the same tests run at full size with bf16 too.
"""

import pytest
import torch

import thinktok.kernels.parallel_thought as pt
import thinktok.kernels.tiles as tiling
from thinktok.kernels.parallel_decode import parallel_thought_decode, parallel_thought_decode_reference
from thinktok.kernels.parallel_thought import (
    parallel_thought_attention,
    parallel_thought_attention_reference,
    parallel_thought_mask,
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(b, h, t, l, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t * (1 + l), d, generator=g).to(DEVICE,
                                                              dtype).requires_grad_() for _ in range(3)]


def test_mask_by_hand():
    # T=2, L=2: rows r0 r1 | (0,0) (0,1) | (1,0) (1,1)
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(parallel_thought_mask(2, 2), expect)


SHAPES = [  # (B, H, T, L, D)
    (1, 1, 1, 1, 64),  # smallest
    (2, 3, 37, 3, 64),  # T not a multiple of the block, several query/key blocks
    (1, 2, 5, 9, 128),  # L > T, head dim 128
    (1, 2, 33, 1, 24),  # L = 1, head dim not a power of two
]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_grads_match_reference(shape, dtype, monkeypatch):
    # poison every output buffer: an element the kernels forget to write shows up as NaN
    monkeypatch.setattr(pt, "_empty", lambda x, **kw: torch.full_like(x, float("nan"), **kw))
    b, h, t, l, d = shape
    q, k, v = inputs(b, h, t, l, d, dtype)
    out = parallel_thought_attention(q, k, v, t, l)
    ref = parallel_thought_attention_reference(q, k, v, t, l)
    assert out.shape == ref.shape and out.dtype == dtype and not out.isnan().any()
    assert rel(out, ref) < TOL[dtype]
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert not g.isnan().any(), f"d{name} has unwritten elements"
        assert rel(g, r) < TOL[dtype], f"d{name}"


# autotuned tiles at bf16 only (the training dtype): every tuned dtype is ~24 more compiles
GPU_CASES = [(torch.float32, "fixed"), (torch.float16, "fixed"), (torch.bfloat16, "fixed"),
             (torch.bfloat16, "autotune")]


@pytest.mark.skipif(not GPU, reason="full size needs a GPU")
@pytest.mark.parametrize("dtype, tiles", GPU_CASES)
def test_full_size_on_gpu(dtype, tiles):
    # T and L at full size; 1 x 4 heads because the reference's fp32 (B, H, N, N) scores take 1.2 GB a head
    q, k, v = inputs(1, 4, 1024, 16, 64, dtype)
    out = parallel_thought_attention(q, k, v, 1024, 16, tiles=tiles)
    ref = parallel_thought_attention_reference(q, k, v, 1024, 16)
    assert rel(out, ref) < TOL[dtype]
    do = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert rel(g, r) < TOL[dtype]


@pytest.mark.skipif(not GPU, reason="full size needs a GPU")
@pytest.mark.parametrize("dtype, tiles", GPU_CASES)
def test_decode_full_size_on_gpu(dtype, tiles):
    args, _ = decode_inputs(4, 12, 1024, 16, 15, 64, dtype)
    out = parallel_thought_decode(*args, tiles=tiles)
    assert rel(out, parallel_thought_decode_reference(*args)) < TOL[dtype]


def test_custom_scale_and_cpu_fallback(monkeypatch):
    q, k, v = inputs(1, 2, 6, 2, 16, torch.float32)
    out = parallel_thought_attention(q, k, v, 6, 2, scale=0.3)
    assert rel(out, parallel_thought_attention_reference(q, k, v, 6, 2, scale=0.3)) < 1e-5
    # without the interpreter flag a CPU tensor takes the PyTorch path (SDPA, the reference's mask)
    if not GPU:
        monkeypatch.delenv("TRITON_INTERPRET")
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            q, k, v = inputs(2, 3, 7, 3, 64, dtype)
            out = parallel_thought_attention(q, k, v, 7, 3)
            assert out.dtype == dtype and rel(out, parallel_thought_attention_reference(q, k, v, 7, 3)) < tol
            ref = parallel_thought_attention_reference(q, k, v, 7, 3)
            do = torch.randn_like(out)
            for g, r in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
                assert rel(g, r) < tol


@pytest.mark.parametrize("t, l, shape, match", [
    (4, 2, (1, 1, 11, 16), "sequence length 11"), (0, 2, (1, 1, 0, 16), "must be >= 1"),
    (4, 0, (1, 1, 4, 16), "must be >= 1"),
])
def test_bad_shapes_are_named(t, l, shape, match):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        parallel_thought_attention(x, x, x, t, l)


def test_flex_mask_mod_is_the_same_pattern():
    from torch.nn.attention.flex_attention import create_mask

    from thinktok.kernels.bench import flex_pattern

    assert torch.equal(create_mask(flex_pattern(7, 3), None, None, 28, 28, device="cpu")[0, 0],
                       parallel_thought_mask(7, 3))


def decode_inputs(b, h, t, l, j, d, dtype, seed=1):
    """Step j of the incremental form, cut from one full layout: the queries are thought (t, j) for every
    t."""
    q, k, v = (x.detach() for x in inputs(b, h, t, l, d, dtype, seed))
    rows = t + torch.arange(t, device=q.device) * l + j

    def thought(x):  # the first j + 1 thought keys/values of every position
        return x[:, :, t:].reshape(b, h, t, l, d)[:, :, :, : j + 1]

    return (q[:, :, rows], k[:, :, :t], v[:, :, :t], thought(k), thought(v)), (q, k, v, rows)


def test_decode_reference_is_the_full_pattern_at_one_step():
    t, l, j = 6, 3, 2
    args, (q, k, v, rows) = decode_inputs(2, 3, t, l, j, 16, torch.float32)
    full = parallel_thought_attention_reference(q, k, v, t, l)
    assert rel(parallel_thought_decode_reference(*args), full[:, :, rows]) < 1e-6


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 0, 64), (2, 3, 37, 4, 3, 64), (1, 2, 70, 2, 0, 128), (1, 2, 33, 3, 1, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_kernel_matches_reference(shape, dtype, monkeypatch):
    monkeypatch.setattr(pt, "_empty", lambda x, **kw: torch.full_like(x, float("nan"), **kw))
    b, h, t, l, j, d = shape
    args, _ = decode_inputs(b, h, t, l, j, d, dtype)
    out = parallel_thought_decode(*args)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel(out, parallel_thought_decode_reference(*args)) < TOL[dtype]


def test_decode_rejects_mismatched_cache():
    args, _ = decode_inputs(1, 2, 5, 2, 1, 16, torch.float32)
    q, kr, vr, kt, vt = args
    with pytest.raises(ValueError, match="k_thought"):
        parallel_thought_decode(q, kr, vr, kt[:, :, :4], vt[:, :, :4])
    with pytest.raises(ValueError, match="k_text"):
        parallel_thought_decode(q, kr[:, :, :4], vr, kt, vt)


# ---- tile configurations: each autotuning candidate's shape logic, forced, in the interpreter ------------

CONFIG_SHAPES = [(1, 2, 37, 3, 16), (1, 1, 5, 9, 32)]  # several blocks of every size; L > T


@pytest.mark.skipif(GPU, reason="the interpreter's check; on a GPU the autotuned full-size tests cover it")
@pytest.mark.parametrize("cfg", tiling.tune_configs(),
                         ids=lambda c: "m{BLOCK_M}n{BLOCK_N}w{num_warps}s{num_stages}".format(**c))
def test_every_tune_config_matches_reference(cfg, monkeypatch):
    monkeypatch.setattr(pt, "_empty", lambda x, **kw: torch.full_like(x, float("nan"), **kw))
    for b, h, t, l, d in CONFIG_SHAPES:
        q, k, v = inputs(b, h, t, l, d, torch.float32)
        out = parallel_thought_attention(q, k, v, t, l, tiles=cfg)
        ref = parallel_thought_attention_reference(q, k, v, t, l)
        assert rel(out, ref) < 1e-5
        do = torch.randn_like(out)
        for g, r in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
            assert rel(g, r) < 1e-5
        args, _ = decode_inputs(b, h, t, l, l - 1, d, torch.float32)
        assert rel(parallel_thought_decode(*args, tiles=cfg), parallel_thought_decode_reference(*args)) < 1e-5


def test_tile_switch(monkeypatch):
    assert tiling.resolve_tiles(None) == "fixed"  # the default: fixed tiles
    monkeypatch.setenv(tiling.TILES_ENV, "autotune")
    if not GPU:
        with pytest.raises(ValueError, match="interpreter"):
            tiling.resolve_tiles(None)
    with pytest.raises(ValueError, match="tiles must be"):
        tiling.resolve_tiles("fastest")


def test_configs_pruned_per_head_dim():
    import triton

    configs = [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in tiling.tune_configs()]
    assert len(tiling._prune(configs, {}, HEAD_DIM=64)) == len(configs)
    kept = tiling._prune(configs, {}, HEAD_DIM=128)
    assert 0 < len(kept) < len(configs)
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128 and c.num_stages <= 3 for c in kept)
