"""Bad inputs at every public entry point of `reference` (issue 2, point 3; docs/DESIGN.md section 3).

Each case replaces one or more arguments of a valid call with a bad value and expects a ValueError or TypeError
whose message names the argument. A case applies to every entry point that takes all the arguments it replaces
(or to the entry points listed in `only`), so one table covers the eight public functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from helpers import causal_block_mask, random_qkv

import reference
from reference import (
    block_scores,
    block_sparse_attention,
    block_sparse_attention_fp8,
    block_sparse_attention_logical,
    compact_blocks,
    dense_attention,
    flash_prefill,
    lists_to_mask,
    mean_pool_keys,
    select_and_compact,
    select_blocks,
)


B, L, HQ, HKV, D, BS = 2, 40, 4, 2, 16, 16
M = 3  # ceil(L / BS)


def valid_args() -> dict:
    q, k, v = random_qkv(B, L, HQ, HKV, D, torch.float32, seed=0)
    mask = causal_block_mask(B, HQ, M)
    counts, indices = compact_blocks(mask)
    kbar = mean_pool_keys(k, BS)
    return dict(
        q=q, k=k, v=v, kbar=kbar, scores=block_scores(q, kbar, BS), mask=mask, counts=counts, indices=indices,
        alpha=0.12, block_size=BS, sink_blocks=1, window_blocks=1, last_dense_blocks=1,
        softmax_scale=None,
    )


# name -> (call, the argument names it takes)
ENTRY_POINTS: dict[str, tuple[Callable[[dict], object], set[str]]] = {
    "flash_prefill": (
        lambda a: flash_prefill(a["q"], a["k"], a["v"], alpha=a["alpha"], block_size=a["block_size"],
                                sink_blocks=a["sink_blocks"], window_blocks=a["window_blocks"],
                                last_dense_blocks=a["last_dense_blocks"], softmax_scale=a["softmax_scale"]),
        {"q", "k", "v", "alpha", "block_size", "sink_blocks", "window_blocks", "last_dense_blocks", "softmax_scale"},
    ),
    "dense_attention": (
        lambda a: dense_attention(a["q"], a["k"], a["v"], a["softmax_scale"]),
        {"q", "k", "v", "softmax_scale"},
    ),
    "block_sparse_attention": (
        lambda a: block_sparse_attention(a["q"], a["k"], a["v"], a["counts"], a["indices"], a["block_size"],
                                         softmax_scale=a["softmax_scale"]),
        {"q", "k", "v", "counts", "indices", "block_size", "softmax_scale"},
    ),
    "block_sparse_attention_fp8": (
        lambda a: block_sparse_attention_fp8(a["q"], a["k"], a["v"], a["counts"], a["indices"], a["block_size"],
                                             softmax_scale=a["softmax_scale"]),
        {"q", "k", "v", "counts", "indices", "block_size", "softmax_scale"},
    ),
    "block_sparse_attention_logical": (
        lambda a: block_sparse_attention_logical(a["q"], a["k"], a["v"], a["mask"], a["block_size"],
                                                 softmax_scale=a["softmax_scale"]),
        {"q", "k", "v", "mask", "block_size", "softmax_scale"},
    ),
    "mean_pool_keys": (lambda a: mean_pool_keys(a["k"], a["block_size"]), {"k", "block_size"}),
    "block_scores": (
        lambda a: block_scores(a["q"], a["kbar"], a["block_size"], softmax_scale=a["softmax_scale"]),
        {"q", "kbar", "block_size", "softmax_scale"},
    ),
    "select_blocks": (
        lambda a: select_blocks(a["scores"], a["alpha"], a["sink_blocks"], a["window_blocks"],
                                a["last_dense_blocks"]),
        {"scores", "alpha", "sink_blocks", "window_blocks", "last_dense_blocks"},
    ),
    "compact_blocks": (lambda a: compact_blocks(a["mask"]), {"mask"}),
    "select_and_compact": (
        lambda a: select_and_compact(a["scores"], a["alpha"], a["sink_blocks"], a["window_blocks"],
                                     a["last_dense_blocks"]),
        {"scores", "alpha", "sink_blocks", "window_blocks", "last_dense_blocks"},
    ),
    "lists_to_mask": (lambda a: lists_to_mask(a["counts"], a["indices"]), {"counts", "indices"}),
}
QKV = {"flash_prefill", "dense_attention", "block_sparse_attention", "block_sparse_attention_logical",
       "block_sparse_attention_fp8"}


@dataclass
class Case:
    id: str
    change: Callable[[dict], dict]  # valid args -> the replaced arguments
    error: type
    match: str
    only: set[str] | None = None  # restrict to these entry points (default: all that take the replaced args)


def qkv(b=B, l=L, hq=HQ, hkv=HKV, d=D, dtype=torch.float32):
    return random_qkv(b, l, hq, hkv, d, dtype, seed=1)


def swap_first_two_of_last_row(indices: torch.Tensor) -> torch.Tensor:
    """Row M-1 of the full causal lists is [0, 1, 2]; make it [1, 0, 2] (in range, not ascending)."""
    out = indices.clone()
    out[..., M - 1, :2] = torch.tensor([1, 0], dtype=out.dtype)
    return out


def meta(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


CASES = [
    # --- not tensors
    Case("q-list", lambda a: {"q": a["q"].tolist()}, TypeError, r"^q must be a torch\.Tensor, got list"),
    Case("k-numpy", lambda a: {"k": a["k"].numpy()}, TypeError, r"^k must be a torch\.Tensor, got ndarray"),
    Case("v-None", lambda a: {"v": None}, TypeError, r"^v must be a torch\.Tensor, got NoneType"),
    Case("kbar-list", lambda a: {"kbar": a["kbar"].tolist()}, TypeError, r"^kbar must be a torch\.Tensor"),
    Case("scores-numpy", lambda a: {"scores": a["scores"].numpy()}, TypeError, r"^scores must be a torch\.Tensor"),
    Case("mask-list", lambda a: {"mask": a["mask"].tolist()}, TypeError, r"^mask must be a torch\.Tensor"),
    Case("counts-list", lambda a: {"counts": a["counts"].tolist()}, TypeError, r"^counts must be a torch\.Tensor"),
    Case("indices-int", lambda a: {"indices": 0}, TypeError, r"^indices must be a torch\.Tensor, got int"),
    # --- wrong number of dimensions
    Case("q-3d", lambda a: {"q": a["q"][0]}, ValueError, r"^q must be 4-D, got shape \(40, 4, 16\)"),
    Case("k-5d", lambda a: {"k": a["k"].unsqueeze(0)}, ValueError, r"^k must be 4-D"),
    Case("v-3d", lambda a: {"v": a["v"].flatten(2)}, ValueError, r"^v must be 4-D"),
    Case("kbar-3d", lambda a: {"kbar": a["kbar"][0]}, ValueError, r"^kbar must be 4-D"),
    Case("scores-3d", lambda a: {"scores": a["scores"][0]}, ValueError, r"^scores must be 4-D"),
    Case("mask-3d", lambda a: {"mask": a["mask"][0]}, ValueError, r"^mask must be 4-D"),
    Case("counts-4d", lambda a: {"counts": a["counts"].unsqueeze(-1)}, ValueError, r"^counts must be 3-D"),
    Case("indices-3d", lambda a: {"indices": a["indices"][..., 0]}, ValueError, r"^indices must be 4-D"),
    # --- q/k/v shapes
    Case("q-batch", lambda a: {"q": qkv(b=3)[0]}, ValueError, r"q and k must have the same batch size, got 3 and 2",
         only=QKV),
    Case("kv-batch", lambda a: dict(zip("kv", qkv(b=1)[1:])), ValueError, r"q and k must have the same batch size",
         only=QKV),
    Case("q-length", lambda a: {"q": qkv(l=56)[0]}, ValueError, r"q and k must have the same sequence length",
         only=QKV),
    Case("kv-length", lambda a: dict(zip("kv", qkv(l=39)[1:])), ValueError,
         r"q and k must have the same sequence length.*got 40 and 39", only=QKV),
    Case("q-headdim", lambda a: {"q": qkv(d=32)[0]}, ValueError, r"q and k must have the same head dim", only=QKV),
    Case("kv-headdim", lambda a: dict(zip("kv", qkv(d=8)[1:])), ValueError, r"q and k must have the same head dim",
         only=QKV),
    Case("v-length", lambda a: {"v": qkv(l=39)[2]}, ValueError, r"k and v must have the same shape"),
    Case("v-headdim", lambda a: {"v": qkv(d=8)[2]}, ValueError, r"k and v must have the same shape"),
    Case("v-heads", lambda a: {"v": qkv(hkv=1)[2]}, ValueError, r"k and v must have the same shape"),
    Case("gqa-not-divisible", lambda a: dict(zip("kv", qkv(hkv=3)[1:])), ValueError,
         r"number of query heads \(4\) must be divisible by the number of kv heads \(3\)"),
    Case("gqa-more-kv-than-q", lambda a: {"q": qkv(hq=1)[0]}, ValueError,
         r"number of query heads \(1\) must be divisible by the number of kv heads \(2\)", only=QKV),
    # --- dtypes
    Case("q-int32", lambda a: {"q": a["q"].to(torch.int32)}, TypeError, r"^q has dtype torch\.int32; expected one of"),
    Case("q-complex64", lambda a: {"q": a["q"].to(torch.complex64)}, TypeError, r"^q has dtype torch\.complex64"),
    Case("k-int64", lambda a: {"k": a["k"].long()}, TypeError, r"^k has dtype torch\.int64"),
    Case("v-bool", lambda a: {"v": a["v"] > 0}, TypeError, r"^v has dtype torch\.bool"),
    Case("kv-float16-q-float32", lambda a: dict(zip("kv", qkv(dtype=torch.float16)[1:])), TypeError,
         r"q, k and v must share one dtype"),
    Case("kbar-int32", lambda a: {"kbar": a["kbar"].int()}, TypeError, r"^kbar has dtype torch\.int32"),
    Case("scores-float16", lambda a: {"scores": a["scores"].half()}, TypeError, r"^scores has dtype torch\.float16"),
    Case("scores-int64", lambda a: {"scores": a["scores"].long()}, TypeError, r"^scores has dtype torch\.int64"),
    Case("mask-uint8", lambda a: {"mask": a["mask"].to(torch.uint8)}, TypeError, r"^mask has dtype torch\.uint8"),
    Case("mask-float32", lambda a: {"mask": a["mask"].float()}, TypeError, r"^mask has dtype torch\.float32"),
    Case("counts-int64", lambda a: {"counts": a["counts"].long()}, TypeError, r"^counts has dtype torch\.int64"),
    Case("indices-int64", lambda a: {"indices": a["indices"].long()}, TypeError, r"^indices has dtype torch\.int64"),
    # --- devices (the meta device stands in for a second device on a CPU-only machine)
    Case("q-meta", lambda a: {"q": meta(a["q"])}, ValueError, r"same device.*q on meta", only=QKV | {"block_scores"}),
    Case("k-meta", lambda a: {"k": meta(a["k"])}, ValueError, r"same device.*k on meta", only=QKV),
    Case("v-meta", lambda a: {"v": meta(a["v"])}, ValueError, r"same device.*v on meta", only=QKV),
    Case("kbar-meta", lambda a: {"kbar": meta(a["kbar"])}, ValueError, r"same device.*kbar on meta"),
    Case("counts-meta", lambda a: {"counts": meta(a["counts"])}, ValueError, r"same device.*counts on meta"),
    Case("indices-meta", lambda a: {"indices": meta(a["indices"])}, ValueError, r"same device.*indices on meta"),
    Case("mask-meta", lambda a: {"mask": meta(a["mask"])}, ValueError, r"same device.*mask on meta",
         only={"block_sparse_attention_logical"}),
    # --- empty tensors
    Case("qkv-L0", lambda a: dict(zip("qkv", qkv(l=0))), ValueError,
         r"^q must not be empty, got shape \(2, 0, 4, 16\)"),
    Case("qkv-B0", lambda a: dict(zip("qkv", qkv(b=0))), ValueError,
         r"^q must not be empty, got shape \(0, 40, 4, 16\)"),
    Case("qkv-D0", lambda a: dict(zip("qkv", qkv(d=0))), ValueError, r"^q must not be empty"),
    Case("q-L0", lambda a: {"q": qkv(l=0)[0]}, ValueError, r"^q must not be empty", only={"block_scores"}),
    Case("k-L0", lambda a: {"k": a["k"][:, :0]}, ValueError, r"^k must not be empty"),
    Case("kbar-N0", lambda a: {"kbar": a["kbar"][:, :0]}, ValueError, r"^kbar must not be empty"),
    Case("scores-M0", lambda a: {"scores": a["scores"][:, :, :0, :0]}, ValueError, r"^scores must not be empty"),
    Case("mask-M0", lambda a: {"mask": a["mask"][:, :, :0, :0]}, ValueError, r"^mask must not be empty"),
    Case("counts-M0", lambda a: {"counts": a["counts"][..., :0]}, ValueError, r"^counts must not be empty"),
    Case("indices-C0", lambda a: {"indices": a["indices"][..., :0]}, ValueError, r"^indices must not be empty"),
    # --- layouts that do not fit q / each other
    Case("kbar-batch", lambda a: {"kbar": torch.cat([a["kbar"], a["kbar"]])}, ValueError,
         r"^kbar must have shape \(B=2, N=3, Hkv, D=16\)"),
    Case("kbar-N", lambda a: {"kbar": a["kbar"][:, :2]}, ValueError, r"^kbar must have shape \(B=2, N=3"),
    Case("kbar-headdim", lambda a: {"kbar": a["kbar"][..., :8]}, ValueError, r"^kbar must have shape"),
    Case("kbar-heads-not-divisible", lambda a: {"kbar": a["kbar"][:, :, :1].expand(B, M, 3, D)}, ValueError,
         r"query heads \(4\) must be divisible by kbar's kv heads \(3\)"),
    Case("q-length-vs-kbar", lambda a: {"q": qkv(l=56)[0]}, ValueError, r"^kbar must have shape \(B=2, N=4",
         only={"block_scores"}),
    Case("scores-not-square", lambda a: {"scores": a["scores"][..., :2]}, ValueError,
         r"^scores must have shape \(B, Hq, M, N\) with M == N"),
    Case("mask-not-square", lambda a: {"mask": a["mask"][..., :2]}, ValueError,
         r"^mask must have shape \(B, Hq, M, N\) with M == N"),
    Case("mask-blocks", lambda a: {"mask": causal_block_mask(B, HQ, M + 1)}, ValueError,
         r"^mask must have shape \(B=2, Hq=4, M=3, N=3\), got \(2, 4, 4, 4\)",
         only={"block_sparse_attention_logical"}),
    Case("mask-heads", lambda a: {"mask": causal_block_mask(B, HKV, M)}, ValueError,
         r"^mask must have shape \(B=2, Hq=4", only={"block_sparse_attention_logical"}),
    Case("counts-blocks", lambda a: {"counts": torch.ones(B, HQ, M + 1, dtype=torch.int32)}, ValueError,
         r"^counts must have shape \(B=2, Hq=4, M=3\), got \(2, 4, 4\)"),
    Case("counts-heads", lambda a: {"counts": a["counts"][:, :HKV]}, ValueError, r"^counts must have shape"),
    Case("indices-rows", lambda a: {"indices": torch.zeros(B, HQ, M + 1, M, dtype=torch.int32)}, ValueError,
         r"^indices must have shape \(B=2, Hq=4, M=3, C\) with 1 <= C <= N=3"),
    Case("indices-too-wide", lambda a: {"indices": torch.zeros(B, HQ, M, M + 1, dtype=torch.int32)}, ValueError,
         r"^indices must have shape .* got \(2, 4, 3, 4\)"),
    Case("lists-rows-differ", lambda a: {"counts": torch.ones(B, HQ, M + 1, dtype=torch.int32)}, ValueError,
         r"^indices must have shape \(B=2, Hq=4, M=4, C\) with 1 <= C <= N=4, got \(2, 4, 3, 3\)",
         only={"lists_to_mask"}),
    # --- list values that compact_blocks never produces (would read the wrong block, or a block twice)
    Case("counts-negative", lambda a: {"counts": a["counts"] - 2}, ValueError, r"^counts must satisfy 0 <= counts"),
    Case("counts-above-diagonal", lambda a: {"counts": a["counts"] + 1}, ValueError,
         r"^counts must satisfy .*no block above the diagonal"),
    Case("indices-negative", lambda a: {"indices": torch.where(a["indices"] == 0, -1, a["indices"])}, ValueError,
         r"^indices\[\.\.\., I, :counts\] must lie in \[0, I\]"),
    Case("indices-above-diagonal", lambda a: {"indices": a["indices"].clone().index_fill_(-1, torch.tensor([0]), 2)},
         ValueError, r"^indices\[\.\.\., I, :counts\] must lie in \[0, I\]"),
    Case("indices-descending", lambda a: {"indices": swap_first_two_of_last_row(a["indices"])}, ValueError,
         r"^indices\[\.\.\., I, :counts\] must be strictly ascending"),
    Case("indices-duplicate", lambda a: {"indices": torch.zeros_like(a["indices"])}, ValueError,
         r"^indices\[\.\.\., I, :counts\] must be strictly ascending"),
    # --- alpha
    *[
        Case(f"alpha-{name}", lambda a, x=x: {"alpha": x}, ValueError, r"^alpha must be a finite number >= 0")
        for name, x in [("negative", -0.1), ("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)]
    ],
    *[
        Case(f"alpha-{name}", lambda a, x=x: {"alpha": x}, TypeError, r"^alpha must be a real number, got " + t)
        for name, x, t in [("str", "0.1", "str"), ("None", None, "NoneType"), ("bool", True, "bool"),
                           ("tensor", torch.tensor(0.1), "Tensor")]
    ],
    # --- block_size
    *[
        Case(f"block_size-{x}", lambda a, x=x: {"block_size": x}, ValueError,
             rf"^block_size must be a power of two >= 16, got {x}")
        for x in (0, 1, 8, 15, 24, 100, -16)
    ],
    *[
        Case(f"block_size-{name}", lambda a, x=x: {"block_size": x}, TypeError, r"^block_size must be an int, got " + t)
        for name, x, t in [("float", 16.0, "float"), ("str", "16", "str"), ("None", None, "NoneType"),
                           ("bool", True, "bool")]
    ],
    # --- safety-net counts
    Case("window_blocks-0", lambda a: {"window_blocks": 0}, ValueError, r"^window_blocks must be >= 1, got 0"),
    Case("window_blocks--1", lambda a: {"window_blocks": -1}, ValueError, r"^window_blocks must be >= 1, got -1"),
    Case("window_blocks-float", lambda a: {"window_blocks": 1.5}, TypeError, r"^window_blocks must be an int"),
    Case("sink_blocks--1", lambda a: {"sink_blocks": -1}, ValueError, r"^sink_blocks must be >= 0, got -1"),
    Case("sink_blocks-str", lambda a: {"sink_blocks": "2"}, TypeError, r"^sink_blocks must be an int"),
    Case("last_dense_blocks--1", lambda a: {"last_dense_blocks": -1}, ValueError,
         r"^last_dense_blocks must be >= 0, got -1"),
    Case("last_dense_blocks-None", lambda a: {"last_dense_blocks": None}, TypeError,
         r"^last_dense_blocks must be an int"),
    # --- softmax scale (one name, softmax_scale, in every function that takes it)
    *[
        Case(f"softmax_scale-{name}", lambda a, x=x: {"softmax_scale": x}, ValueError,
             r"^softmax_scale must be a finite number > 0")
        for name, x in [("0", 0.0), ("negative", -0.5), ("nan", math.nan), ("inf", math.inf)]
    ],
    Case("softmax_scale-str", lambda a: {"softmax_scale": "0.1"}, TypeError,
         r"^softmax_scale must be a real number or None, got str"),
]


# Lists that do not fit q's blocks: lists_to_mask has no q, it reads M from counts (its own cases are below).
FIT_Q = {"counts-blocks", "counts-heads"}


def applicable(case: Case, entry: str) -> bool:
    takes = ENTRY_POINTS[entry][1]
    changed = set(case.change(valid_args()))
    if entry == "lists_to_mask" and case.id in FIT_Q:
        return False
    return changed <= takes and (case.only is None or entry in case.only)


PARAMS = [
    pytest.param(entry, case, id=f"{entry}-{case.id}")
    for case in CASES
    for entry in ENTRY_POINTS
    if applicable(case, entry)
]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_valid_call_succeeds(entry):
    """The baseline every bad-input case starts from is itself valid (so the errors below come from the change)."""
    call, _ = ENTRY_POINTS[entry]
    call(valid_args())


def test_every_case_applies_somewhere():
    covered = {p.values[1].id for p in PARAMS}
    assert covered == {c.id for c in CASES}


def test_every_entry_point_is_exercised():
    assert {p.values[0] for p in PARAMS} == set(ENTRY_POINTS)
    # merge_attention_states takes no q/k/v: its bad input is tested in tests/test_lse.py; flash_prefill_varlen takes
    # them in the varlen layout (total, H, D) with cu_seqlens: its bad input is tested in tests/test_varlen.py
    assert set(ENTRY_POINTS) | {"FlashPrefillStats", "causal_block_density", "PAPER_ALPHA", "merge_attention_states",
                                "flash_prefill_varlen", "VarlenStats"} == set(reference.__all__)


@pytest.mark.parametrize("entry, case", PARAMS)
def test_bad_input_is_rejected(entry, case):
    call, _ = ENTRY_POINTS[entry]
    args = valid_args()
    args.update(case.change(args))
    with pytest.raises(case.error, match=case.match):
        call(args)


def test_flash_prefill_options_are_keyword_only():
    q, k, v = qkv()
    with pytest.raises(TypeError):
        flash_prefill(q, k, v, 0.1)


def test_softmax_scale_is_one_keyword_and_positional_calls_keep_working():
    """Every function taking the softmax scale calls it softmax_scale (FlashAttention's name); passing it by position
    gives the same result, and the old keyword `scale` is gone."""
    a = valid_args()
    q, k, v, kbar, mask, counts, indices = (a[n] for n in ("q", "k", "v", "kbar", "mask", "counts", "indices"))
    calls = {
        "block_scores": lambda *s, **kw: block_scores(q, kbar, BS, *s, **kw),
        "block_sparse_attention": lambda *s, **kw: block_sparse_attention(q, k, v, counts, indices, BS, *s, **kw),
        "block_sparse_attention_logical": lambda *s, **kw: block_sparse_attention_logical(q, k, v, mask, BS, *s, **kw),
        "dense_attention": lambda *s, **kw: dense_attention(q, k, v, *s, **kw),
    }
    for name, call in calls.items():
        by_keyword = call(softmax_scale=0.3)
        assert torch.equal(call(0.3), by_keyword), name
        assert not torch.equal(call(), by_keyword), name  # the scale is used
        with pytest.raises(TypeError, match="scale"):
            call(scale=0.3)
