"""Aggregation speed and memory: what one round costs the server.

Writes synthetic PEFT adapters with the shapes of a 7B Llama (q/k/v/o projections, 4096 x 4096,
ranks mixed over {8, 16, 32, 64}, bf16 safetensors, ``lora_alpha = 2 r``), then measures, each in a
fresh interpreter, every strategy of ``hf_fedlora.list_strategies()``, the I/O floor (reading every
input tensor once with safetensors, same warm page cache), the sha256 hashing that
``aggregate_adapters`` does for provenance, PEFT's ``add_weighted_adapter`` (``svd`` and ``cat``, on a
stated sample of modules, extrapolated) and FlexLoRA's factored SVD against a dense SVD.

    python benchmarks/bench_aggregation.py --preset quick          # a few minutes
    python benchmarks/bench_aggregation.py --preset full --keep    # 32 layers, 10 and 50 clients

Results go to ``docs/results/aggregation.json`` (one section per preset), ``aggregation.md``
(rendered from the JSON) and ``aggregation_<preset>_*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    AnonPeakSampler,
    fmt_bytes,
    io_counters,
    machine_info,
    markdown_table,
    max_rss_bytes,
    proc_status,
    repeat_timed,
    roomiest_temp_dir,
    run_child,
    summarize,
    write_child_result,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PADDING_STRATEGIES = ("zero_padding", "replication", "hetlora")
KEY = "base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{ab}.weight"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark size. ``peft_modules`` is how many modules PEFT's merge is timed on per
    combination type; its time is extrapolated to all modules."""

    name: str
    layers: int
    hidden: int
    clients: tuple[int, ...]
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    equal_rank: int = 16
    repeats: int = 3
    max_seconds: float = 90.0
    peft_modules: dict = dataclasses.field(default_factory=lambda: {"svd": 1, "cat": 4})
    isolation: str = "subprocess"

    @property
    def signature(self) -> str:
        return f"L{self.layers}_h{self.hidden}_r{'-'.join(map(str, self.ranks))}_eq{self.equal_rank}"

    @property
    def num_modules(self) -> int:
        return self.layers * len(PROJECTIONS)


PRESETS = {
    "smoke": Preset("smoke", layers=2, hidden=256, clients=(3,), ranks=(4, 8, 16), equal_rank=8, repeats=1,
                    max_seconds=5, peft_modules={"svd": 1, "cat": 2}, isolation="inprocess"),
    "quick": Preset("quick", layers=2, hidden=4096, clients=(5, 20), repeats=3, max_seconds=30,
                    peft_modules={"svd": 1, "cat": 4}),
    "full": Preset("full", layers=32, hidden=4096, clients=(10, 50), repeats=2, max_seconds=45,
                   peft_modules={"svd": 1, "cat": 4}),
}


def client_rank(preset: Preset, kind: str, k: int) -> int:
    return preset.equal_rank if kind == "equal" else preset.ranks[k % len(preset.ranks)]


