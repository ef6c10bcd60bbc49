"""Convergence on real data: does replication beat zero-padding? (Byun & Lee, arXiv 2406.17477)

Runs the recipe's federation (``hf_fedlora.federation.run_federation``, in-process) on AG News with
the embedded all-MiniLM-L6-v2, once per (strategy, seed), with the seed paper's setup scaled to CPU:
100 clients, 10 sampled per round, one local epoch, 10% class-balanced ("high-quality") clients and a
Dirichlet(0.5) label skew for the rest; the class-balanced clients train at rank 20 and the rest at rank 5
(what the paper's quality upgrade aims at); preset ``paper`` (and ``--rank-mode quality_upgrade``) runs the
upgrade itself: everyone at rank 5, every client scored after round 1, the top 10% moved to rank 20. Heterogeneous strategies: replication,
zero_padding, hetlora, flexlora, stacking; baselines: homogeneous rank 5 and rank 20 (fedavg).

    python benchmarks/bench_convergence.py --preset quick          # replication vs zero_padding, 1 seed
    python benchmarks/bench_convergence.py --preset full --resume  # all strategies, 3 seeds, 30 rounds
    python benchmarks/bench_convergence.py --preset paper --resume # the paper's rank upgrade, 3 seeds
    python benchmarks/bench_convergence.py --preset full --jobs 11 --threads 1  # on a GPU machine: 4.6 min (H200)
    python benchmarks/bench_convergence.py --preset full --report-only   # rewrite the results pages

Measured per run: accuracy of the global adapter on a fixed test subset after every round, the final
global adapter on the full test set, bytes up/down (from ``metrics.jsonl``), and the post-aggregation
diagnostic: for every round after the upgrade and every sampled rank-20 client, its own adapter's
accuracy (before aggregation) and that of its rank-20 view of the round's global adapter (after).

Runs go to ``<workdir>/<preset>/<strategy>-seed<k>/``; a killed benchmark continues with ``--resume``
(complete runs are skipped, a partial run resumes from its last complete round). Results:
``docs/results/convergence_<preset>.json``, ``.md`` (rendered from the JSON) and ``_*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, markdown_table, write_json  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "ag_news"
HETEROGENEOUS = ("replication", "zero_padding", "hetlora", "flexlora", "stacking")
HOMOGENEOUS = {"homogeneous_r5": "5", "homogeneous_r20": "20"}
ALL_STRATEGIES = (*HETEROGENEOUS, *HOMOGENEOUS)


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark size. Everything but ``strategies``, ``seeds`` and ``rounds`` is part of a
    run's settings; runs of two presets with equal settings are the same run (``full`` extends
    ``quick``'s finished runs instead of redoing their first rounds)."""

    name: str
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int
    num_clients: int = 100
    clients_per_round: int = 10
    max_train_samples: int | None = None  # None: all 10,001 training rows (~100 per client)
    max_seq_length: int = 32
    learning_rate: float = 1e-3
    batch_size: int = 16
    local_epochs: float = 1.0
    lora_alpha: float = 16.0
    eval_samples: int = 300  # the fixed per-round test subset (first rows of test.tsv)
    quality_eval_samples: int = 128
    final_eval_samples: int | None = None  # None: the full 7,600-row test set
    eval_batch_size: int = 128
    low_rank: int = 5
    high_rank: int = 20
    upgrade_fraction: float = 0.1
    upgrade_after_round: int = 1
    high_quality_fraction: float = 0.1
    dirichlet_alpha: float = 0.5
    model_config_overrides: str | None = None
    # "high_quality_clients": the class-balanced clients (ids 0..ceil(high_quality_fraction * N) - 1, as
    # the `high_quality` partition places them) train at high_rank from round 1, the rest at low_rank.
    # "quality_upgrade": the paper's protocol, the recipe's upgrade with quality_scoring "all": every client is
    # scored after round upgrade_after_round and the top upgrade_fraction move to high_rank.
    rank_mode: str = "high_quality_clients"
    targets: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85)

    def settings(self) -> dict[str, Any]:
        skip = {"name", "strategies", "seeds", "rounds", "targets"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


PRESETS = {
    "smoke": Preset("smoke", strategies=("replication", "zero_padding"), seeds=(0,), rounds=2, num_clients=4,
                    clients_per_round=4, max_train_samples=64, max_seq_length=16, eval_samples=32,
                    quality_eval_samples=16, final_eval_samples=48, eval_batch_size=32,
                    model_config_overrides="num_hidden_layers=1", targets=(0.3, 0.5)),
    "quick": Preset("quick", strategies=("replication", "zero_padding"), seeds=(0,), rounds=10),
    "full": Preset("full", strategies=ALL_STRATEGIES, seeds=(0, 1, 2), rounds=30),
    # the paper's own protocol: everyone at rank 5, every client scored after round 1, the top 10% upgraded to 20
    "paper": Preset("paper", strategies=("replication", "zero_padding", "hetlora"), seeds=(0, 1, 2), rounds=30,
                    rank_mode="quality_upgrade"),
}


def run_name(strategy: str, seed: int) -> str:
    return f"{strategy}-seed{seed}"


def recipe_arguments(preset: Preset, strategy: str, seed: int, out: Path, data_dir: Path, resume: bool):
    """The recipe's four ``*Arguments`` for one run."""
    from hf_fedlora.federation.config import ClientArguments, DataArguments, FederationArguments, ModelArguments

    homogeneous = strategy in HOMOGENEOUS
    upgrade = preset.rank_mode == "quality_upgrade" and not homogeneous
    if homogeneous:
        ranks = HOMOGENEOUS[strategy]
    elif upgrade:
        ranks = str(preset.low_rank)
    else:
        num_hq = math.ceil(preset.high_quality_fraction * preset.num_clients)
        ranks = ",".join([str(preset.high_rank)] * num_hq + [str(preset.low_rank)] * (preset.num_clients - num_hq))
    model = ModelArguments(model_config_overrides=preset.model_config_overrides)
    data = DataArguments(task="ag_news", data_dir=str(data_dir), max_train_samples=preset.max_train_samples,
                         max_eval_samples=preset.eval_samples, max_seq_length=preset.max_seq_length)
    client = ClientArguments(local_epochs=preset.local_epochs, per_device_train_batch_size=preset.batch_size,
                             per_device_eval_batch_size=preset.eval_batch_size, learning_rate=preset.learning_rate,
                             lora_alpha=preset.lora_alpha)
    fed = FederationArguments(
        num_clients=preset.num_clients, clients_per_round=preset.clients_per_round, rounds=preset.rounds,
        partition="high_quality", dirichlet_alpha=preset.dirichlet_alpha,
        high_quality_fraction=preset.high_quality_fraction,
        ranks=ranks, quality_upgrade=upgrade, low_rank=preset.low_rank,
        high_rank=preset.high_rank, upgrade_fraction=preset.upgrade_fraction,
        upgrade_after_round=preset.upgrade_after_round, quality_eval_samples=preset.quality_eval_samples,
        strategy="fedavg" if homogeneous else strategy, seed=seed, keep_client_adapters=True,
        output_dir=str(out), resume=resume, overwrite_output_dir=not resume,
        # the paper scores every client before the upgrade; recipes from before this option score the sampled ones
        **({"quality_scoring": "all"} if upgrade and "quality_scoring" in FederationArguments.__dataclass_fields__ else {}),
    )
    return model, data, client, fed


# --------------------------------------------------------------------------------------------
# evaluation helpers (one trainer per process, shared with the diagnostic and the final test)


_EVAL: dict[str, Any] = {}


def evaluator(preset: Preset, data_dir: Path) -> dict[str, Any]:
    """A cached trainer, metric, per-round test subset and final test set for ``preset``."""
    key = json.dumps(preset.settings(), sort_keys=True) + str(data_dir)
    if _EVAL.get("key") != key:
        from hf_fedlora.federation.client import LocalTrainer
        from hf_fedlora.federation.config import DataArguments, ModelArguments
        from hf_fedlora.federation.data import load_task
        from hf_fedlora.metrics import load_glue_metric

        task = load_task(DataArguments(task="ag_news", data_dir=str(data_dir), max_eval_samples=preset.final_eval_samples,
                                       max_seq_length=preset.max_seq_length))
        overrides = ModelArguments(model_config_overrides=preset.model_config_overrides).config_overrides()
        import torch

        trainer = LocalTrainer(None, task.num_labels, lora_alpha=preset.lora_alpha, config_overrides=overrides,
                               label_names=task.label_names, device="cuda" if torch.cuda.is_available() else "cpu")
        _EVAL.clear()
        _EVAL.update(key=key, trainer=trainer, metric=load_glue_metric(task.metric, keep_in_memory=True),
                     test=task.validation, subset=task.validation.select(range(min(preset.eval_samples, len(task.validation)))))
    return _EVAL


def accuracy(preset: Preset, data_dir: Path, adapter: Any, split: str) -> float:
    ev = evaluator(preset, data_dir)
    return ev["trainer"].evaluate(adapter, ev[split], ev["metric"], preset.eval_batch_size, preset.max_seq_length)["score"]


def send_back_method(strategy: str) -> str:
    from hf_fedlora import get_strategy

    return get_strategy("fedavg" if strategy in HOMOGENEOUS else strategy).send_back


def run_diagnostic(preset: Preset, strategy: str, run_dir: Path, data_dir: Path) -> list[dict[str, Any]]:
    """Before/after accuracies of every sampled high-rank client in every round after the upgrade
    (cached in ``diagnostic.json``; only rounds not yet measured are evaluated)."""
    from hf_fedlora import LoraAdapter

    path = run_dir / "diagnostic.json"
    done = json.loads(path.read_text()) if path.is_file() else []
    if strategy in HOMOGENEOUS:
        return done
    seen = {(d["round"], d["client"]) for d in done}
    method = send_back_method(strategy)
    for rec in read_metrics(run_dir):
        rnd = rec["round"]
        if preset.rank_mode == "quality_upgrade" and rnd <= preset.upgrade_after_round:
            continue
        high = [c for c in rec["clients"] if c["rank"] == preset.high_rank and (rnd, c["client"]) not in seen]
        if not high:
            continue
        global_view = LoraAdapter.from_pretrained(run_dir / f"round-{rnd:04d}").to_rank(
            preset.high_rank, lora_alpha=preset.lora_alpha, method=method)
        after = accuracy(preset, data_dir, global_view, "subset")
        for c in high:
            folder = run_dir / "clients" / f"round-{rnd:04d}" / f"client-{c['client']:04d}"
            before = accuracy(preset, data_dir, LoraAdapter.from_pretrained(folder), "subset")
            done.append({"round": rnd, "client": c["client"], "before": before, "after": after,
                         "global_accuracy": rec["eval"]["score"]})
    done.sort(key=lambda d: (d["round"], d["client"]))
    write_json(path, done)
    return done


def final_test(preset: Preset, run_dir: Path, data_dir: Path, completed: int) -> dict[str, Any]:
    """The last global adapter on the full test set (cached in ``final_test.json`` per round)."""
    from hf_fedlora import LoraAdapter

    path = run_dir / "final_test.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("round") == completed:
            return cached
    start = time.perf_counter()
    acc = accuracy(preset, data_dir, LoraAdapter.from_pretrained(run_dir / f"round-{completed:04d}"), "test")
    result = {"round": completed, "accuracy": acc, "num_examples": len(evaluator(preset, data_dir)["test"]),
              "seconds": round(time.perf_counter() - start, 2)}
    write_json(path, result)
    return result


def high_slots(preset: Preset, run_dir: Path, completed: int) -> dict[str, Any]:
    """How much of the global update lives in rank slots beyond ``low_rank`` (the slots only the
    rank-20 clients own), per round: ``sum_m ||B[:, r:] A[r:]|| / sum_m ||B A||`` over modules, and
    the rounds after which those slots are exactly zero in every module (A and B both zero is a
    stationary point: a client can no longer train them). Cached in ``high_slots.json``."""
    from hf_fedlora import LoraAdapter

    path = run_dir / "high_slots.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("round") == completed:
            return cached
    r, share, dead = preset.low_rank, [], []
    for rnd in range(1, completed + 1):
        adapter = LoraAdapter.from_pretrained(run_dir / f"round-{rnd:04d}")
        total = high = 0.0
        zero = True
        for module in adapter.modules:
            a, b = adapter.folded_factors(module)
            total += float((b @ a).norm())
            high += float((b[:, r:] @ a[r:]).norm()) if a.shape[0] > r else 0.0
            zero = zero and not bool(a[r:].any()) and not bool(b[:, r:].any())
        share.append(high / total if total else 0.0)
        dead.append(zero)
    result = {"round": completed, "low_rank": r, "share_per_round": share, "zero_after_rounds": [i + 1 for i, d in enumerate(dead) if d]}
    write_json(path, result)
    return result


# --------------------------------------------------------------------------------------------
# running


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    from hf_fedlora.federation.state import RunState, read_records

    state = RunState.load(run_dir)
    return read_records(run_dir, state.completed_round) if state else []


def completed_rounds(run_dir: Path) -> int:
    from hf_fedlora.federation.state import RunState

    state = RunState.load(run_dir)
    return state.completed_round if state else 0


def _reusable_source(workdir: Path, preset: Preset, name: str) -> Path | None:
    """A finished run of another preset with the same settings (and at most our rounds)."""
    for other in PRESETS.values():
        if other.name == preset.name or other.settings() != preset.settings() or other.rounds > preset.rounds:
            continue
        src = workdir / other.name / name
        if completed_rounds(src) == other.rounds and (src / "bench_run.json").is_file():
            return src
    return None


class capped_threads:
    """Cap ``torch.set_num_threads`` (``run_federation`` asks for every core) while running.

    On a machine shared with other work, two intra-op threads on a busy core spin at their barriers:
    a round took 5-10x longer than with one thread. ``None``: no cap."""

    def __init__(self, threads: int | None):
        self.threads = threads

    def __enter__(self) -> "capped_threads":
        import torch

        self._orig = torch.set_num_threads
        if self.threads:
            torch.set_num_threads = lambda n: self._orig(max(1, min(int(n), self.threads)))
            self._orig(self.threads)
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_num_threads = self._orig


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def run_one(preset: Preset, strategy: str, seed: int, workdir: Path, data_dir: Path, log: Any,
            threads: int | None = None) -> None:
    """Run (or resume, or extend) one (strategy, seed) run, then its diagnostic and final test."""
    from hf_fedlora.federation import run_federation

    name = run_name(strategy, seed)
    run_dir = workdir / preset.name / name
    meta_path = run_dir / "bench_run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if not meta and not (run_dir / "state.json").is_file():
        source = _reusable_source(workdir, preset, name)
        if source is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(source, run_dir)
            meta = {**json.loads((source / "bench_run.json").read_text()), "extended_from": source.parent.name}
            (run_dir / "final_test.json").unlink(missing_ok=True)
            log(f"{name}: continuing the {meta['extended_from']} run ({completed_rounds(run_dir)} rounds)")
    if meta and meta.get("settings") != preset.settings():
        raise ValueError(f"'{run_dir}' was run with other settings; delete it or use another --workdir.")
    meta.update(strategy=strategy, seed=seed, settings=preset.settings())
    done = completed_rounds(run_dir)
    if done < preset.rounds:
        meta["complete"] = False
        write_json(meta_path, meta)
        start = time.perf_counter()
        log(f"{name}: rounds {done + 1}..{preset.rounds}")
        args = recipe_arguments(preset, strategy, seed, run_dir, data_dir, resume=(run_dir / "state.json").is_file())
        with capped_threads(threads):
            run_federation(*args)
        meta.setdefault("chunks", []).append({"from_round": done + 1, "to_round": preset.rounds, "threads": threads,
                                              "device": _device_name(),
                                              "seconds": round(time.perf_counter() - start, 1),
                                              "load_average_after": list(os.getloadavg())})
        write_json(meta_path, meta)
    start = time.perf_counter()
    with capped_threads(threads):
        diag = run_diagnostic(preset, strategy, run_dir, data_dir)
        meta["diagnostic_seconds"] = round(meta.get("diagnostic_seconds", 0) + time.perf_counter() - start, 1)
        final = final_test(preset, run_dir, data_dir, completed_rounds(run_dir))
        high_slots(preset, run_dir, completed_rounds(run_dir))
    meta["complete"] = True
    write_json(meta_path, meta)
    log(f"{name}: done; final test accuracy {final['accuracy']:.4f}, {len(diag)} diagnostic pairs")


# --------------------------------------------------------------------------------------------
# summarising


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def collect_run(preset: Preset, strategy: str, seed: int, workdir: Path) -> dict[str, Any] | None:
    run_dir = workdir / preset.name / run_name(strategy, seed)
    records = read_metrics(run_dir)
    if not records:
        return None
    meta_path = run_dir / "bench_run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    final_path, diag_path = run_dir / "final_test.json", run_dir / "diagnostic.json"
    final = json.loads(final_path.read_text()) if final_path.is_file() else None
    complete = bool(meta.get("complete")) and len(records) >= preset.rounds and final is not None \
        and final["round"] == len(records)
    slots = high_slots(preset, run_dir, len(records)) if complete else None
    rounds = []
    for r in records[: preset.rounds]:
        clients = r["clients"]
        rounds.append({
            "round": r["round"], "accuracy": r["eval"]["score"],
            "bytes_up": sum(c["bytes_up"] for c in clients), "bytes_down": sum(c["bytes_down"] for c in clients),
            "bytes_round": r["bytes_round"], "cumulative_bytes": r["cumulative_bytes"], "num_clients": len(clients),
            "ranks": sorted(c["rank"] for c in clients), "global_rank": r["global_rank"],
            "mean_loss": _mean([c["loss"] for c in clients]), "seconds": r["seconds"],
        })
    return {
        "strategy": strategy, "seed": seed, "status": "complete" if complete else f"partial ({len(rounds)}/{preset.rounds} rounds)",
        "complete": complete, "completed_rounds": len(rounds), "rounds": rounds,
        "final_test": final if complete else None,
        "diagnostic": json.loads(diag_path.read_text()) if diag_path.is_file() and complete else [],
        "loop_seconds": round(sum(r["seconds"]["wall"] for r in records), 1),
        "diagnostic_seconds": meta.get("diagnostic_seconds"),
        "final_test_seconds": final["seconds"] if final else None,
        "extended_from": meta.get("extended_from"), "chunks": meta.get("chunks", []),
        "high_slots": slots,
    }


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(curve) if a >= target), None)


