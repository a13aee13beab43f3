"""Accuracy figures quoted from the FlashPrefill papers (DESIGN.md section 7), shown beside ours as "paper".

Quotes, never measured here. The models are 7B-30B; ours is SmolLM2-135M, so these are context, not targets a
135M model could reach.
"""

from repro.paper import PAPER_V2_ALPHA, PAPER_V2_NIAH_DENSITY  # noqa: F401  (re-exported for the report)

# Seed poster: RULER average, Qwen3-30B-A3B.
PAPER_RULER = {"model": "Qwen3-30B-A3B", "Full": 93.28, "FlashPrefill": 92.68}
# Seed poster: InfiniteBench average, Qwen2.5-7B.
PAPER_INFINITEBENCH = {"model": "Qwen2.5-7B", "Full": 23.87, "FlashPrefill": 24.93}
# Seed poster: needle-in-a-haystack 2K-256K.
PAPER_NIAH = "near lossless from 2K to 256K tokens"
