"""The convergence benchmark's report: per-strategy summaries over seeds (AUC, final test,
rounds to target, bytes, the post-aggregation diagnostic, paired differences against zero-padding),
the plots and the markdown page. Everything here works on the JSON (``convergence_<preset>.json``),
so the page can be rewritten from it alone."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import report_paired as rp
from _common import markdown_table, write_json


def run_name(strategy: str, seed: int) -> str:
    """The key of a (strategy, seed) run in the JSON, and its folder under ``<workdir>/<preset>/``."""
    return f"{strategy}-seed{seed}"


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def rounds_to(curve: list[float], target: float) -> int | None:
    """The first round from which the 3-round moving average stays at or above ``target``."""
    return rp.rounds_to_stay(curve, target)


def summarize_strategy(preset: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One strategy over its seeds (``preset`` as in the JSON): curves, AUC, final test, rounds to
    each target, bytes, the diagnostic and the high rank slots, from the complete runs."""
    full = [r for r in runs if r["complete"]]
    curves = [[x["accuracy"] for x in r["rounds"]] for r in full]
    out: dict[str, Any] = {
        "seeds_complete": [r["seed"] for r in full],
        "seeds_partial": [r["seed"] for r in runs if not r["complete"]],
    }
    if not full:
        return out
    per_round = list(zip(*curves))
    half = preset["rounds"] // 2
    auc = [_mean(c) for c in curves]
    late = [_mean(c[half:]) for c in curves]
    finals = [r["final_test"]["accuracy"] for r in full]
    last = [c[-1] for c in curves]
    up = [x["bytes_up"] / x["num_clients"] for r in full for x in r["rounds"]]
    down = [x["bytes_down"] / x["num_clients"] for r in full for x in r["rounds"]]
    cum = [r["rounds"][-1]["cumulative_bytes"] for r in full]
    diag = [d for r in full for d in r["diagnostic"]]
    out.update(
        {
            "curve_mean": [_mean(list(x)) for x in per_round],
            "curve_std": [_std(list(x)) for x in per_round],
            "curve_min": [min(x) for x in per_round],
            "curve_max": [max(x) for x in per_round],
            "cumulative_mb_mean": [
                _mean([r["rounds"][i]["cumulative_bytes"] / 1e6 for r in full]) for i in range(len(per_round))
            ],
            "auc": {"mean": _mean(auc), "std": _std(auc), "per_seed": auc},
            "auc_second_half": {
                "mean": _mean(late),
                "std": _std(late),
                "per_seed": late,
                "from_round": half + 1,
            },
            "last_round_subset": {"mean": _mean(last), "std": _std(last), "per_seed": last},
            "final_test": {
                "mean": _mean(finals),
                "std": _std(finals),
                "per_seed": finals,
                "num_examples": full[0]["final_test"]["num_examples"],
            },
            "rounds_to_target": {str(t): [rounds_to(c, t) for c in curves] for t in preset["targets"]},
            "best_round_accuracy": {
                "mean": _mean([max(c) for c in curves]),
                "per_seed": [max(c) for c in curves],
            },
            "bytes_up_per_client_round": _mean(up),
            "bytes_down_per_client_round": _mean(down),
            "cumulative_bytes": {"mean": _mean(cum), "per_seed": cum},
            "diagnostic": {
                "pairs": len(diag),
                "before_mean": _mean([d["before"] for d in diag]),
                "after_mean": _mean([d["after"] for d in diag]),
                "drop_mean": _mean([d["before"] - d["after"] for d in diag]),
                "worst_drop": max((d["before"] - d["after"] for d in diag), default=None),
                "first": diag[0] if diag else None,
            },
            "high_slot_share_last_round": _mean(
                [r["high_slots"]["share_per_round"][-1] for r in full if r.get("high_slots")]
            ),
            "high_slot_share_mean": _mean(
                [_mean(r["high_slots"]["share_per_round"]) for r in full if r.get("high_slots")]
            ),
            "high_slots_zero_from_round": [
                min(r["high_slots"]["zero_after_rounds"], default=None) for r in full if r.get("high_slots")
            ],
            "seconds_per_run": _mean(
                [
                    r["loop_seconds"] + (r["final_test_seconds"] or 0) + (r["diagnostic_seconds"] or 0)
                    for r in full
                ]
            ),
        }
    )
    return out


