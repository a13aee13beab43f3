"""The loss analysis's numbers, computed from its long rows (values may be strings, as read back from the CSVs):
monotone checks, pooled errors, group means, flip-vs-margin statistics and the samples-CSV comparisons between
alphas (repro/stats.py's paired comparisons and McNemar).

Monotone "within tolerance": a series y(alpha) over increasing alphas is monotone when every step satisfies
y[i+1] >= y[i] - (rtol |y[i]| + atol); `atol` is the rounding floor of the series (its value at alpha 0, dense
attention through the same path, when alpha 0 was measured), so noise at the dense end does not count as a
violation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..powered.arms import ARMS
from ..stats import PairedDifference, stratified
from .prompts import PROMPT_FIELDS

RTOL = 0.02  # relative step tolerance of the monotone checks


def num(value) -> float:
    """A CSV cell as a float (NaN for an empty cell)."""
    return math.nan if value is None or str(value).strip() == "" else float(value)


def cell(value) -> float | str:
    """A CSV cell as a number when it is one, else its text (so that "12" and 12 group together)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def truthy(value) -> bool:
    return str(value).strip() in ("True", "true", "1", "1.0")


def prompt_key(row: Mapping) -> tuple:
    return tuple(str(row[f]) for f in PROMPT_FIELDS)


# --------------------------------------------------------------------------------------------------------------
# Monotone checks
# --------------------------------------------------------------------------------------------------------------
def is_monotone(values: Sequence[float], rtol: float = RTOL, atol: float = 0.0) -> bool:
    """Non-decreasing within tolerance (module docstring); NaNs are skipped."""
    ys = [y for y in values if not math.isnan(y)]
    return all(b >= a - (rtol * abs(a) + atol) for a, b in zip(ys, ys[1:]))


def monotone_series(rows, series: Sequence[str], y: str, x: str = "alpha",
                    rtol: float = RTOL) -> tuple[int, int, list[str]]:
    """(series monotone in x, series, descriptions of the others): rows grouped by the `series` fields, each group
    ordered by x; atol = |the group's value at x = 0| when measured (the rounding floor), else 0."""
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        groups[tuple(str(r[f]) for f in series)].append((num(r[x]), num(r[y])))
    bad = []
    for key, points in sorted(groups.items()):
        points.sort()
        floor = abs(next((v for a, v in points if a == 0), 0.0))
        if not is_monotone([v for _, v in points], rtol, 0.0 if math.isnan(floor) else floor):
            shown = ", ".join(f"{a:g}: {v:.3g}" for a, v in points)
            bad.append(f"{', '.join(f'{f} {k}' for f, k in zip(series, key))} ({shown})")
    return len(groups) - len(bad), len(groups), bad


# --------------------------------------------------------------------------------------------------------------
# Aggregates
# --------------------------------------------------------------------------------------------------------------
def pooled_error(rows, by: Sequence[str] = ("layer", "alpha")) -> dict[tuple, float]:
    """sqrt(sum err2 / sum ref2) per `by` group: the relative error of all the group's prompts together."""
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        s = sums[tuple(num(r[f]) for f in by)]
        s[0] += num(r["err2"])
        s[1] += num(r["ref2"])
    return {k: math.sqrt(e / d) if d > 0 else math.nan for k, (e, d) in sorted(sums.items())}


