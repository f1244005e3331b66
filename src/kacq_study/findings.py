"""Which of the papers' findings a study run reproduces: explicit criteria applied to its numbers.

Nothing here is hard-coded: each finding states its criterion, the values it looked at and whether it
holds (``None`` when the run lacks what the criterion needs, e.g. an arm that was not run).

>>> assess({"pretraining": {"entropy": {"steps": [0, 1, 2], "total": [3.0, 2.9, 2.8],
...          "per_layer": [[1.5, 1.5], [1.5, 1.4], [1.5, 1.3]]}}, "arms": {}})[0]["holds"]
True
"""
from __future__ import annotations

import functools
import math
from statistics import mean, median
from typing import Any

KINDS = ("mem", "gen", "hard_gen")
SCENARIOS = ("paraphrase", "duplication", "once")
# "Facts land preferentially in low-activity slots": the share of the probes' top-k slots that were
# low-activity must exceed the share of all slots that were by this much (fixed before any run).
LANDING_MARGIN = 0.05
LANDING_ARMS = ("late", "late+resuscitation")
# A retainability fit with R^2 below this is "no power law": its decay constant is never compared or printed.
POWER_LAW_MIN_R2 = 0.5
# Regime checks (is the study in the papers' regime at all?), reported apart from the papers' findings.
# Facts are learned: injected facts' mean target log prob rises by at least this many nats over the arm ...
LEARNED_MIN_RISE = 1.0
# ... and by at least this many nats more than the never-injected control facts' does.
LEARNED_MARGIN = 0.5
# Pretraining has flattened: the mean loss over the last LOSS_FLAT_WINDOW of the steps is within
# LOSS_FLAT_TOLERANCE (relative) of the mean over the window before it.
LOSS_FLAT_WINDOW = 0.1
LOSS_FLAT_TOLERANCE = 0.02
# The decay regime's checkpoint rule (kacq_study.pipeline.entropy_peak): entropy "decayed" after its peak when the
# fall from the peak to the last measurement exceeds this many times the curve's step-to-step noise after the peak
# (the entropy-weight-decay experiment's criterion, fixed before any run).
DECAY_NOISE_MULTIPLE = 3.0


# The dedicated experiment (``python -m kacq_study.experiments NAME``, written up in docs/findings.md) that
# looks into each finding, by id or by the id's stem before "[arm]"
EXPERIMENT_FOR = {
    "entropy_decays": "entropy-widths", "last_layer_falls_most": "entropy-widths",
    "late_acquires_less": "acquisition-vs-entropy", "late_forgets_more": "acquisition-vs-entropy",
    "resuscitation_improves_acquisition": "resuscitation-dose", "resuscitation_improves_retention": "resuscitation-dose",
    "injection_raises_log_prob": "probe-wording", "mem_gen_hard_gen_order": "probe-wording",
    "power_law_forgetting": "forgetting-horizon", "duplication_more_effective": "forgetting-horizon",
    "duplication_forgets_faster": "forgetting-horizon", "facts_land_in_low_activity_slots": "landing",
    "augment_improves_acquisition": "augmentation-rows", "augment_sam_improves_acquisition": "augmentation-rows",
    "sam_improves_acquisition": "sam-dose",
}


def experiment_for(finding_id: str) -> str | None:
    """The name of the dedicated experiment behind a finding, or None where there is none.

    >>> experiment_for("facts_land_in_low_activity_slots[late]")
    'landing'
    """
    return EXPERIMENT_FOR.get(finding_id.split("[", 1)[0])


