"""Input checks shared by the public entry points of `reference` and `triton_impl`.

Every check raises `TypeError` (wrong kind of object or dtype) or `ValueError` (wrong shape or value) with a
message that names the argument and says what was expected, so that bad input never reaches a kernel.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, x, *, ndim: int, dtypes=None) -> None:
    """`x` is a non-empty torch.Tensor with `ndim` dimensions and (optionally) one of `dtypes`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {_names(dtypes)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on the same device, got {listing}")


def check_qkv_tensors(q, k, v, *, ndim: int, kv_layout: str, dtypes=ATTENTION_DTYPES) -> None:
    """q, k, v: tensors of `ndim` dims and one allowed dtype, on one device, k and v of one shape (kv_layout names
    it in the message). The checks every layout shares (check_qkv; reference/varlen.py's packed layout)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=ndim, dtypes=dtypes)
    check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {kv_layout}, got {tuple(k.shape)} and {tuple(v.shape)}")


def check_heads(Hq: int, Hkv: int, D: int, Dk: int, head_dims=None) -> None:
    """One head dim for q and k, one of head_dims when given, and query heads in whole GQA groups of the kv heads."""
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {Dk}")
    if Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be divisible by the number of kv heads ({Hkv})")
    if head_dims is not None and D not in head_dims:
        raise ValueError(f"head dim {D} is not supported; expected one of {sorted(head_dims)}")


def check_qkv(q, k, v, *, dtypes=ATTENTION_DTYPES, head_dims=None) -> tuple[int, int, int, int, int]:
    """Validate q (B, L, Hq, D), k and v (B, L, Hkv, D); return (B, L, Hq, Hkv, D)."""
    check_qkv_tensors(q, k, v, ndim=4, kv_layout="(B, L, Hkv, D)", dtypes=dtypes)
    B, L, Hq, D = q.shape
    Bk, Lk, Hkv, Dk = k.shape
    if Bk != B:
        raise ValueError(f"q and k must have the same batch size, got {B} and {Bk}")
    if Lk != L:
        raise ValueError(f"q and k must have the same sequence length (prefill), got {L} and {Lk}")
    check_heads(Hq, Hkv, D, Dk, head_dims)
    return B, L, Hq, Hkv, D


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    return block_size


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if math.isnan(alpha) or math.isinf(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    return float(alpha)


def check_count(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_selection_params(alpha, sink_blocks, window_blocks, last_dense_blocks, block_size=None) -> float:
    """FlashPrefill's selection parameters, without tensors: the threshold alpha (Eq. 3), the block size when given,
    and the safety net (sink_blocks, last_dense_blocks >= 0, window_blocks >= 1). Returns alpha as a float."""
    alpha = check_alpha(alpha)
    if block_size is not None:
        check_block_size(block_size)
    check_count("sink_blocks", sink_blocks, minimum=0)
    check_count("window_blocks", window_blocks, minimum=1)
    check_count("last_dense_blocks", last_dense_blocks, minimum=0)
    return alpha


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def resolve_scale(softmax_scale, head_dim: int) -> float:
    """The `softmax_scale` argument (one name across the public API, FlashAttention's), or 1/sqrt(D) when None."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a real number or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale}")
    return float(softmax_scale)


def num_blocks(length: int, block_size: int) -> int:
    """ceil(L / Bs)."""
    return (length + block_size - 1) // block_size


def check_kbar(q, kbar, block_size: int, *, dtypes=ATTENTION_DTYPES) -> None:
    """kbar (B, N, Hkv, D) must fit q (B, L, Hq, D) with N = ceil(L / Bs)."""
    check_tensor("q", q, ndim=4, dtypes=dtypes)
    check_tensor("kbar", kbar, ndim=4, dtypes=(torch.float32, torch.float64) + tuple(dtypes))
    check_same_device(q=q, kbar=kbar)
    B, L, Hq, D = q.shape
    N = num_blocks(L, block_size)
    if kbar.shape[0] != B or kbar.shape[1] != N or kbar.shape[3] != D:
        raise ValueError(
            f"kbar must have shape (B={B}, N={N}, Hkv, D={D}) for q of shape {tuple(q.shape)} "
            f"and block_size={block_size}, got {tuple(kbar.shape)}"
        )
    if Hq % kbar.shape[2] != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be divisible by kbar's kv heads ({kbar.shape[2]})")


def check_scores(scores) -> None:
    check_tensor("scores", scores, ndim=4, dtypes=(torch.float32, torch.float64))
    if scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must have shape (B, Hq, M, N) with M == N, got {tuple(scores.shape)}")


def check_mask(mask) -> None:
    check_tensor("mask", mask, ndim=4, dtypes=(torch.bool,))
    if mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"mask must have shape (B, Hq, M, N) with M == N, got {tuple(mask.shape)}")


def check_block_layout(q, *, block_size: int, counts=None, indices=None, mask=None) -> None:
    """counts (B, Hq, M) int32 + indices (B, Hq, M, N) int32, or mask (B, Hq, M, N) bool, for q (B, L, Hq, D)."""
    B, L, Hq, _ = q.shape
    M = num_blocks(L, block_size)
    if mask is not None:
        check_mask(mask)
        check_same_device(q=q, mask=mask)
        if tuple(mask.shape) != (B, Hq, M, M):
            raise ValueError(f"mask must have shape (B={B}, Hq={Hq}, M={M}, N={M}), got {tuple(mask.shape)}")
        return
    check_tensor("counts", counts, ndim=3, dtypes=(torch.int32,))
    check_tensor("indices", indices, ndim=4, dtypes=(torch.int32,))
    check_same_device(q=q, counts=counts, indices=indices)
    if tuple(counts.shape) != (B, Hq, M):
        raise ValueError(f"counts must have shape (B={B}, Hq={Hq}, M={M}), got {tuple(counts.shape)}")
    if tuple(indices.shape[:3]) != (B, Hq, M) or not 1 <= indices.shape[3] <= M:
        raise ValueError(
            f"indices must have shape (B={B}, Hq={Hq}, M={M}, C) with 1 <= C <= N={M}, got {tuple(indices.shape)}"
        )


# The rules of block lists, each with its message (triton_impl's one-kernel check raises the same ones).
BAD_COUNTS = "counts must satisfy 0 <= counts[..., I] <= I + 1 (no block above the diagonal)"
BAD_INDEX = "indices[..., I, :counts] must lie in [0, I] (causal key blocks of query block I)"
NOT_ASCENDING = "indices[..., I, :counts] must be strictly ascending (as compact_blocks returns them)"


def check_lists(counts, indices) -> None:
    """counts (B, Hq, M) int32 and indices (B, Hq, M, C) int32, 1 <= C <= M, on one device, following the rules of
    `check_block_lists`: block lists on their own, without a q to fit (`selection.lists_to_mask`)."""
    check_tensor("counts", counts, ndim=3, dtypes=(torch.int32,))
    check_tensor("indices", indices, ndim=4, dtypes=(torch.int32,))
    check_same_device(counts=counts, indices=indices)
    B, Hq, M = counts.shape
    if tuple(indices.shape[:3]) != (B, Hq, M) or not 1 <= indices.shape[3] <= M:
        raise ValueError(
            f"indices must have shape (B={B}, Hq={Hq}, M={M}, C) with 1 <= C <= N={M}, got {tuple(indices.shape)}"
        )
    check_block_lists(counts, indices)


def check_block_lists(counts: torch.Tensor, indices: torch.Tensor) -> None:
    """The lists are what `compact_blocks` makes: 0 <= counts[..., I] <= min(I + 1, C) and
    indices[..., I, :counts] strictly ascending in [0, I]. (Reads the values: one host sync per rule.)"""
    M, C = counts.shape[-1], indices.shape[-1]
    I = torch.arange(M, device=counts.device)
    if bool(((counts < 0) | (counts > torch.clamp(I + 1, max=C))).any()):
        raise ValueError(BAD_COUNTS)
    listed = torch.arange(C, device=counts.device) < counts.unsqueeze(-1)  # (B, Hq, M, C)
    out_of_range = listed & ((indices < 0) | (indices > I.view(M, 1)))
    if bool(out_of_range.any()):
        raise ValueError(BAD_INDEX)
    not_ascending = listed[..., 1:] & (indices[..., 1:] <= indices[..., :-1])
    if bool(not_ascending.any()):
        raise ValueError(NOT_ASCENDING)