def group_mean(rows, by: Sequence[str], value: str) -> dict[tuple, float]:
    """Mean of `value` per `by` group, NaNs and empty cells left out (NaN for a group without any value)."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        acc[tuple(cell(r[f]) for f in by)].append(num(r[value]))
    return {k: float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else math.nan
            for k, v in sorted(acc.items(), key=lambda kv: tuple((isinstance(c, str), c) for c in kv[0]))}


# --------------------------------------------------------------------------------------------------------------
# Flips against the Full margin
# --------------------------------------------------------------------------------------------------------------
def auc_smaller(flipped: Sequence[float], others: Sequence[float]) -> float:
    """P(a flipped prompt's value < a non-flipped prompt's value), ties counted half (Mann-Whitney's AUC); 0.5 is
    no relation, 1.0 every flipped prompt below every other one. NaN when a group is empty."""
    a, b = np.asarray(flipped, dtype=float), np.asarray(others, dtype=float)
    if a.size == 0 or b.size == 0:
        return math.nan
    less = (a[:, None] < b[None, :]).mean()
    ties = (a[:, None] == b[None, :]).mean()
    return float(less + 0.5 * ties)


def permutation_p(flipped: Sequence[float], others: Sequence[float], n_perm: int = 20_000, seed: int = 0) -> float:
    """Two-sided permutation p-value of |AUC - 0.5| (the group labels shuffled), NaN when a group is empty."""
    a, b = list(flipped), list(others)
    if not a or not b:
        return math.nan
    values = np.asarray(a + b, dtype=float)
    observed = abs(auc_smaller(a, b) - 0.5)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        perm = rng.permutation(values)
        hits += abs(auc_smaller(perm[:len(a)], perm[len(a):]) - 0.5) >= observed - 1e-12
    return (hits + 1) / (n_perm + 1)


def margin_split(answer_rows, alpha: float, flip_of, margin: str = "full_margin_answer_min"
                 ) -> tuple[list[float], list[float]]:
    """(Full margins of the prompts that flip at `alpha`, of those that do not), flip_of(row) -> bool | None
    (None: unknown, left out), over the answer rows of that alpha."""
    flips, others = [], []
    for r in answer_rows:
        if r["setting"] == "flashprefill" and num(r["alpha"]) == alpha:
            f = flip_of(r)
            if f is not None and not math.isnan(num(r[margin])):
                (flips if f else others).append(num(r[margin]))
    return flips, others


# --------------------------------------------------------------------------------------------------------------
# The samples CSV: arms at different alphas, paired
# --------------------------------------------------------------------------------------------------------------
def arm_of_alpha(alpha: float) -> str | None:
    """The powered arm that runs plain FlashPrefill at `alpha` (no mean correction, no dense layers)."""
    for arm in ARMS.values():
        if arm.selector == "flashprefill" and not arm.knobs and math.isclose(float(arm.value), alpha):
            return arm.name
    return None


def alpha_arms(sample_rows) -> list[tuple[float, str]]:
    """(alpha, arm) of the plain FlashPrefill arms the samples rows hold, by alpha."""
    present = {r["arm"] for r in sample_rows}
    return sorted((float(a.value), a.name) for a in ARMS.values()
                  if a.name in present and a.selector == "flashprefill" and not a.knobs)


def paired(sample_rows, arm_a: str, arm_b: str, n_boot: int = 10_000) -> PairedDifference:
    """arm_b minus arm_a over every prompt both answered (ValueError when they are not paired)."""
    return stratified(sample_rows, PROMPT_FIELDS, {"arm": arm_a}, {"arm": arm_b}, by=(), n_boot=n_boot)[-1].result


def lost_sets(sample_rows) -> dict[str, set]:
    """arm -> the prompts Full answers right and the arm wrong."""
    scores: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in sample_rows:
        scores[prompt_key(r)][r["arm"]] = num(r["score"])
    out: dict[str, set] = defaultdict(set)
    for key, by_arm in scores.items():
        if by_arm.get("full") == 100:
            for arm, s in by_arm.items():
                if arm != "full" and s < 100:
                    out[arm].add(key)
    return out


def overlap(sample_rows, arm_a: str, arm_b: str) -> dict:
    """Prompts lost at both arms against the count expected if the two arms lost prompts independently:
    n_right (Full right), lost_a, lost_b, both, expected = lost_a lost_b / n_right."""
    right = {prompt_key(r) for r in sample_rows if r["arm"] == "full" and num(r["score"]) == 100}
    lost = lost_sets(sample_rows)
    a, b = lost.get(arm_a, set()) & right, lost.get(arm_b, set()) & right
    return dict(n_right=len(right), lost_a=len(a), lost_b=len(b), both=len(a & b),
                expected=len(a) * len(b) / len(right) if right else math.nan)


def used_sample_rows(rows: Iterable[Mapping], split: str, family: str, lengths: Sequence[int]) -> list[dict]:
    """The samples rows of the analysed split, family and lengths, arms Full and plain FlashPrefill only."""
    keep = {"full"} | {a.name for a in ARMS.values() if a.selector == "flashprefill" and not a.knobs}
    return [dict(r) for r in rows if r["split"] == split and r["family"] == family and int(r["length"]) in lengths
            and r["arm"] in keep]