def write_client(folder: Path, preset: Preset, rank: int, seed: int) -> None:
    """One client adapter exactly as PEFT writes it (config + bf16 safetensors), atomically."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    h = preset.hidden
    tensors = {}
    for layer in range(preset.layers):
        for proj in PROJECTIONS:
            a = torch.randn(rank, h, generator=gen) / math.sqrt(h)
            b = torch.randn(h, rank, generator=gen) * 0.02
            tensors[KEY.format(layer=layer, proj=proj, ab="A")] = a.to(torch.bfloat16)
            tensors[KEY.format(layer=layer, proj=proj, ab="B")] = b.to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM",
               base_model_name_or_path="synthetic/llama-7b-shapes").save_pretrained(str(tmp))
    os.replace(tmp, folder)


def input_dirs(root: Path, preset: Preset, kind: str, count: int) -> list[str]:
    """Client folders ``0..count-1`` of a set (``kind`` is ``mixed`` or ``equal``)."""
    return [str(root / preset.signature / kind / f"client_{k:03d}") for k in range(count)]


def ensure_inputs(preset: Preset, dirs: list[str]) -> None:
    """Write the client folders that are missing (inputs are cached between runs)."""
    for folder in map(Path, dirs):
        if not (folder / "adapter_model.safetensors").is_file():
            k, kind = int(folder.name.split("_")[1]), folder.parent.name
            write_client(folder, preset, client_rank(preset, kind, k), seed=k + (10_000 if kind == "equal" else 0))


def _tensor_bytes(dirs: list[str]) -> int:
    from safetensors import safe_open

    total = 0
    for d in dirs:
        with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as handle:
            for key in handle.keys():
                s = handle.get_slice(key)
                total += math.prod(s.get_shape()) * 2  # bf16
    return total


def case_io_floor(spec: dict) -> dict:
    """Read every input tensor once with safetensors (copied into process memory), and hash the files."""
    from safetensors import safe_open

    from hf_fedlora.adapters.io import sha256_file

    files = [os.path.join(d, "adapter_model.safetensors") for d in spec["dirs"]]

    def read(convert):
        for f in files:
            with safe_open(f, "pt") as handle:
                for key in handle.keys():
                    convert(handle.get_tensor(key))

    # get_tensor may return a view of the mapped file; clone() makes it an actual read into memory.
    variants = {
        "read": lambda: read(lambda t: t.clone()),
        "read_f32": lambda: read(lambda t: t.float()),
        "sha256": lambda: [sha256_file(f) for f in files],
    }
    out = {name: summarize(repeat_timed(fn, spec["repeats"], spec["max_seconds"])) for name, fn in variants.items()}
    out["file_bytes"] = sum(os.path.getsize(f) for f in files)
    out["tensor_bytes"] = _tensor_bytes(spec["dirs"])
    return out


def case_strategy(spec: dict) -> dict:
    """``aggregate_adapters`` on the folders: wall time with and without the provenance hashing,
    peak memory, bytes read."""
    import torch

    import hf_fedlora
    from hf_fedlora import LoraAdapter, aggregate_adapters

    dirs, name = spec["dirs"], spec["strategy"]
    base = {"maxrss": max_rss_bytes(), **proc_status()}
    info: dict[str, Any] = {}

    held: list = []

    def run() -> None:
        held.append(aggregate_adapters(dirs, strategy=name))

    def release() -> None:  # untimed: measure the output, free it
        result = held.pop()
        if "output_bytes" not in info:
            state = result.state_dict()
            info["output_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
            info["output_rank_max"] = max(result.ranks.values())
        del result
        gc.collect()

    try:
        with AnonPeakSampler() as sampler:
            io0 = io_counters()
            first = repeat_timed(run, 1, cleanup=release)
            io1 = io_counters()
            times = first + repeat_timed(run, spec["repeats"] - 1, spec["max_seconds"] - first[0], cleanup=release) \
                if spec["repeats"] > 1 and first[0] < spec["max_seconds"] else first
            real_sha = LoraAdapter.sha256
            LoraAdapter.sha256 = lambda self: "not-hashed"  # the benchmark's patch, to price the hashing
            try:
                no_hash = repeat_timed(run, spec["repeats"], spec["max_seconds"], cleanup=release)
            finally:
                LoraAdapter.sha256 = real_sha
    except hf_fedlora.AdapterError as exc:
        return {"status": "n/a", "reason": str(exc)}
    ranks = [int(json.load(open(os.path.join(d, "adapter_config.json")))["r"]) for d in dirs]
    a_dim = b_dim = spec["hidden"]
    module_inputs_f32 = sum(r * (a_dim + b_dim) * 4 for r in ranks)
    return {
        "status": "ok",
        "time": summarize(times),
        "time_no_hash": summarize(no_hash),
        "peak_anon_delta": sampler.delta,
        "peak_rss_delta": max_rss_bytes() - base["maxrss"],
        "baseline_rss": base["VmRSS"],
        "rchar_per_run": io1["rchar"] - io0["rchar"],
        "storage_read_bytes_first_run": io1["read_bytes"] - io0["read_bytes"],
        "tensor_bytes": _tensor_bytes(dirs),
        "module_inputs_f32_bytes": module_inputs_f32,
        "torch_threads": torch.get_num_threads(),
        **info,
    }


def _tiny_model(hidden: int, modules: list[tuple[int, str]]):
    """Just the sampled Linear layers of a Llama, at the paths PEFT's keys name."""
    import torch
    from torch import nn

    layers = nn.ModuleList()
    for layer in range(max(m[0] for m in modules) + 1):
        block, attn = nn.Module(), nn.Module()
        for proj in PROJECTIONS:
            if (layer, proj) in modules:
                setattr(attn, proj, nn.Linear(hidden, hidden, bias=False, dtype=torch.float32))
        block.self_attn = attn
        layers.append(block)
    inner, outer = nn.Module(), nn.Module()
    inner.layers = layers
    outer.model = inner
    outer.prepare_inputs_for_generation = lambda *args, **kwargs: {}  # PeftModelForCausalLM asks for it
    return outer


