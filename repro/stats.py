"""Paired comparisons of two attention settings answered on the same prompts: intervals, McNemar, sample sizes.

Every accuracy claim of the form "setting B scores X points below setting A" is a difference of two means over
the same prompts, so it is computed here as a *paired* difference (numpy and the standard library only):

- `paired_difference(a, b)` answers "how large is the difference, and how sure are we?": the mean of B minus the
  mean of A (in the scores' own units, 0/1 or 0-100) with a percentile paired-bootstrap interval: prompts are
  resampled with replacement, the same prompts for both arms. For right/wrong scores it also answers "could the
  difference be chance?": the exact McNemar test, a two-sided binomial test on the discordant prompts (those one
  arm answers right and the other wrong); the prompts both arms get right or both get wrong carry no information
  about the difference and do not enter it.
- `stratified(rows, key, a, b)` does the same per task and length (or any `by` fields) of long-format result
  rows, as the CSVs in repro/results/ hold them, plus one comparison over all prompts; it refuses, naming them,
  prompts that one setting answered and the other did not.
- `format_interval(result)` writes one for a report: "-3.7 pt [-6.1, -1.4], McNemar p = 0.004 (13 lost / 5 won)".
- `prompts_needed(delta, discordant)` is the sample-size formula below.

Why paired. Which prompt is asked dominates the variance: a prompt that is hard for dense attention is hard for
sparse attention too, so the two arms' per-prompt scores are strongly correlated. Comparing two independent
accuracies would charge the comparison with the spread of prompt difficulty twice; the paired difference cancels
it, and only the prompts on which the arms disagree remain.

Why a noise floor. Two *dense* paths already disagree on some prompts: FlashPrefill at alpha = 0 through the
Triton kernels (every block kept) and SDPA differ only in floating-point reduction order, and yet a greedy decode
can flip on a near-tie. That dense-vs-dense comparison must be run on the same prompts and reported beside every
sparse-vs-dense difference: a sparse difference inside the dense one's interval is not evidence of an effect of
sparsity, and its discordant rate is the least psi (below) any comparison will show.

What n resolves a 1-point difference near 80% accuracy. Let psi be the discordant rate (the fraction of prompts
on which the two arms disagree) and delta the true difference (fraction, 0.01 = 1 point). The per-prompt
difference d is -1, 0 or +1 with variance psi - delta^2, so the interval's half-width is about
z_{0.975} sqrt(psi / n) and, for a two-sided test at 5% with 80% power (McNemar, Connor 1987):

    n = (z_{0.975} sqrt(psi) + z_{0.80} sqrt(psi - delta^2))^2 / delta^2
      ~ 7.85 (psi - delta^2) / delta^2                      (z_{0.975} = 1.96, z_{0.80} = 0.84)

    psi = 0.02 (arms disagree on 1 prompt in 50):   n ~ 1,570 prompts
    psi = 0.05 (1 in 20, a plausible sparse-vs-dense rate): n ~ 3,920
    psi = 0.10:                                     n ~ 7,850
    psi = 0.32 (errors independent at 80%, 2 * 0.8 * 0.2: what pairing saves; unpaired arms need ~25,100 each)

The accuracy enters only through psi (at 80% it caps the independent-errors case at 0.32); psi itself is
measured, from the noise floor and a pilot run, not assumed. Read the other way: with n = 200 prompts and
psi = 0.05 the 95% interval is about +-3.1 points (+-1.4 at n = 1,000, +-0.7 at n = 4,000), so 200 prompts resolve
differences of several points, not one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

# The bootstrap draws its (n_boot, n) index matrix in chunks of at most this many indices (16 MiB of int64).
CHUNK_INDICES = 1 << 21
# Fields that name one prompt in the accuracy CSVs (repro/results/accuracy, repro/results/sparsity_accuracy).
PROMPT_FIELDS = ("experiment", "task", "length", "depth", "seed")


@dataclass(frozen=True)
class PairedDifference:
    """B minus A over n paired prompts, in the scores' units.

    `low`, `high`: the percentile paired-bootstrap interval of `diff` at `level`. `right`: the score of a right
    answer (1 or 100) when every score is 0 or that value; None for graded scores (fractions of a multi-answer
    prompt, say), for which McNemar is not defined and `b_wins`, `a_wins`, `mcnemar_p` are None as well.
    `b_wins`: prompts A answers wrong and B right; `a_wins`: the reverse.
    """

    n: int
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    level: float
    n_boot: int
    right: float | None
    b_wins: int | None
    a_wins: int | None
    mcnemar_p: float | None


def mcnemar_exact(b_wins: int, a_wins: int) -> float:
    """Exact two-sided McNemar p-value: min(1, 2 P[X <= min(b_wins, a_wins)]), X ~ Binomial(b_wins + a_wins, 1/2).

    1 when there are no discordant prompts. Computed in integers (sum of binomial coefficients over 2^N), so it is
    exact up to the final division whatever N.
    """
    if b_wins < 0 or a_wins < 0:
        raise ValueError(f"discordant counts must be >= 0, got b_wins={b_wins}, a_wins={a_wins}")
    total = b_wins + a_wins
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(b_wins, a_wins) + 1))
    return min(1.0, 2 * tail / 2**total)


def paired_difference(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> PairedDifference:
    """Compare per-prompt scores `a` and `b` of two settings on the same prompts, in the same order.

    Scores are 0/1 or 0-100 (both arms in one unit). diff = mean(b) - mean(a). The interval resamples prompt
    indices with replacement (the same indices for both arms, i.e. it resamples the per-prompt differences b - a)
    `n_boot` times and takes the (1 - level)/2 and (1 + level)/2 quantiles of the resampled mean differences.
    The differences are sorted before resampling, so the result depends on the prompts, not on their order: a
    permutation of the prompts gives the identical result, and one seed always the same interval. When a == b
    every resampled difference is 0 and the interval is exactly [0, 0].

    McNemar (b_wins, a_wins, mcnemar_p) is computed only for binary outcomes: every score of both arms 0 or 1, or
    every score 0 or 100. For graded scores those fields are None (McNemar needs right/wrong pairs).
    """
    a_arr, b_arr = _scores(a, "a"), _scores(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must score the same prompts: {a_arr.size} scores vs {b_arr.size}")
    if a_arr.size == 0:
        raise ValueError("no prompts to compare")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = a_arr.size
    mean_a, mean_b = float(np.sort(a_arr).mean()), float(np.sort(b_arr).mean())
    low, high = _bootstrap_interval(np.sort(b_arr - a_arr), n_boot, seed, level)

    right = _binary_unit(np.concatenate([a_arr, b_arr]))
    b_wins = a_wins = p = None
    if right is not None:
        b_wins = int(np.sum((a_arr == 0) & (b_arr == right)))
        a_wins = int(np.sum((a_arr == right) & (b_arr == 0)))
        p = mcnemar_exact(b_wins, a_wins)
    return PairedDifference(n=n, mean_a=mean_a, mean_b=mean_b, diff=mean_b - mean_a, low=low, high=high,
                            level=level, n_boot=n_boot, right=right, b_wins=b_wins, a_wins=a_wins, mcnemar_p=p)


def _scores(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one score per prompt (1-D), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds a NaN or infinite score")
    return arr


def _binary_unit(scores: np.ndarray) -> float | None:
    """1 or 100 when every score is 0 or that value (1 when all are 0), else None."""
    for right in (1.0, 100.0):
        if np.all((scores == 0) | (scores == right)):
            return right
    return None


def _bootstrap_interval(diffs: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` under resampling with replacement, drawn in bounded chunks."""
    n = diffs.size
    rng = np.random.default_rng(seed)
    rows = max(1, min(n_boot, CHUNK_INDICES // n))
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diffs[idx].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------------- long rows


Row = Mapping[str, Any]
SettingSpec = Mapping[str, Any] | Callable[[Row], bool]


@dataclass(frozen=True)
class Stratum:
    """One group's comparison: `group` maps each `by` field to its value ("all" in every field for the row over
    all prompts)."""

    group: Mapping[str, str]
    result: PairedDifference


def stratified(rows: Iterable[Row], key: Sequence[str] | Callable[[Row], Hashable], a_setting: SettingSpec,
               b_setting: SettingSpec, *, score: str = "score", by: Sequence[str] = ("task", "length"),
               n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> list[Stratum]:
    """Paired comparisons of two settings in long-format result rows, one per `by` group plus one over all.

    rows: dicts, one per prompt and setting (values may be strings, as csv.DictReader gives them).
    key: the fields that name a prompt (e.g. PROMPT_FIELDS), or a function of a row returning a hashable prompt id.
        With fields, numbers compare as numbers ("4096" pairs with 4096, "0.20" with 0.2).
    a_setting, b_setting: which rows are each arm: a mapping field -> value that the row must match (compared as
        numbers where both parse as one, e.g. {"method": "flashprefill", "alpha": 0.12}), or a predicate.
        Rows matching neither are ignored; a row matching both is an error.
    by: the prompt fields to group by; both arms' rows of one prompt must agree on them.

    Returns the groups in sorted order (numbers numerically), then the "all" stratum. Raises ValueError when an
    arm has no rows, answers a prompt twice, or when one arm has prompts the other lacks (naming them): nothing
    is dropped silently.
    """
    prompt_of = key if callable(key) else _field_key(tuple(key))
    arms: dict[str, dict[Hashable, Row]] = {"A": {}, "B": {}}
    for row in rows:
        in_a, in_b = _matches(row, a_setting), _matches(row, b_setting)
        if in_a and in_b:
            raise ValueError(f"a row matches both settings: {dict(row)}")
        if in_a or in_b:
            arm = arms["A" if in_a else "B"]
            prompt = prompt_of(row)
            if prompt in arm:
                raise ValueError(f"setting {'A' if in_a else 'B'} answers prompt {_show(prompt)} twice")
            arm[prompt] = row
    for name, spec in (("A", a_setting), ("B", b_setting)):
        if not arms[name]:
            raise ValueError(f"no row matches setting {name} ({_show_spec(spec)})")
    _check_paired(arms["A"], arms["B"])

    groups: dict[tuple, tuple[dict[str, str], list[tuple[float, float]]]] = {}
    for prompt in sorted(arms["A"], key=_sort_key):
        row_a, row_b = arms["A"][prompt], arms["B"][prompt]
        label = tuple(_canon(row_a.get(f)) for f in by)
        if label != tuple(_canon(row_b.get(f)) for f in by):
            raise ValueError(f"the two settings' rows of prompt {_show(prompt)} disagree on {list(by)}")
        _, pairs = groups.setdefault(label, ({f: str(row_a.get(f, "")).strip() for f in by}, []))
        pairs.append((_score(row_a, score, prompt), _score(row_b, score, prompt)))

    def compare(pairs):
        a, b = zip(*pairs)
        return paired_difference(a, b, n_boot=n_boot, seed=seed, level=level)

    ordered = sorted(groups.items(), key=lambda item: _sort_key(item[0]))
    out = [Stratum(shown, compare(pairs)) for _, (shown, pairs) in ordered]
    every = [pair for _, pairs in groups.values() for pair in pairs]
    return out + [Stratum({f: "all" for f in by}, compare(every))]


def _canon(value: Any) -> Any:
    """A value as the CSV and the code may both spell it: a float when it parses as one, else the stripped text."""
    if value is None:
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return number if math.isfinite(number) else str(value).strip()


def _sort_key(value: Any) -> Any:
    """Orders canonical values (or tuples of them): numbers before text, numbers numerically."""
    if isinstance(value, tuple):
        return tuple(_sort_key(v) for v in value)
    if isinstance(value, float):
        return (0, value, "")
    return (1, 0.0, str(value))


def _field_key(fields: tuple[str, ...]) -> Callable[[Row], tuple]:
    if not fields:
        raise ValueError("key needs at least one field")

    def prompt(row: Row) -> tuple:
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"row lacks the prompt fields {missing}: {dict(row)}")
        return tuple(_canon(row[f]) for f in fields)

    return prompt


def _matches(row: Row, spec: SettingSpec) -> bool:
    if callable(spec):
        return bool(spec(row))
    return all(field in row and _canon(row[field]) == _canon(value) for field, value in spec.items())


def _check_paired(a: Mapping[Hashable, Row], b: Mapping[Hashable, Row], shown: int = 10) -> None:
    only_a = sorted(set(a) - set(b), key=_sort_key)
    only_b = sorted(set(b) - set(a), key=_sort_key)
    if not only_a and not only_b:
        return
    parts = []
    for name, other, missing in (("B", "A", only_a), ("A", "B", only_b)):
        if missing:
            listed = ", ".join(_show(p) for p in missing[:shown])
            more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
            parts.append(f"setting {name} lacks {len(missing)} prompt(s) that {other} has: {listed}{more}")
    raise ValueError("unpaired prompts (nothing is dropped silently): " + "; ".join(parts))


def _score(row: Row, field: str, prompt: Hashable) -> float:
    try:
        return float(row[field])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"prompt {_show(prompt)} has no numeric {field!r}: {row.get(field)!r}") from None


def _show(prompt: Hashable) -> str:
    if isinstance(prompt, tuple):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in prompt) + ")"
    return repr(prompt)


