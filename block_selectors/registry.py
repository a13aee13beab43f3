"""The selector table (`SELECTORS`) and the frozen `Setting` type; see the package docstring."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch

import peers
import reference
from reference.validation import check_selection_params

FULL = "full"  # a Setting's selector for exact dense attention (no selection)
REFERENCE, TRITON = "reference", "triton"


# --------------------------------------------------------------------------------------------------------------
# FlashPrefill's selection (stages 1-4) from q and k, as the peers' selectors are called
# --------------------------------------------------------------------------------------------------------------
def flashprefill_select(q: torch.Tensor, k: torch.Tensor, *, alpha: float = 0.12, sink_blocks: int = 2,
                        window_blocks: int = 4, last_dense_blocks: int = 2, block_size: int = 128,
                        softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashPrefill's block lists with the reference stages: pool (1), score (2), select and compact (3-4)."""
    kbar = reference.mean_pool_keys(k, block_size)
    scores = reference.block_scores(q, kbar, block_size, softmax_scale)
    return reference.select_and_compact(scores, alpha, sink_blocks, window_blocks, last_dense_blocks)


def flashprefill_select_triton(q: torch.Tensor, k: torch.Tensor, *, alpha: float = 0.12, sink_blocks: int = 2,
                               window_blocks: int = 4, last_dense_blocks: int = 2, block_size: int = 128,
                               softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same lists with the Triton kernels (their public entry points, input checks included): the selection
    `triton_impl.flash_prefill` runs before its attention."""
    import triton_impl

    kbar = triton_impl.mean_pool_keys(k, block_size)
    scores = triton_impl.block_scores(q, kbar, block_size, softmax_scale)
    return triton_impl.select_and_compact(scores, alpha, sink_blocks, window_blocks, last_dense_blocks)


def check_flashprefill_params(*, alpha=0.12, sink_blocks=2, window_blocks=4, last_dense_blocks=2,
                              block_size=128) -> float:
    """Validate FlashPrefill's parameters (without tensors), as its entry points do; return alpha as a float."""
    return check_selection_params(alpha, sink_blocks, window_blocks, last_dense_blocks, block_size)


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selector:
    """One block selector: see the package docstring. `defaults` holds the paper defaults of `params` (block_size
    is passed separately: every selector here defaults to 128)."""

    key: str
    name: str
    knob: str
    paper_default: float
    default_source: str
    params: tuple[str, ...]
    defaults: Mapping[str, object]
    check: Callable[..., object]
    implementations: Mapping[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]]

    def select(self, q: torch.Tensor, k: torch.Tensor, *, impl: str = REFERENCE, block_size: int = 128,
               softmax_scale: float | None = None, **params) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, indices) of this selector; unset parameters take their paper defaults."""
        if impl not in self.implementations:
            raise ValueError(f"{self.name} has no {impl!r} implementation (it has: "
                             f"{', '.join(map(repr, self.implementations))})")
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"{self.name} takes no parameter {', '.join(map(repr, unknown))} (it takes: "
                             f"{', '.join(self.params)})")
        return self.implementations[impl](q, k, block_size=block_size, softmax_scale=softmax_scale,
                                          **{**self.defaults, **params})


def _read_only(**kw) -> Mapping:
    return MappingProxyType(dict(kw))


SELECTORS: Mapping[str, Selector] = _read_only(
    flashprefill=Selector(
        key="flashprefill", name="FlashPrefill", knob="alpha", paper_default=0.12,
        default_source="the official V1 code's default (Qwen3-30B-A3B); the paper's alphas per model are "
                       "reference.PAPER_ALPHA",
        params=("alpha", "sink_blocks", "window_blocks", "last_dense_blocks"),
        defaults=_read_only(alpha=0.12, sink_blocks=2, window_blocks=4, last_dense_blocks=2),
        check=check_flashprefill_params,
        implementations=_read_only(reference=flashprefill_select, triton=flashprefill_select_triton)),
    flexprefill=Selector(
        key="flexprefill", name="FlexPrefill", knob="gamma", paper_default=0.9,
        default_source="the FlexPrefill paper (ICLR 2025): gamma 0.9, tau 0.1, min_budget 1024 tokens",
        params=("gamma", "tau", "min_budget", "max_budget"),
        defaults=_read_only(gamma=0.9, tau=0.1, min_budget=1024, max_budget=None),
        check=peers.check_flexprefill_params,
        implementations=_read_only(reference=peers.flexprefill_select)),
    xattention=Selector(
        key="xattention", name="XAttention", knob="threshold", paper_default=0.9,
        default_source="the XAttention paper (ICML 2025): threshold 0.9, stride 8; sink and diagonal kept",
        params=("threshold", "stride", "keep_sink", "keep_diagonal"),
        defaults=_read_only(threshold=0.9, stride=8, keep_sink=True, keep_diagonal=True),
        check=peers.check_xattention_params,
        implementations=_read_only(reference=peers.xattention_select)),
)
PEERS = tuple(key for key in SELECTORS if key != "flashprefill")  # ("flexprefill", "xattention")


# --------------------------------------------------------------------------------------------------------------
# One point of an experiment
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """A selector (a SELECTORS key, or FULL for dense attention) with a value of its knob, in one implementation.

    title: how reports name the setting; None names it "<Name> <knob>=<value>" ("Full" for FULL). Every other
    parameter keeps its paper default (block size 128)."""

    selector: str
    value: float | None = None
    impl: str = REFERENCE
    title: str | None = None

    def __post_init__(self):
        if self.selector == FULL:
            if self.value is not None:
                raise ValueError(f"a {FULL!r} setting has no knob value, got {self.value!r}")
            return
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be {FULL!r} or one of {', '.join(map(repr, SELECTORS))}, "
                             f"got {self.selector!r}")
        entry = SELECTORS[self.selector]
        if self.value is None:
            raise ValueError(f"a {entry.name} setting needs a value of its knob {entry.knob}")
        if self.impl not in entry.implementations:
            raise ValueError(f"{entry.name} has no {self.impl!r} implementation")
        entry.check(**{entry.knob: self.value})

    @property
    def entry(self) -> Selector | None:
        return SELECTORS.get(self.selector)

    @property
    def name(self) -> str:
        """The selector's display name: "Full", "FlashPrefill", "FlexPrefill", "XAttention"."""
        return "Full" if self.selector == FULL else self.entry.name

    @property
    def param(self) -> str:
        """The knob's name ("" for Full)."""
        return "" if self.selector == FULL else self.entry.knob

    @property
    def paper_default(self) -> bool:
        return self.selector != FULL and self.value == self.entry.paper_default

    @property
    def label(self) -> str:
        if self.title is not None:
            return self.title
        return "Full" if self.selector == FULL else f"{self.name} {self.param}={self.value:g}"

    def select(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, indices) of this setting on q, k."""
        if self.selector == FULL:
            raise ValueError("the 'full' setting selects nothing: it is dense attention")
        return self.entry.select(q, k, impl=self.impl, **{self.param: self.value})

    def config_changes(self) -> dict:
        """The flashprefill_hf.FlashPrefillConfig fields that give this setting (not for FULL: use_dense)."""
        if self.selector == FULL:
            raise ValueError("the 'full' setting is dense attention: flashprefill_hf.use_dense, not a config")
        if self.selector == "flashprefill":
            return dict(selector="flashprefill", selector_params={}, alpha=self.value)
        return dict(selector=self.selector, selector_params={self.param: self.value})
