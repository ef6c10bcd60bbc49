"""The aggregation benchmark's report: the derived table (ratios to the I/O floor and to PEFT,
memory growth, targets), the plots and the markdown page, all from the measured cases, so that
``bench_aggregation.py --report-only`` can rewrite the page from ``aggregation.json`` alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from _common import fmt_bytes, markdown_table, write_json
from report_streaming import (
    STREAMING_NOTES,
    flexlora_randomized_table,
    plot_streaming,
    render_streaming,
    streaming_table,
    summarize_streaming,
)

__all__ = ["NOTES", "STREAMING_NOTES", "plot_streaming", "summarize_streaming", "write_pages"]

PADDING_STRATEGIES = ("zero_padding", "replication", "hetlora")


def summarize_run(preset: dict[str, Any], results: dict[str, dict]) -> dict:
    """The derived table of one preset's cases (``preset`` as in its JSON section): ratios to the
    I/O floor and to PEFT, memory growth, target checks."""
    rows, targets = [], {}
    for n in preset["clients"]:
        floors = {s: results.get(f"io_floor///{s}/{n}") for s in ("mixed", "equal")}
        peft = {c: results.get(f"peft//{c}/mixed/{n}") for c in preset["peft_modules"]}
        for key, res in results.items():
            kind, strategy, _, dataset, count = key.split("/")
            if kind != "strategy" or int(count) != n:
                continue
            row = {"n": n, "strategy": strategy, "set": dataset, "status": res["status"]}
            if res["status"] != "ok":
                row["reason"] = res["reason"]
                rows.append(row)
                continue
            if not floors[dataset]:
                continue
            floor = floors[dataset]["read"]
            # with the provenance hash: against reading each file once, hashing it and materialising its
            # tensors, or reading the tensors and hashing the files in two passes, whichever was faster
            two_pass = {k: floor[k] + floors[dataset]["sha256"][k] for k in ("min", "median")}
            fused = floors[dataset].get("read_sha256", two_pass)
            hash_floor = {k: min(fused[k], two_pass[k]) for k in ("min", "median")}
            row.update(
                {
                    "median_s": res["time"]["median"],
                    "min_s": res["time"]["min"],
                    "no_hash_median_s": res["time_no_hash"]["median"],
                    "no_hash_min_s": res["time_no_hash"]["min"],
                    "floor_median_s": floor["median"],
                    "floor_min_s": floor["min"],
                    "hash_floor_min_s": hash_floor["min"],
                    "sha256_median_s": floors[dataset]["sha256"]["median"],
                    "ratio_floor_min": res["time"]["min"] / hash_floor["min"],
                    "ratio_floor_median": res["time"]["median"] / hash_floor["median"],
                    "ratio_floor_no_hash_min": res["time_no_hash"]["min"] / floor["min"],
                    # inputs already in memory, no hash: what the merge costs with no I/O at all
                    **(
                        {
                            "in_memory_min_s": res["time_in_memory"]["min"],
                            "ratio_floor_in_memory_min": res["time_in_memory"]["min"] / floor["min"],
                        }
                        if "time_in_memory" in res
                        else {}
                    ),
                    "hash_share": 1 - res["time_no_hash"]["median"] / res["time"]["median"],
                    "peak_rss_delta": res["peak_rss_delta"],
                    "peak_anon_delta": res["peak_anon_delta"],
                    "output_bytes": res["output_bytes"],
                    "module_inputs_f32_bytes": res["module_inputs_f32_bytes"],
                    "anon_over_bound": res["peak_anon_delta"]
                    / (res["output_bytes"] + res["module_inputs_f32_bytes"]),
                    "tensor_bytes": res["tensor_bytes"],
                    "rchar_per_run": res["rchar_per_run"],
                }
            )
            if dataset == "mixed":
                for combination, p in peft.items():
                    if p:
                        row[f"speedup_vs_peft_{combination}"] = (
                            p["time_extrapolated"]["median"] / res["time"]["median"]
                        )
            rows.append(row)
        dense = results.get(f"dense_svd///mixed/{n}")
        if dense and "shared" in dense:
            for variant in ("independent", "shared"):
                v = dense[variant]
                targets[f"flexlora_randomized_50x_dense_svd_{variant}_n{n}"] = {
                    "speedup": v["speedup_randomized_vs_dense_svd"],
                    "excess": v["excess_randomized"],
                    "certificate": v["certificate"],
                    "auto_used_randomized": v["auto_used_randomized"],
                    "met": v["speedup_randomized_vs_dense_svd"] >= 50 and v["excess_randomized"] <= 1e-3,
                }
                # what FlexLoRA does by default (svd="auto"): the certified randomised result, else exact
                targets[f"flexlora_default_50x_dense_svd_{variant}_n{n}"] = {
                    "speedup": dense["dense_svd"]["median"] / v["auto"]["median"],
                    "speedup_exact": dense["dense_svd"]["median"] / v["flexlora"]["median"],
                    "excess": v["excess_randomized"] if v["auto_used_randomized"] else 0.0,
                    "met": dense["dense_svd"]["median"] / v["auto"]["median"] >= 50,
                }
    for row in rows:
        if row["status"] != "ok":
            continue
        if row["strategy"] in PADDING_STRATEGIES or (row["strategy"] == "fedavg" and row["set"] == "equal"):
            targets[f"{row['strategy']}_floor_n{row['n']}"] = {
                "ratio_hash_floor": row["ratio_floor_min"],
                "ratio_read_floor_no_hash": row["ratio_floor_no_hash_min"],
                **(
                    {"ratio_read_floor_in_memory": row["ratio_floor_in_memory_min"]}
                    if "ratio_floor_in_memory_min" in row
                    else {}
                ),
                "met": row["ratio_floor_min"] <= 1.3 and row["ratio_floor_no_hash_min"] <= 1.5,
            }
        if row["strategy"] == "flexlora" and "speedup_vs_peft_svd" in row:
            targets[f"flexlora_200x_peft_svd_n{row['n']}"] = {
                "speedup": row["speedup_vs_peft_svd"],
                "met": row["speedup_vs_peft_svd"] >= 200,
            }
    growth = {}
    if len(preset["clients"]) > 1:
        lo, hi = min(preset["clients"]), max(preset["clients"])
        for strategy in {r["strategy"] for r in rows if r["status"] == "ok"}:
            pick = {r["n"]: r for r in rows if r["strategy"] == strategy and r["status"] == "ok"}
            if lo in pick and hi in pick:
                growth[strategy] = {
                    "clients": [lo, hi],
                    "peak_anon_delta": [pick[lo]["peak_anon_delta"], pick[hi]["peak_anon_delta"]],
                    "peak_rss_delta": [pick[lo]["peak_rss_delta"], pick[hi]["peak_rss_delta"]],
                    "output_bytes": [pick[lo]["output_bytes"], pick[hi]["output_bytes"]],
                }
    return {
        "rows": rows,
        "targets": targets,
        "memory_growth": growth,
        "streaming": summarize_streaming(results)["rows"],
    }


def plot(run: dict, out: Path) -> list[str]:
    """The time and memory plots of one preset's section, written to ``out``; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preset = run["preset"]
    rows = [r for r in run["summary"]["rows"] if r["status"] == "ok"]
    names = sorted({(r["strategy"], r["set"]) for r in rows})
    files = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(preset["clients"])
    labels = [f"{s}" + (" (equal ranks)" if d == "equal" else "") for s, d in names]
    for j, n in enumerate(preset["clients"]):
        vals = [
            next((r["ratio_floor_min"] for r in rows if (r["strategy"], r["set"]) == nm and r["n"] == n), 0)
            for nm in names
        ]
        peft_vals = []
        for combination in preset["peft_modules"]:
            p = run["cases"].get(f"peft//{combination}/mixed/{n}")
            floor = run["cases"].get(f"io_floor///mixed/{n}")
            peft_vals.append(p["time_extrapolated"]["min"] / floor["read"]["min"] if p and floor else 0)
        xs = [i + j * width for i in range(len(names) + len(peft_vals))]
        ax.bar(xs, vals + peft_vals, width, label=f"{n} clients")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names) + len(preset["peft_modules"]))])
    ax.set_xticklabels(
        labels + [f"PEFT {c} (extrap.)" for c in preset["peft_modules"]], rotation=30, ha="right"
    )
    ax.axhline(2.0, color="k", ls="--", lw=1, label="2x I/O floor target")
    ax.set_yscale("log")
    ax.set_ylabel("wall time / I/O floor (min of repeats)")
    ax.set_title(
        f"Aggregation time, {preset['layers']} layers x 4 modules of {preset['hidden']}x{preset['hidden']} "
        f"({preset['name']})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"aggregation_{preset['name']}_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path.name)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k, (metric, style) in enumerate((("peak_anon_delta", "-o"), ("peak_rss_delta", ":x"))):
        for i, nm in enumerate(names):
            pts = sorted((r["n"], r[metric]) for r in rows if (r["strategy"], r["set"]) == nm)
            ax.plot(
                [p[0] for p in pts],
                [p[1] / 2**20 for p in pts],
                style,
                color=f"C{i}",
                label=f"{labels[i]}" if k == 0 else None,
            )
    ax.set_xlabel("clients")
    ax.set_ylabel("MiB above the imported-interpreter baseline")
    ax.set_yscale("log")
    ax.set_title("Peak memory: anonymous RSS (solid) vs ru_maxrss incl. mmapped files (dotted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"aggregation_{preset['name']}_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path.name)
    return files


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_markdown(report: dict) -> str:
    """The results page, generated from the JSON (no hand-typed numbers)."""
    out = [
        "# Aggregation speed and memory",
        "",
        "Generated by `benchmarks/bench_aggregation.py` from `aggregation.json`; do not edit by hand.",
        "",
    ]
    for name in ("full", "quick", "streaming", "smoke"):
        run = report.get("presets", {}).get(name)
        if not run:
            continue
        if run["preset"].get("kind") == "streaming":
            out += render_streaming(run)
            continue
        p = run["preset"]
        s = run["summary"]
        done = (
            "" if run.get("complete", True) else f" **PARTIAL: {run['cases_done']} cases measured so far.**"
        )
        out += [
            f"## Preset `{name}`",
            "",
            f"Command: `{run['command']}` ({run['finished']}, {run['elapsed_s']:.0f} s in all).{done}",
            "",
            f"Inputs: {p['layers']} layers x {{q,k,v,o}}_proj of {p['hidden']}x{p['hidden']}, client k has rank "
            f"{p['ranks']}[k mod {len(p['ranks'])}] and `lora_alpha = 2r`, bf16 safetensors written in PEFT's format; "
            f"{p['clients']} clients, uniform weights. `fedavg` also runs on an equal-rank set (every client r={p['equal_rank']}).",
            "",
            "Machine: " + ", ".join(f"{k}={v}" for k, v in run["machine"].items()),
            "",
            "**Caveats.** " + " ".join(run["notes"]),
            "",
            *(["**This run.** " + " ".join(run["run_notes"]), ""] if run.get("run_notes") else []),
        ]
        out += [
            "### Wall time, memory, bytes read",
            "",
            "Ratios use the minimum over repeats (median in brackets). `x I/O floor` is against the faster of "
            "reading every file once, hashing it and materialising its tensors (`read+sha256` below) and "
            "`read` + `sha256` as two passes; `no sha256` is the same "
            "call with `record_sha256=False`, against the read floor (`read`); `in memory` is that call on "
            "clients already loaded into memory (`LoraAdapter.from_state_dict`: no I/O at all), against the same "
            "read floor: what the merge's arithmetic and per-call work cost alone. Peak memory is above the baseline "
            "of an interpreter that imported torch and hf_fedlora; `bound` = output + one module's inputs in float32.",
            "",
        ]
        header = [
            "clients",
            "strategy",
            "median s",
            "min s",
            "x I/O floor",
            "no sha256: s (x floor)",
            "in memory: s (x floor)",
            "sha256 share",
            "peak anon",
            "ru_maxrss",
            "anon / bound",
            "tensor bytes",
            "read() bytes",
            "vs PEFT svd",
            "vs PEFT cat",
        ]
        table = []
        for r in s["rows"]:
            label = r["strategy"] + (" (equal ranks)" if r["set"] == "equal" else "")
            if r["status"] != "ok":
                table.append(
                    [r["n"], label, "n/a: " + r["reason"].split(";")[0].replace("|", "/")] + [""] * 12
                )
                continue
            table.append(
                [
                    r["n"],
                    label,
                    _f(r["median_s"]),
                    _f(r["min_s"]),
                    f"{r['ratio_floor_min']:.1f} ({r['ratio_floor_median']:.1f})",
                    f"{_f(r['no_hash_min_s'])} ({r['ratio_floor_no_hash_min']:.1f})",
                    f"{_f(r['in_memory_min_s'])} ({r['ratio_floor_in_memory_min']:.1f})"
                    if "in_memory_min_s" in r
                    else "",
                    f"{100 * r['hash_share']:.0f}%",
                    fmt_bytes(r["peak_anon_delta"]),
                    fmt_bytes(r["peak_rss_delta"]),
                    _f(r["anon_over_bound"]),
                    fmt_bytes(r["tensor_bytes"]),
                    fmt_bytes(r["rchar_per_run"]),
                    f"{r['speedup_vs_peft_svd']:.0f}x" if "speedup_vs_peft_svd" in r else "n/a",
                    f"{r['speedup_vs_peft_cat']:.1f}x" if "speedup_vs_peft_cat" in r else "n/a",
                ]
            )
        out += [markdown_table(header, table), ""]
        out += ["### I/O floor (same run, warm page cache)", ""]
        ftable = []
        for key, c in run["cases"].items():
            if key.startswith("io_floor"):
                _, _, _, dataset, n = key.split("/")
                ftable.append(
                    [
                        n,
                        dataset,
                        fmt_bytes(c["tensor_bytes"]),
                        _f(c["read"]["min"], 3),
                        _f(c["read"]["median"], 3),
                        _f(c["read_f32"]["min"], 3),
                        _f(c["read_sha256"]["min"], 3) if "read_sha256" in c else "n/a",
                        _f(c["sha256"]["min"], 3),
                        _f(c["sha256"]["median"], 3),
                        f"{c['file_bytes'] / c['sha256']['min'] / 2**20:.0f} MiB/s",
                    ]
                )
        out += [
            markdown_table(
                [
                    "clients",
                    "set",
                    "tensor bytes",
                    "read min s",
                    "read median s",
                    "read+to f32 min s",
                    "read+sha256 min s",
                    "sha256 min s",
                    "sha256 median s",
                    "sha256 rate",
                ],
                ftable,
            ),
            "",
        ]
        out += ["### PEFT `add_weighted_adapter` (sampled modules, extrapolated)", ""]
        ptable = []
        for key, c in run["cases"].items():
            if key.startswith("peft"):
                n = key.split("/")[-1]
                ptable.append(
                    [
                        n,
                        c["combination_type"],
                        ", ".join(c["sampled_modules"]),
                        _f(c["time_sample"]["median"]),
                        f"x{c['extrapolation_factor']:.0f}",
                        _f(c["time_extrapolated"]["median"], 1),
                        _f(c["load_adapters_s"], 1),
                    ]
                )
        out += [
            markdown_table(
                [
                    "clients",
                    "combination",
                    "sampled modules",
                    "sample median s",
                    "extrapolation",
                    "EXTRAPOLATED all-module s",
                    "load_adapter s (not counted)",
                ],
                ptable,
            ),
            "",
        ]
        out += ["### FlexLoRA: factored SVD vs dense `torch.linalg.svd` (one module)", ""]
        dtable = []
        for key, c in run["cases"].items():
            if key.startswith("dense_svd"):
                n = key.split("/")[-1]
                dtable.append(
                    [
                        n,
                        c["module"],
                        c["sum_ranks"],
                        c["target_rank"],
                        _f(c["flexlora"]["median"], 4),
                        _f(c["dense_sum"]["median"], 3),
                        _f(c["dense_svd"]["median"], 2),
                        f"{c['speedup_svd_only']:.0f}x",
                        f"{c['rel_diff_reconstructions']:.1e}",
                        f"{c['rel_error_flexlora']:.4f} / {c['rel_error_dense']:.4f}",
                    ]
                )
        out += [
            markdown_table(
                [
                    "clients",
                    "module",
                    "sum r_k",
                    "R",
                    "flexlora s",
                    "dense sum s",
                    "dense svd s",
                    "speedup (svd only)",
                    "rel. diff of rank-R results",
                    "rel. error vs sum: flex / dense",
                ],
                dtable,
            ),
            "",
        ]
        out += flexlora_randomized_table(run["cases"])
        if s.get("streaming"):
            out += ["### StreamingAggregator vs aggregate_adapters (same folders, same run)", ""]
            out += [streaming_table(s["streaming"]), ""]
        out += ["### Targets", ""]
        out += [
            markdown_table(
                ["target", "met", "numbers"],
                [
                    [
                        k,
                        "yes" if v["met"] else "**no**",
                        ", ".join(
                            f"{a}={_f(b, 3) if isinstance(b, float) else b}"
                            for a, b in v.items()
                            if a != "met"
                        ),
                    ]
                    for k, v in s["targets"].items()
                ],
            ),
            "",
        ]
        if s["memory_growth"]:
            out += ["### Does memory grow with the number of clients?", ""]
            out += [
                markdown_table(
                    ["strategy", "clients", "peak anon", "ru_maxrss", "output"],
                    [
                        [
                            k,
                            " -> ".join(map(str, g["clients"])),
                            " -> ".join(fmt_bytes(x) for x in g["peak_anon_delta"]),
                            " -> ".join(fmt_bytes(x) for x in g["peak_rss_delta"]),
                            " -> ".join(fmt_bytes(x) for x in g["output_bytes"]),
                        ]
                        for k, g in sorted(s["memory_growth"].items())
                    ],
                ),
                "",
            ]
        out += [f"![time]({f})" for f in run["plots"]] + [""]
    return "\n".join(out)


