"""The default run's verdicts as README.md and docs/findings.md publish them, generated from a results.json.

The published text lives between markers in those files::

    <!-- published from results.json: NAME -->
    ...generated text...
    <!-- end published -->

where NAME is one of :data:`BLOCKS`. :func:`update` rewrites every marked block from a results dict and
:func:`differences` lists the blocks whose text a results dict would change, so the published verdicts cannot
drift from a run: a test regenerates them from the committed ``docs/demo_results.json``, and

    python -m kacq_study.published runs/demo/results.json --check   # exit 1 when the published text differs
    python -m kacq_study.published runs/demo/results.json --write   # rewrite the blocks (and keep a copy)

compares (or rewrites) them against a fresh run. The decay regime's study (``kacq demo --regime decay``) has blocks of
its own, marked ``<!-- published from decay results.json: NAME -->`` and generated from ``docs/demo_decay_results.json``;
the same commands given its results.json check or rewrite those blocks only.

Beside each verdict the text gives every seed's margin to the finding's criterion (how far the compared
numbers were from flipping it) and marks the verdict *fragile* when some seed's margin is no larger than the
spread of the margins across seeds (their range, the run-to-run variation this study measures): a rerun with
other seeds, or the same seeds on a CPU whose arithmetic rounds differently, may well change that seed's
verdict and with it the count of seeds the finding held for.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from kacq_hooks.errors import UnknownKeyError

from .findings import (DECAY_NOISE_MULTIPLE, KINDS, LANDING_MARGIN, LEARNED_MARGIN, LEARNED_MIN_RISE, LOSS_FLAT_TOLERANCE,
                       POWER_LAW_MIN_R2)
from .output import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
FILES = ("README.md", "docs/findings.md")
COPY = "docs/demo_results.json"  # the committed results.json the published text is generated from
START = "<!-- published from results.json: {name} -->"
END = "<!-- end published -->"
# The decay regime's study (`kacq demo --regime decay`) is published apart, from its own committed results, in blocks
# that name it: a results.json updates only the blocks of its own study (told by its config's checkpoint rule)
DECAY_FILES = ("docs/findings.md",)
DECAY_COPY = "docs/demo_decay_results.json"
DECAY_START = "<!-- published from decay results.json: {name} -->"
_SOURCES = {"results.json": "default", "decay results.json": "decay"}


def _n(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _spread(value, digits: int = 3) -> str:
    """A spread over seeds as "mean (min to max)"; "n/a" when no seed has the number."""
    if not isinstance(value, dict) or value.get("mean") is None:
        return "n/a"
    if value["min"] == value["max"]:
        return _n(value["mean"], digits)
    return f"{_n(value['mean'], digits)} ({_n(value['min'], digits)} to {_n(value['max'], digits)})"


def _values(value) -> list:
    """The per-seed numbers of a spread (None where a seed has none)."""
    return list(value["values"]) if isinstance(value, dict) and "values" in value else []


def _minus(a, b, offset: float = 0.0) -> list:
    return [x - y - offset if x is not None and y is not None else None for x, y in zip(_values(a), _values(b))]


def _lowest(columns: list[list]) -> list:
    """Per seed, the smallest of several margins (None when one is missing)."""
    return [None if None in seed else min(seed) for seed in zip(*columns)] if columns else []


def _power_law_margin(v: dict) -> list:
    """The nearer of the criterion's two bounds, both as shares: the share of groups decaying by a power law
    beyond one half, and the median R^2 beyond POWER_LAW_MIN_R2."""
    decaying, groups = _values(v.get("groups_decaying")), _values(v.get("groups"))
    r2 = [_values(s) for s in v.get("r_squared", {}).values()]
    out = []
    for seed, (d, g) in enumerate(zip(decaying, groups)):
        fitted = sorted(x[seed] for x in r2 if seed < len(x) and x[seed] is not None)
        if d is None or g is None or not fitted:
            out.append(None)
            continue
        median_r2 = (fitted[(len(fitted) - 1) // 2] + fitted[len(fitted) // 2]) / 2
        out.append(min(d / g - 0.5, median_r2 - POWER_LAW_MIN_R2) if g else None)
    return out


def _compare_margin(higher: str, lower: str) -> Callable[[dict], list]:
    return lambda v: _minus(v.get(higher), v.get(lower))


# Per finding id (its stem before "[arm]"), each seed's margin to the criterion: > 0 where the criterion holds
# by that much, < 0 where it fails by that much (the first condition of a criterion with several)
MARGINS: dict[str, Callable[[dict], list]] = {
    "entropy_decays": lambda v: [None if s is None else -0.5 - s for s in _values(v.get("spearman"))],
    "last_layer_falls_most": lambda v: _lowest(
        [[d for d in _values(v["drop_per_layer"][-1])]]
        + [_minus(v["drop_per_layer"][-1], other) for other in v["drop_per_layer"][:-1]]) if v.get("drop_per_layer")
    else [],
    "late_acquires_less": _compare_margin("acquisition[early]", "acquisition[late]"),
    "late_forgets_more": _compare_margin("forgetting[late]", "forgetting[early]"),
    "resuscitation_improves_acquisition": _compare_margin("acquisition[late+resuscitation]", "acquisition[late]"),
    "resuscitation_improves_retention": _compare_margin("retention[late+resuscitation]", "retention[late]"),
    "injection_raises_log_prob": lambda v: _lowest(
        [[None if x is None else x - 0.5 for x in _values(f)] for f in v.get("positive_fraction", {}).values()]),
    "mem_gen_hard_gen_order": lambda v: _lowest([_minus(v["effectivity"]["mem"], v["effectivity"]["gen"]),
                                                 _minus(v["effectivity"]["gen"], v["effectivity"]["hard_gen"])]),
    "power_law_forgetting": lambda v: _power_law_margin(v),
    "duplication_more_effective": _compare_margin("duplication", "paraphrase"),
    "duplication_forgets_faster": _compare_margin("duplication", "paraphrase"),
    "facts_land_in_low_activity_slots": lambda v: _minus(v.get("share_end"), v.get("chance"), LANDING_MARGIN),
    "augment_improves_acquisition": _compare_margin("acquisition[late+augment]", "acquisition[late]"),
    "sam_improves_acquisition": _compare_margin("acquisition[late+sam]", "acquisition[late]"),
    "augment_sam_improves_acquisition": _compare_margin("acquisition[late+augment+sam]", "acquisition[late]"),
}


def margins(finding: dict) -> list:
    """Each seed's margin to a combined finding's criterion (see :data:`MARGINS`); [] where none is defined."""
    rule = MARGINS.get(finding["id"].split("[", 1)[0])
    if rule is None:
        return []
    # a seed where the finding was not checked has no margin (its premise is absent, e.g. nothing was forgotten)
    return [None if verdict is None else m for m, verdict in zip(rule(finding["values"]), finding["per_seed"])]


def fragile(finding: dict) -> bool:
    """Whether a seed's verdict is within the seeds' spread: the smallest margin (in size) is no larger than the
    margins' range across seeds (a finding checked in fewer than two seeds has no spread and counts as fragile)."""
    measured = [m for m in margins(finding) if m is not None]
    if len(measured) < 2:
        return bool(measured)
    return min(abs(m) for m in measured) <= max(measured) - min(measured)


