"""Tile settings of the parallel-thought kernels: fixed tiles, Triton's autotuner over TUNE_SPACE, or a forced
config, chosen by the `tiles` argument or THINKTOK_TILES; and whether the kernels run in Triton's CPU
interpreter."""

from __future__ import annotations

import os

import triton

from thinktok.errors import UserError


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tile settings. "fixed": 64x64 tiles (32x32 in the interpreter) with Triton's default warps/stages;
# "autotune" lets triton.autotune pick from TUNE_SPACE per (head dim, T, L), timing each candidate on the
# first call of a shape; a dict {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} forces one candidate (the
# interpreter tests run every one). The switch: the `tiles` argument, else THINKTOK_TILES (default fixed).
TILES_ENV = "THINKTOK_TILES"
# (BLOCK_M, BLOCK_N, num_warps, num_stages): FA2-style Triton on an H100 is usually best at 128x64 / 64x64
# with 4-8 warps and 3-4 stages for D=64; 32-wide key tiles cut the masked work of the thought-key tiles.
# Six candidates: each costs a compile (~1-2 s) per kernel and dtype the first time a machine meets it.
TUNE_SPACE = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3),
              (64, 32, 4, 4)]


def tune_configs() -> list[dict]:
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in TUNE_SPACE]


def fits(cfg: dict, head_dim: int) -> bool:
    """Per head dim: at 128 the q tile plus num_stages (k, v) tile pairs of a large config overflow the
    228 KB of shared memory an H100 block may use, so only tiles up to 64x128 with <= 3 stages stay."""
    return head_dim <= 64 or (cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 64 * 128 and cfg["num_stages"] <= 3)


def _prune(configs, named_args, **kwargs):
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    if head_dim is None:  # not handed to the pruner by this Triton version: time them all
        return configs
    kept = [c for c in configs if fits({**c.kwargs, "num_stages": c.num_stages}, head_dim)]
    return kept or configs[:1]


def _tuned(kernel, key: list[str]):
    configs = [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in tune_configs()]
    # every kernel writes all of its outputs (no accumulation), so re-running a candidate is harmless
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune})(kernel)


def resolve_tiles(tiles: str | dict | None) -> str | dict:
    tiles = os.environ.get(TILES_ENV, "fixed") if tiles is None else tiles
    if not isinstance(tiles, dict) and tiles not in ("fixed", "autotune"):
        raise UserError(f"tiles must be 'fixed', 'autotune' or a config dict, got {tiles!r}")
    if tiles == "autotune" and interpreting():
        raise UserError("tiles='autotune' times candidates on a GPU; the interpreter takes 'fixed' or a "
                         "config")
    return tiles