def summarize_strategy(preset: Preset, runs: list[dict[str, Any]]) -> dict[str, Any]:
    full = [r for r in runs if r["complete"]]
    curves = [[x["accuracy"] for x in r["rounds"]] for r in full]
    out: dict[str, Any] = {"seeds_complete": [r["seed"] for r in full],
                           "seeds_partial": [r["seed"] for r in runs if not r["complete"]]}
    if not full:
        return out
    per_round = list(zip(*curves))
    half = preset.rounds // 2
    auc = [_mean(c) for c in curves]
    late = [_mean(c[half:]) for c in curves]
    finals = [r["final_test"]["accuracy"] for r in full]
    last = [c[-1] for c in curves]
    up = [x["bytes_up"] / x["num_clients"] for r in full for x in r["rounds"]]
    down = [x["bytes_down"] / x["num_clients"] for r in full for x in r["rounds"]]
    cum = [r["rounds"][-1]["cumulative_bytes"] for r in full]
    diag = [d for r in full for d in r["diagnostic"]]
    out.update({
        "curve_mean": [_mean(list(x)) for x in per_round], "curve_std": [_std(list(x)) for x in per_round],
        "curve_min": [min(x) for x in per_round], "curve_max": [max(x) for x in per_round],
        "cumulative_mb_mean": [_mean([r["rounds"][i]["cumulative_bytes"] / 1e6 for r in full]) for i in range(len(per_round))],
        "auc": {"mean": _mean(auc), "std": _std(auc), "per_seed": auc},
        "auc_second_half": {"mean": _mean(late), "std": _std(late), "per_seed": late, "from_round": half + 1},
        "last_round_subset": {"mean": _mean(last), "std": _std(last), "per_seed": last},
        "final_test": {"mean": _mean(finals), "std": _std(finals), "per_seed": finals,
                       "num_examples": full[0]["final_test"]["num_examples"]},
        "rounds_to_target": {str(t): [rounds_to(c, t) for c in curves] for t in preset.targets},
        "best_round_accuracy": {"mean": _mean([max(c) for c in curves]), "per_seed": [max(c) for c in curves]},
        "bytes_up_per_client_round": _mean(up), "bytes_down_per_client_round": _mean(down),
        "cumulative_bytes": {"mean": _mean(cum), "per_seed": cum},
        "diagnostic": {
            "pairs": len(diag), "before_mean": _mean([d["before"] for d in diag]),
            "after_mean": _mean([d["after"] for d in diag]),
            "drop_mean": _mean([d["before"] - d["after"] for d in diag]),
            "worst_drop": max((d["before"] - d["after"] for d in diag), default=None),
            "first": diag[0] if diag else None,
        },
        "high_slot_share_last_round": _mean([r["high_slots"]["share_per_round"][-1] for r in full if r.get("high_slots")]),
        "high_slot_share_mean": _mean([_mean(r["high_slots"]["share_per_round"]) for r in full if r.get("high_slots")]),
        "high_slots_zero_from_round": [min(r["high_slots"]["zero_after_rounds"], default=None) for r in full if r.get("high_slots")],
        "seconds_per_run": _mean([r["loop_seconds"] + (r["final_test_seconds"] or 0) + (r["diagnostic_seconds"] or 0)
                                  for r in full]),
    })
    return out


