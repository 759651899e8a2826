"""`thinktok bench attention`: the parallel-thought kernel against dense masked SDPA and
`torch.compile(flex_attention)` with a block mask of the same pattern, in one process, forward and
forward+backward. Prints ratios and useful TFLOP/s (only allowed query-key pairs count) and saves JSON.
Needs a CUDA GPU: on a CPU the kernel API runs a dense PyTorch path, so timings would say nothing."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from thinktok.analysis.timing import timed, write_json
from thinktok.errors import UserError

from .parallel_thought import allowed, parallel_thought_attention, parallel_thought_mask

SIZES = ((512, 8), (1024, 8), (1024, 16))


def useful_pairs(t: int, l: int) -> int:
    return int(parallel_thought_mask(t, l).sum())


def median_ms(fn, iters: int = 20) -> float:
    """The shared benchmark timer on the GPU, in ms (3 warm-up calls: the first of a shape may autotune)."""
    return 1000 * timed(fn, iters, "cuda", warm_up=3)


def flex_pattern(t: int, l: int):
    """FlexAttention mask_mod of the pattern."""
    return lambda b, h, q_idx, kv_idx: allowed(q_idx, kv_idx, t, l)


def implementations(t: int, l: int, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = t * (1 + l)
    dense = parallel_thought_mask(t, l, device)
    block_mask = create_block_mask(flex_pattern(t, l), None, None, n, n, device=device)
    flex = torch.compile(flex_attention)
    return {
        "kernel": lambda q, k, v: parallel_thought_attention(q, k, v, t, l, tiles="fixed"),
        # the first call of a shape times every candidate (inside median_ms's warm-up calls)
        "kernel_autotune": lambda q, k, v: parallel_thought_attention(q, k, v, t, l, tiles="autotune"),
        "sdpa_dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
        "flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask),
    }


def bench_attention(out: Path, batch: int = 4, heads: int = 12, head_dim: int = 64,
                    dtype: str = "bfloat16") -> dict:
    if not torch.cuda.is_available():
        raise UserError("bench attention needs a CUDA GPU (on a CPU the kernel API runs a dense PyTorch "
                         "path)")
    device, torch_dtype = torch.device("cuda"), getattr(torch, dtype)
    results = {"device": torch.cuda.get_device_name(), "batch": batch, "heads": heads, "head_dim": head_dim,
               "dtype": dtype, "sizes": []}
    for t, l in SIZES:
        n = t * (1 + l)
        q, k, v = (torch.randn(batch, heads, n, head_dim, device=device, dtype=torch_dtype,
                               requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        flops_fwd = 4 * batch * heads * useful_pairs(t, l) * head_dim  # QK^T and PV, 2 flops per MAC
        row = {"T": t, "L": l}
        for name, fn in implementations(t, l, device).items():
            fwd = median_ms(lambda: fn(q, k, v))
            both = median_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
            # backward does 2.5x the forward's matmul work (dV, dP, dS->dQ, dK)
            row[name] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_tflops": flops_fwd / fwd / 1e9,
                         "fwd_bwd_tflops": 3.5 * flops_fwd / both / 1e9}
        def bwd(name):
            return row[name]["fwd_bwd_ms"] - row[name]["fwd_ms"]

        for base in ("sdpa_dense", "flex"):
            row[f"speedup_vs_{base}"] = {"fwd": row[base]["fwd_ms"] / row["kernel"]["fwd_ms"],
                                         "bwd": bwd(base) / bwd("kernel"),
                                         "fwd_bwd": row[base]["fwd_bwd_ms"] / row["kernel"]["fwd_bwd_ms"]}
        fixed, tuned = row["kernel"], row["kernel_autotune"]
        row["autotune_vs_fixed"] = {"fwd": fixed["fwd_ms"] / tuned["fwd_ms"],
                                    "fwd_bwd": fixed["fwd_bwd_ms"] / tuned["fwd_bwd_ms"]}
        results["sizes"].append(row)
        print(f"T={t:5d} L={l:3d} | kernel fwd {row['kernel']['fwd_ms']:.3f} ms "
              f"({row['kernel']['fwd_tflops']:.0f} TFLOP/s) fwd+bwd {row['kernel']['fwd_bwd_ms']:.3f} ms | "
              f"vs flex fwd {row['speedup_vs_flex']['fwd']:.2f}x, bwd {row['speedup_vs_flex']['bwd']:.2f}x "
              f"| vs dense SDPA {row['speedup_vs_sdpa_dense']['fwd']:.1f}x / "
              f"{row['speedup_vs_sdpa_dense']['fwd_bwd']:.1f}x | autotuned tiles "
              f"{row['autotune_vs_fixed']['fwd']:.2f}x / {row['autotune_vs_fixed']['fwd_bwd']:.2f}x fixed")
    write_json(out / "attention.json", results)
    print(f"saved {out / 'attention.json'}")
    return results
