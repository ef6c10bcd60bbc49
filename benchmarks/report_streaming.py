"""The streaming preset's part of the aggregation report: ``StreamingAggregator`` against
``aggregate_adapters`` on the same clients (time and peak memory), its plot and its markdown."""

from __future__ import annotations

from pathlib import Path

from _common import fmt_bytes, markdown_table

STREAMING_NOTES = [
    "`list` is `aggregate_adapters(folders, strategy)`; `stream` is `StreamingAggregator(strategy)`, one "
    "`add(folder)` per client, then `result()`. Both hash every file for the provenance record.",
    "Each (strategy, mode, clients) case ran in a fresh interpreter; peak memory is above the baseline of that "
    "interpreter after its imports (`peak anon`: sampled RssAnon, `ru_maxrss`: the resident peak).",
    "Times are the minimum over repeats (median in brackets); the ratio `stream / list` compares the minima "
    "measured in the same run. The machine's load is in its line: other jobs shared the 2 cores. Both modes "
    "run torch on one thread (`torch_threads` in the JSON): on these tiny matrices a loaded thread pool made "
    "single products 100x slower.",
    "`zero_padding`, `replication` and `hetlora` stream into running sums (memory: the output plus one "
    "client); `flexlora` keeps every client's folded factors until `result()`. `stacking` is left out: its "
    "rank (the sum of the clients' ranks) passes the layer's size from about 40 of these clients; `fedavg` "
    "needs equal ranks and streams like `zero_padding`.",
]


def summarize_streaming(results: dict[str, dict]) -> dict:
    """One row per (clients, strategy): both modes side by side and their ratios."""
    rows = []
    pairs: dict[tuple[int, str], dict[str, dict]] = {}
    for key, res in results.items():
        kind, strategy, mode, _, count = key.split("/")
        if kind == "streaming":
            pairs.setdefault((int(count), strategy), {})[mode] = res
    for (n, strategy), modes in sorted(pairs.items()):
        if set(modes) != {"list", "stream"}:
            continue
        lst, stream = modes["list"], modes["stream"]
        rows.append(
            {
                "n": n,
                "strategy": strategy,
                "list_min_s": lst["time"]["min"],
                "list_median_s": lst["time"]["median"],
                "stream_min_s": stream["time"]["min"],
                "stream_median_s": stream["time"]["median"],
                "ratio_time_min": stream["time"]["min"] / lst["time"]["min"],
                "list_peak_anon": lst["peak_anon_delta"],
                "stream_peak_anon": stream["peak_anon_delta"],
                "list_peak_rss": lst["peak_rss_delta"],
                "stream_peak_rss": stream["peak_rss_delta"],
                "output_bytes": stream["output_bytes"],
                "tensor_bytes": stream["tensor_bytes"],
            }
        )
    return {"rows": rows}


def plot_streaming(run: dict, out: Path) -> list[str]:
    """Peak memory and time against the number of clients, list vs stream, one colour per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run["summary"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, strategy in enumerate(sorted({r["strategy"] for r in rows})):
        pts = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["n"])
        ns = [r["n"] for r in pts]
        for mode, style in (("list", ":x"), ("stream", "-o")):
            axes[0].plot(ns, [max(r[f"{mode}_peak_anon"], 1) / 2**20 for r in pts], style, color=f"C{i}")
            axes[1].plot(ns, [r[f"{mode}_min_s"] for r in pts], style, color=f"C{i}")
        axes[0].plot([], [], "-", color=f"C{i}", label=strategy)
    for ax, label in zip(
        axes, ("peak anonymous memory above baseline, MiB", "wall time, s (min of repeats)")
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8, title="solid: stream, dotted: list")
    fig.suptitle(f"StreamingAggregator vs aggregate_adapters ({run['preset']['name']})")
    fig.tight_layout()
    path = out / f"aggregation_{run['preset']['name']}_streaming.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def render_streaming(run: dict) -> list[str]:
    """The streaming preset's section of the results page."""
    p = run["preset"]
    done = "" if run.get("complete", True) else f" **PARTIAL: {run['cases_done']} cases measured so far.**"
    out = [
        f"## Preset `{p['name']}`: streaming vs list",
        "",
        f"Command: `{run['command']}` ({run['finished']}, {run['elapsed_s']:.0f} s in all).{done}",
        "",
        f"Inputs: {p['layers']} layers x {{q,k,v,o}}_proj of {p['hidden']}x{p['hidden']}, client k has rank "
        f"{p['ranks']}[k mod {len(p['ranks'])}] and `lora_alpha = 2r`, bf16 safetensors in PEFT's format; "
        f"{p['clients']} clients, uniform weights.",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in run["machine"].items()),
        "",
        "**Caveats.** " + " ".join(run["notes"]),
        "",
    ]
    out += [streaming_table(run["summary"]["rows"]), ""]
    out += [f"![streaming]({f})" for f in run["plots"]] + [""]
    return out