def summarize_all(preset: Preset, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    by_strategy = {s: [r for r in runs.values() if r["strategy"] == s] for s in preset.strategies}
    strategies = {s: summarize_strategy(preset, rs) for s, rs in by_strategy.items()}
    scored = {s: v for s, v in strategies.items() if "auc" in v}
    summary: dict[str, Any] = {"strategies": strategies}
    if not scored:
        return summary
    best = max(scored, key=lambda s: scored[s]["auc"]["mean"])
    reached = [t for t in preset.targets if max(scored[best]["curve_mean"]) >= t]
    target = max(reached) if reached else None
    summary.update(best_by_auc=best, target=target,
                   target_rule="the highest of the preset's targets that the best strategy's (by AUC) mean curve reaches")
    if target is not None:
        for s, v in scored.items():
            hits = v["rounds_to_target"][str(target)]
            v["rounds_to_headline_target"] = {"per_seed": hits, "reached": sum(h is not None for h in hits),
                                              "mean_of_reached": _mean([h for h in hits if h is not None])}
    # paired differences against zero-padding (same seed: same split, sampling and client shuffling)
    paired = {}
    ref = {r["seed"]: r for r in by_strategy.get("zero_padding", []) if r["complete"]}
    for s in scored:
        if s == "zero_padding":
            continue
        pairs = [(r, ref[r["seed"]]) for r in by_strategy[s] if r["complete"] and r["seed"] in ref]
        if not pairs:
            continue
        auc = [_mean([x["accuracy"] for x in a["rounds"]]) - _mean([x["accuracy"] for x in b["rounds"]]) for a, b in pairs]
        fin = [a["final_test"]["accuracy"] - b["final_test"]["accuracy"] for a, b in pairs]
        wins = [sum(x["accuracy"] > y["accuracy"] for x, y in zip(a["rounds"], b["rounds"])) for a, b in pairs]
        paired[s] = {"seeds": [a["seed"] for a, _ in pairs], "auc_diff": auc, "auc_diff_mean": _mean(auc),
                     "final_test_diff": fin, "final_test_diff_mean": _mean(fin),
                     "rounds_ahead": wins, "rounds_compared": [len(a["rounds"]) for a, _ in pairs]}
    summary["paired_vs_zero_padding"] = paired
    return summary


# --------------------------------------------------------------------------------------------
# output


def plot(preset: Preset, summary: dict[str, Any], out: Path) -> list[str]:
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
            line, = ax.plot(x, v["curve_mean"], marker="o", markersize=3, label=f"{s} (n={n})")
            if n > 1:
                ax.fill_between(x, v["curve_min"], v["curve_max"], color=line.get_color(), alpha=0.15)
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set(xlabel="round" if kind == "round" else "cumulative MB communicated (up + down, all clients)",
               ylabel=f"accuracy on the first {preset.eval_samples} test rows",
               title=f"AG News, MiniLM: accuracy by {'round' if kind == 'round' else 'traffic'} ({preset.name})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        name = f"convergence_{preset.name}_{kind}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _p(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def _ms(v: dict | None, digits: int = 1) -> str:
    if not v or v.get("mean") is None:
        return "n/a"
    return f"{_p(v['mean'], digits)} ± {_p(v['std'], digits)}" if len(v.get("per_seed", [])) > 1 else _p(v["mean"], digits)


def render_markdown(report: dict[str, Any]) -> str:
    p, s, runs = report["preset"], report["summary"], report["runs"]
    m = report["machine"]
    complete = [k for k, r in runs.items() if r["complete"]]
    lines = [
        f"# Convergence benchmark, preset `{p['name']}`: replication vs zero-padding on AG News",
        "",
        "Generated by `benchmarks/bench_convergence.py` from `convergence_"
        f"{p['name']}.json`; do not edit by hand. Runs made by: "
        + ("; ".join(f"`{c}`" for c in report.get("run_commands", [])) or f"`{report['command']}`") + ".",
        "",
        f"**Runs complete: {len(complete)} of {len(p['strategies']) * len(p['seeds'])}** "
        f"({', '.join(complete) or 'none'}).",
    ]
    partial = [f"{k}: {r['status']}" for k, r in runs.items() if not r["complete"]]
    missing = [run_name(st, sd) for st in p["strategies"] for sd in p["seeds"] if run_name(st, sd) not in runs]
    if partial:
        lines.append(f"Partial (not in the tables): {'; '.join(partial)}.")
    if missing:
        lines.append(f"Not started: {', '.join(missing)}.")
    if report.get("notes"):
        lines += ["", "Notes on how these runs were made:", ""] + [f"- {n}" for n in report["notes"]] + [""]
    prog = report.get("progress") or {}
    if prog.get("estimated_remaining_minutes"):
        lines.append(f"Progress: {prog['rounds_done']} of {prog['rounds_planned']} federated rounds done; at the "
                     f"measured {prog['seconds_per_round_mean']:.0f} s per round the rest needs about "
                     f"{prog['estimated_remaining_minutes']:.0f} more minutes on this machine (plus the final tests).")
    lines += [
        f"Continue with `python benchmarks/bench_convergence.py --preset {p['name']} --resume`." if partial or missing else "",
        "",
        "## Setup",
        "",
        f"- Machine: {m['cpu_count']} CPU cores ({m['processor']}), {m.get('mem_total_gib')} GiB, torch {m['torch']}"
        + (f", transformers {m['transformers']}" if m.get("transformers") else "")
        + (f", GPU {m['accelerator']} (CUDA {m.get('cuda')}): local training and evaluation on the GPU"
           if m.get("accelerator") else f" with {m['torch_threads']} threads, no GPU")
        + (f"; {m['jobs']} runs at a time" if (m.get("jobs") or 1) > 1 else "")
        + f". Load average when this invocation started: {', '.join(f'{x:.2f}' for x in m['load_average_at_start'] or [])}; "
        f"at the end: {', '.join(f'{x:.2f}' for x in report.get('load_average_at_end') or [])}."
        + (f" Devices the runs trained on: {', '.join(sorted(report['devices']))}." if report.get("devices") else ""),
        f"- Compute time of the complete runs (federation loop + diagnostic + final test): "
        f"{report['compute_seconds_complete'] / 60:.1f} min in total; this invocation's wall time: "
        f"{report['invocation_seconds'] / 60:.1f} min.",
        f"- Model: the embedded all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters)"
        + (f" with `{p['model_config_overrides']}`" if p["model_config_overrides"] else "")
        + f"; LoRA on query/value, alpha {p['lora_alpha']:g}, dropout 0.05; the classifier head is trained and averaged densely.",
        f"- Data: `../shared/data/ag_news` (train 10,001 rows"
        + (f", subset of {p['max_train_samples']}" if p["max_train_samples"] else "")
        + f"; test 7,600), max length {p['max_seq_length']} tokens. Per-round accuracy: the first "
        f"{p['eval_samples']} rows of test.tsv (the same rows every round); final accuracy: "
        + (f"the first {p['final_eval_samples']} test rows." if p["final_eval_samples"] else "the full 7,600-row test set."),
        f"- Federation: {p['num_clients']} clients (partition `high_quality`: {p['high_quality_fraction']:.0%} class-balanced, "
        f"Dirichlet({p['dirichlet_alpha']}) for the rest), {p['clients_per_round']} sampled per round, {p['rounds']} rounds, "
        f"one local epoch (batch {p['batch_size']}, AdamW lr {p['learning_rate']:g}, constant), seeds {list(p['seeds'])}.",
        (f"- Ranks: heterogeneous strategies start every client at rank {p['low_rank']}; in round "
         f"{p['upgrade_after_round']} every one of the {p['num_clients']} clients trains once and is scored on "
         f"{p['quality_eval_samples']} validation rows (only the sampled ones are aggregated), and the top "
         f"{p['upgrade_fraction']:.0%} move to rank {p['high_rank']} (the paper's protocol: the recipe's `quality_upgrade` "
         "with `quality_scoring all`). " if p.get("rank_mode") == "quality_upgrade" else
         f"- Ranks: the {math.ceil(p['high_quality_fraction'] * p['num_clients'])} class-balanced clients train at rank "
         f"{p['high_rank']} from round 1, the others at rank {p['low_rank']} (a fixed rank list: what the paper's upgrade "
         "is meant to find; preset `paper` runs the upgrade itself). ")
        + "Baselines `homogeneous_r5` / `homogeneous_r20`: every client at that rank, `fedavg`.",
        "- Pairing: the split, the client sampling and every client's shuffling and dropout are seeded from "
        "(seed, round, client), so runs with the same seed differ only in the strategy.",
        "",
    ]
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
        f"Rounds to target: first round at or above **{_p(target, 0) if target is not None else 'n/a'}%** "
        f"({s.get('target_rule')}); per seed, `-` = not reached.",
        "",
    ]
    rows = []
    for name, v in scored.items():
        hits = v.get("rounds_to_headline_target", {}).get("per_seed", [])
        rows.append([
            f"`{name}`", len(v["seeds_complete"]), _ms(v["auc"]), _ms(v["auc_second_half"]), _ms(v["last_round_subset"]),
            _ms(v["final_test"]), ", ".join("-" if h is None else str(h) for h in hits) or "n/a",
            f"{v['bytes_up_per_client_round'] / 1e6:.3f} / {v['bytes_down_per_client_round'] / 1e6:.3f}",
            f"{v['cumulative_bytes']['mean'] / 1e6:.1f}",
        ])
    lines.append(markdown_table(
        ["strategy", "seeds", "AUC %", f"AUC rounds {scored[next(iter(scored))]['auc_second_half']['from_round']}+ %",
         "last round (subset) %", "final, full test %", "rounds to target", "MB up / down per client-round",
         "cumulative MB"], rows))
    paired = s.get("paired_vs_zero_padding") or {}
    if paired:
        lines += ["", "### Paired differences against `zero_padding` (same seed)", ""]
        lines.append(markdown_table(
            ["strategy", "seeds", "AUC diff (points)", "final test diff (points)", "rounds ahead of zero_padding"],
            [[f"`{k}`", ", ".join(map(str, v["seeds"])), ", ".join(f"{100 * d:+.1f}" for d in v["auc_diff"]),
              ", ".join(f"{100 * d:+.1f}" for d in v["final_test_diff"]),
              ", ".join(f"{w}/{n}" for w, n in zip(v["rounds_ahead"], v["rounds_compared"]))] for k, v in paired.items()]))
    lines += [
        "",
        "### Post-aggregation diagnostic",
        "",
        f"For every round (after the upgrade, with `--rank-mode quality_upgrade`) and every sampled rank-{p['high_rank']} client: accuracy of its own "
        f"trained adapter (before aggregation) and of its rank-{p['high_rank']} view of that round's new global "
        "adapter (after; `to_rank` with the strategy's send-back method), both on the per-round test subset. "
        "The paper's example: 84.34% before, 38.95% after zero-padding, 82.11% after replication.",
        "",
    ]
    drows = []
    for name, v in scored.items():
        d = v["diagnostic"]
        if not d["pairs"]:
            continue
        first = d["first"]
        drows.append([f"`{name}`", d["pairs"], _p(d["before_mean"]), _p(d["after_mean"]), f"{100 * d['drop_mean']:+.1f}",
                      f"{100 * d['worst_drop']:+.1f}",
                      f"round {first['round']}, client {first['client']}: {_p(first['before'])} -> {_p(first['after'])}"])
    lines.append(markdown_table(["strategy", "pairs", "before %", "after %", "mean drop (points)", "worst drop",
                                 "first pair"], drows) if drows else "No high-rank client pairs.")
    lines += [
        "", f"### Rank slots {p['low_rank'] + 1}-{p['high_rank']} of the global adapter", "",
        f"Share of the global update's norm in slots beyond rank {p['low_rank']} (those only rank-{p['high_rank']} "
        f"clients own): sum over modules of ||B[:, {p['low_rank']}:] A[{p['low_rank']}:]|| / ||B A||, and the first "
        "round after which those slots are exactly zero in every module. A slot with A and B both zero has zero "
        "gradient, so once zero-padding aggregates a round with no rank-20 client, the rank-20 clients can never "
        "train those slots again and effectively run at rank 5.", "",
    ]
    lines.append(markdown_table(
        ["strategy", "share, mean over rounds", "share, last round", "slots exactly zero from round (per seed)"],
        [[f"`{k}`", _p(v.get("high_slot_share_mean")), _p(v.get("high_slot_share_last_round")),
          ", ".join("never" if x is None else str(x) for x in v.get("high_slots_zero_from_round", []))]
         for k, v in scored.items() if not k.startswith("homogeneous")]))
    lines += ["", "### Accuracy per round (mean over complete seeds, %)", ""]
    n = max(len(v["curve_mean"]) for v in scored.values())
    lines.append(markdown_table(["round", *[f"`{k}`" for k in scored]],
                                [[i + 1, *[_p(v["curve_mean"][i]) if i < len(v["curve_mean"]) else "" for v in scored.values()]]
                                 for i in range(n)]))
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in report.get("plots", [])]
    return "\n".join(lines) + "\n"


def run_commands(workdir: Path, preset: Preset) -> list[str]:
    path = workdir / preset.name / "commands.json"
    return json.loads(path.read_text()) if path.is_file() else []


def write_report(preset: Preset, workdir: Path, out: Path, command: str, started: float, machine: dict,
                 report_only: bool = False) -> dict:
    runs = {}
    for strategy in preset.strategies:
        for seed in preset.seeds:
            r = collect_run(preset, strategy, seed, workdir)
            if r is not None:
                runs[run_name(strategy, seed)] = r
    summary = summarize_all(preset, runs)
    devices = sorted({c["device"] for r in runs.values() for c in r["chunks"] if c.get("device")})
    notes_path = workdir / preset.name / "notes.json"
    report = {
        "notes": json.loads(notes_path.read_text()) if notes_path.is_file() else [],
        "benchmark": "convergence", "preset": {"name": preset.name, "strategies": list(preset.strategies),
                                               "seeds": list(preset.seeds), "rounds": preset.rounds,
                                               "targets": list(preset.targets), **preset.settings()},
        "machine": machine, "load_average_at_end": list(os.getloadavg()), "command": command,
        "run_commands": run_commands(workdir, preset),
        "invocation_seconds": round(time.perf_counter() - started, 1),
        "compute_seconds_complete": round(sum(r["loop_seconds"] + (r["final_test_seconds"] or 0) + (r["diagnostic_seconds"] or 0)
                                              for r in runs.values() if r["complete"]), 1),
        "runs": runs, "summary": summary, "devices": devices,
    }
    previous = out / f"convergence_{preset.name}.json"
    if report_only and previous.is_file():  # the page describes the invocation that ran the runs, not this one
        kept = json.loads(previous.read_text())
        report.update({k: kept[k] for k in ("machine", "load_average_at_end", "command", "invocation_seconds") if k in kept})
    done_rounds = [r["seconds"]["wall"] for run in runs.values() for r in run["rounds"]]
    planned = len(preset.strategies) * len(preset.seeds) * preset.rounds
    per_round = _mean(done_rounds)
    report["progress"] = {
        "rounds_done": len(done_rounds), "rounds_planned": planned, "seconds_per_round_mean": per_round,
        "estimated_remaining_minutes": None if per_round is None else round(per_round * (planned - len(done_rounds)) / 60, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot(preset, summary, out)
    write_json(out / f"convergence_{preset.name}.json", report)
    (out / f"convergence_{preset.name}.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def run_order(preset: Preset) -> list[tuple[int, str]]:
    """Replication and zero-padding (the question asked) over every seed first, seed by seed, so
    paired runs finish together; then the other strategies seed by seed."""
    first = [st for st in ("replication", "zero_padding") if st in preset.strategies]
    rest = [st for st in preset.strategies if st not in first]
    return [(sd, st) for sd in preset.seeds for st in first] + [(sd, st) for sd in preset.seeds for st in rest]


def _job(preset: Preset, strategy: str, seed: int, workdir: Path, data_dir: Path, threads: int | None) -> str:
    """One run in a worker process of ``--jobs``."""
    run_one(preset, strategy, seed, workdir, data_dir, _log, threads=threads)
    return run_name(strategy, seed)


def _log(msg: str) -> None:
    print(f"[bench_convergence {time.strftime('%H:%M:%S')} pid {os.getpid()}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--strategies", nargs="+", choices=ALL_STRATEGIES,
                        help="run only these of the preset's strategies now (the results still cover the whole preset)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these of the preset's seeds now")
    parser.add_argument("--rounds", type=int, help="override the preset's rounds")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "outputs" / "bench_convergence")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="AG News folder (train.tsv, test.tsv)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results")
    parser.add_argument("--resume", action="store_true",
                        help="keep the preset's runs in --workdir: skip complete ones, resume partial ones")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the results from --workdir")
    parser.add_argument("--rank-mode", choices=["high_quality_clients", "quality_upgrade"],
                        help="override the preset's rank assignment (see Preset.rank_mode)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: on a shared machine 2 threads on a busy core were "
                             "5-10x slower; 0: every core, as the recipe does)")
    parser.add_argument("--note", help="a line about this invocation to keep on the results page (e.g. what was interrupted)")
    parser.add_argument("--max-minutes", type=float, help="start no new run after this many minutes")
    parser.add_argument("--jobs", type=int, default=0,
                        help="runs at a time, each in its own process with --threads threads (default 0: as many as "
                             "the cores allow, e.g. 2 on 2 cores; on a GPU machine the runs share the GPU)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: the GPU when there is one (training, evaluation); cpu: never the GPU")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import torch

    started = time.perf_counter()
    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, **{k: tuple(v) if isinstance(v, list) else v for k, v in
                                            (("rounds", args.rounds), ("rank_mode", args.rank_mode))
                                            if v is not None})
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
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
        write_json(commands_path, [*run_commands(args.workdir, preset), f"{time.strftime('%Y-%m-%d %H:%M')}: {command}"])
        extra = sorted(set(args.strategies or []) - set(preset.strategies)) + sorted(set(args.seeds or []) - set(preset.seeds))
        if extra:
            raise SystemExit(f"{extra} are not in preset {preset.name!r}")
        todo = [(seed, strategy) for seed, strategy in run_order(preset)
                if not (args.strategies and strategy not in args.strategies) and not (args.seeds and seed not in args.seeds)]
        args.jobs = args.jobs or max(1, min(len(todo), (os.cpu_count() or 1) // max(1, args.threads or 1)))
        machine["jobs"] = args.jobs
        if args.jobs > 1:
            _run_parallel(args, preset, todo, started, command, machine, log)
        for seed, strategy in todo if args.jobs <= 1 else []:
            if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
                log("time budget reached; continue with --resume")
                break
            run_one(preset, strategy, seed, args.workdir, args.data_dir, log, threads=args.threads or None)
            write_report(preset, args.workdir, args.out, command, started, machine)
    report = write_report(preset, args.workdir, args.out, command, started, machine, report_only=args.report_only)
    log(f"wrote {args.out / f'convergence_{preset.name}.md'}")
    return report


def _run_parallel(args: argparse.Namespace, preset: Preset, todo: list[tuple[int, str]], started: float,
                  command: str, machine: dict, log: Any) -> None:
    """``todo`` in ``args.jobs`` worker processes; the results page is rewritten as each run ends."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        pending = {pool.submit(_job, preset, strategy, seed, args.workdir, args.data_dir, args.threads or None)
                   for seed, strategy in todo}
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
