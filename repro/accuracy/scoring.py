"""RULER's scoring (Hsieh et al. 2024, `eval/synthetic/constants.py`), restated.

    string_match_all(preds, refs)  = 100 * mean over samples of (fraction of the sample's references that occur,
                                     case-insensitively, in its prediction)
    string_match_part(preds, refs) = 100 * mean over samples of max over references (1 if it occurs, else 0)

RULER post-processes predictions by cutting at the first newline-free chunk and stripping; we do the same light
normalisation (`postprocess`). Scores are percentages (0-100), like the paper's tables.
"""

from __future__ import annotations

import re
from typing import Sequence


def postprocess(prediction: str) -> str:
    """Strip whitespace and drop control characters (RULER's postprocess_pred)."""
    prediction = prediction.strip()
    return re.sub(r"[\x00-\x1f]", "\n", prediction).strip()


def sample_score(prediction: str, references: Sequence[str], metric: str) -> float:
    """The score (0-1) of one prediction: fraction of references found ("all") or any found ("part")."""
    pred = postprocess(prediction).lower()
    hits = [r.lower() in pred for r in references]
    if not hits:
        raise ValueError("a sample needs at least one reference answer")
    if metric == "all":
        return sum(hits) / len(hits)
    if metric == "part":
        return float(any(hits))
    raise ValueError(f"metric must be 'all' or 'part', got {metric!r}")


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return _mean([sample_score(p, r, "all") for p, r in zip(predictions, references, strict=True)])


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return _mean([sample_score(p, r, "part") for p, r in zip(predictions, references, strict=True)])


def _mean(xs: list[float]) -> float:
    if not xs:
        raise ValueError("no samples to score")
    return 100.0 * sum(xs) / len(xs)