def _held(finding: dict) -> str:
    text = f"{finding['held']} of {finding['seeds']}"
    if finding["checked"] < finding["seeds"]:
        text += f", checked in {finding['checked']}"
    return text


def _margin_text(finding: dict) -> str:
    measured = margins(finding)
    if not any(m is not None for m in measured):
        return ""
    text = "margin per seed " + ", ".join(_n(m) for m in measured)
    return text + ("; **fragile**: within the seeds' spread" if fragile(finding) else "")


# What each finding's line shows of its values (the criterion itself is in findings.py and report.md)
def _detail(finding: dict) -> str:
    v, stem = finding["values"], finding["id"].split("[", 1)[0]
    if stem == "entropy_decays":
        return (f"total entropy from {_spread(v['first'], 2)} at step {_spread(v['from_step'], 0)} to "
                f"{_spread(v['last'], 2)}, Spearman {_spread(v['spearman'], 2)}")
    if stem == "last_layer_falls_most":
        return "drop per layer " + ", ".join(_spread(d) for d in v["drop_per_layer"])
    if stem == "injection_raises_log_prob":
        means = [f["mean"] for f in v["positive_fraction"].values() if f.get("mean") is not None]
        return f"lowest group's share of positive effectivities {_n(min(means)) if means else 'n/a'}"
    if stem == "mem_gen_hard_gen_order":
        return "effectivity " + ", ".join(f"{kind} {_spread(v['effectivity'].get(kind))}" for kind in KINDS)
    if stem == "power_law_forgetting":
        r2 = [s["mean"] for s in v["r_squared"].values() if s.get("mean") is not None]
        return (f"{_spread(v['groups_decaying'], 1)} of {_spread(v['groups'], 0)} groups decay by a power law "
                f"(R^2 >= {POWER_LAW_MIN_R2}); median over groups of the mean R^2 "
                f"{_n(sorted(r2)[len(r2) // 2]) if r2 else 'n/a'}")
    if stem == "duplication_forgets_faster":
        return f"mean decay duplication {_spread(v['duplication'])} vs paraphrase {_spread(v['paraphrase'])}"
    if stem == "duplication_more_effective":
        return f"effectivity duplication {_spread(v['duplication'])} vs paraphrase {_spread(v['paraphrase'])}"
    if stem == "facts_land_in_low_activity_slots":
        return (f"{_spread(v['share_end'])} of the top slots low-activity at the end against chance "
                f"{_spread(v['chance'], 2)} (+ {LANDING_MARGIN}); {_spread(v.get('share_start'))} at the arm's start")
    numbers = [(k, s) for k, s in v.items() if isinstance(s, dict) and "mean" in s]
    return " vs ".join(f"{k} {_spread(s)}" for k, s in numbers)