def case_peft(spec: dict) -> dict:
    """PEFT's ``add_weighted_adapter`` on a sample of modules, extrapolated to all of them."""
    import logging

    from peft import PeftModel

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    sample = [(layer, proj) for layer in range(spec["layers"]) for proj in sorted(PROJECTIONS)][: spec["sample"]]
    model = _tiny_model(spec["hidden"], sample)
    dirs = spec["dirs"]
    start = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, dirs[0], adapter_name="c0")
    for k, d in enumerate(dirs[1:], 1):
        peft_model.load_adapter(d, adapter_name=f"c{k}")
    load_s = time.perf_counter() - start
    names = [f"c{k}" for k in range(len(dirs))]
    weights = [1.0 / len(dirs)] * len(dirs)

    def merge() -> None:
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=spec["combination"])
        peft_model.delete_adapter("merged")

    times = summarize(repeat_timed(merge, spec["repeats"], spec["max_seconds"]))
    factor = spec["num_modules"] / len(sample)
    return {
        "combination_type": spec["combination"],
        "sampled_modules": [f"layers.{layer}.self_attn.{proj}" for layer, proj in sample],
        "time_sample": times,
        "extrapolation_factor": factor,
        "time_extrapolated": {"median": times["median"] * factor, "min": times["min"] * factor},
        "load_adapters_s": load_s,
    }


def case_dense_svd(spec: dict) -> dict:
    """FlexLoRA's factored SVD of one module against ``torch.linalg.svd`` of the dense sum."""
    import torch

    from hf_fedlora import LoraAdapter, get_strategy
    from hf_fedlora.strategies import ModuleInputs

    adapters = [LoraAdapter.from_pretrained(d) for d in spec["dirs"]]
    module = adapters[0].modules[0]
    folded = [a.folded_factors(module) for a in adapters]
    p = torch.full((len(adapters),), 1.0 / len(adapters))
    inputs = ModuleInputs(name=module, a=[f[0] for f in folded], b=[f[1] for f in folded], weights=p)
    strategy = get_strategy("flexlora")
    holder: dict[str, Any] = {}

    def flex() -> None:
        holder["ab"] = strategy.aggregate_module(inputs)

    def dense_sum() -> None:
        holder["w"] = sum(w * (b @ a) for w, (a, b) in zip(p, folded))

    def dense_svd() -> None:
        holder["svd"] = torch.linalg.svd(holder["w"], full_matrices=False)

    t_flex = summarize(repeat_timed(flex, spec["repeats"], spec["max_seconds"]))
    t_sum = summarize(repeat_timed(dense_sum, spec["repeats"], spec["max_seconds"]))
    t_svd = summarize(repeat_timed(dense_svd, spec["svd_repeats"], spec["max_seconds"]))
    rank = inputs.max_rank
    u, s, vh = holder["svd"]
    w = holder["w"]
    dense = (u[:, :rank] * s[:rank]) @ vh[:rank]
    a, b = holder["ab"]
    flexr = b @ a
    norm = lambda x: float(torch.linalg.matrix_norm(x))  # noqa: E731
    return {
        "module": module,
        "shape": list(w.shape),
        "sum_ranks": sum(inputs.ranks),
        "target_rank": rank,
        "flexlora": t_flex,
        "dense_sum": t_sum,
        "dense_svd": t_svd,
        "speedup_svd_only": t_svd["median"] / t_flex["median"],
        "speedup_sum_plus_svd": (t_svd["median"] + t_sum["median"]) / t_flex["median"],
        "rel_diff_reconstructions": norm(flexr - dense) / norm(dense),
        "rel_error_flexlora": norm(w - flexr) / norm(w),
        "rel_error_dense": norm(w - dense) / norm(w),
    }


