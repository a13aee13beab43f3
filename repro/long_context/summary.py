"""The long-context run's numbers: Full's dev score per RoPE method (and the choice it makes), the test
comparisons (repro.powered.summary.compare: each arm paired with Full), per-layer densities.

Rows are run.answer's (the powered evaluation's rows plus `rope` and `rope_factor`); values may be strings."""

from __future__ import annotations

from collections import defaultdict

from ..stats import PairedDifference, stratified
from ..powered.summary import PROMPT
from .rope import CONTROL, ROPE_METHODS


def _lengths(rows) -> list[int]:
    return sorted({int(r["length"]) for r in rows})


def full_dev_score(rows, method: str, length: int) -> float:
    """Full's mean dev score (0-100) with `method` at `length`; nan when it has no rows."""
    xs = [float(r["score"]) for r in rows if r["split"] == "dev" and r["arm"] == "full" and r["rope"] == method
          and int(r["length"]) == length]
    return sum(xs) / len(xs) if xs else float("nan")


def choose_methods(rows, lengths=None) -> dict[int, str]:
    """length -> the RoPE method of ROPE_METHODS with the best Full dev score (ties: the earlier one)."""
    out = {}
    for L in lengths or _lengths(rows):
        scores = [(full_dev_score(rows, m, L), -i, m) for i, m in enumerate(ROPE_METHODS)]
        scores = [s for s in scores if s[0] == s[0]]  # drop methods without dev rows (nan)
        if not scores:
            raise ValueError(f"no dev rows of Full at length {L}")
        out[L] = max(scores)[2]
    return out


def method_comparisons(rows) -> dict[int, dict[str, PairedDifference]]:
    """length -> method -> that method's Full dev score minus the chosen method's, paired on the dev prompts (the
    chosen method against itself is omitted)."""
    chosen = choose_methods(rows)
    out = {}
    for L, best in chosen.items():
        out[L] = {}
        for method in (CONTROL, *ROPE_METHODS):
            if method == best or full_dev_score(rows, method, L) != full_dev_score(rows, method, L):
                continue
            out[L][method] = stratified([r for r in rows if r["split"] == "dev" and int(r["length"]) == L], PROMPT,
                                   {"arm": "full", "rope": best}, {"arm": "full", "rope": method}, by=())[-1].result
    return out


def layer_density(layers, arm: str) -> dict[int, dict[int, float]]:
    """length -> layer -> mean density of `arm` over its test batches (weighted by the prompts of each batch)."""
    acc: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in layers:
        if r["arm"] == arm and r["split"] == "test":
            cell = acc[(int(r["length"]), int(r["layer"]))]
            cell[0] += float(r["density"]) * int(r["batch"])
            cell[1] += int(r["batch"])
    out: dict[int, dict[int, float]] = defaultdict(dict)
    for (L, layer), (total, n) in sorted(acc.items()):
        out[L][layer] = total / n
    return dict(out)