NOTES = [
    "Every case is repeated; the minimum (least disturbed) and the median are reported, and every ratio is "
    "measured in the same run. The machine line gives the load average when the run started.",
    "The I/O floor is warm-cache: the inputs were just written (or read) and sit in the page cache, as they do "
    "for every strategy timed after them; no case reads from the disk itself (see `storage_read_bytes_first_run`).",
    "The read floor (`read`) is safetensors `safe_open` + `get_tensor` of every tensor, copied into process "
    "memory (`clone()`, since `get_tensor` can return a view of the mapped file). The floor with the provenance "
    "hash (`read+sha256`) reads each file once into memory, takes its sha256 from that buffer and makes every "
    "tensor from it (`frombuffer`, no further copy).",
    "Strategy, floor and dense SVD cases run torch, and the BLAS/LAPACK that scipy loads (FlexLoRA's "
    "eigen-solve), on one thread (the machine has 2 cores shared with other jobs, where a loaded intra-op "
    "pool thrashes); `aggregate_adapters` still reads ahead on its helper thread while it merges.",
    "`tensor bytes` is the size of every input tensor, which each strategy reads once with positioned reads "
    "(`preadv`, no memory map); `read() bytes` is everything read through read() calls: those tensor reads "
    "and, for the provenance sha256, only the bytes no tensor read covered (the header).",
    "`ru_maxrss` is the growth of the process's peak resident set over the baseline; `peak anon` (sampled every "
    "2 ms, in a first, untimed call: the sampler's thread would slow the timed ones) is the anonymous memory "
    "the process owns.",
    "PEFT times cover `add_weighted_adapter` only (adapters already loaded into a PeftModel holding just the "
    "sampled Linear layers) and are EXTRAPOLATED linearly from the stated modules to all modules.",
    "Each strategy, I/O floor and PEFT case ran in a fresh subprocess (except the in-process `smoke` preset).",
]


def write_pages(out: Path, report: dict) -> None:
    """``aggregation.json`` and ``aggregation.md`` in ``out``; the page is rendered from the JSON as
    written (so a run and ``--report-only`` on its JSON give the same page)."""
    write_json(out / "aggregation.json", report)
    page = render_markdown(json.loads((out / "aggregation.json").read_text(encoding="utf-8")))
    (out / "aggregation.md").write_text(page, encoding="utf-8")