def _show_spec(spec: SettingSpec) -> str:
    return getattr(spec, "__name__", "a predicate") if callable(spec) else repr(dict(spec))


# ---------------------------------------------------------------------------------------------------- reporting


def format_interval(result: PairedDifference, unit: str = "pt", scale: float | None = None, digits: int = 1) -> str:
    """"-3.7 pt [-6.1, -1.4], McNemar p = 0.004 (13 lost / 5 won)": the difference and its interval, then for
    binary scores the McNemar p-value with the prompts B lost (a_wins) and won (b_wins).

    scale multiplies the difference; by default 100 for 0/1 scores (so points are percentage points) and 1
    otherwise (0-100 scores are already in points).
    """
    if scale is None:
        scale = 100.0 if result.right == 1 else 1.0
    f = f"{{:.{digits}f}}"

    def num(x):
        text = f.format(x * scale)
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"

    text = f"{num(result.diff)} {unit} [{num(result.low)}, {num(result.high)}]"
    if result.mcnemar_p is None:
        return text
    p = result.mcnemar_p
    shown = "< 0.001" if p < 0.001 else f"= {p:.3f}" if p < 0.01 else f"= {p:.2f}"
    return f"{text}, McNemar p {shown} ({result.a_wins} lost / {result.b_wins} won)"


def prompts_needed(delta: float, discordant: float, *, alpha: float = 0.05, power: float = 0.80) -> int:
    """Prompts needed for a two-sided paired (McNemar) test at `alpha` to detect a true difference `delta`
    (a fraction: 0.01 = 1 point) with probability `power`, when the arms disagree on a fraction `discordant` of
    the prompts (Connor 1987): n = (z_{1-alpha/2} sqrt(psi) + z_power sqrt(psi - delta^2))^2 / delta^2."""
    if not 0 < abs(delta) <= discordant <= 1:
        raise ValueError(f"need 0 < |delta| <= discordant <= 1, got delta={delta}, discordant={discordant}")
    z = NormalDist().inv_cdf
    root = z(1 - alpha / 2) * math.sqrt(discordant) + z(power) * math.sqrt(discordant - delta**2)
    return math.ceil(root**2 / delta**2)