CASES = {"io_floor": case_io_floor, "strategy": case_strategy, "peft": case_peft, "dense_svd": case_dense_svd}


def run_case(spec: dict, isolation: str) -> dict:
    if isolation == "inprocess":
        return CASES[spec["kind"]](spec)
    return run_child([str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                     env={"PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})


def plan(preset: Preset, root: Path, strategies: list[str], with_peft: bool) -> list[dict]:
    common = {"repeats": preset.repeats, "max_seconds": preset.max_seconds, "hidden": preset.hidden,
              "layers": preset.layers, "num_modules": preset.num_modules}
    cases = []
    for n in preset.clients:
        mixed = input_dirs(root, preset, "mixed", n)
        equal = input_dirs(root, preset, "equal", n) if "fedavg" in strategies else None
        cases.append({**common, "kind": "io_floor", "set": "mixed", "n": n, "dirs": mixed})
        if equal:
            cases.append({**common, "kind": "io_floor", "set": "equal", "n": n, "dirs": equal})
        for name in strategies:
            cases.append({**common, "kind": "strategy", "strategy": name, "set": "mixed", "n": n, "dirs": mixed})
            if name == "fedavg":
                cases.append({**common, "kind": "strategy", "strategy": name, "set": "equal", "n": n, "dirs": equal})
        cases.append({**common, "kind": "dense_svd", "set": "mixed", "n": n, "dirs": mixed,
                      "svd_repeats": 1 if preset.hidden >= 2048 else preset.repeats})
        if with_peft:
            for combination, sample in preset.peft_modules.items():
                cases.append({**common, "kind": "peft", "combination": combination, "sample": sample,
                              "set": "mixed", "n": n, "dirs": mixed, "repeats": 1 if combination == "svd" else preset.repeats})
    return cases


def case_key(spec: dict) -> str:
    return "/".join(str(spec.get(k, "")) for k in ("kind", "strategy", "combination", "set", "n"))


def summarize_run(preset: Preset, results: dict[str, dict]) -> dict:
    """The derived table: ratios to the I/O floor and to PEFT, memory growth, target checks."""
    rows, targets = [], {}
    for n in preset.clients:
        floors = {s: results.get(f"io_floor///{s}/{n}") for s in ("mixed", "equal")}
        peft = {c: results.get(f"peft//{c}/mixed/{n}") for c in preset.peft_modules}
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
            row.update({
                "median_s": res["time"]["median"], "min_s": res["time"]["min"],
                "no_hash_median_s": res["time_no_hash"]["median"], "no_hash_min_s": res["time_no_hash"]["min"],
                "floor_median_s": floor["median"], "floor_min_s": floor["min"],
                "sha256_median_s": floors[dataset]["sha256"]["median"],
                "ratio_floor_min": res["time"]["min"] / floor["min"],
                "ratio_floor_median": res["time"]["median"] / floor["median"],
                "ratio_floor_no_hash_min": res["time_no_hash"]["min"] / floor["min"],
                "hash_share": 1 - res["time_no_hash"]["median"] / res["time"]["median"],
                "peak_rss_delta": res["peak_rss_delta"], "peak_anon_delta": res["peak_anon_delta"],
                "output_bytes": res["output_bytes"], "module_inputs_f32_bytes": res["module_inputs_f32_bytes"],
                "anon_over_bound": res["peak_anon_delta"] / (res["output_bytes"] + res["module_inputs_f32_bytes"]),
                "tensor_bytes": res["tensor_bytes"], "rchar_per_run": res["rchar_per_run"],
            })
            if dataset == "mixed":
                for combination, p in peft.items():
                    if p:
                        row[f"speedup_vs_peft_{combination}"] = p["time_extrapolated"]["median"] / res["time"]["median"]
            rows.append(row)
        dense = results.get(f"dense_svd///mixed/{n}")
        if dense:
            targets[f"flexlora_100x_dense_svd_n{n}"] = {
                "speedup_svd_only": dense["speedup_svd_only"], "rel_diff": dense["rel_diff_reconstructions"],
                "met": dense["speedup_svd_only"] >= 100 and dense["rel_diff_reconstructions"] < 1e-3,
            }
    for row in rows:
        if row["strategy"] in PADDING_STRATEGIES and row["status"] == "ok":
            targets[f"{row['strategy']}_2x_floor_n{row['n']}"] = {
                "ratio_min": row["ratio_floor_min"], "ratio_no_hash_min": row["ratio_floor_no_hash_min"],
                "met": row["ratio_floor_min"] <= 2.0,
            }
    growth = {}
    if len(preset.clients) > 1:
        lo, hi = min(preset.clients), max(preset.clients)
        for strategy in {r["strategy"] for r in rows if r["status"] == "ok"}:
            pick = {r["n"]: r for r in rows if r["strategy"] == strategy and r["status"] == "ok"}
            if lo in pick and hi in pick:
                growth[strategy] = {
                    "clients": [lo, hi],
                    "peak_anon_delta": [pick[lo]["peak_anon_delta"], pick[hi]["peak_anon_delta"]],
                    "peak_rss_delta": [pick[lo]["peak_rss_delta"], pick[hi]["peak_rss_delta"]],
                    "output_bytes": [pick[lo]["output_bytes"], pick[hi]["output_bytes"]],
                }
    return {"rows": rows, "targets": targets, "memory_growth": growth}


def plot(preset: Preset, run: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run["summary"]["rows"] if r["status"] == "ok"]
    names = sorted({(r["strategy"], r["set"]) for r in rows})
    files = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(preset.clients)
    labels = [f"{s}" + (" (equal ranks)" if d == "equal" else "") for s, d in names]
    for j, n in enumerate(preset.clients):
        vals = [next((r["ratio_floor_min"] for r in rows if (r["strategy"], r["set"]) == nm and r["n"] == n), 0)
                for nm in names]
        peft_vals = []
        for combination in preset.peft_modules:
            p = run["cases"].get(f"peft//{combination}/mixed/{n}")
            floor = run["cases"].get(f"io_floor///mixed/{n}")
            peft_vals.append(p["time_extrapolated"]["min"] / floor["read"]["min"] if p and floor else 0)
        xs = [i + j * width for i in range(len(names) + len(peft_vals))]
        ax.bar(xs, vals + peft_vals, width, label=f"{n} clients")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names) + len(preset.peft_modules))])
    ax.set_xticklabels(labels + [f"PEFT {c} (extrap.)" for c in preset.peft_modules], rotation=30, ha="right")
    ax.axhline(2.0, color="k", ls="--", lw=1, label="2x I/O floor target")
    ax.set_yscale("log")
    ax.set_ylabel("wall time / I/O floor (min of repeats)")
    ax.set_title(f"Aggregation time, {preset.layers} layers x 4 modules of {preset.hidden}x{preset.hidden} ({preset.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"aggregation_{preset.name}_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path.name)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k, (metric, style) in enumerate((("peak_anon_delta", "-o"), ("peak_rss_delta", ":x"))):
        for i, nm in enumerate(names):
            pts = sorted((r["n"], r[metric]) for r in rows if (r["strategy"], r["set"]) == nm)
            ax.plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], style, color=f"C{i}",
                    label=f"{labels[i]}" if k == 0 else None)
    ax.set_xlabel("clients")
    ax.set_ylabel("MiB above the imported-interpreter baseline")
    ax.set_yscale("log")
    ax.set_title("Peak memory: anonymous RSS (solid) vs ru_maxrss incl. mmapped files (dotted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"aggregation_{preset.name}_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path.name)
    return files


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_markdown(report: dict) -> str:
    """The results page, generated from the JSON (no hand-typed numbers)."""
    out = ["# Aggregation speed and memory", "",
           f"Generated by `benchmarks/bench_aggregation.py` from `aggregation.json`; do not edit by hand.", ""]
    for name in ("full", "quick", "smoke"):
        run = report.get("presets", {}).get(name)
        if not run:
            continue
        p = run["preset"]
        s = run["summary"]
        done = "" if run.get("complete", True) else f" **PARTIAL: {run['cases_done']} cases measured so far.**"
        out += [f"## Preset `{name}`", "",
                f"Command: `{run['command']}` ({run['finished']}, {run['elapsed_s']:.0f} s in all).{done}", "",
                f"Inputs: {p['layers']} layers x {{q,k,v,o}}_proj of {p['hidden']}x{p['hidden']}, client k has rank "
                f"{p['ranks']}[k mod {len(p['ranks'])}] and `lora_alpha = 2r`, bf16 safetensors written in PEFT's format; "
                f"{p['clients']} clients, uniform weights. `fedavg` also runs on an equal-rank set (every client r={p['equal_rank']}).",
                "", "Machine: " + ", ".join(f"{k}={v}" for k, v in run["machine"].items()), "",
                "**Caveats.** " + " ".join(run["notes"]), ""]
        out += ["### Wall time, memory, bytes read", "",
                "Ratios use the minimum over repeats (median in brackets). `no sha256` is the same call with the "
                "provenance hashing patched out by the benchmark. Peak memory is above the baseline of an "
                "interpreter that imported torch and hf_fedlora; `bound` = output + one module's inputs in float32.", ""]
        header = ["clients", "strategy", "median s", "min s", "x I/O floor", "no sha256: s (x floor)",
                  "sha256 share", "peak anon", "ru_maxrss", "anon / bound", "tensor bytes", "read() bytes",
                  "vs PEFT svd", "vs PEFT cat"]
        table = []
        for r in s["rows"]:
            label = r["strategy"] + (" (equal ranks)" if r["set"] == "equal" else "")
            if r["status"] != "ok":
                table.append([r["n"], label, "n/a: " + r["reason"].split(";")[0].replace("|", "/")] + [""] * 11)
                continue
            table.append([
                r["n"], label, _f(r["median_s"]), _f(r["min_s"]),
                f"{r['ratio_floor_min']:.1f} ({r['ratio_floor_median']:.1f})",
                f"{_f(r['no_hash_min_s'])} ({r['ratio_floor_no_hash_min']:.1f})",
                f"{100 * r['hash_share']:.0f}%", fmt_bytes(r["peak_anon_delta"]), fmt_bytes(r["peak_rss_delta"]),
                _f(r["anon_over_bound"]), fmt_bytes(r["tensor_bytes"]), fmt_bytes(r["rchar_per_run"]),
                f"{r['speedup_vs_peft_svd']:.0f}x" if "speedup_vs_peft_svd" in r else "n/a",
                f"{r['speedup_vs_peft_cat']:.1f}x" if "speedup_vs_peft_cat" in r else "n/a",
            ])
        out += [markdown_table(header, table), ""]
        out += ["### I/O floor (same run, warm page cache)", ""]
        ftable = []
        for key, c in run["cases"].items():
            if key.startswith("io_floor"):
                _, _, _, dataset, n = key.split("/")
                ftable.append([n, dataset, fmt_bytes(c["tensor_bytes"]), _f(c["read"]["min"], 3), _f(c["read"]["median"], 3),
                               _f(c["read_f32"]["min"], 3), _f(c["sha256"]["min"], 3), _f(c["sha256"]["median"], 3),
                               f"{c['file_bytes'] / c['sha256']['min'] / 2**20:.0f} MiB/s"])
        out += [markdown_table(["clients", "set", "tensor bytes", "read min s", "read median s", "read+to f32 min s",
                                "sha256 min s", "sha256 median s", "sha256 rate"], ftable), ""]
        out += ["### PEFT `add_weighted_adapter` (sampled modules, extrapolated)", ""]
        ptable = []
        for key, c in run["cases"].items():
            if key.startswith("peft"):
                n = key.split("/")[-1]
                ptable.append([n, c["combination_type"], ", ".join(c["sampled_modules"]), _f(c["time_sample"]["median"]),
                               f"x{c['extrapolation_factor']:.0f}", _f(c["time_extrapolated"]["median"], 1),
                               _f(c["load_adapters_s"], 1)])
        out += [markdown_table(["clients", "combination", "sampled modules", "sample median s", "extrapolation",
                                "EXTRAPOLATED all-module s", "load_adapter s (not counted)"], ptable), ""]
        out += ["### FlexLoRA: factored SVD vs dense `torch.linalg.svd` (one module)", ""]
        dtable = []
        for key, c in run["cases"].items():
            if key.startswith("dense_svd"):
                n = key.split("/")[-1]
                dtable.append([n, c["module"], c["sum_ranks"], c["target_rank"], _f(c["flexlora"]["median"], 4),
                               _f(c["dense_sum"]["median"], 3), _f(c["dense_svd"]["median"], 2),
                               f"{c['speedup_svd_only']:.0f}x", f"{c['rel_diff_reconstructions']:.1e}",
                               f"{c['rel_error_flexlora']:.4f} / {c['rel_error_dense']:.4f}"])
        out += [markdown_table(["clients", "module", "sum r_k", "R", "flexlora s", "dense sum s", "dense svd s",
                                "speedup (svd only)", "rel. diff of rank-R results", "rel. error vs sum: flex / dense"],
                               dtable), ""]
        out += ["### Targets", ""]
        out += [markdown_table(["target", "met", "numbers"],
                               [[k, "yes" if v["met"] else "**no**", ", ".join(f"{a}={_f(b, 3) if isinstance(b, float) else b}"
                                                                          for a, b in v.items() if a != "met")]
                                for k, v in s["targets"].items()]), ""]
        if s["memory_growth"]:
            out += ["### Does memory grow with the number of clients?", ""]
            out += [markdown_table(["strategy", "clients", "peak anon", "ru_maxrss", "output"],
                                   [[k, " -> ".join(map(str, g["clients"])),
                                     " -> ".join(fmt_bytes(x) for x in g["peak_anon_delta"]),
                                     " -> ".join(fmt_bytes(x) for x in g["peak_rss_delta"]),
                                     " -> ".join(fmt_bytes(x) for x in g["output_bytes"])]
                                    for k, g in sorted(s["memory_growth"].items())]), ""]
        out += [f"![time]({f})" for f in run["plots"]] + [""]
    return "\n".join(out)


