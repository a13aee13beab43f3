"""Which attention path ran, read from the backend's DensityRecorder, and the check that is the point of the serving
run: no prefill call fell back to dense attention, and every serving call ran the layout its scenario tests.

The recorder keeps one record per layer per prefill call (decoding steps are not recorded). A call's *kind* is

    "flashprefill/batch"       FlashPrefill on whole unpadded prompts (a one-shot prefill, a chunk without prefix)
    "flashprefill/varlen"      FlashPrefill through flash_prefill_varlen (a padded batch, a chunk after a prefix)
    "dense_layer"              a configured dense layer (dense_layers > 0)
    "dense_fallback (reason)"  sdpa instead of FlashPrefill: what the check refuses

One `entry` per model run (a scenario on one prompt or one batch, or a one-shot reference): attention, scenario,
variant, side ("serving" or "one-shot"), lengths (the run's prompt lengths, "2K" or "2K+4K+8K"), calls (kind ->
count) and max_prefix (the longest cached prefix of its varlen calls). Entries go into the run's JSON as they are.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

FLASHPREFILL = "flashprefill"  # the attention of the checked runs; "sdpa" runs (the dense floor) are not checked
# What the serving side of each scenario must show: FlashPrefill's varlen layout, and for the scenarios that
# continue a cache, a call with a cached prefix.
NEEDS_PREFIX = {"chunked": True, "padded": False, "multi_turn": True}


def call_kind(record: Mapping) -> str:
    """The kind (module docstring) of one recorder record."""
    if record["path"] == "flashprefill":
        return f"flashprefill/{record.get('layout') or 'batch'}"
    if record["path"] == "dense_fallback":
        return f"dense_fallback ({record.get('reason')})"
    return str(record["path"])


def entry(attention: str, scenario: str, variant: str, side: str, lengths: str, records: Iterable[Mapping]) -> dict:
    """The evidence of one model run from the recorder's records of it (decoding steps, if recorded, left out)."""
    prefill = [r for r in records if not r.get("decode")]
    prefixes = [int(r.get("prefix") or 0) for r in prefill if r["path"] == "flashprefill"]
    return dict(attention=attention, scenario=scenario, variant=variant, side=side, lengths=lengths,
                calls=dict(Counter(call_kind(r) for r in prefill)), max_prefix=max(prefixes, default=0))


def _unmet(e: Mapping) -> str | None:
    """Why one serving run did not test its scenario's layout, or None."""
    if e["side"] != "serving" or e["scenario"] not in NEEDS_PREFIX:
        return None
    if not e["calls"].get("flashprefill/varlen"):
        return "no call ran FlashPrefill's varlen layout"
    if NEEDS_PREFIX[e["scenario"]] and e["max_prefix"] == 0:
        return "no call continued a cached prefix"
    return None


def aggregate(entries: Iterable[Mapping]) -> list[dict]:
    """Entries summed per (attention, variant, side, lengths), in first-seen order: runs, calls per kind, the
    longest prefix, and `unmet`: runs whose serving calls did not show their scenario's layout (with why)."""
    groups: dict[tuple, dict] = {}
    for e in entries:
        key = (e["attention"], e["variant"], e["side"], e["lengths"])
        g = groups.setdefault(key, dict(attention=e["attention"], scenario=e["scenario"], variant=e["variant"],
                                        side=e["side"], lengths=e["lengths"], runs=0, calls=Counter(),
                                        max_prefix=0, unmet=Counter()))
        g["runs"] += 1
        g["calls"].update(e["calls"])
        g["max_prefix"] = max(g["max_prefix"], e["max_prefix"])
        if e["attention"] == FLASHPREFILL and (why := _unmet(e)):
            g["unmet"][why] += 1
    return [dict(g, calls=dict(g["calls"]), unmet=dict(g["unmet"])) for g in groups.values()]


def problems(entries: Iterable[Mapping]) -> list[str]:
    """What makes the run fail, one sentence per (variant, side, lengths): FlashPrefill runs with prefill calls
    that fell back to dense attention, with no prefill call recorded at all, or serving runs that did not run
    their scenario's layout. Empty when the check passes."""
    found = []
    for g in aggregate(entries):
        if g["attention"] != FLASHPREFILL:
            continue
        where = f"{g['variant']} ({g['side']}, {g['lengths']})"
        fallbacks = {k: n for k, n in g["calls"].items() if k.startswith("dense_fallback")}
        if fallbacks:
            shown = ", ".join(f"{n} x {k}" for k, n in sorted(fallbacks.items()))
            found.append(f"{where}: {sum(fallbacks.values())} prefill calls fell back to dense attention ({shown})")
        if not g["calls"]:
            found.append(f"{where}: the backend recorded no prefill call (is the model switched to it?)")
        for why, n in g["unmet"].items():
            found.append(f"{where}: {why} in {n} of {g['runs']} runs")
    return found