def summarize_all(preset: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every strategy's summary, the headline target and the paired differences against zero-padding."""
    by_strategy = {s: [r for r in runs.values() if r["strategy"] == s] for s in preset["strategies"]}
    strategies = {s: summarize_strategy(preset, rs) for s, rs in by_strategy.items()}
    scored = {s: v for s, v in strategies.items() if "auc" in v}
    summary: dict[str, Any] = {"strategies": strategies}
    if not scored:
        return summary
    best = max(scored, key=lambda s: scored[s]["auc"]["mean"])
    reached = [t for t in preset["targets"] if max(scored[best]["curve_mean"]) >= t]
    target = max(reached) if reached else None
    summary.update(
        best_by_auc=best,
        target=target,
        target_rule="the highest of the preset's targets that the best strategy's (by AUC) mean curve reaches",
    )
    if target is not None:
        for v in scored.values():
            hits = v["rounds_to_target"][str(target)]
            v["rounds_to_headline_target"] = {
                "per_seed": hits,
                "reached": sum(h is not None for h in hits),
                "mean_of_reached": _mean([h for h in hits if h is not None]),
            }
    # paired differences against zero-padding (same seed: same split, sampling and client shuffling)
    paired = {}
    ref = {r["seed"]: r for r in by_strategy.get("zero_padding", []) if r["complete"]}
    for s in scored:
        if s == "zero_padding":
            continue
        pairs = [(r, ref[r["seed"]]) for r in by_strategy[s] if r["complete"] and r["seed"] in ref]
        if not pairs:
            continue
        auc = [
            _mean([x["accuracy"] for x in a["rounds"]]) - _mean([x["accuracy"] for x in b["rounds"]])
            for a, b in pairs
        ]
        fin = [a["final_test"]["accuracy"] - b["final_test"]["accuracy"] for a, b in pairs]
        wins = [
            sum(x["accuracy"] > y["accuracy"] for x, y in zip(a["rounds"], b["rounds"])) for a, b in pairs
        ]
        paired[s] = {
            "seeds": [a["seed"] for a, _ in pairs],
            "auc_diff": auc,
            "auc_diff_mean": _mean(auc),
            "final_test_diff": fin,
            "final_test_diff_mean": _mean(fin),
            "rounds_ahead": wins,
            "rounds_compared": [len(a["rounds"]) for a, _ in pairs],
        }
    summary["paired_vs_zero_padding"] = paired
    summary["paired"] = rp.paired_all(preset, runs)
    return summary


def progress(preset: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rounds done and planned, and the time the rest needs at the measured pace."""
    done_rounds = [r["seconds"]["wall"] for run in runs.values() for r in run["rounds"]]
    planned = len(preset["strategies"]) * len(preset["seeds"]) * preset["rounds"]
    per_round = _mean(done_rounds)
    return {
        "rounds_done": len(done_rounds),
        "rounds_planned": planned,
        "seconds_per_round_mean": per_round,
        "estimated_remaining_minutes": None
        if per_round is None
        else round(per_round * (planned - len(done_rounds)) / 60, 1),
    }


def plot(preset: dict[str, Any], summary: dict[str, Any], out: Path) -> list[str]:
    """Accuracy by round and by traffic (mean over seeds, min-max band), written to ``out``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = []
    for kind in ("round", "bytes"):
        fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
        drawn = 0
        for s, v in summary["strategies"].items():
            if "curve_mean" not in v:
                continue
            x = list(range(1, len(v["curve_mean"]) + 1)) if kind == "round" else v["cumulative_mb_mean"]
            n = len(v["seeds_complete"])
            (line,) = ax.plot(x, v["curve_mean"], marker="o", markersize=3, label=f"{s} (n={n})")
            if n > 1:
                ax.fill_between(x, v["curve_min"], v["curve_max"], color=line.get_color(), alpha=0.15)
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set(
            xlabel="round" if kind == "round" else "cumulative MB communicated (up + down, all clients)",
            ylabel=f"accuracy on the first {preset['eval_samples']} test rows",
            title=f"AG News, MiniLM: accuracy by {'round' if kind == 'round' else 'traffic'} ({preset['name']})",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        name = f"convergence_{preset['name']}_{kind}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _p(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def _ms(v: dict | None, digits: int = 1) -> str:
    if not v or v.get("mean") is None:
        return "n/a"
    return (
        f"{_p(v['mean'], digits)} ± {_p(v['std'], digits)}"
        if len(v.get("per_seed", [])) > 1
        else _p(v["mean"], digits)
    )


def render_markdown(report: dict[str, Any]) -> str:
    """The results page, generated from the JSON (no hand-typed numbers)."""
    p, s, runs = report["preset"], report["summary"], report["runs"]
    m = report["machine"]
    complete = [k for k, r in runs.items() if r["complete"]]
    lines = [
        f"# Convergence benchmark, preset `{p['name']}`: replication vs zero-padding on AG News",
        "",
        "Generated by `benchmarks/bench_convergence.py` from `convergence_"
        f"{p['name']}.json`; do not edit by hand. Runs made by: "
        + ("; ".join(f"`{c}`" for c in report.get("run_commands", [])) or f"`{report['command']}`")
        + ".",
        "",
        f"**Runs complete: {len(complete)} of {len(p['strategies']) * len(p['seeds'])}** "
        f"({', '.join(complete) or 'none'}).",
    ]
    partial = [f"{k}: {r['status']}" for k, r in runs.items() if not r["complete"]]
    missing = [
        run_name(st, sd) for st in p["strategies"] for sd in p["seeds"] if run_name(st, sd) not in runs
    ]
    if partial:
        lines.append(f"Partial (not in the tables): {'; '.join(partial)}.")
    if missing:
        lines.append(f"Not started: {', '.join(missing)}.")
    if report.get("notes"):
        lines += ["", "Notes on how these runs were made:", ""] + [f"- {n}" for n in report["notes"]] + [""]
    prog = report.get("progress") or {}
    if prog.get("estimated_remaining_minutes"):
        lines.append(
            f"Progress: {prog['rounds_done']} of {prog['rounds_planned']} federated rounds done; at the "
            f"measured {prog['seconds_per_round_mean']:.0f} s per round the rest needs about "
            f"{prog['estimated_remaining_minutes']:.0f} more minutes on this machine (plus the final tests)."
        )
    lines += [
        f"Continue with `python benchmarks/bench_convergence.py --preset {p['name']} --resume`."
        if partial or missing
        else "",
        "",
        "## Setup",
        "",
        f"- Machine: {m['cpu_count']} CPU cores ({m['processor']}), {m.get('mem_total_gib')} GiB, torch {m['torch']}"
        + (f", transformers {m['transformers']}" if m.get("transformers") else "")
        + (
            f", GPU {m['accelerator']} (CUDA {m.get('cuda')}): local training and evaluation on the GPU"
            if m.get("accelerator")
            else f" with {m['torch_threads']} threads, no GPU"
        )
        + (f"; {m['jobs']} runs at a time" if (m.get("jobs") or 1) > 1 else "")
        + f". Load average when this invocation started: {', '.join(f'{x:.2f}' for x in m['load_average_at_start'] or [])}; "
        f"at the end: {', '.join(f'{x:.2f}' for x in report.get('load_average_at_end') or [])}."
        + (
            f" Devices the runs trained on: {', '.join(sorted(report['devices']))}."
            if report.get("devices")
            else ""
        ),
        f"- Compute time of the complete runs (federation loop + diagnostic + final test): "
        f"{report['compute_seconds_complete'] / 60:.1f} min in total; this invocation's wall time: "
        f"{report['invocation_seconds'] / 60:.1f} min.",
        "- Model: the embedded all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters)"
        + (f" with `{p['model_config_overrides']}`" if p["model_config_overrides"] else "")
        + f"; LoRA on query/value, alpha {p['lora_alpha']:g}, dropout 0.05; the classifier head is trained and averaged densely.",
        "- Data: `../shared/data/ag_news` (train 10,001 rows"
        + (f", subset of {p['max_train_samples']}" if p["max_train_samples"] else "")
        + f"; test 7,600), max length {p['max_seq_length']} tokens. Per-round accuracy: the first "
        f"{p['eval_samples']} rows of test.tsv (the same rows every round); final accuracy: "
        + (
            f"the first {p['final_eval_samples']} test rows."
            if p["final_eval_samples"]
            else "the full 7,600-row test set."
        ),
        f"- Federation: {p['num_clients']} clients (partition `high_quality`: {p['high_quality_fraction']:.0%} class-balanced, "
        f"Dirichlet({p['dirichlet_alpha']}) for the rest), {p['clients_per_round']} sampled per round, {p['rounds']} rounds, "
        f"{p['local_epochs']:g} local epoch(s) (batch {p['batch_size']}, AdamW lr {p['learning_rate']:g}, constant), seeds {list(p['seeds'])}.",
        (
            f"- Ranks: heterogeneous strategies start every client at rank {p['low_rank']}; in round "
            f"{p['upgrade_after_round']} every one of the {p['num_clients']} clients trains once and is scored on "
            f"{p['quality_eval_samples']} validation rows (only the sampled ones are aggregated), and the top "
            f"{p['upgrade_fraction']:.0%} move to rank {p['high_rank']} (the paper's protocol: the recipe's `quality_upgrade` "
            "with `quality_scoring all`). "
            if p.get("rank_mode") == "quality_upgrade"
            else f"- Ranks: the {math.ceil(p['high_quality_fraction'] * p['num_clients'])} class-balanced clients train at rank "
            f"{p['high_rank']} from round 1, the others at rank {p['low_rank']} (a fixed rank list: what the paper's upgrade "
            "is meant to find; preset `paper` runs the upgrade itself). "
        )
        + "Baselines `homogeneous_r5` / `homogeneous_r20`: every client at that rank, `fedavg`.",
        "- Pairing: the split, the client sampling and every client's shuffling and dropout are seeded from "
        "(seed, round, client), so runs with the same seed differ only in the strategy.",
        "",
    ]
    lines += rp.cells_section(p) + rp.subset_section(report)
    scored = {k: v for k, v in s["strategies"].items() if "auc" in v}
    if not scored:
        lines.append("No complete runs yet.")
        return "\n".join(lines) + "\n"
    target = s.get("target")
    lines += [
        "## Results",
        "",
        "AUC = mean accuracy over all rounds (per-round test subset); it rewards getting high early and staying "
        "there, which the noisy last round alone does not show. Mean ± standard deviation over seeds.",
        "Rounds to target: the first round from which the 3-round moving average (rounds 1-2: the rounds so far) "
        f"stays at or above **{_p(target, 0) if target is not None else 'n/a'}%** "
        f"({s.get('target_rule')}); per seed, `-` = not reached.",
        "",
    ]
    rows = []
    for name, v in scored.items():
        hits = v.get("rounds_to_headline_target", {}).get("per_seed", [])
        rows.append(
            [
                f"`{name}`",
                len(v["seeds_complete"]),
                _ms(v["auc"]),
                _ms(v["auc_second_half"]),
                _ms(v["last_round_subset"]),
                _ms(v["final_test"]),
                ", ".join("-" if h is None else str(h) for h in hits) or "n/a",
                f"{v['bytes_up_per_client_round'] / 1e6:.3f} / {v['bytes_down_per_client_round'] / 1e6:.3f}",
                f"{v['cumulative_bytes']['mean'] / 1e6:.1f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "strategy",
                "seeds",
                "AUC %",
                f"AUC rounds {scored[next(iter(scored))]['auc_second_half']['from_round']}+ %",
                "last round (subset) %",
                "final, full test %",
                "rounds to target",
                "MB up / down per client-round",
                "cumulative MB",
            ],
            rows,
        )
    )
    lines += rp.paired_section(report)
    paired = s.get("paired_vs_zero_padding") or {}
    if paired:
        lines += ["", "### Paired differences against `zero_padding` (same seed)", ""]
        lines.append(
            markdown_table(
                [
                    "strategy",
                    "seeds",
                    "AUC diff (points)",
                    "final test diff (points)",
                    "rounds ahead of zero_padding",
                ],
                [
                    [
                        f"`{k}`",
                        ", ".join(map(str, v["seeds"])),
                        ", ".join(f"{100 * d:+.1f}" for d in v["auc_diff"]),
                        ", ".join(f"{100 * d:+.1f}" for d in v["final_test_diff"]),
                        ", ".join(f"{w}/{n}" for w, n in zip(v["rounds_ahead"], v["rounds_compared"])),
                    ]
                    for k, v in paired.items()
                ],
            )
        )
    lines += [
        "",
        "### Post-aggregation diagnostic",
        "",
        f"For every round (after the upgrade, with `--rank-mode quality_upgrade`) and every sampled rank-{p['high_rank']} client: accuracy of its own "
        f"trained adapter (before aggregation) and of its rank-{p['high_rank']} view of that round's new global "
        "adapter (after; `to_rank` with the strategy's send-back method), both on the first "
        f"{p.get('diagnostic_samples') or p['eval_samples']} test rows. "
        "The paper's example: 84.34% before, 38.95% after zero-padding, 82.11% after replication.",
        "",
    ]
    drows = []
    for name, v in scored.items():
        d = v["diagnostic"]
        if not d["pairs"]:
            continue
        first = d["first"]
        drows.append(
            [
                f"`{name}`",
                d["pairs"],
                _p(d["before_mean"]),
                _p(d["after_mean"]),
                f"{100 * d['drop_mean']:+.1f}",
                f"{100 * d['worst_drop']:+.1f}",
                f"round {first['round']}, client {first['client']}: {_p(first['before'])} -> {_p(first['after'])}",
            ]
        )
    lines.append(
        markdown_table(
            ["strategy", "pairs", "before %", "after %", "mean drop (points)", "worst drop", "first pair"],
            drows,
        )
        if drows
        else "No high-rank client pairs."
    )
    lines += [
        "",
        f"### Rank slots {p['low_rank'] + 1}-{p['high_rank']} of the global adapter",
        "",
        f"Share of the global update's norm in slots beyond rank {p['low_rank']} (those only rank-{p['high_rank']} "
        f"clients own): sum over modules of ||B[:, {p['low_rank']}:] A[{p['low_rank']}:]|| / ||B A||, and the first "
        "round after which those slots are exactly zero in every module. A slot with A and B both zero has zero "
        "gradient, so once zero-padding aggregates a round with no rank-20 client, the rank-20 clients can never "
        "train those slots again and effectively run at rank 5.",
        "",
    ]
    lines.append(
        markdown_table(
            [
                "strategy",
                "share, mean over rounds",
                "share, last round",
                "slots exactly zero from round (per seed)",
            ],
            [
                [
                    f"`{k}`",
                    _p(v.get("high_slot_share_mean")),
                    _p(v.get("high_slot_share_last_round")),
                    ", ".join(
                        "never" if x is None else str(x) for x in v.get("high_slots_zero_from_round", [])
                    ),
                ]
                for k, v in scored.items()
                if not k.startswith("homogeneous")
            ],
        )
    )
    lines += ["", "### Accuracy per round (mean over complete seeds, %)", ""]
    n = max(len(v["curve_mean"]) for v in scored.values())
    lines.append(
        markdown_table(
            ["round", *[f"`{k}`" for k in scored]],
            [
                [
                    i + 1,
                    *[_p(v["curve_mean"][i]) if i < len(v["curve_mean"]) else "" for v in scored.values()],
                ]
                for i in range(n)
            ],
        )
    )
    lines += rp.per_seed_curves(report)
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in report.get("plots", [])]
    return "\n".join(lines) + "\n"


def write_pages(out: Path, report: dict[str, Any]) -> None:
    """``convergence_<preset>.json`` and ``.md`` in ``out``; the page is rendered from the JSON as
    written (so a run and a re-rendering of its JSON give the same page)."""
    name = report["preset"]["name"]
    write_json(out / f"convergence_{name}.json", report)
    page = render_markdown(json.loads((out / f"convergence_{name}.json").read_text(encoding="utf-8")))
    (out / f"convergence_{name}.md").write_text(page, encoding="utf-8")
