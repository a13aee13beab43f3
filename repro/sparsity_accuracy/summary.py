"""Per-setting summaries of a sparsity_accuracy run and the matching of the peers to FlashPrefill.

Accuracy-matched setting of a peer: the grid setting with the lowest realised density whose mean score is >= the
mean score of FlashPrefill at the reference alpha on the same prompts (none if no grid setting reaches it); the same
rule on "same" (agreement with Full) instead of the score is reported beside it. Error-matched settings come from
`python -m repro.sparsity`'s run (attention-output error on activations), read from its CSV.
"""

from __future__ import annotations

from pathlib import Path

from block_selectors import FULL, PEERS, SELECTORS

from ..common import read_long_csv
from .experiment import prompt_key

ORDER = (FULL, *SELECTORS)  # report order: Full, FlashPrefill, then the peers


def selector_name(key: str) -> str:
    """"full" -> "Full", a SELECTORS key -> its display name ("XAttention")."""
    return "Full" if key == FULL else SELECTORS[key].name


def summarize(rows: list[dict], length: int | None = None) -> list[dict]:
    """One dict per setting over the prompts every setting answered (at `length`, or all lengths): setting fields,
    n, score, same (fraction of prompts answered exactly as Full), density (mean over prompts)."""
    rows = [r for r in rows if length is None or int(r["length"]) == length]
    by_setting: dict[str, list[dict]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)
    common = set.intersection(*({prompt_key(r) for r in rs} for rs in by_setting.values())) if by_setting else set()
    full = {prompt_key(r): r["prediction"] for r in rows if r["method"] == FULL}
    out = []
    for label, rs in by_setting.items():
        rs = [r for r in rs if prompt_key(r) in common]
        if not rs:
            continue
        first = rs[0]
        out.append(dict(setting=label, method=first["method"], param=first["param"],
                        value=float(first["value"]) if first["value"] not in ("", None) else None,
                        paper_default=str(first["paper_default"]) == "True", n=len(rs),
                        score=sum(float(r["score"]) for r in rs) / len(rs),
                        same=sum(r["prediction"] == full.get(prompt_key(r)) for r in rs) / len(rs),
                        density=sum(float(r["density"]) for r in rs) / len(rs)))
    return sorted(out, key=lambda s: (ORDER.index(s["method"]), s["value"] or 0.0))


def matched(summary: list[dict], alpha: float, key: str = "score") -> dict[str, dict | None]:
    """Per peer, the grid setting of lowest density whose `key` ("score", or "same": agreement with Full) is >=
    FlashPrefill's at `alpha` (None if none)."""
    fp = next((s for s in summary if s["method"] == "flashprefill" and s["value"] == alpha), None)
    out = {}
    for peer in PEERS:
        ok = [s for s in summary if s["method"] == peer and fp is not None and s[key] >= fp[key] - 1e-9]
        out[peer] = min(ok, key=lambda s: (s["density"], s["value"])) if ok else None
    return out


def error_matched(path: Path) -> dict[str, dict]:
    """The error-matched settings of a CPU run of `python -m repro.sparsity` (its sparsity.csv: attention-output error on real
    SmolLM2 activations), per selector key: {value, density, L}; empty when the file or the rows are absent."""
    if not path.exists():
        return {}
    keys = {s.name: key for key, s in SELECTORS.items()}
    return {keys[r["selector"]]: dict(value=float(r["value"]), density=float(r["density"]), L=int(r["L"]))
            for r in read_long_csv(path) if r.get("matched") == "True" and r.get("selector") in keys}
