"""Convergence on real data: does replication beat zero-padding? (Byun & Lee, arXiv 2406.17477)

Runs the recipe's federation (``hf_fedlora.federation.run_federation``, in-process) on AG News with
the embedded all-MiniLM-L6-v2, once per (strategy, seed), with the seed paper's setup scaled to CPU:
100 clients, 10 sampled per round, one local epoch, 10% class-balanced ("high-quality") clients and
a Dirichlet(0.5) label skew for the rest; the class-balanced clients train at rank 20 and the rest at
rank 5 (what the paper's quality upgrade aims at); preset ``paper`` (and ``--rank-mode
quality_upgrade``) runs the upgrade itself: everyone at rank 5, every client scored after round 1,
the top 10% moved to rank 20. Heterogeneous strategies: replication, zero_padding, hetlora,
flexlora, stacking; baselines: homogeneous rank 5 and rank 20 (fedavg).

    python benchmarks/bench_convergence.py --preset quick          # replication vs zero_padding, 1 seed
    python benchmarks/bench_convergence.py --preset full --resume  # all strategies, 3 seeds, 30 rounds
    python benchmarks/bench_convergence.py --preset paper --resume # the paper's rank upgrade, 3 seeds
    python benchmarks/bench_convergence.py --preset full --jobs 11 --threads 1  # on a GPU machine: 4.6 min (H200)
    python benchmarks/bench_convergence.py --preset full --report-only --publish  # rewrite docs/results/

Issue 15's presets (runs are ``<strategy>[+nested][+revive]@<cell>-seed<k>``): ``regimes``
(replication / zero_padding / flexlora in 7 regime cells) and ``beyond`` (raflora, nested-rank
training, revived slots and their combinations against replication, flexlora and stacking), 5 seeds,
30 rounds, all 7,600 test rows every round; on a GPU machine, both (resumable; rerun the same line
until the page says every run is complete):

    python benchmarks/bench_convergence.py --preset regimes --resume --jobs 16 --threads 1 --max-minutes 9 --publish && \
    python benchmarks/bench_convergence.py --preset beyond --resume --jobs 16 --threads 1 --max-minutes 9 --publish

``regimes_cpu`` and ``beyond_cpu`` are their CPU subsets (one cell, 3 rounds, 2,000 rows per round).
Results go to ``<workdir>/results/`` unless ``--publish`` (``docs/results/``) or ``--out``.

Measured per run: accuracy of the global adapter on a fixed test subset after every round, the final
global adapter on the full test set, bytes up/down (from ``metrics.jsonl``), and the post-aggregation
diagnostic: for every round after the upgrade and every sampled rank-20 client, its own adapter's
accuracy (before aggregation) and that of its rank-20 view of the round's global adapter (after).

Runs go to ``<workdir>/<preset>/<strategy>-seed<k>/``; a killed benchmark continues with ``--resume``
(complete runs are skipped, a partial run resumes from its last complete round). Results:
``convergence_<preset>.json``, ``.md`` (rendered from the JSON) and ``_*.png``, in ``--out``.

Presets are ``configs/convergence_<preset>.yaml``; one run and its measurements are in
``convergence_runs.py``, the summaries, plots and page in ``report_convergence.py``. Torch's thread
count is set here, in this process and in every worker of ``--jobs`` (``--threads``).
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report_convergence  # noqa: E402
from _common import machine_info, preset_names, write_json  # noqa: E402
from convergence_runs import Preset, collect_run, load_presets, parse_label, run_one  # noqa: E402
from report_convergence import run_name  # noqa: E402
from report_paired import subset_summary  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "ag_news"


def set_threads(threads: int) -> None:
    """Torch's intra-op threads in this process: ``threads``, or every core for 0 (``--threads``).

    The library leaves the thread count to its caller; on a machine shared with other work, two
    threads on a busy core spin at their barriers (a round took 5-10x longer than with one)."""
    import torch

    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))


def run_commands(workdir: Path, preset: Preset) -> list[str]:
    path = workdir / preset.name / "commands.json"
    return json.loads(path.read_text()) if path.is_file() else []


def write_report(
    preset: Preset,
    workdir: Path,
    out: Path,
    command: str,
    started: float,
    machine: dict,
    report_only: bool = False,
) -> dict:
    """Collect the preset's runs from ``workdir`` into ``convergence_<preset>.json``, its page and
    plots in ``out``. With ``report_only`` and no run in ``workdir``, the page is rendered again
    from the JSON already in ``out``."""
    previous = out / f"convergence_{preset.name}.json"
    notes_path = workdir / preset.name / "notes.json"
    runs = {}
    for strategy in preset.labels():
        for seed in preset.seeds:
            r = collect_run(preset, strategy, seed, workdir)
            if r is not None:
                runs[run_name(strategy, seed)] = r
    if report_only and not runs and previous.is_file():
        report = json.loads(previous.read_text())
        if notes_path.is_file():  # notes added since, with --note
            report["notes"] = json.loads(notes_path.read_text())
        _attach_cpu_subset(report, preset.name, out)
        report_convergence.write_pages(out, report)
        return report
    described = {
        "name": preset.name,
        "strategies": preset.labels(),
        "base_strategies": list(preset.strategies),
        "cells": preset.cells,
        "seeds": list(preset.seeds),
        "rounds": preset.rounds,
        "targets": list(preset.targets),
        **preset.settings(),
    }
    summary = report_convergence.summarize_all(described, runs)
    devices = sorted({c["device"] for r in runs.values() for c in r["chunks"] if c.get("device")})
    report = {
        "notes": json.loads(notes_path.read_text()) if notes_path.is_file() else [],
        "benchmark": "convergence",
        "preset": described,
        "machine": machine,
        "load_average_at_end": list(os.getloadavg()),
        "command": command,
        "run_commands": run_commands(workdir, preset),
        "invocation_seconds": round(time.perf_counter() - started, 1),
        "compute_seconds_complete": round(
            sum(
                r["loop_seconds"] + (r["final_test_seconds"] or 0) + (r["diagnostic_seconds"] or 0)
                for r in runs.values()
                if r["complete"]
            ),
            1,
        ),
        "runs": runs,
        "summary": summary,
        "devices": devices,
    }
    if (
        report_only and previous.is_file()
    ):  # the page describes the invocation that ran the runs, not this one
        kept = json.loads(previous.read_text())
        report.update(
            {
                k: kept[k]
                for k in ("machine", "load_average_at_end", "command", "invocation_seconds")
                if k in kept
            }
        )
    report["progress"] = report_convergence.progress(described, runs)
    _attach_cpu_subset(report, preset.name, out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = report_convergence.plot(described, summary, out)
    report_convergence.write_pages(out, report)
    return report


def _attach_cpu_subset(report: dict[str, Any], name: str, out: Path) -> None:
    """A GPU preset's page shows what its CPU subset (``convergence_<name>_cpu.json`` in ``out``)
    has measured, as of now."""
    sibling = out / f"convergence_{name}_cpu.json"
    if sibling.is_file():
        report["cpu_subset"] = subset_summary(json.loads(sibling.read_text()))


def run_order(preset: Preset) -> list[tuple[int, str]]:
    """Seed by seed (so a chunked invocation completes the first seeds of every cell first, and
    paired runs finish together); within a seed, cell by cell, replication and zero-padding (the
    question asked) before the other strategies."""
    order = []
    for seed in preset.seeds:
        for cell in preset.cells or [None]:
            labels = [lb for lb in preset.labels() if parse_label(lb)[2] == cell]
            first = [lb for lb in labels if lb.split("@")[0] in ("replication", "zero_padding")]
            order += [(seed, lb) for lb in first + [lb for lb in labels if lb not in first]]
    return order


def _job(
    preset: Preset, strategy: str, seed: int, workdir: Path, data_dir: Path, threads: int | None, prune: bool
) -> str:
    """One run in a worker process of ``--jobs`` (started with :func:`set_threads`)."""
    run_one(preset, strategy, seed, workdir, data_dir, _log, threads=threads, prune=prune)
    return run_name(strategy, seed)


def _log(msg: str) -> None:
    print(f"[bench_convergence {time.strftime('%H:%M:%S')} pid {os.getpid()}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=preset_names("convergence"),
        default="quick",
        help="configs/convergence_<preset>.yaml",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        help="run only these of the preset's strategies (e.g. replication, zero_padding+revive) now (the "
        "results still cover the whole preset)",
    )
    parser.add_argument("--cells", nargs="+", help="run only these of the preset's regime cells now")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these of the preset's seeds now")
    parser.add_argument("--rounds", type=int, help="override the preset's rounds")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "outputs" / "bench_convergence")
    parser.add_argument(
        "--data-dir", type=Path, default=DATA_DIR, help="AG News folder (train.tsv, test.tsv)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where the JSON, page and plots go (default: <workdir>/results, a scratch folder; "
        "--publish: docs/results/)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write the results to docs/results/ (the committed pages), unless --out says otherwise",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the preset's runs in --workdir: skip complete ones, resume partial ones",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite the results from --workdir (where it holds none of the preset's runs: "
        "only the page, from the JSON in --out)",
    )
    parser.add_argument(
        "--rank-mode",
        choices=["high_quality_clients", "quality_upgrade"],
        help="override the preset's rank assignment (rank_mode in its YAML)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1: on a shared machine 2 threads on a busy core were "
        "5-10x slower; 0: every core, as the recipe does)",
    )
    parser.add_argument(
        "--note", help="a line about this invocation to keep on the results page (e.g. what was interrupted)"
    )
    parser.add_argument("--max-minutes", type=float, help="start no new run after this many minutes")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="delete a complete run's adapters, keeping its JSON (enough for the report and --resume)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="runs at a time, each in its own process with --threads threads (default 0: as many as "
        "the cores allow, e.g. 2 on 2 cores; on a GPU machine the runs share the GPU)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu"],
        default="auto",
        help="auto: the GPU when there is one (training, evaluation); cpu: never the GPU",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = REPO_ROOT / "docs" / "results" if args.publish else args.workdir / "results"
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    started = time.perf_counter()
    preset = load_presets()[args.preset]
    preset = dataclasses.replace(
        preset,
        **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in (("rounds", args.rounds), ("rank_mode", args.rank_mode))
            if v is not None
        },
    )
    set_threads(args.threads)
    machine = {**machine_info(), "bench_threads": args.threads or None, "jobs": args.jobs}
    command = "python benchmarks/bench_convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log = lambda msg: print(f"[bench_convergence {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    notes_path = args.workdir / preset.name / "notes.json"
    if args.note:
        notes = json.loads(notes_path.read_text()) if notes_path.is_file() else []
        write_json(notes_path, [*notes, f"{time.strftime('%Y-%m-%d %H:%M')}: {args.note}"])
    if not args.report_only:
        if not (args.data_dir / "train.tsv").is_file():
            raise FileNotFoundError(f"no AG News train.tsv in '{args.data_dir}'; pass --data-dir")
        preset_dir = args.workdir / preset.name
        if preset_dir.exists() and not args.resume:
            log(f"removing the previous runs in '{preset_dir}' (pass --resume to keep them)")
            shutil.rmtree(preset_dir)
            if args.note:
                write_json(notes_path, [f"{time.strftime('%Y-%m-%d %H:%M')}: {args.note}"])
        commands_path = preset_dir / "commands.json"
        write_json(
            commands_path,
            [*run_commands(args.workdir, preset), f"{time.strftime('%Y-%m-%d %H:%M')}: {command}"],
        )
        extra = (
            sorted(set(args.strategies or []) - {lb.split("@")[0] for lb in preset.labels()})
            + sorted(set(args.seeds or []) - set(preset.seeds))
            + sorted(set(args.cells or []) - set(preset.cells or []))
        )
        if extra:
            raise SystemExit(f"{extra} are not in preset {preset.name!r}")
        todo = [
            (seed, label)
            for seed, label in run_order(preset)
            if not (args.strategies and label.split("@")[0] not in args.strategies)
            and not (args.seeds and seed not in args.seeds)
            and not (args.cells and parse_label(label)[2] not in args.cells)
        ]
        args.jobs = args.jobs or max(1, min(len(todo), (os.cpu_count() or 1) // max(1, args.threads or 1)))
        machine["jobs"] = args.jobs
        if args.jobs > 1:
            _run_parallel(args, preset, todo, started, command, machine, log)
        for seed, strategy in todo if args.jobs <= 1 else []:
            if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
                log("time budget reached; continue with --resume")
                break
            run_one(
                preset,
                strategy,
                seed,
                args.workdir,
                args.data_dir,
                log,
                threads=args.threads or None,
                prune=args.prune,
            )
            write_report(preset, args.workdir, args.out, command, started, machine)
    report = write_report(
        preset, args.workdir, args.out, command, started, machine, report_only=args.report_only
    )
    log(f"wrote {args.out / f'convergence_{preset.name}.md'}")
    return report


def _run_parallel(
    args: argparse.Namespace,
    preset: Preset,
    todo: list[tuple[int, str]],
    started: float,
    command: str,
    machine: dict,
    log: Any,
) -> None:
    """``todo`` in ``args.jobs`` worker processes; the results page is rewritten as each run ends."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(
        max_workers=args.jobs, mp_context=context, initializer=set_threads, initargs=(args.threads,)
    ) as pool:
        pending = {
            pool.submit(
                _job, preset, strategy, seed, args.workdir, args.data_dir, args.threads or None, args.prune
            )
            for seed, strategy in todo
        }
        failed = []
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    failed.append(repr(future.exception()))
                    log(f"a run failed: {failed[-1]}")
                else:
                    log(f"{future.result()} finished")
            write_report(preset, args.workdir, args.out, command, started, machine)
            if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
                log("time budget reached: cancelling the runs not yet started; continue with --resume")
                for future in pending:
                    future.cancel()
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {failed}")


if __name__ == "__main__":
    main()