def finding_line(finding: dict) -> str:
    parts = [f"held for {_held(finding)} seeds", _detail(finding), _margin_text(finding)]
    return f"- {finding['claim']} ({finding['paper']}): " + "; ".join(p for p in parts if p) + "."


def _regime_line(check: dict) -> str:
    v = check["values"]
    if check["id"] == "entropy_decayed_before_late":
        detail = (f"peak (early checkpoint) at step {_spread(v['peak_step'], 0)}, fall to the late checkpoint "
                  f"{_spread(v['fall_after_peak'], 4)} nats against step-to-step noise {_spread(v['noise'], 4)} "
                  f"(passes above {DECAY_NOISE_MULTIPLE:g}x the noise)")
    elif check["id"] == "loss_flattened":
        detail = (f"relative change of the mean loss over the last tenth of pretraining "
                  f"{_spread(v['relative_change'], 4)} (within {LOSS_FLAT_TOLERANCE:.0%} passes)")
    else:
        detail = (f"injected facts' rise {_spread(v['injected_rise'], 2)} nats/token against "
                  f"{_spread(v['control_rise'], 2)} for never-injected facts (passes at >= {LEARNED_MIN_RISE} and "
                  f">= control + {LEARNED_MARGIN})")
    return f"- {check['claim']}: passed for {check['held']} of {check['seeds']} seeds; {detail}."


def _groups(findings: list[dict]) -> list[tuple[str, list[dict]]]:
    every = [f for f in findings if f["reproduces"]]
    some = [f for f in findings if not f["reproduces"] and f["held"] > 0]
    none = [f for f in findings if f["held"] == 0 and f["checked"] > 0]
    unchecked = [f for f in findings if f["checked"] == 0]
    return [("Reproduce (every seed)", every), ("Hold for some seeds only", some),
            ("Do not reproduce (no seed)", none), ("Not checked (no seed had what the criterion needs)", unchecked)]


def readme_findings(results: dict) -> str:
    """The README's list: regime checks, then the findings grouped by how many seeds they held for."""
    seeds = ", ".join(map(str, results["seeds"]))
    lines = [f"Seeds {seeds}; each number is the mean over seeds with the range in parentheses.", "",
             "**Regime checks**:", ""]
    lines += [_regime_line(c) for c in results["regime"]]
    for title, found in _groups(results["findings"]):
        if found:
            lines += ["", f"**{title}**:", ""] + [finding_line(f) for f in found]
    return "\n".join(lines)


def findings_table(results: dict) -> str:
    """docs/findings.md's table: every finding with the seeds it held for, most first."""
    n = len(results["seeds"])
    order = sorted(results["findings"], key=lambda f: (-f["held"], -f["checked"]))
    lines = [f"| finding | paper | seeds held (of {n}) | seeds checked | within the seeds' spread |",
             "|---|---|---|---|---|"]
    for f in order:
        lines.append(f"| {f['claim']} | {f['paper'].rsplit(' ', 1)[0]} | {f['held']} | {f['checked']} | "
                     f"{'fragile' if fragile(f) else ''} |")
    regime = results["regime"]
    passed = all(c["held"] == c["seeds"] for c in regime)
    counts = ", ".join(f"{c['id']} {c['held']} of {c['seeds']}" for c in regime)
    verdict = "every check passed for every seed" if passed else "not every check passed"
    lines += ["", f"Regime checks: {verdict} ({counts}). A verdict is *fragile* when some seed's margin to the "
              "criterion is no larger than the spread (range) of the margins across seeds."]
    return "\n".join(lines)