def _finding(key: str, paper: str, claim: str, criterion: str, values: dict, holds: bool | None) -> dict:
    return {"id": key, "paper": paper, "claim": claim, "criterion": criterion, "values": values, "holds": holds}


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties ranked by position); None for fewer than 3 points or a constant side."""
    if len(x) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else None


def _number(value) -> bool:
    """A finite number (not a bool): what a criterion can compare. A None (NaN in results.json) or NaN input
    makes a finding not checked, never held or not held by accident of a comparison with NaN.

    >>> _number(0.5), _number(None), _number(float("nan")), _number(True)
    (True, False, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(values) -> bool:
    values = list(values)
    return bool(values) and all(_number(v) for v in values)


def fit_ok(fit: dict | None) -> bool:
    """Whether a retainability fit is a power law by its own quality criterion (R^2 >= POWER_LAW_MIN_R2)."""
    if not fit:
        return False
    r2, decay = fit.get("r_squared"), fit.get("decay")
    return (isinstance(r2, (int, float)) and math.isfinite(r2) and r2 >= POWER_LAW_MIN_R2
            and isinstance(decay, (int, float)) and math.isfinite(decay))


def _kim(results: dict, arm: str, key: str) -> float | None:
    value = results["arms"].get(arm, {}).get("kim", {}).get(key)
    return value if _number(value) else None


def _compare(results: dict, key: str, higher: str, lower: str) -> tuple[dict, bool | None]:
    a, b = _kim(results, higher, key), _kim(results, lower, key)
    values = {f"{key}[{higher}]": a, f"{key}[{lower}]": b}
    return values, (a > b) if a is not None and b is not None else None


def _forgets_more(late: float | None, early: float | None) -> bool | None:
    """Whether the late arm forgot more: it must have forgotten something (F > 0) to forget more. When
    both arms gained accuracy (F <= 0, an undertrained model still learning) there is no forgetting to
    compare, and the larger of two negative numbers would say nothing about the claim.

    >>> _forgets_more(0.1, 0.02), _forgets_more(-0.2, -0.4), _forgets_more(-0.1, 0.05)
    (True, None, False)
    """
    if late is None or early is None or (late <= 0 and early <= 0):
        return None
    return late > 0 and late > early


def _acquires_more(early: float | None, late: float | None) -> bool | None:
    """Whether the early arm acquired more: when neither arm acquired anything (both A <= 0) there is no
    acquisition to compare, as for :func:`_forgets_more`.

    >>> _acquires_more(0.3, 0.2), _acquires_more(-0.1, -0.3), _acquires_more(0.1, -0.3)
    (True, None, True)
    """
    if early is None or late is None or (early <= 0 and late <= 0):
        return None
    return early > late


def landing(results: dict, arm: str) -> dict:
    """The finding "the injected facts land preferentially in low-activity slots" for one arm: the mean share of
    the probes' top-k attributed slots, at the end of the arm, that were low-activity at its starting checkpoint,
    against chance (the share of all slots that were) plus :data:`LANDING_MARGIN`.

    >>> arm = {"attribution": {"k": 50, "quantile": 0.5, "chance": 0.5, "steps": [0, 6, 38],
    ...                        "share": {"mean": [0.4, 0.5, 0.6]}}}
    >>> landing({"arms": {"late": arm}}, "late")["holds"]
    True
    """
    attribution = results.get("arms", {}).get(arm, {}).get("attribution")
    values: dict[str, Any] = {"share_end": None, "chance": None}
    holds = None
    if attribution:
        means = attribution["share"]["mean"]
        values = {"share_end": means[-1], "chance": attribution["chance"], "share_start": means[0],
                  "share_after_first_injection": means[1] if len(means) > 2 else None}
        if _number(means[-1]) and _number(attribution["chance"]):
            holds = means[-1] > attribution["chance"] + LANDING_MARGIN
    k = attribution["k"] if attribution else "k"
    with_or_without = "after resuscitation" if "resuscitation" in arm else "without resuscitation"
    return _finding(
        f"facts_land_in_low_activity_slots[{arm}]", "Kim et al. 2025",
        f"injected facts land preferentially in low-activity memory slots ({with_or_without})",
        f"in arm '{arm}', the mean share of each probe's top-{k} grad x act slots at the end of the arm that were "
        "low-activity at the starting checkpoint (c̄ on the calibration text at or below the resuscitation "
        f"quantile, before any edit) > chance (the share of all slots that were) + {LANDING_MARGIN}",
        values, holds)


def _early_on(results: dict) -> tuple[list, list, list]:
    """The pretraining entropy curve from the early checkpoint on: steps, totals and per-layer values. The papers
    measured checkpoints long after the first transient of training (an entropy collapse and climb within the
    first tens of steps from scratch): the curve is judged from the early checkpoint on."""
    entropy = results["pretraining"]["entropy"]
    start = results["pretraining"].get("checkpoints", {}).get("early", entropy["steps"][0])
    kept = [i for i, step in enumerate(entropy["steps"]) if step >= start]
    return ([entropy["steps"][i] for i in kept], [entropy["total"][i] for i in kept],
            [entropy["per_layer"][i] for i in kept])


def entropy_decays(results: dict) -> dict:
    """Kim et al.: knowledge entropy decays during pretraining."""
    steps, totals, _ = _early_on(results)
    rho = spearman([float(s) for s in steps], totals) if _numbers(totals) else None
    return _finding(
        "entropy_decays", "Kim et al. 2025", "knowledge entropy decays during pretraining",
        "from the early checkpoint on: total entropy at the last measurement < at the early checkpoint, and "
        "Spearman(step, entropy) <= -0.5",
        {"from_step": steps[0] if steps else None, "first": totals[0] if totals else None,
         "last": totals[-1] if totals else None, "spearman": rho},
        (totals[-1] < totals[0] and rho is not None and rho <= -0.5) if len(totals) >= 2 and _numbers(totals)
        else None)


def last_layer_falls_most(results: dict) -> dict:
    """Kim et al.: the last layer's entropy falls most."""
    _, _, per_layer = _early_on(results)
    ends = (per_layer[0], per_layer[-1]) if per_layer else ([], [])
    drops = ([first - last for first, last in zip(*ends)] if _numbers([*ends[0], *ends[1]])
             else [None] * len(ends[0]))
    return _finding(
        "last_layer_falls_most", "Kim et al. 2025", "the last layer's entropy falls most",
        "from the early checkpoint on: the last layer's entropy fell (drop = early checkpoint - last measurement "
        "> 0) and its drop is the largest of all layers",
        # "falls most" needs a fall: when every layer rose, the smallest rise is no fall at all
        {"drop_per_layer": drops}, (drops[-1] > 0 and max(range(len(drops)), key=drops.__getitem__) == len(drops) - 1)
        if len(drops) > 1 and _numbers(drops) else None)


def _one_checkpoint(results: dict) -> bool:
    """Whether the early and the late checkpoint are the same step: the decay regime's peak rule takes the last step
    as the early checkpoint when entropy still climbs at the end, and the early and late arms then train the same
    weights; an early-against-late finding has nothing to compare (not checked, never "not held"). The criterion
    texts do not say so: they are the same for every seed, and a run's earlier results.json keeps its bytes; the
    seed's regime check (entropy_decayed_before_late) fails and says why."""
    steps = results.get("pretraining", {}).get("checkpoints", {})
    return steps.get("early") is not None and steps.get("early") == steps.get("late")


def late_acquires_less(results: dict) -> dict:
    """Kim et al.: a later checkpoint acquires new knowledge less well."""
    values, _ = _compare(results, "acquisition", "early", "late")
    return _finding("late_acquires_less", "Kim et al. 2025",
                    "a later checkpoint acquires new knowledge less well",
                    "acquisition A = (K_after - K_before)/|K_before| of the early arm > the late arm; not "
                    "checked when neither arm acquired anything (both A <= 0)",
                    values, None if _one_checkpoint(results)
                    else _acquires_more(values["acquisition[early]"], values["acquisition[late]"]))


def late_forgets_more(results: dict) -> dict:
    """Kim et al.: a later checkpoint forgets more."""
    values, _ = _compare(results, "forgetting", "late", "early")
    return _finding("late_forgets_more", "Kim et al. 2025", "a later checkpoint forgets more",
                    "forgetting F (relative drop of held-out next-token accuracy) of the late arm > 0 and > "
                    "the early arm's; not checked when neither arm lost accuracy (both F <= 0)",
                    values, None if _one_checkpoint(results)
                    else _forgets_more(values["forgetting[late]"], values["forgetting[early]"]))


def _resuscitation_improves(results: dict, key: str, claim: str) -> dict:
    values, holds = _compare(results, key, "late+resuscitation", "late")
    return _finding(f"resuscitation_improves_{key}", "Kim et al. 2025", claim,
                    f"{key} of late+resuscitation > late", values, holds)


def resuscitation_improves_acquisition(results: dict) -> dict:
    """Kim et al.: resuscitation improves acquisition at the late checkpoint."""
    return _resuscitation_improves(results, "acquisition", "resuscitation improves acquisition at the late checkpoint")


def resuscitation_improves_retention(results: dict) -> dict:
    """Kim et al.: resuscitation improves retention at the late checkpoint."""
    return _resuscitation_improves(results, "retention", "resuscitation improves retention at the late checkpoint")


def _reference(results: dict) -> tuple[str | None, dict]:
    """The arm Chang et al.'s findings are judged in ("late", else the first arm run) and its groups."""
    arms = results.get("arms", {})
    reference = "late" if "late" in arms else next(iter(arms), None)
    return reference, (arms[reference]["groups"] if reference else {})


def injection_raises_log_prob(results: dict) -> dict:
    """Chang et al.: each update on a fact raises its probes' log prob."""
    reference, groups = _reference(results)
    positive = {k: g["effectivity_positive_fraction"] for k, g in groups.items()}
    return _finding(
        "injection_raises_log_prob", "Chang et al. 2024", "each update on a fact raises its probes' log prob",
        f"in arm '{reference}', more than half of all (probe, injection) effectivities are > 0 in every group",
        {"positive_fraction": positive},
        all(v > 0.5 for v in positive.values()) if _numbers(positive.values()) else None)


def mem_gen_hard_gen_order(results: dict) -> dict:
    """Chang et al.: effectivity of memorization > semantic > compositional probes."""
    reference, groups = _reference(results)
    kinds = {}
    for kind in KINDS:  # the mean over scenarios; None when one is None or NaN (not like for like)
        vals = [groups[f"{s}/{kind}"]["effectivity"] for s in SCENARIOS if f"{s}/{kind}" in groups]
        kinds[kind] = mean(vals) if _numbers(vals) else None
    ordered = [kinds[k] for k in KINDS]
    return _finding(
        "mem_gen_hard_gen_order", "Chang et al. 2024", "effectivity: memorization > semantic > compositional",
        f"in arm '{reference}', mean effectivity over scenarios: mem > gen > hard_gen", {"effectivity": kinds},
        (ordered[0] > ordered[1] > ordered[2]) if None not in ordered else None)


def power_law_forgetting(results: dict) -> dict:
    """Chang et al.: forgetting follows a power law in steps."""
    reference, groups = _reference(results)
    fits = {k: g["retainability"]["fit"] for k, g in groups.items()
            if _number(g["retainability"]["fit"]["r_squared"])}
    r2 = [f["r_squared"] for f in fits.values()]
    # "most groups" counts every group: one without a fit (too few points) does not decay by a power law
    decaying = sum(fit_ok(f) and f["decay"] > 0 for f in fits.values())
    return _finding(
        "power_law_forgetting", "Chang et al. 2024", "forgetting follows a power law in steps",
        f"in arm '{reference}', the fit R ~ intercept - decay log10(t) has median R^2 >= {POWER_LAW_MIN_R2} over "
        f"the groups with a fit, and decay > 0 in more than half of all groups (a group without a fit, or whose fit "
        f"has R^2 < {POWER_LAW_MIN_R2}, has no power law and counts as not decaying)",
        {"r_squared": {k: f["r_squared"] for k, f in fits.items()}, "decay": {k: f["decay"] for k, f in fits.items()},
         "groups": len(groups), "groups_decaying": decaying},
        (median(r2) >= POWER_LAW_MIN_R2 and decaying > len(groups) / 2) if fits else None)


def duplication_more_effective(results: dict) -> dict:
    """Chang et al.: duplication gives higher effectivity than paraphrase."""
    reference, groups = _reference(results)

    def scenario_mean(scenario: str) -> float | None:
        vals = [groups[f"{scenario}/{kind}"]["effectivity"] for kind in KINDS if f"{scenario}/{kind}" in groups]
        return mean(vals) if _numbers(vals) else None

    dup_e, par_e = scenario_mean("duplication"), scenario_mean("paraphrase")
    return _finding(
        "duplication_more_effective", "Chang et al. 2024", "duplication gives higher effectivity than paraphrase",
        f"in arm '{reference}', mean effectivity over kinds: duplication > paraphrase",
        {"duplication": dup_e, "paraphrase": par_e}, (dup_e > par_e) if None not in (dup_e, par_e) else None)


def duplication_forgets_faster(results: dict) -> dict:
    """Chang et al.: duplication is forgotten faster than paraphrase."""
    reference, groups = _reference(results)

    def scenario_decay(scenario: str) -> float | None:
        """The mean decay constant over kinds, only when every kind's fit is a power law (else None: a
        decay from a failed fit is not compared, and a mean over fewer kinds would not be like for like)."""
        fitted = [groups.get(f"{scenario}/{kind}", {}).get("retainability", {}).get("fit") for kind in KINDS]
        return mean(f["decay"] for f in fitted) if all(fit_ok(f) for f in fitted) else None

    dup_a, par_a = scenario_decay("duplication"), scenario_decay("paraphrase")
    # "forgotten faster" needs forgetting on both sides: a rising retainability (decay <= 0) has no speed
    # of forgetting to compare
    compared = None not in (dup_a, par_a) and dup_a > 0 and par_a > 0
    return _finding(
        "duplication_forgets_faster", "Chang et al. 2024", "duplication is forgotten faster than paraphrase",
        f"in arm '{reference}', mean decay constant over kinds: duplication > paraphrase; not checked when a "
        f"scenario has a kind whose fit has R^2 < {POWER_LAW_MIN_R2} (no power law), or when either scenario's mean "
        "decay is <= 0 (nothing forgotten)",
        {"duplication": dup_a, "paraphrase": par_a,
         "r_squared": {f"{s}/{k}": groups.get(f"{s}/{k}", {}).get("retainability", {}).get("fit", {}).get("r_squared")
                       for s in ("duplication", "paraphrase") for k in KINDS}},
        (dup_a > par_a) if compared else None)


def _zhu_improves_acquisition(results: dict, arm: str, claim: str) -> dict | None:
    """Zhu et al.'s finding for ``arm`` against the late arm; None (not listed) when the arm was not run."""
    if arm not in results.get("arms", {}):
        return None
    values, holds = _compare(results, "acquisition", arm, "late")
    return _finding(f"{arm.replace('late+', '').replace('+', '_')}_improves_acquisition",
                    "Zhu et al. 2025", f"{claim} improves knowledge acquisition",
                    f"acquisition of {arm} > late", values, holds)


def augment_improves_acquisition(results: dict) -> dict | None:
    """Zhu et al.: formatting augmentation improves knowledge acquisition (listed when late+augment ran)."""
    return _zhu_improves_acquisition(results, "late+augment", "formatting augmentation")


def sam_improves_acquisition(results: dict) -> dict | None:
    """Zhu et al.: SAM improves knowledge acquisition (listed when late+sam ran)."""
    return _zhu_improves_acquisition(results, "late+sam", "SAM")


def augment_sam_improves_acquisition(results: dict) -> dict | None:
    """Zhu et al.: augmentation and SAM together improve acquisition (listed when late+augment+sam ran)."""
    return _zhu_improves_acquisition(results, "late+augment+sam", "augmentation and SAM together")


# The papers' findings in the order results.json lists them: each a function results -> finding (or None where it
# does not apply to the run, e.g. an arm that was not run). A new finding is one function added here.
FINDINGS = (
    entropy_decays, last_layer_falls_most, late_acquires_less, late_forgets_more,
    resuscitation_improves_acquisition, resuscitation_improves_retention,
    injection_raises_log_prob, mem_gen_hard_gen_order, power_law_forgetting, duplication_more_effective,
    duplication_forgets_faster,
    augment_improves_acquisition, sam_improves_acquisition, augment_sam_improves_acquisition,
    *(functools.partial(landing, arm=arm) for arm in LANDING_ARMS),  # where the facts land, per arm
)


def assess(results: dict) -> list[dict]:
    """The findings list for a results dict (one seed's, as :func:`kacq_study.study.run_study` keeps them in
    ``per_seed``): every function of :data:`FINDINGS` that applies to the run."""
    return [f for f in (finding(results) for finding in FINDINGS) if f is not None]


def facts_are_learned(results: dict, arm: str) -> dict:
    """The regime check "facts are learned" for one arm: the injected facts' mean target log prob rises by at
    least :data:`LEARNED_MIN_RISE` nats over the arm, and by at least :data:`LEARNED_MARGIN` more than the
    never-injected control facts' (None when the arm has no learning record or no controls).

    >>> facts_are_learned({"arms": {"late": {"learning": {"injected": {"rise": 1.6}, "control": {"rise": 0.2}}}}},
    ...                   "late")["holds"]
    True
    """
    learning = results.get("arms", {}).get(arm, {}).get("learning") or {}
    injected = learning.get("injected", {}).get("rise")
    control = learning.get("control", {}).get("rise")
    holds = None
    if _number(injected) and _number(control):
        holds = injected >= LEARNED_MIN_RISE and injected >= control + LEARNED_MARGIN
    return _finding(
        f"facts_are_learned[{arm}]", "regime", f"the injected facts are learned in arm '{arm}'",
        f"the injected facts' mean target log prob rises >= {LEARNED_MIN_RISE} nats from the arm's start to its end, "
        f"and >= the never-injected control facts' rise + {LEARNED_MARGIN} nats",
        {"injected_rise": injected, "control_rise": control}, holds)


def loss_flattened(results: dict) -> dict:
    """The regime check "pretraining's loss has flattened": the mean loss over the last
    :data:`LOSS_FLAT_WINDOW` of the steps is within :data:`LOSS_FLAT_TOLERANCE` (relative) of the mean
    over the same number of steps before them.

    >>> loss_flattened({"pretraining": {"loss": [9.0] * 80 + [3.02] * 10 + [3.0] * 10}})["holds"]
    True
    """
    losses = list(results.get("pretraining", {}).get("loss") or [])
    window = max(1, round(LOSS_FLAT_WINDOW * len(losses)))
    values: dict[str, Any] = {"last": None, "before": None, "relative_change": None}
    holds = None
    # a None or NaN loss (a diverged step) leaves the check open: a loss curve with holes is not flat
    if len(losses) >= 2 * window and _numbers(losses[-2 * window:]):
        last, before = mean(losses[-window:]), mean(losses[-2 * window:-window])
        change = (last - before) / abs(before) if before else None
        values = {"last": last, "before": before, "relative_change": change}
        holds = abs(change) <= LOSS_FLAT_TOLERANCE if change is not None else None
    return _finding(
        "loss_flattened", "regime", "pretraining ran until its loss curve flattened",
        f"the mean training loss over the last {LOSS_FLAT_WINDOW:.0%} of pretraining steps is within "
        f"{LOSS_FLAT_TOLERANCE:.0%} of the mean over the {LOSS_FLAT_WINDOW:.0%} before them",
        values, holds)


def entropy_decayed_before_late(results: dict) -> dict | None:
    """The regime check of a run whose checkpoints were chosen from its entropy curve (``checkpoint_rule="peak"``):
    entropy decayed after the peak (the early checkpoint) before the late checkpoint, by the rule's own criterion
    (:func:`kacq_study.pipeline.entropy_peak`). None for a run with fixed checkpoints (no such check).

    >>> rule = {"peak_step": 300, "late_step": 900, "fall_after_peak": 0.05, "noise": 0.005, "noise_multiple": 3.0,
    ...         "decays": True}
    >>> entropy_decayed_before_late({"pretraining": {"checkpoint_rule": rule}})["holds"]
    True
    """
    rule = results.get("pretraining", {}).get("checkpoint_rule")
    if not rule:
        return None
    values = {k: rule.get(k) for k in ("peak_step", "late_step", "fall_after_peak", "noise", "measurements_after_peak")}
    return _finding(
        "entropy_decayed_before_late", "regime",
        "knowledge entropy peaked and decayed during pretraining before the late checkpoint",
        f"the total entropy at the late checkpoint (the last step) is below its peak after the early collapse (the "
        f"early checkpoint) by more than {rule.get('noise_multiple')} times the step-to-step noise of the curve from "
        "the peak on, with at least three measurements after the peak",
        # too few measurements after the peak (a peak at the end: entropy still climbing) is no decay, not "unchecked"
        values, rule.get("decays") is True)


def regime(results: dict) -> list[dict]:
    """The regime checks (not the papers' findings): pretraining flattened, entropy decayed before the late
    checkpoint (runs whose checkpoints the entropy curve chose), and each arm learned its facts."""
    decayed = entropy_decayed_before_late(results)
    return [loss_flattened(results), *([decayed] if decayed is not None else []),
            *(facts_are_learned(results, arm) for arm in results.get("arms", {}))]


def spread(values) -> dict:
    """Mean, min and max over the finite numbers of ``values`` (one per seed; None where a seed has none),
    with the values themselves.

    >>> spread([1.0, None, 3.0])
    {'mean': 2.0, 'min': 1.0, 'max': 3.0, 'values': [1.0, None, 3.0]}
    """
    values = [v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
              for v in values]
    finite = [v for v in values if v is not None]
    return {"mean": mean(finite) if finite else None, "min": min(finite) if finite else None,
            "max": max(finite) if finite else None, "values": values}


def combine(trees: list) -> Any:
    """Numbers at the same place in every tree (dicts by key, lists by index) become their :func:`spread`;
    strings and booleans are kept when equal across trees (None otherwise). A key or index missing from a
    tree counts as None there.

    >>> combine([{"a": [1, 2], "b": "x"}, {"a": [3, 4], "b": "x"}])["a"][1]["mean"]
    3
    """
    present = [t for t in trees if t is not None]
    if not present:
        return None
    if all(isinstance(t, dict) for t in present):
        keys = list(dict.fromkeys(k for t in present for k in t))
        return {k: combine([t.get(k) if isinstance(t, dict) else None for t in trees]) for k in keys}
    if all(isinstance(t, (list, tuple)) for t in present):
        size = max(len(t) for t in present)
        return [combine([t[i] if isinstance(t, (list, tuple)) and i < len(t) else None for t in trees])
                for i in range(size)]
    if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in present):
        return spread(trees)
    return present[0] if all(t == present[0] for t in present) and len(present) == len(trees) else None


