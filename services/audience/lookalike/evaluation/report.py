"""The evaluation table and its summary, as printed by ``bench/lookalike_eval.py``.

Per target: one line per method (AUC with its 95% bootstrap interval, lift at each reach), then
flashcrowd's paired difference to each baseline and its stability across fit seeds. The summary
gives, per data set and overall: mean AUC per method, the mean of flashcrowd minus the better
baseline, how many targets are significantly below the better baseline (95% interval of the paired
difference entirely below 0) and above both, and the largest AUC range across fit seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.audience.lookalike.evaluation.metrics import Interval
from services.audience.lookalike.evaluation.protocol import BASELINES, METHODS, REACHES, TargetResult

__all__ = ["format_summary", "format_table"]


def _iv(iv: Interval, signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    return f"{iv.estimate:{fmt}} [{iv.low:{fmt}}, {iv.high:{fmt}}]"


def format_table(results: Sequence[TargetResult]) -> str:
    lifts = "".join(f" {'lift@' + format(r, '.0%'):>8}" for r in REACHES)
    head = f"{'target':<30} {'pos':>5} {'seed':>5} {'hidden':>6} {'ranked':>6}  {'method':<10} "
    head += f"{'AUC [95% CI]':<22}{lifts}"
    lines = [head, "-" * len(head)]
    for res in results:
        for i, method in enumerate(METHODS):
            left = (
                f"{res.target.name[:30]:<30} {res.seed + res.hidden:>5} {res.seed:>5} {res.hidden:>6} "
                f"{res.ranked:>6}"
                if i == 0
                else " " * 56
            )
            row = "".join(f" {res.lift[method][r]:>7.2f}x" for r in REACHES)
            lines.append(f"{left}  {method:<10} {_iv(res.auc[method]):<22}{row}")
        diffs = ", ".join(f"{b} {_iv(res.diff[b], True)}" for b in BASELINES)
        verdict = "BELOW best baseline" if res.significantly_below_best else "not below best baseline"
        if res.above_both:
            verdict += ", above both"
        stab = np.array(res.stability)
        notes = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.notes.items())
        lines.append(f"{'':<58}flashcrowd − {diffs}: {verdict}")
        lines.append(
            f"{'':<58}stability over {len(stab)} fit seeds: AUC {np.nanmin(stab):.3f}-{np.nanmax(stab):.3f} "
            f"(range {res.stability_range:.3f}, sd {np.nanstd(stab):.3f}){'; ' + notes if notes else ''}"
        )
        lines.append("")
    return "\n".join(lines)


def format_summary(results: Sequence[TargetResult]) -> str:
    groups: dict[str, list[TargetResult]] = {}
    for res in results:
        groups.setdefault(res.dataset, []).append(res)
    if len(groups) > 1:
        groups["all"] = list(results)
    head = f"{'data set':<20} {'targets':>7} " + "".join(f" {m:>10}" for m in METHODS)
    head += f" {'fc−best':>8} {'below':>6} {'above both':>10} {'max range':>9}"
    lines = ["mean AUC per method; fc−best = mean of flashcrowd minus the better baseline per target;",
             "below = targets significantly below the better baseline (paired bootstrap 95%);",
             "max range = largest flashcrowd AUC range across fit seeds", head, "-" * len(head)]  # fmt: skip
    for name, group in groups.items():
        means = "".join(f" {np.mean([r.auc[m].estimate for r in group]):>10.3f}" for m in METHODS)
        diff = np.mean([r.diff["best"].estimate for r in group])
        below = sum(r.significantly_below_best for r in group)
        above = sum(r.above_both for r in group)
        worst = max(r.stability_range for r in group)
        lines.append(f"{name:<20} {len(group):>7} {means} {diff:>+8.3f} {below:>6} {above:>10} {worst:>9.3f}")
    return "\n".join(lines)