def streaming_table(rows: list[dict]) -> str:
    """List vs stream, one row per (clients, strategy)."""
    table = [
        [
            r["n"],
            r["strategy"],
            f"{r['list_min_s']:.3f} ({r['list_median_s']:.3f})",
            f"{r['stream_min_s']:.3f} ({r['stream_median_s']:.3f})",
            f"{r['ratio_time_min']:.2f}",
            fmt_bytes(r["list_peak_anon"]),
            fmt_bytes(r["stream_peak_anon"]),
            fmt_bytes(r["list_peak_rss"]),
            fmt_bytes(r["stream_peak_rss"]),
            fmt_bytes(r["output_bytes"]),
            fmt_bytes(r["tensor_bytes"]),
        ]
        for r in rows
    ]
    header = [
        "clients",
        "strategy",
        "list s",
        "stream s",
        "stream / list",
        "list peak anon",
        "stream peak anon",
        "list ru_maxrss",
        "stream ru_maxrss",
        "output",
        "all inputs",
    ]
    return markdown_table(header, table)


def flexlora_randomized_table(cases: dict[str, dict]) -> list[str]:
    """FlexLoRA's randomised range finder against its exact factored SVD and the dense SVD, one module,
    on independent clients and on the same factors made to share directions."""
    table = []
    for key, c in cases.items():
        if not key.startswith("dense_svd") or "shared" not in c:
            continue
        for variant in ("independent", "shared"):
            v = c[variant]
            table.append(
                [
                    key.split("/")[-1],
                    variant,
                    c["sum_ranks"],
                    f"{v['flexlora']['median']:.3f}",
                    f"{v['randomized']['median']:.3f}",
                    f"{v['auto']['median']:.3f}",
                    f"{c['dense_svd']['median']:.2f}",
                    f"{v['speedup_randomized_vs_dense_svd']:.0f}x",
                    f"{v['speedup_randomized_vs_exact']:.1f}x",
                    f"{v['excess_randomized']:.1e}",
                    f"{v['certificate']:.1e}",
                    "randomized" if v["auto_used_randomized"] else "exact",
                    f"{v['rel_error_flexlora']:.4f} / {v['rel_error_randomized']:.4f}",
                ]
            )
    if not table:
        return []
    header = [
        "clients",
        "clients' updates",
        "sum r_k",
        "exact s",
        "randomized s",
        "auto s",
        "dense svd s",
        "randomized vs dense svd",
        "randomized vs exact",
        "excess error (measured)",
        "certificate (bound)",
        "auto used",
        "rel. error: exact / randomized",
    ]
    return [
        "### FlexLoRA: randomised range finder vs exact (one module)",
        "",
        "`excess error` is (||M - M_r||_F^2 - ||M - M_e||_F^2) / ||M||_F^2 of the randomised result M_r "
        "against the exact truncation M_e, measured with the dense sum; `certificate` is the library's a-posteriori "
        "bound on it (probes of the range residual), and `auto` keeps the randomised result only where the "
        "certificate is at most 1e-3. `shared`: the same factors made to share 32 directions of decaying "
        "strength (`aggregation_cases._shared_directions`), as updates of one task do.",
        "",
        markdown_table(header, table),
        "",
    ]
