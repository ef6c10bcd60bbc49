"""Paired comparisons for the convergence report (issue 15): every difference is taken between two
runs of the same seed (same split, client sampling and client shuffling), and reported as the mean
paired difference with its standard deviation and n; a difference whose |mean| is within 2 standard
deviations is flagged (5 seeds are needed before calling it either way). Also rounds to target by a
3-round moving average, and the per-cell tables of presets with regime cells."""

from __future__ import annotations

import statistics
from typing import Any

from _common import markdown_table

REFERENCES = ("zero_padding", "replication", "flexlora", "stacking")
"""What every other strategy of a cell is compared with (those the cell runs)."""
WINDOW = 3
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table)."""


def ci95_half_width(std: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean of ``n`` paired differences (t, n - 1 df)."""
    return T_95.get(n - 1, 1.96) * std / n**0.5


def moving_average(curve: list[float], window: int = WINDOW) -> list[float]:
    """Trailing moving average; the first ``window - 1`` rounds average the rounds so far."""
    return [statistics.fmean(curve[max(0, i - window + 1) : i + 1]) for i in range(len(curve))]


def rounds_to_stay(curve: list[float], target: float, window: int = WINDOW) -> int | None:
    """The first round from which the moving average stays at or above ``target`` until the last
    round (``None``: it never does, or drops below again)."""
    ma = moving_average(curve, window)
    below = [i for i, x in enumerate(ma) if x < target]
    first = (below[-1] + 1) if below else 0
    return first + 1 if first < len(ma) else None


def _auc(run: dict[str, Any]) -> float:
    return statistics.fmean(x["accuracy"] for x in run["rounds"])


