"""Aggregation speed and memory: what one round costs the server.

Writes synthetic PEFT adapters with the shapes of a 7B Llama (q/k/v/o projections, 4096 x 4096,
ranks mixed over {8, 16, 32, 64}, bf16 safetensors, ``lora_alpha = 2 r``), then measures, each in a
fresh interpreter, every strategy of ``hf_fedlora.list_strategies()``, the I/O floor (reading every
input tensor once with safetensors, same warm page cache), the sha256 hashing that
``aggregate_adapters`` does for provenance, PEFT's ``add_weighted_adapter`` (``svd`` and ``cat``, on a
stated sample of modules, extrapolated) and FlexLoRA's factored SVD against a dense SVD.

    python benchmarks/bench_aggregation.py --preset quick          # a few minutes
    python benchmarks/bench_aggregation.py --preset full --keep    # 32 layers, 10 and 50 clients
    python benchmarks/bench_aggregation.py --preset streaming      # StreamingAggregator vs the list, 10-1,000 clients
    python benchmarks/bench_aggregation.py --report-only           # rewrite the page from the JSON
    python benchmarks/bench_aggregation.py --preset full --publish # write docs/results/ (committed results)

Presets are ``configs/aggregation_<preset>.yaml``; the cases are in ``aggregation_cases.py``, the
summary, plots and page in ``report_aggregation.py``. Results go to ``aggregation.json`` (one
section per preset), ``aggregation.md`` (rendered from the JSON) and ``aggregation_<preset>_*.png``
in a scratch folder (``--out``, default ``bench_results/`` under the working directory); only
``--publish`` writes the committed ``docs/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aggregation_cases  # noqa: E402
import report_aggregation  # noqa: E402
from _common import load_preset, machine_info, preset_names, roomiest_temp_dir, run_child, write_json  # noqa: E402
from aggregation_cases import Preset, ensure_inputs, input_dirs  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = REPO_ROOT / "docs" / "results"
PADDING_AND_FEDAVG = ("zero_padding", "replication", "hetlora", "fedavg")


def run_case(spec: dict, isolation: str) -> dict:
    """One case, in this process or in a fresh interpreter (``isolation``)."""
    if isolation == "inprocess":
        return aggregation_cases.run_case(spec)
    return run_child(
        [aggregation_cases.__file__, json.dumps(spec)],
        env={"PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )


def plan(preset: Preset, root: Path, strategies: list[str], with_peft: bool) -> list[dict]:
    """Every case of a preset, in the order they run (a ``streaming`` preset: each strategy for
    heterogeneous ranks whose rank does not grow with the clients, as a list and streamed, at each
    client count)."""
    from hf_fedlora import get_strategy

    common = {
        "repeats": preset.repeats,
        "max_seconds": preset.max_seconds,
        "hidden": preset.hidden,
        "layers": preset.layers,
        "num_modules": preset.num_modules,
    }
    cases = []
    if preset.kind == "streaming":
        for n in preset.clients:
            mixed = input_dirs(root, preset, "mixed", n)
            for name in strategies:
                rule = get_strategy(name)  # stacking's rank would pass the layer's size: not a LoRA
                if rule.rank_grows_with_clients or not rule.supports_heterogeneous_ranks:
                    continue
                for mode in ("list", "stream"):
                    case = {**common, "kind": "streaming", "strategy": name, "set": "mixed", "n": n}
                    cases.append({**case, "combination": mode, "mode": mode, "dirs": mixed})
        return cases
    for n in preset.clients:
        mixed = input_dirs(root, preset, "mixed", n)
        equal = input_dirs(root, preset, "equal", n) if "fedavg" in strategies else None
        for name in preset.streaming_strategies:  # streaming vs list on these shapes
            for mode in ("list", "stream"):
                case = {**common, "kind": "streaming", "strategy": name, "set": "mixed", "n": n}
                cases.append({**case, "combination": mode, "mode": mode, "dirs": mixed})
        cases.append({**common, "kind": "io_floor", "set": "mixed", "n": n, "dirs": mixed})
        if equal:
            cases.append({**common, "kind": "io_floor", "set": "equal", "n": n, "dirs": equal})
        for name in strategies:
            # the rules with a floor target are also timed with their inputs already in memory
            strategy = {
                **common,
                "kind": "strategy",
                "strategy": name,
                "in_memory": name in PADDING_AND_FEDAVG,
            }
            cases.append({**strategy, "set": "mixed", "n": n, "dirs": mixed})
            if name == "fedavg":
                cases.append({**strategy, "set": "equal", "n": n, "dirs": equal})
        cases.append(
            {
                **common,
                "oversample": 16,
                "power_iterations": 2,
                "kind": "dense_svd",
                "set": "mixed",
                "n": n,
                "dirs": mixed,
                "svd_repeats": 1 if preset.hidden >= 2048 else preset.repeats,
            }
        )
        if with_peft:
            for combination, sample in preset.peft_modules.items():
                cases.append(
                    {
                        **common,
                        "kind": "peft",
                        "combination": combination,
                        "sample": sample,
                        "set": "mixed",
                        "n": n,
                        "dirs": mixed,
                        "repeats": 1 if combination == "svd" else preset.repeats,
                    }
                )
    # what the targets need first (floors, padding rules, fedavg, the SVD comparison), for every client
    # count, then the rest: a run cut short still has every ratio measured side by side
    first = ("io_floor", "dense_svd")
    critical = [
        c
        for c in cases
        if c["kind"] in first or c.get("strategy") in PADDING_AND_FEDAVG and c["kind"] == "strategy"
    ]
    rest = [c for c in cases if c not in critical]
    return [c for c in critical + rest if case_key(c) not in preset.skip]


def case_key(spec: dict) -> str:
    return "/".join(str(spec.get(k, "")) for k in ("kind", "strategy", "combination", "set", "n"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=preset_names("aggregation"),
        default="quick",
        help="configs/aggregation_<preset>.yaml",
    )
    parser.add_argument("--clients", type=int, nargs="+", help="override the preset's client counts")
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument("--repeats", type=int, help="override the preset's repeats")
    parser.add_argument("--strategies", nargs="+", help="default: hf_fedlora.list_strategies()")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's add_weighted_adapter")
    parser.add_argument("--isolation", choices=["subprocess", "inprocess"])
    parser.add_argument(
        "--data-dir", type=Path, help="where inputs are generated and cached (default: roomiest temp dir)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where results are written (default: ./bench_results, a scratch folder; see --publish)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"write the committed results in {PUBLISHED} (default: the scratch folder of --out); "
        "applies to --report-only too",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs (and partial results)")
    parser.add_argument(
        "--resume", action="store_true", help="reuse case results saved by an interrupted run"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only re-render aggregation.md from aggregation.json (current notes and summaries), in the "
        "--out folder (docs/results/ only with --publish)",
    )
    args = parser.parse_args(argv)
    if args.publish and args.out is not None and args.out.resolve() != PUBLISHED.resolve():
        parser.error("--publish writes docs/results/; do not combine it with another --out")
    args.out = PUBLISHED if args.publish else (args.out or Path.cwd() / "bench_results")
    if args.report_only:
        report = json.loads((args.out / "aggregation.json").read_text())
        for run in report.get("presets", {}).values():  # summaries recomputed from the measured cases
            streaming = run["preset"].get("kind") == "streaming"
            run["notes"] = report_aggregation.STREAMING_NOTES if streaming else report_aggregation.NOTES
            if streaming:
                run["summary"] = report_aggregation.summarize_streaming(run["cases"])
            else:
                run["summary"] = report_aggregation.summarize_run(run["preset"], run["cases"])
        report_aggregation.write_pages(args.out, report)
        return report

    import hf_fedlora

    preset = load_preset(Preset, "aggregation", args.preset)
    overrides = {
        k: v
        for k, v in (
            ("clients", tuple(args.clients) if args.clients else None),
            ("layers", args.layers),
            ("repeats", args.repeats),
            ("isolation", args.isolation),
        )
        if v is not None
    }
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
    for spec in cases:
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
    print(
        f"[bench] wrote {args.out / 'aggregation.json'} and aggregation.md in {time.time() - started:.0f} s",
        flush=True,
    )
    return run


def write_report(
    out: Path, preset: Preset, done: dict, strategies: list[str], command: str, started: float, num_cases: int
) -> dict:
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
        "notes": report_aggregation.NOTES,
        "strategies": strategies,
        "cases": done,
    }
    out.mkdir(parents=True, exist_ok=True)
    if preset.kind == "streaming":
        run["notes"] = report_aggregation.STREAMING_NOTES
        run["summary"] = report_aggregation.summarize_streaming(done)
        run["plots"] = report_aggregation.plot_streaming(run, out)
    else:
        run["summary"] = report_aggregation.summarize_run(run["preset"], done)
        run["plots"] = report_aggregation.plot(run, out)
    json_path = out / "aggregation.json"
    report = json.loads(json_path.read_text()) if json_path.is_file() else {}
    report.setdefault("presets", {})[preset.name] = run
    report_aggregation.write_pages(out, report)
    return run


if __name__ == "__main__":
    main()