def finding_lines(results: dict, ids: Sequence[str]) -> str:
    """The published line of each finding in ``ids`` (as :func:`readme_findings` writes it), in that order."""
    by_id = {f["id"]: f for f in results["findings"]}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise UnknownKeyError(f"no finding {unknown} in this results.json; it has {sorted(by_id)}")
    return "\n".join(finding_line(by_id[i]) for i in ids)


# The blocks by name; "findings:ID,ID" is the lines of those findings (docs/findings.md's sections)
BLOCKS: dict[str, Callable[[dict], str]] = {"readme-findings": readme_findings, "findings-table": findings_table}
_BLOCK = re.compile(r"<!-- published from (?P<source>results\.json|decay results\.json): (?P<name>\S+) -->"
                    r"\n(?P<body>.*?)\n?" + re.escape(END), re.S)


def study_of(results: dict) -> str:
    """Which study a results dict is: "decay" (its checkpoints chosen by the entropy peak) or "default"."""
    return "decay" if (results.get("config") or {}).get("checkpoint_rule") == "peak" else "default"


def files_of(results: dict) -> tuple[str, ...]:
    return DECAY_FILES if study_of(results) == "decay" else FILES


def copy_of(results: dict) -> str:
    return DECAY_COPY if study_of(results) == "decay" else COPY


def _start(source: str, name: str) -> str:
    return (DECAY_START if _SOURCES[source] == "decay" else START).format(name=name)


def render(name: str, results: dict) -> str:
    """The text of block ``name`` for ``results``."""
    if name.startswith("findings:"):
        return finding_lines(results, name.split(":", 1)[1].split(","))
    if name not in BLOCKS:
        raise UnknownKeyError(f"unknown published block {name!r}; use one of {sorted(BLOCKS)} or findings:ID,ID")
    return BLOCKS[name](results)


def update(text: str, results: dict) -> str:
    """``text`` with every marked block of ``results``' study regenerated from ``results`` (the other study's
    blocks as they are)."""
    study = study_of(results)

    def block(m: re.Match) -> str:
        if _SOURCES[m["source"]] != study:
            return m[0]
        return f"{_start(m['source'], m['name'])}\n{render(m['name'], results)}\n{END}"

    return _BLOCK.sub(block, text)


def differences(results: dict, root: Path = ROOT, files: Sequence[str] | None = None) -> list[str]:
    """The files (with the block names) whose published text ``results`` would change; [] when they agree.
    Only the blocks of ``results``' study are compared (:func:`study_of`); a file that holds none of them is
    reported too: the check would otherwise pass on nothing."""
    out = []
    study = study_of(results)
    for name in files_of(results) if files is None else files:
        text = (Path(root) / name).read_text(encoding="utf-8")
        blocks = [m for m in _BLOCK.finditer(text) if _SOURCES[m["source"]] == study]
        if not blocks:
            out.append(f"{name}: no published block")
            continue
        changed = [m["name"] for m in blocks if m["body"] != render(m["name"], results)]
        if changed:
            out.append(f"{name}: {', '.join(changed)} differ")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kacq_study.published", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results.json of kacq demo (the default run, or --regime decay's, whose "
                        f"blocks and copy {DECAY_COPY} are its own)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="exit 1 when the published text differs")
    action.add_argument("--write", action="store_true", help=f"rewrite the published blocks and copy the results "
                        f"to {COPY} (or {DECAY_COPY})")
    parser.add_argument("--root", default=str(ROOT), help="the repository (default: this checkout)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    if "per_seed" not in results or "findings" not in results:
        parser.error(f"{args.results} is not a results.json of kacq demo (no per_seed / findings)")
    root = Path(args.root)
    if args.check:
        found = differences(results, root)
        for line in found:
            print(line)
        print("the published verdicts differ from this results.json" if found else "the published verdicts agree")
        return 1 if found else 0
    files, copy = files_of(results), copy_of(results)
    for name in files:
        path = root / name
        write_text_atomic(path, update(path.read_text(encoding="utf-8"), results))
    if Path(args.results).resolve() != (root / copy).resolve():
        shutil.copyfile(args.results, root / copy)
    print(f"rewrote the published blocks ({study_of(results)} study) of {', '.join(files)} and copied the results "
          f"to {copy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
