"""What repro.sparsity measures and how its files name it: lengths, shapes, the settings of each selector (from
`block_selectors`), the error-matching grids, and the display vocabulary of the CSV, tables and figures.

A setting is a `block_selectors.Setting`; its CSV columns are `selector` = Setting.name ("FlashPrefill"),
`param` = Setting.param, `value` = Setting.value, `setting` = Setting.label (the titles below), and `impl` =
impl_label(setting), one of REFERENCE, TRITON, PYTORCH.
"""

from __future__ import annotations

from types import MappingProxyType

from block_selectors import SELECTORS, Setting

from ..common import device_slug

CPU_LENGTHS = (4096, 8192, 16384, 32768, 65536)
GPU_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072, 262144)
REAL_LENGTHS = (1024, 2048, 4096, 8192)
CPU_SHAPE = MappingProxyType(dict(q_heads=8, kv_heads=2, head_dim=64))
GPU_SHAPE = MappingProxyType(dict(q_heads=32, kv_heads=4, head_dim=128))  # docs/DESIGN.md's standard shape
BLOCK = 128  # every selector's block size (block_selectors' default)
SYNTHETIC = "synthetic planted_qkv"  # the `input` column of the synthetic rows
REAL = "real SmolLM2-135M"           # ... and of the real-activation rows
DENSITY_TOLERANCE = 1e-3  # Triton vs reference FlashPrefill density (they differ only at exact threshold ties)
V1_ALPHA = 0.12  # FlashPrefill's V1 default: the Triton/reference cross-check and the error-matching target

# Which code computed a row's lists (the `impl` column).
REFERENCE = "reference stages (PyTorch)"
TRITON = "Triton kernels"
PYTORCH = "PyTorch (ours; no Triton version)"

# --------------------------------------------------------------------------------------------------------------
# Settings (every parameter but the knob keeps its paper default; block size 128)
# --------------------------------------------------------------------------------------------------------------
PEER_SETTINGS = (
    Setting("flexprefill", 0.9, title="FlexPrefill gamma=0.9 tau=0.1 (paper default)"),
    Setting("xattention", 0.9, title="XAttention tau=0.9 S=8 (paper default)"),
)
# Without Triton (a CPU without the interpreter; always on the real activations): the reference stages.
DEFAULT_SETTINGS = (
    Setting("flashprefill", V1_ALPHA, title="FlashPrefill alpha=0.12 (V1 default)"),
    Setting("flashprefill", 0.1, title="FlashPrefill alpha=0.1 (V2 paper)"),
    *PEER_SETTINGS,
)
# With Triton (CUDA, or the interpreter): Triton is the timed FlashPrefill; the reference stages stay as a separately
# labelled row at alpha 0.12, for their time and as the density cross-check.
TRITON_SETTINGS = (
    Setting("flashprefill", V1_ALPHA, impl="triton", title="FlashPrefill alpha=0.12 (V1 default)"),
    Setting("flashprefill", 0.1, impl="triton", title="FlashPrefill alpha=0.1 (V2 paper)"),
    Setting("flashprefill", V1_ALPHA, title="FlashPrefill alpha=0.12 (V1 default), reference stages"),
    *PEER_SETTINGS,
)
# Sweeps for the error matching, per selector key: values of its knob (the paper default is in each grid).
MATCH_GRID = MappingProxyType({
    "flashprefill": (0.02, 0.05, 0.08, 0.1, 0.12, 0.18, 0.3),
    "flexprefill": (0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995),
    "xattention": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
})


def sweep_settings() -> tuple[Setting, ...]:
    """Every point of MATCH_GRID, reference implementations, labelled "<Name> <knob>=<value> (sweep)"."""
    return tuple(Setting(key, value, title=f"{SELECTORS[key].name} {SELECTORS[key].knob}={value:g} (sweep)")
                 for key, values in MATCH_GRID.items() for value in values)


def settings_for(triton: bool) -> tuple[Setting, ...]:
    """The synthetic part's settings: TRITON_SETTINGS where the Triton kernels run, else DEFAULT_SETTINGS."""
    return TRITON_SETTINGS if triton else DEFAULT_SETTINGS


# --------------------------------------------------------------------------------------------------------------
# Display vocabulary
# --------------------------------------------------------------------------------------------------------------
COLORS = MappingProxyType({"FlashPrefill": "tab:blue", "FlexPrefill": "tab:orange", "XAttention": "tab:green"})


def impl_label(setting: Setting) -> str:
    """The `impl` column of a setting: TRITON, REFERENCE (FlashPrefill's reference stages) or PYTORCH (a peer)."""
    if setting.impl == "triton":
        return TRITON
    return REFERENCE if setting.selector == "flashprefill" else PYTORCH


def impl_of(row) -> str:
    """A row's implementation; CSVs written before the `impl` column ran FlashPrefill's reference stages."""
    return row.get("impl") or (REFERENCE if row["selector"] == "FlashPrefill" else PYTORCH)


def line_style(label: str) -> str:
    """Dashed for the V2 alpha, dotted crosses for the reference-stages twin of a Triton row."""
    return "x:" if label.endswith("reference stages") else "o--" if "V2" in label else "o-"


def output_tag(stamp) -> str:
    """File stem: "sparsity" on a CPU, "sparsity_<gpu>" on CUDA ("NVIDIA H200" -> sparsity_h200, the GPU slug of
    the run folders and of bench_speed), so results of different machines never overwrite each other."""
    if stamp["device"] != "cuda":
        return "sparsity"
    return "sparsity_" + device_slug(stamp["device_name"])


def pct(x) -> str:
    return "-" if x == "" or x is None else f"{100 * x:.1f}%"

