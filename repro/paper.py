"""Numbers quoted from the FlashPrefill papers (docs/DESIGN.md section 7). Quotes, never measured here: every table or
figure that shows them labels them "paper".
"""

# V2 paper: density of FlashPrefill on NIAH prompts (real models, V2 selection, alpha = 0.1), as (low, high)
# fractions of the causal blocks, by sequence length in tokens.
PAPER_V2_NIAH_DENSITY = {
    4096: (0.70, 0.76),
    8192: (0.46, 0.54),
    16384: (0.30, 0.34),
    32768: (0.16, 0.19),
    65536: (0.09, 0.09),
    131072: (0.046, 0.049),
}
PAPER_V2_ALPHA = 0.1

# Seed poster: block density at 256K tokens.
PAPER_DENSITY_256K = {"FlashPrefill": 0.035, "FlexPrefill": 0.084, "XAttention": 0.185}

# Seed poster: operator speedup over FlashAttention-2 (Qwen3-30B-A3B).
PAPER_OPERATOR_SPEEDUP = {4096: 1.71, 262144: 27.78}


def paper_range(value: tuple[float, float], percent: bool = True) -> str:
    """(0.70, 0.76) -> "70-76%" (one number when low == high)."""
    lo, hi = (100 * v for v in value) if percent else value
    fmt = (lambda x: f"{x:.3g}")
    text = fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"
    return text + ("%" if percent else "")

# Seed poster: accuracy. RULER average on Qwen3-30B-A3B; InfiniteBench average on Qwen2.5-7B; NIAH 2K-256K.
PAPER_RULER = {"model": "Qwen3-30B-A3B", "Full": 93.28, "FlashPrefill": 92.68}
PAPER_INFINITEBENCH = {"model": "Qwen2.5-7B", "Full": 23.87, "FlashPrefill": 24.93}
PAPER_NIAH = "near lossless from 2K to 256K tokens"
