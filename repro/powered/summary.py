"""The powered evaluation's numbers: every arm paired with Full on the same prompts (repro/stats.py), the noise
floor, the densities, and the knob chosen on dev by a fixed rule.

Rows are the long-format rows of experiment.run_arm (values may be strings, as read back from the CSV).

The dev rule (`choose_on_dev`), fixed before any test number is looked at: among the arms of the groups "default",
"knob" and "sweep" (FlashPrefill settings), keep those whose dev difference from Full is >= -GOAL_LOSS points with
the interval's lower end >= -GOAL_LOW points, and take the one with the lowest dev density; if none qualifies,
take the arm with the largest dev difference. Its test result is then reported as is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..stats import PairedDifference, stratified

PROMPT = ("split", "family", "task", "length", "seed")
GOAL_LOSS = 1.0  # points: the goal, a loss of at most 1 point ...
GOAL_LOW = -2.0  # ... with the 95% interval's lower end above -2 points
CHOOSABLE_GROUPS = ("default", "knob", "sweep")


@dataclass(frozen=True)
class Comparison:
    """One arm against Full on one split, in one group of prompts (group: field -> value, "all" for all)."""

    arm: str
    split: str
    group: dict
    result: PairedDifference
    density: float


def arms_in(rows) -> list[str]:
    """The arms of the rows in first-seen order."""
    return list(dict.fromkeys(r["arm"] for r in rows))


def splits_in(rows) -> list[str]:
    return [s for s in ("dev", "test") if any(r["split"] == s for r in rows)]


def mean_density(rows, arm: str, split: str, **where) -> float:
    xs = [float(r["density"]) for r in rows if r["arm"] == arm and r["split"] == split
          and all(str(r[k]) == str(v) for k, v in where.items())]
    return sum(xs) / len(xs) if xs else float("nan")


def compare(rows, arm: str, split: str, by=("length",), n_boot: int = 10_000) -> list[Comparison]:
    """`arm` minus Full on `split`, per `by` group and over all its prompts (last)."""
    chosen = [r for r in rows if r["split"] == split]
    strata = stratified(chosen, PROMPT, {"arm": "full"}, {"arm": arm}, by=by, n_boot=n_boot)
    out = []
    for s in strata:
        where = {k: v for k, v in s.group.items() if v != "all"}
        out.append(Comparison(arm, split, dict(s.group), s.result, mean_density(rows, arm, split, **where)))
    return out


def overall(rows, arm: str, split: str, n_boot: int = 10_000) -> Comparison:
    """`arm` minus Full over every prompt of `split`."""
    return compare(rows, arm, split, by=("length",), n_boot=n_boot)[-1]


def group_of(rows, arm: str) -> str:
    return next(r["group"] for r in rows if r["arm"] == arm)


def choose_on_dev(rows, n_boot: int = 10_000) -> tuple[str | None, list[Comparison]]:
    """(the arm the dev rule picks, the dev comparisons it looked at); None when there is no dev split or no
    FlashPrefill arm."""
    if "dev" not in splits_in(rows):
        return None, []
    candidates = [a for a in arms_in(rows) if a != "full" and group_of(rows, a) in CHOOSABLE_GROUPS]
    looked = [overall(rows, a, "dev", n_boot) for a in candidates]
    if not looked:
        return None, []
    # Scores are 0-100, so differences are already in points.
    good = [c for c in looked if c.result.diff >= -GOAL_LOSS and c.result.low >= GOAL_LOW]
    pick = min(good, key=lambda c: c.density) if good else max(looked, key=lambda c: c.result.diff)
    return pick.arm, looked


def discordant_rate(rows, arm: str, split: str) -> float:
    """Fraction of prompts on which the arm and Full score differently (any score difference counts)."""
    full = {tuple(str(r[f]) for f in PROMPT): float(r["score"]) for r in rows
            if r["arm"] == "full" and r["split"] == split}
    other = {tuple(str(r[f]) for f in PROMPT): float(r["score"]) for r in rows
             if r["arm"] == arm and r["split"] == split}
    common = set(full) & set(other)
    return sum(full[p] != other[p] for p in common) / len(common) if common else float("nan")


def depth_profile(rows, arms, split: str, bins: int = 5, family: str = "needle") -> dict[str, list[float]]:
    """arm -> mean score per needle-depth bin (equal widths of [0, 1)) on the family's prompts of `split`."""
    out = {}
    for arm in arms:
        sums, counts = [0.0] * bins, [0] * bins
        for r in rows:
            if r["arm"] == arm and r["split"] == split and r["family"] == family and str(r["depth"]) != "":
                b = min(bins - 1, int(float(r["depth"]) * bins))
                sums[b] += float(r["score"])
                counts[b] += 1
        out[arm] = [s / c if c else float("nan") for s, c in zip(sums, counts)]
    return out