def combine_findings(per_seed: list[list[dict]]) -> list[dict]:
    """One finding per id over seeds: held for k of n seeds, checked for m; it reproduces only if it held for
    every seed (a seed where it could not be checked counts as not held). ``values`` combines the seeds'
    values with :func:`combine`; the criterion is the first seed's (the same code for every seed)."""
    n = len(per_seed)
    by_id: dict[str, list] = {}
    for s, found in enumerate(per_seed):
        for f in found:
            by_id.setdefault(f["id"], [None] * n)[s] = f
    out = []
    for key, seeds in by_id.items():
        first = next(f for f in seeds if f is not None)
        verdicts = [f["holds"] if f is not None else None for f in seeds]
        held = sum(v is True for v in verdicts)
        out.append({"id": key, "paper": first["paper"], "claim": first["claim"], "criterion": first["criterion"],
                    "held": held, "checked": sum(v is not None for v in verdicts), "seeds": n,
                    "per_seed": verdicts, "values": combine([f["values"] if f else None for f in seeds]),
                    "reproduces": n > 0 and held == n})
    return out


def summarize(findings: list[dict]) -> dict[str, Any]:
    """Counts of findings that hold, do not hold, and could not be checked (for combined findings: reproduced
    = held for every seed, not checked = checked for no seed, not reproduced = the rest)."""
    if findings and "reproduces" in findings[0]:
        reproduced = sum(f["reproduces"] for f in findings)
        unchecked = sum(f["checked"] == 0 for f in findings)
        return {"reproduced": reproduced, "not_reproduced": len(findings) - reproduced - unchecked,
                "not_checked": unchecked}
    return {"reproduced": sum(f["holds"] is True for f in findings),
            "not_reproduced": sum(f["holds"] is False for f in findings),
            "not_checked": sum(f["holds"] is None for f in findings)}
