"""The selector registry (block_selectors): every entry selects valid block lists in every implementation it names,
FlashPrefill's two implementations agree, parameters are checked before any tensor is touched, and `Setting` names
and configures what the experiments run."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, KERNEL_TEST_DTYPES, dtype_id

import flashprefill_hf
import reference
from block_selectors import FULL, PEERS, SELECTORS, Setting
from reference.synthetic import planted_qkv
from tools.oracle import block_sets_agree

BS = 64


def inputs(dtype=torch.float32, device="cpu"):
    return planted_qkv(1, 700, 4, 2, 64, seed=3, dtype=dtype, device=device)[:2]  # a partial last block


@pytest.mark.parametrize("key", list(SELECTORS))
def test_every_entry_selects_valid_lists_with_its_paper_defaults(key):
    q, k = inputs()
    counts, indices = SELECTORS[key].select(q, k, block_size=BS)
    mask = reference.lists_to_mask(counts, indices)  # checks the list rules (ascending, causal)
    assert mask.shape == (1, 4, 11, 11) and bool(mask.diagonal(dim1=-2, dim2=-1).all())


def test_the_table_names_each_selector_its_knob_and_default():
    assert list(SELECTORS) == ["flashprefill", *PEERS] and PEERS == ("flexprefill", "xattention")
    for key, entry in SELECTORS.items():
        assert entry.key == key and entry.knob in entry.params
        assert entry.defaults[entry.knob] == entry.paper_default
        entry.check(**{entry.knob: entry.paper_default})  # the default passes its own check
        assert "reference" in entry.implementations
    assert {k: e.name for k, e in SELECTORS.items()} == {"flashprefill": "FlashPrefill", "flexprefill": "FlexPrefill",
                                                          "xattention": "XAttention"}


@pytest.mark.parametrize("dtype", KERNEL_TEST_DTYPES, ids=dtype_id)
def test_flashprefill_reference_and_triton_entries_keep_the_same_blocks(dtype):
    """The same block sets, except at threshold ties (the oracle's rule)."""
    q, k = inputs(dtype, DEVICE)
    ref = reference.lists_to_mask(*SELECTORS["flashprefill"].select(q, k, impl="reference", block_size=BS, alpha=0.1))
    tri = reference.lists_to_mask(*SELECTORS["flashprefill"].select(q, k, impl="triton", block_size=BS, alpha=0.1))
    scores = reference.block_scores(q, reference.mean_pool_keys(k, BS), BS)
    assert block_sets_agree(tri.cpu(), ref.cpu(), scores.cpu(), 0.1)


@pytest.mark.parametrize("key, params, error, match", [
    ("flashprefill", dict(alpha=-1.0), ValueError, "alpha"),
    ("flashprefill", dict(window_blocks=0), ValueError, "window_blocks"),
    ("flexprefill", dict(gamma=1.5), ValueError, "gamma"),
    ("xattention", dict(stride=3), ValueError, "stride"),
    ("xattention", dict(keep_sink="yes"), TypeError, "keep_sink"),
])
def test_parameters_are_checked_without_tensors(key, params, error, match):
    with pytest.raises(error, match=match):
        SELECTORS[key].check(**params)


def test_select_refuses_what_an_entry_does_not_have():
    q, k = inputs()
    with pytest.raises(ValueError, match="FlexPrefill has no 'triton' implementation"):
        SELECTORS["flexprefill"].select(q, k, impl="triton")
    with pytest.raises(ValueError, match="XAttention takes no parameter 'gamma'"):
        SELECTORS["xattention"].select(q, k, gamma=0.9)


def test_settings_name_themselves_as_the_reports_do():
    assert Setting(FULL).label == "Full" and Setting(FULL).param == "" and not Setting(FULL).paper_default
    assert Setting("flashprefill", 0.12).label == "FlashPrefill alpha=0.12"
    assert Setting("flexprefill", 0.9).paper_default and Setting("xattention", 0.95).label == "XAttention threshold=0.95"
    assert Setting("flashprefill", 0.1, title="FlashPrefill alpha=0.1 (V2 paper)").label.endswith("(V2 paper)")
    assert len({Setting("flashprefill", 0.12), Setting("flashprefill", 0.12)}) == 1  # frozen: usable as a dict key


def test_a_setting_selects_with_its_knob_and_the_paper_defaults():
    q, k = inputs()
    got = Setting("xattention", 0.8).select(q, k)
    expected = SELECTORS["xattention"].select(q, k, block_size=128, threshold=0.8, stride=8)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(ValueError, match="dense attention"):
        Setting(FULL).select(q, k)


@pytest.mark.parametrize("args, error, match", [
    (("sliding",), ValueError, "selector must be 'full' or one of"),
    (("flashprefill",), ValueError, "needs a value of its knob alpha"),
    ((FULL, 0.5), ValueError, "has no knob value"),
    (("flexprefill", 0.9, "triton"), ValueError, "no 'triton' implementation"),
    (("flexprefill", 0.0), ValueError, "gamma"),
])
def test_bad_settings_are_refused_when_made(args, error, match):
    with pytest.raises(error, match=match):
        Setting(*args)


@pytest.mark.parametrize("setting", [Setting("flashprefill", 0.3), Setting("flexprefill", 0.8),
                                     Setting("xattention", 0.7)], ids=lambda s: s.selector)
def test_a_setting_configures_the_backend_to_select_the_same_blocks(setting):
    """Setting.config_changes() makes a FlashPrefillConfig whose selection is the setting's own."""
    q, k = inputs()
    config = flashprefill_hf.FlashPrefillConfig(block_size=BS).replace(**setting.config_changes())  # validated
    if setting.selector == "flashprefill":
        assert config.alpha == setting.value
        return
    expected = SELECTORS[setting.selector].select(q, k, block_size=BS, **{setting.param: setting.value})
    got = config.select_peer(q, k, None)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