NOTES = [
    "Every case is repeated; the minimum (least disturbed) and the median are reported, and every ratio is "
    "measured in the same run. The machine line gives the load average when the run started.",
    "The I/O floor is warm-cache: the inputs were just written (or read) and sit in the page cache, as they do "
    "for every strategy timed after them; no case reads from the disk itself (see `storage_read_bytes_first_run`).",
    "The I/O floor is safetensors `safe_open` + `get_tensor` of every tensor, copied into process memory "
    "(`clone()`, since `get_tensor` can return a view of the mapped file).",
    "`tensor bytes` is the size of every input tensor, which each strategy reads once with positioned reads "
    "(`readinto`, no memory map); `read() bytes` is everything read through read() calls: those tensor reads "
    "plus the sha256 pass over every file for the provenance record.",
    "`ru_maxrss` is the growth of the process's peak resident set over the baseline; `peak anon` (sampled every "
    "2 ms) is the anonymous memory the process owns.",
    "PEFT times cover `add_weighted_adapter` only (adapters already loaded into a PeftModel holding just the "
    "sampled Linear layers) and are EXTRAPOLATED linearly from the stated modules to all modules.",
    "Each strategy, I/O floor and PEFT case ran in a fresh subprocess (except the in-process `smoke` preset).",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--clients", type=int, nargs="+", help="override the preset's client counts")
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument("--repeats", type=int, help="override the preset's repeats")
    parser.add_argument("--strategies", nargs="+", help="default: hf_fedlora.list_strategies()")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's add_weighted_adapter")
    parser.add_argument("--isolation", choices=["subprocess", "inprocess"])
    parser.add_argument("--data-dir", type=Path, help="where inputs are generated and cached (default: roomiest temp dir)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs (and partial results)")
    parser.add_argument("--resume", action="store_true", help="reuse case results saved by an interrupted run")
    parser.add_argument("--report-only", action="store_true",
                        help="only re-render aggregation.md from aggregation.json (with the current notes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report_only:
        report = json.loads((args.out / "aggregation.json").read_text())
        for run in report.get("presets", {}).values():
            run["notes"] = NOTES
        write_json(args.out / "aggregation.json", report)
        (args.out / "aggregation.md").write_text(render_markdown(report), encoding="utf-8")
        return report
    if args.child:
        spec = json.loads(args.child)
        write_child_result(CASES[spec["kind"]](spec))
        return {}

    import hf_fedlora

    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in (("clients", tuple(args.clients) if args.clients else None), ("layers", args.layers),
                                   ("repeats", args.repeats), ("isolation", args.isolation)) if v is not None}
    preset = dataclasses.replace(preset, **overrides)
    strategies = args.strategies or hf_fedlora.list_strategies()
    root = (args.data_dir or roomiest_temp_dir()) / "hf_fedlora_bench_aggregation"
    partial = root / preset.signature / f"partial_{preset.name}.json"
    started = time.time()
    print(f"[bench] inputs under {root} (generated where missing)", flush=True)
    cases = plan(preset, root, strategies, with_peft=not args.no_peft)
    done = json.loads(partial.read_text()) if args.resume and partial.is_file() else {}
    command = "python benchmarks/bench_aggregation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run: dict = {}
    for i, spec in enumerate(cases):
        key = case_key(spec)
        if key in done:
            print(f"[bench] {key}: cached", flush=True)
            continue
        ensure_inputs(preset, spec["dirs"])
        t0 = time.perf_counter()
        done[key] = run_case(spec, preset.isolation)
        print(f"[bench] {key}: {time.perf_counter() - t0:.1f} s", flush=True)
        write_json(partial, done)
        if preset.name == "full":  # long runs publish what they have after every case
            run = write_report(args.out, preset, done, strategies, command, started, len(cases))
    run = write_report(args.out, preset, done, strategies, command, started, len(cases))
    if not args.keep:
        shutil.rmtree(root / preset.signature, ignore_errors=True)
    print(f"[bench] wrote {args.out / 'aggregation.json'} and aggregation.md in {time.time() - started:.0f} s", flush=True)
    return run


def write_report(out: Path, preset: Preset, done: dict, strategies: list[str], command: str, started: float,
                 num_cases: int) -> dict:
    """Summarise the cases measured so far into ``aggregation.json`` (this preset's section), the
    markdown page and the plots."""
    run = {
        "preset": dataclasses.asdict(preset),
        "command": command,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "elapsed_s": time.time() - started,
        "complete": len(done) >= num_cases,
        "cases_done": f"{len(done)}/{num_cases}",
        "machine": machine_info(),
        "notes": NOTES,
        "strategies": strategies,
        "cases": done,
    }
    run["summary"] = summarize_run(preset, done)
    out.mkdir(parents=True, exist_ok=True)
    run["plots"] = plot(preset, run, out)
    json_path = out / "aggregation.json"
    report = json.loads(json_path.read_text()) if json_path.is_file() else {}
    report.setdefault("presets", {})[preset.name] = run
    write_json(json_path, report)
    (out / "aggregation.md").write_text(render_markdown(report), encoding="utf-8")
    return run


if __name__ == "__main__":
    main()