def paired(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``a - b`` over the seeds both completed: AUC and final accuracy, each with per-seed values,
    mean, std (n - 1), n, and whether |mean| is within 2 std (``None`` with n < 2)."""
    ref = {r["seed"]: r for r in runs_b if r["complete"]}
    pairs = [(r, ref[r["seed"]]) for r in runs_a if r["complete"] and r["seed"] in ref]
    if not pairs:
        return None
    out: dict[str, Any] = {"seeds": [a["seed"] for a, _ in pairs], "n": len(pairs)}
    for key, value in (("auc", _auc), ("final", lambda r: r["final_test"]["accuracy"])):
        diffs = [value(a) - value(b) for a, b in pairs]
        mean = statistics.fmean(diffs)
        std = statistics.stdev(diffs) if len(diffs) > 1 else None
        half = None if std is None else ci95_half_width(std, len(diffs))
        out[key] = {
            "per_seed": diffs,
            "mean": mean,
            "std": std,
            "within_2_std": None if std is None else abs(mean) <= 2 * std,
            "ci95": None if half is None else [mean - half, mean + half],
            "ci95_excludes_zero": None if half is None else abs(mean) > half,
            "same_sign": sum(d > 0 for d in diffs) if mean > 0 else sum(d < 0 for d in diffs),
        }
    return out


def cell_of(label: str) -> str:
    return label.partition("@")[2]


def strategy_of(label: str) -> str:
    return label.partition("@")[0]


def paired_all(preset: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every label against every reference strategy of its own cell: ``{"a - b": paired(...)}``."""
    by_label = {lb: [r for r in runs.values() if r["strategy"] == lb] for lb in preset["strategies"]}
    out = {}
    for a in preset["strategies"]:
        for ref in REFERENCES:
            b = next(
                (lb for lb in preset["strategies"] if strategy_of(lb) == ref and cell_of(lb) == cell_of(a)),
                None,
            )
            if (
                b is None
                or b == a
                or (
                    strategy_of(a) in REFERENCES and REFERENCES.index(strategy_of(a)) <= REFERENCES.index(ref)
                )
            ):
                continue
            result = paired(by_label[a], by_label[b])
            if result is not None:
                out[f"{a} - {b}"] = {"a": a, "b": b, **result}
    return out


def _pm(v: dict[str, Any]) -> str:
    if v["std"] is None:
        return f"{100 * v['mean']:+.2f} (n=1)"
    flag = " (within 2 std)" if v["within_2_std"] else ""
    return f"{100 * v['mean']:+.2f} ± {100 * v['std']:.2f}{flag}"


def _ci(v: dict[str, Any]) -> str:
    if not v.get("ci95"):
        return "-"
    text = f"[{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}]"
    return f"**{text}**" if v["ci95_excludes_zero"] else text


def paired_section(report: dict[str, Any]) -> list[str]:
    """The page's paired differences, cell by cell."""
    comparisons = report["summary"].get("paired") or {}
    if not comparisons:
        return []
    lines = [
        "",
        "### Paired differences (same seed), mean ± std over seeds, in accuracy points",
        "",
        "`a - b` per seed, then the mean and standard deviation of those differences; *(within 2 std)*: "
        "|mean| <= 2 std, not distinguishable from zero at this n (the issue asks for 5 seeds there). "
        "95% CI: of the mean paired difference (Student's t, n - 1 degrees of freedom); **bold** where it "
        "excludes zero, the test this page's claims rest on. "
        "AUC: mean accuracy over all rounds on the fixed per-round rows; final: the final test.",
        "",
    ]
    rows = [
        [
            f"`{v['a']}` - `{v['b']}`",
            v["n"],
            _pm(v["auc"]),
            _ci(v["auc"]),
            f"{v['auc']['same_sign']}/{v['n']}",
            _pm(v["final"]),
            _ci(v["final"]),
            ", ".join(f"{100 * d:+.1f}" for d in v["auc"]["per_seed"]),
        ]
        for v in comparisons.values()
    ]
    header = [
        "comparison",
        "n",
        "AUC diff",
        "AUC 95% CI",
        "seeds agreeing in sign",
        "final diff",
        "final 95% CI",
        "AUC diff per seed",
    ]
    return lines + [markdown_table(header, rows)]


def cells_section(preset: dict[str, Any]) -> list[str]:
    """What each regime cell changes against the preset's settings."""
    cells = preset.get("cells") or {}
    if not cells:
        return []
    rows = [
        [f"`{name}`", ", ".join(f"{k} = {v}" for k, v in over.items()) or "(the preset as written)"]
        for name, over in cells.items()
    ]
    note = (
        "Every run is `<strategy>@<cell>`: the cell's settings replace those above (learning rate, ranks, "
        "clients...); the rank-slot and diagnostic sections below use each cell's own low and high rank."
    )
    return ["", "### Regime cells", "", note, "", markdown_table(["cell", "overrides"], rows), ""]


def per_seed_curves(report: dict[str, Any]) -> list[str]:
    """Every run's accuracy on the fixed rows, round by round (the full record behind the means)."""
    runs = [r for r in report["runs"].values() if r["rounds"]]
    if not runs:
        return []
    n = max(len(r["rounds"]) for r in runs)
    rows = [
        [
            f"`{r['strategy']}`",
            r["seed"],
            *[f"{100 * x['accuracy']:.1f}" for x in r["rounds"]],
            *[""] * (n - len(r["rounds"])),
        ]
        for r in sorted(runs, key=lambda r: (r["strategy"], r["seed"]))
    ]
    return [
        "",
        "### Accuracy per round, every run (%, fixed per-round rows)",
        "",
        markdown_table(["run", "seed", *[str(i + 1) for i in range(n)]], rows),
    ]


def subset_summary(sibling: dict[str, Any]) -> dict[str, Any]:
    """What the page of a GPU preset shows of its CPU subset's JSON (``<preset>_cpu``): the subset's
    settings, its per-strategy AUC and final accuracy, and its paired differences."""
    p = sibling["preset"]
    return {
        "name": p["name"],
        "settings": {
            k: p.get(k)
            for k in ("rounds", "seeds", "eval_samples", "final_eval_samples", "diagnostic_samples", "cells")
        },
        "strategies": {
            k: {
                "seeds": v["seeds_complete"],
                "auc": v["auc"],
                "final": v["final_test"],
                "rounds_to_target": v["rounds_to_target"],
            }
            for k, v in sibling["summary"]["strategies"].items()
            if "auc" in v
        },
        "paired": sibling["summary"].get("paired") or {},
        "runs_complete": sorted(k for k, r in sibling["runs"].items() if r["complete"]),
    }


def subset_section(report: dict[str, Any]) -> list[str]:
    """The CPU subset's figures on the GPU preset's page (``report["cpu_subset"]``)."""
    sub = report.get("cpu_subset")
    if not sub:
        return []
    st = sub["settings"]
    lines = [
        "",
        f"## What the CPU subset `{sub['name']}` measured so far",
        "",
        f"From `convergence_{sub['name']}.json` (page `convergence_{sub['name']}.md`): cells {list(st['cells'] or ['(none)'])}, "
        f"{st['rounds']} rounds, seeds {st['seeds']}, every round on the first {st['eval_samples']} test rows "
        f"(final accuracy: the last round's, on those rows). Runs complete: {', '.join(sub['runs_complete']) or 'none'}.",
        "",
    ]
    rows = [
        [
            f"`{k}`",
            len(v["seeds"]),
            f"{100 * v['auc']['mean']:.1f}"
            + (f" ± {100 * v['auc']['std']:.1f}" if len(v["seeds"]) > 1 else ""),
            f"{100 * v['final']['mean']:.1f}"
            + (f" ± {100 * v['final']['std']:.1f}" if len(v["seeds"]) > 1 else ""),
        ]
        for k, v in sub["strategies"].items()
    ]
    lines.append(markdown_table(["strategy@cell", "seeds", "AUC %", "final %"], rows))
    return lines + paired_section({"summary": {"paired": sub["paired"]}}) + [""]
