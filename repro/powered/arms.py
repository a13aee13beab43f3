"""The arms of the powered evaluation: Full (the model's sdpa), a second dense path (the noise floor) and the sparse
settings, each a `block_selectors.Setting` plus the backend knobs the issue asks about (run through
`repro.harness.AttentionSwitch.use(arm.setting, **arm.knobs)`).

    ARMS["full"]            Full attention, transformers' sdpa: the reference arm every other arm is paired with
    ARMS["dense_kernels"]   FlashPrefill at alpha 0 (every block kept) through the backend: dense attention that
                            differs from sdpa only in rounding. Its difference from Full is the noise floor.
    ARMS["fp"]              FlashPrefill at its default alpha (0.12 for SmolLM2, the V1 default)
    ARMS["fp_a0.06"] ...    the alpha sweep; "+mc": V2's mean correction; "+dense4": the first 4 layers dense
                            (V2's SGLang example); "fp_v2": V2's alpha 0.1
    ARMS["flex_g0.9"] ...   FlexPrefill's gamma sweep; "xattn_t0.9" ...: XAttention's threshold sweep
    ARMS["fp+fp8"]          the default with the attention in e4m3 (reference/fp8.py); "dense_fp8": alpha 0 in e4m3,
                            what the quantisation alone costs

An arm's `group` says what it is for: "floor" (the dense-vs-dense noise floor), "default", "sweep" (the Pareto
figure), "knob" (choices made on dev, reported on test), "peer", "precision" (the FP8 attention; not a dev-rule candidate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from block_selectors import FULL, Setting

DEFAULT_ALPHA = 0.12


@dataclass(frozen=True)
class Arm:
    """One way to run the prefill: a setting of a block selector (or Full) and extra backend fields."""

    name: str
    setting: Setting
    group: str
    knobs: dict = field(default_factory=dict)  # FlashPrefillConfig fields beyond the setting's (dense_layers, ...)

    @property
    def selector(self) -> str:
        return self.setting.selector

    @property
    def value(self):
        return self.setting.value

    @property
    def label(self) -> str:
        parts = [self.setting.label]
        if self.knobs.get("mean_correction"):
            parts.append("+ mean corr.")
        if self.knobs.get("dense_layers"):
            parts.append(f"+ first {self.knobs['dense_layers']} layers dense")
        if self.knobs.get("fp8"):
            parts.append("in fp8")
        return " ".join(parts)

    def columns(self) -> dict:
        """How a result row names the arm."""
        return dict(arm=self.name, group=self.group, method=self.selector, param=self.setting.param,
                    value="" if self.value is None else self.value,
                    mean_correction=bool(self.knobs.get("mean_correction", False)),
                    dense_layers=int(self.knobs.get("dense_layers", 0)))


def _fp(name: str, alpha: float, group: str, **knobs) -> Arm:
    return Arm(name, Setting("flashprefill", alpha), group, knobs)


def _build() -> dict[str, Arm]:
    arms = [Arm("full", Setting(FULL), "reference"),
            Arm("dense_kernels", Setting("flashprefill", 0.0, title="dense (FlashPrefill alpha=0)"), "floor"),
            _fp("fp", DEFAULT_ALPHA, "default"),
            _fp("fp+mc", DEFAULT_ALPHA, "knob", mean_correction=True),
            _fp("fp+dense4", DEFAULT_ALPHA, "knob", dense_layers=4),
            _fp("fp_v2", 0.1, "knob")]
    for alpha in (0.03, 0.06, 0.2, 0.3):
        arms.append(_fp(f"fp_a{alpha:g}", alpha, "sweep"))
    for alpha in (0.06, 0.3):
        arms.append(_fp(f"fp_a{alpha:g}+mc", alpha, "sweep", mean_correction=True))
    arms += [_fp("fp+fp8", DEFAULT_ALPHA, "precision", fp8=True),
             Arm("dense_fp8", Setting("flashprefill", 0.0, title="dense (FlashPrefill alpha=0)"), "precision",
                 dict(fp8=True))]
    for gamma in (0.8, 0.9, 0.95, 0.99):
        arms.append(Arm(f"flex_g{gamma:g}", Setting("flexprefill", gamma), "peer"))
    for threshold in (0.8, 0.9, 0.95, 0.99):
        arms.append(Arm(f"xattn_t{threshold:g}", Setting("xattention", threshold), "peer"))
    return {a.name: a for a in arms}


ARMS: dict[str, Arm] = _build()
# What a full device run answers first: the paired comparison and its noise floor, then the knobs, the sweep and
# the peers (a time budget cuts from the end).
PRIORITY = ("full", "dense_kernels", "fp", "fp+mc", "fp+dense4", "fp_a0.06", "fp_a0.3", "flex_g0.9", "xattn_t0.9",
            "fp_v2", "fp_a0.2", "fp_a0.03", "fp_a0.06+mc", "fp_a0.3+mc", "flex_g0.95", "xattn_t0.95", "flex_g0.8",
            "xattn_t0.8", "flex_g0.99", "xattn_t0.99", "fp+fp8", "dense_fp8")
assert set(PRIORITY) == set(ARMS), set(PRIORITY) ^ set(ARMS)


def check_arms(names) -> list[Arm]:
    """The arms named, in PRIORITY order, "full" first whether named or not (every comparison pairs with it)."""
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; expected some of {list(PRIORITY)}")
    wanted = set(names) | {"full"}
    return [ARMS[n] for n in PRIORITY if n in wanted]
