"""Which sequences a transformers attention call holds, read off its mask: the packed (varlen) layout.

A decoder layer hands the backend query (B, Hq, Lq, D) and the keys of its cache, key / value (B, Hkv, Lk, D),
with a boolean or additive 4-D mask (B, 1, Lq, Lk) (None for a causal prompt without padding). With transformers'
dynamic cache, query row i is the token at key position p_i = Lk - Lq + i (the chunk follows its cached prefix).
FlashPrefill can run such a call through `flash_prefill_varlen` when every row b of the batch is one sequence:

    key validity      valid_b = the keys that the last query row may see (every real key of row b)
    keys              valid_b is one run [ks_b, ke_b)   (left padding, right padding, or none)
    real query rows   the rows whose own key position is valid: p_i in [ks_b, ke_b)
    the mask          a real row i sees exactly the valid keys up to its own position: valid_b & (j <= p_i)

Then sequence b is the chunk q[b, rows] over the keys k[b, ks_b:ke_b]; its last real row sits at key ke_b - 1, so
it is bottom-right aligned, as `flash_prefill_varlen` wants. Rows that are not real are padding: they hold no token
of any sequence and their output is set to 0 (dense sdpa would give them an arbitrary value that nothing reads).

Anything else (a custom mask, padding inside a prompt, a static cache whose key length is the cache size) is not a
layout and the call runs dense attention. `batch_layout` reads the mask once per mask tensor: the model builds one
mask per forward and passes the same tensor to every layer, so the check and its host synchronisation are paid once
per forward, not per layer. A mask made under `torch.inference_mode()` has no version counter, so an in-place change
could not be seen: it is read at every call (one host synchronisation per layer).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedLayout:
    """The sequences of one call. Per batch row b: query rows [q_start[b], q_end[b]) of the Lq rows and keys
    [k_start[b], k_end[b]) of the Lk keys (host ints). The device tensors: cu_seqlens_q / cu_seqlens_k (B + 1,)
    int32 of the packed batch, and q_rows / k_rows, the flat indices (into B * Lq and B * Lk) of the rows packed."""

    q_start: tuple[int, ...]
    q_end: tuple[int, ...]
    k_start: tuple[int, ...]
    k_end: tuple[int, ...]
    Lq: int
    Lk: int
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    q_rows: torch.Tensor
    k_rows: torch.Tensor

    @property
    def max_seqlen_q(self) -> int:
        return max(e - s for s, e in zip(self.q_start, self.q_end))

    @property
    def max_seqlen_k(self) -> int:
        return max(e - s for s, e in zip(self.k_start, self.k_end))

    @property
    def is_full(self) -> bool:
        """Every row is one whole unpadded prompt without a prefix: a plain batched prefill."""
        return (self.Lq == self.Lk and all(s == 0 for s in self.k_start + self.q_start)
                and all(e == self.Lk for e in self.k_end + self.q_end))

    @property
    def prefix(self) -> int:
        """The longest cached prefix (keys before the chunk) of any sequence."""
        return max(ke - ks - (qe - qs) for qs, qe, ks, ke in zip(self.q_start, self.q_end, self.k_start, self.k_end))

    def pack(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, L, H, D) -> (total, H, D): the sequences' rows one after the other."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, rows)

    def unpack_queries(self, packed: torch.Tensor) -> torch.Tensor:
        """(total_q, Hq, D) -> (B, Lq, Hq, D), padding rows 0."""
        B = len(self.q_start)
        out = packed.new_zeros(B * self.Lq, *packed.shape[1:])
        out.index_copy_(0, self.q_rows, packed)
        return out.view(B, self.Lq, *packed.shape[1:])


def read_layout(attention_mask: torch.Tensor, B: int, Lq: int, Lk: int) -> PackedLayout | None:
    """The layout of a 4-D mask (module docstring), or None when the mask is not one. One host synchronisation."""
    if (attention_mask.dim() != 4 or attention_mask.shape[0] not in (1, B) or attention_mask.shape[1] != 1
            or tuple(attention_mask.shape[-2:]) != (Lq, Lk) or not 0 < Lq <= Lk):
        return None
    allowed = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
    allowed = allowed.expand(B, Lq, Lk)
    device = allowed.device
    keys = torch.arange(Lk, device=device)
    position = keys[Lk - Lq:]  # p_i, (Lq,)
    valid = allowed[:, -1, :]  # (B, Lk)
    real = valid[:, position]  # (B, Lq)
    expected = valid[:, None, :] & (keys[None, None, :] <= position[None, :, None])
    mask_ok = ((allowed == expected) | ~real[:, :, None]).all()
    k_start = valid.int().argmax(1)  # the first valid key (0 when there is none)
    k_end = k_start + valid.sum(1)
    one_run = (valid == ((keys >= k_start[:, None]) & (keys < k_end[:, None]))).all(1) & (k_end > k_start)
    q_start = real.int().argmax(1)
    q_end = q_start + real.sum(1)  # the real rows: key positions [ks, ke) among the last Lq, one run as well
    usable = one_run & (q_end > q_start) & mask_ok
    usable, ks, ke, qs, qe = torch.stack([usable.long(), k_start, k_end, q_start, q_end]).tolist()  # one host read
    if not all(usable):
        return None
    return _build(tuple(qs), tuple(qe), tuple(ks), tuple(ke), Lq, Lk, device)


def _build(qs, qe, ks, ke, Lq, Lk, device) -> PackedLayout:
    q_lens = [e - s for s, e in zip(qs, qe)]
    k_lens = [e - s for s, e in zip(ks, ke)]
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    q_rows = torch.cat([torch.arange(s, e) + b * Lq for b, (s, e) in enumerate(zip(qs, qe))])
    k_rows = torch.cat([torch.arange(s, e) + b * Lk for b, (s, e) in enumerate(zip(ks, ke))])
    return PackedLayout(qs, qe, ks, ke, Lq, Lk, cu_q.to(device), cu_k.to(device), q_rows.to(device),
                        k_rows.to(device))


class _PerMask:
    """layout (or None) per mask tensor, for as long as the tensor lives and is not modified in place. Keyed by id
    with a weak reference (a tensor's == is elementwise, so tensors cannot be dictionary keys)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, int, tuple[int, int, int], PackedLayout | None]] = {}
        self._lock = threading.Lock()

    def get(self, mask: torch.Tensor, B: int, Lq: int, Lk: int) -> PackedLayout | None:
        if mask.is_inference():  # made under torch.inference_mode(): no version counter to see in-place changes
            return read_layout(mask, B, Lq, Lk)
        key, shape = id(mask), (B, Lq, Lk)
        with self._lock:
            entry = self._seen.get(key)
        if entry is not None and entry[0]() is mask and entry[1] == mask._version and entry[2] == shape:
            return entry[3]
        layout = read_layout(mask, B, Lq, Lk)
        with self._lock:
            self._seen[key] = (weakref.ref(mask, lambda _, key=key: self._drop(key)), mask._version, shape, layout)
        return layout

    def _drop(self, key: int) -> None:
        with self._lock:
            self._seen.pop(key, None)


_LAYOUTS = _PerMask()


def batch_layout(attention_mask: torch.Tensor, B: int, Lq: int, Lk: int) -> PackedLayout | None:
    """The packed layout of a call with this mask (cached per mask tensor), or None if the mask is not one."""
    return _LAYOUTS.get(attention_mask, B, Lq, Lk)
