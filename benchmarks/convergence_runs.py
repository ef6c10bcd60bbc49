"""One convergence run: the recipe's federation for a (strategy, seed) pair, its measurements
(the post-aggregation diagnostic, the final test, the high rank slots) and what the report reads
back from its folder.

A run lives in ``<workdir>/<preset>/<strategy>-seed<k>/``: the recipe's output (``state.json``,
``metrics.jsonl``, ``round-NNNN/``, client adapters) plus ``bench_run.json`` (settings, chunks of
rounds run, times), ``diagnostic.json``, ``final_test.json`` and ``high_slots.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from _common import load_preset, preset_names, write_json
from report_convergence import run_name

HETEROGENEOUS = ("replication", "zero_padding", "hetlora", "flexlora", "stacking", "raflora")
HOMOGENEOUS = {"homogeneous_r5": "5", "homogeneous_r20": "20"}
ALL_STRATEGIES = (*HETEROGENEOUS, *HOMOGENEOUS)
MODIFIERS = {"nested": "nested_rank", "revive": "revive_zero_slots"}
"""Client-side options a run's label can add to its strategy: ``replication+nested``,
``zero_padding+revive`` (``ClientArguments`` fields, the same bytes per round)."""


def parse_label(label: str) -> tuple[str, tuple[str, ...], str | None]:
    """``strategy[+modifier...][@cell]`` -> (strategy, modifiers, cell).

    Raises:
        ValueError: an unknown strategy or modifier."""
    body, _, cell = label.partition("@")
    strategy, *mods = body.split("+")
    if strategy not in ALL_STRATEGIES or any(m not in MODIFIERS for m in mods):
        raise ValueError(f"run label {label!r}: strategies {ALL_STRATEGIES}, modifiers {sorted(MODIFIERS)}")
    return strategy, tuple(mods), cell or None


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark size, read from ``configs/convergence_<name>.yaml`` (whose comments say what
    each field does). Everything but ``strategies``, ``seeds``, ``rounds`` and ``targets`` is part
    of a run's settings; runs of two presets with equal settings are the same run (``full`` extends
    ``quick``'s finished runs instead of redoing their first rounds)."""

    name: str
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int
    num_clients: int
    clients_per_round: int
    max_train_samples: int | None
    max_seq_length: int
    learning_rate: float
    batch_size: int
    local_epochs: float
    lora_alpha: float
    eval_samples: int
    quality_eval_samples: int
    final_eval_samples: int | None
    eval_batch_size: int
    low_rank: int
    high_rank: int
    upgrade_fraction: float
    upgrade_after_round: int
    high_quality_fraction: float
    dirichlet_alpha: float
    model_config_overrides: str | None
    rank_mode: str
    targets: tuple[float, ...]
    diagnostic_samples: int | None
    """Test rows of the post-aggregation diagnostic (``None``: ``eval_samples``)."""
    cells: dict[str, dict] | None
    """Regime cells, name -> overrides of settings fields; every strategy runs in every cell, as
    ``<strategy>@<cell>`` (``None``: one cell, the preset as written)."""

    def settings(self) -> dict[str, Any]:
        skip = {"name", "strategies", "seeds", "rounds", "targets", "cells"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def labels(self) -> list[str]:
        """The runs' labels (one per strategy and cell), in the page's order."""
        return (
            [f"{s}@{c}" for c in self.cells for s in self.strategies] if self.cells else list(self.strategies)
        )

    def for_label(self, label: str) -> Preset:
        """The settings of the runs of ``label``: the preset with its cell's overrides."""
        cell = parse_label(label)[2]
        if cell is None or self.cells is None:  # a cell's preset is its own
            return self
        if cell not in self.cells:
            raise ValueError(f"preset {self.name!r} has no cell {cell!r}")
        return dataclasses.replace(self, cells=None, **self.cells[cell])


def load_presets() -> dict[str, Preset]:
    """Every preset of ``configs/convergence_*.yaml``, by name."""
    return {name: load_preset(Preset, "convergence", name) for name in preset_names("convergence")}


def recipe_arguments(preset: Preset, strategy: str, seed: int, out: Path, data_dir: Path, resume: bool):
    """The recipe's four ``*Arguments`` for one run."""
    from hf_fedlora.federation import ClientArguments, DataArguments, FederationArguments, ModelArguments

    preset, (strategy, mods, _) = preset.for_label(strategy), parse_label(strategy)
    homogeneous = strategy in HOMOGENEOUS
    upgrade = preset.rank_mode == "quality_upgrade" and not homogeneous
    if homogeneous:
        ranks = HOMOGENEOUS[strategy]
    elif upgrade:
        ranks = str(preset.low_rank)
    else:
        num_hq = math.ceil(preset.high_quality_fraction * preset.num_clients)
        ranks = ",".join(
            [str(preset.high_rank)] * num_hq + [str(preset.low_rank)] * (preset.num_clients - num_hq)
        )
    model = ModelArguments(model_config_overrides=preset.model_config_overrides)
    data = DataArguments(
        task="ag_news",
        data_dir=str(data_dir),
        max_train_samples=preset.max_train_samples,
        max_eval_samples=preset.eval_samples,
        max_seq_length=preset.max_seq_length,
    )
    client = ClientArguments(
        local_epochs=preset.local_epochs,
        per_device_train_batch_size=preset.batch_size,
        per_device_eval_batch_size=preset.eval_batch_size,
        learning_rate=preset.learning_rate,
        lora_alpha=preset.lora_alpha,
        **{MODIFIERS[m]: True for m in mods},
    )
    fed = FederationArguments(
        num_clients=preset.num_clients,
        clients_per_round=preset.clients_per_round,
        rounds=preset.rounds,
        partition="high_quality",
        dirichlet_alpha=preset.dirichlet_alpha,
        high_quality_fraction=preset.high_quality_fraction,
        ranks=ranks,
        quality_upgrade=upgrade,
        low_rank=preset.low_rank,
        high_rank=preset.high_rank,
        upgrade_fraction=preset.upgrade_fraction,
        upgrade_after_round=preset.upgrade_after_round,
        quality_eval_samples=preset.quality_eval_samples,
        strategy="fedavg" if homogeneous else strategy,
        seed=seed,
        keep_client_adapters=True,
        output_dir=str(out),
        resume=resume,
        overwrite_output_dir=not resume,
        # the paper scores every client before the upgrade (the recipe's default scores the sampled ones)
        **({"quality_scoring": "all"} if upgrade else {}),
    )
    return model, data, client, fed


_EVAL: dict[str, Any] = {}  # one trainer per process, shared by the diagnostic and the final test


def evaluator(preset: Preset, data_dir: Path) -> dict[str, Any]:
    """A cached trainer, metric, per-round test subset and final test set for ``preset``."""
    key = json.dumps(preset.settings(), sort_keys=True) + str(data_dir)
    if _EVAL.get("key") != key:
        from hf_fedlora.federation import DataArguments, LocalTrainer, ModelArguments, load_task
        from hf_fedlora.metrics import load_glue_metric

        task = load_task(
            DataArguments(
                task="ag_news",
                data_dir=str(data_dir),
                max_eval_samples=preset.final_eval_samples,
                max_seq_length=preset.max_seq_length,
            )
        )
        overrides = ModelArguments(model_config_overrides=preset.model_config_overrides).config_overrides()
        import torch

        trainer = LocalTrainer(
            None,
            task.num_labels,
            lora_alpha=preset.lora_alpha,
            config_overrides=overrides,
            label_names=task.label_names,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
        _EVAL.clear()
        _EVAL.update(
            key=key,
            trainer=trainer,
            metric=load_glue_metric(task.metric, keep_in_memory=True),
            test=task.validation,
            subset=task.validation.select(range(min(preset.eval_samples, len(task.validation)))),
            diagnostic=task.validation.select(
                range(min(preset.diagnostic_samples or preset.eval_samples, len(task.validation)))
            ),
        )
    return _EVAL


def accuracy(preset: Preset, data_dir: Path, adapter: Any, split: str) -> float:
    ev = evaluator(preset, data_dir)
    return ev["trainer"].evaluate(
        adapter, ev[split], ev["metric"], preset.eval_batch_size, preset.max_seq_length
    )["score"]


def send_back_method(strategy: str) -> str:
    from hf_fedlora import get_strategy

    strategy = parse_label(strategy)[0]
    return get_strategy("fedavg" if strategy in HOMOGENEOUS else strategy).send_back


def run_diagnostic(preset: Preset, strategy: str, run_dir: Path, data_dir: Path) -> list[dict[str, Any]]:
    """Before/after accuracies of every sampled high-rank client in every round after the upgrade
    (cached in ``diagnostic.json``; only rounds not yet measured are evaluated)."""
    from hf_fedlora import LoraAdapter

    path = run_dir / "diagnostic.json"
    done = json.loads(path.read_text()) if path.is_file() else []
    preset = preset.for_label(strategy)
    if parse_label(strategy)[0] in HOMOGENEOUS:
        return done
    seen = {(d["round"], d["client"]) for d in done}
    method = send_back_method(strategy)
    for rec in read_metrics(run_dir):
        rnd = rec.round
        if preset.rank_mode == "quality_upgrade" and rnd <= preset.upgrade_after_round:
            continue
        high = [c for c in rec.clients if c.rank == preset.high_rank and (rnd, c.client) not in seen]
        if not high:
            continue
        global_view = LoraAdapter.from_pretrained(run_dir / f"round-{rnd:04d}").to_rank(
            preset.high_rank, lora_alpha=preset.lora_alpha, method=method
        )
        after = accuracy(preset, data_dir, global_view, "diagnostic")
        for c in high:
            folder = run_dir / "clients" / f"round-{rnd:04d}" / f"client-{c.client:04d}"
            before = accuracy(preset, data_dir, LoraAdapter.from_pretrained(folder), "diagnostic")
            done.append(
                {
                    "round": rnd,
                    "client": c.client,
                    "before": before,
                    "after": after,
                    "global_accuracy": rec.eval["score"],
                }
            )
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
    if preset.final_eval_samples is not None and preset.final_eval_samples == preset.eval_samples:
        # the same rows as the per-round evaluation: its last score is the final test (CPU presets)
        last = read_metrics(run_dir)[completed - 1]
        result = {"round": completed, "accuracy": last.eval["score"], "num_examples": preset.eval_samples}
        write_json(path, {**result, "seconds": 0.0, "from": "the last round's evaluation"})
        return json.loads(path.read_text())
    acc = accuracy(preset, data_dir, LoraAdapter.from_pretrained(run_dir / f"round-{completed:04d}"), "test")
    result = {
        "round": completed,
        "accuracy": acc,
        "num_examples": len(evaluator(preset, data_dir)["test"]),
        "seconds": round(time.perf_counter() - start, 2),
    }
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
    result = {
        "round": completed,
        "low_rank": r,
        "share_per_round": share,
        "zero_after_rounds": [i + 1 for i, d in enumerate(dead) if d],
    }
    write_json(path, result)
    return result


def read_metrics(run_dir: Path) -> list[Any]:
    """The ``RoundRecord`` of every complete round of the run (none before its first round)."""
    from hf_fedlora.federation import RunState, read_records

    state = RunState.load(run_dir)
    return read_records(run_dir, state.completed_round) if state else []


def completed_rounds(run_dir: Path) -> int:
    """The run's last complete round (0 before its first)."""
    from hf_fedlora.federation import RunState

    state = RunState.load(run_dir)
    return state.completed_round if state else 0


def _reusable_source(workdir: Path, preset: Preset, label: str, seed: int) -> Path | None:
    """A finished run of another preset with the same strategy, client options and settings (its
    cell's, if any) and at most our rounds."""
    mine, settings = parse_label(label)[:2], preset.for_label(label).settings()
    for other in load_presets().values():
        if other.name == preset.name or other.rounds > preset.rounds:
            continue
        for theirs in other.labels():
            if parse_label(theirs)[:2] != mine or other.for_label(theirs).settings() != settings:
                continue
            src = workdir / other.name / run_name(theirs, seed)
            if completed_rounds(src) == other.rounds and (src / "bench_run.json").is_file():
                return src
    return None


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def run_one(
    preset: Preset,
    strategy: str,
    seed: int,
    workdir: Path,
    data_dir: Path,
    log: Any,
    threads: int | None = None,
    prune: bool = False,
) -> None:
    """Run (or resume, or extend) one (strategy, seed) run, then its diagnostic and final test.

    Torch's thread count is the caller's: ``threads`` is only recorded with the rounds run. ``prune``:
    once complete, delete the run's adapters (client and global), keeping the JSON the report reads
    (the measurements are cached per round): a few hundred KB per run to carry off a lent machine."""
    from hf_fedlora.federation import run_federation

    name, cell = run_name(strategy, seed), preset.for_label(strategy)
    run_dir = workdir / preset.name / name
    meta_path = run_dir / "bench_run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if not meta and not (run_dir / "state.json").is_file():
        source = _reusable_source(workdir, preset, strategy, seed)
        if source is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(source, run_dir)
            meta = {
                **json.loads((source / "bench_run.json").read_text()),
                "extended_from": source.parent.name,
            }
            (run_dir / "final_test.json").unlink(missing_ok=True)
            log(f"{name}: continuing the {meta['extended_from']} run ({completed_rounds(run_dir)} rounds)")
    if meta and meta.get("settings") != cell.settings():
        raise ValueError(f"'{run_dir}' was run with other settings; delete it or use another --workdir.")
    meta.update(strategy=strategy, seed=seed, settings=cell.settings())
    done = completed_rounds(run_dir)
    if done < preset.rounds:
        meta["complete"] = False
        write_json(meta_path, meta)
        start = time.perf_counter()
        log(f"{name}: rounds {done + 1}..{preset.rounds}")
        args = recipe_arguments(
            preset, strategy, seed, run_dir, data_dir, resume=(run_dir / "state.json").is_file()
        )
        run_federation(*args)
        meta.setdefault("chunks", []).append(
            {
                "from_round": done + 1,
                "to_round": preset.rounds,
                "threads": threads,
                "device": _device_name(),
                "seconds": round(time.perf_counter() - start, 1),
                "load_average_after": list(os.getloadavg()),
            }
        )
        write_json(meta_path, meta)
    start = time.perf_counter()
    diag = run_diagnostic(preset, strategy, run_dir, data_dir)
    meta["diagnostic_seconds"] = round(meta.get("diagnostic_seconds", 0) + time.perf_counter() - start, 1)
    final = final_test(cell, run_dir, data_dir, completed_rounds(run_dir))
    high_slots(cell, run_dir, completed_rounds(run_dir))
    meta["complete"] = True
    if prune:
        for folder in [run_dir / "clients", *run_dir.glob("round-*")]:
            shutil.rmtree(folder, ignore_errors=True)
        meta["pruned"] = True
    write_json(meta_path, meta)
    log(f"{name}: done; final test accuracy {final['accuracy']:.4f}, {len(diag)} diagnostic pairs")


def collect_run(preset: Preset, strategy: str, seed: int, workdir: Path) -> dict[str, Any] | None:
    """A run's entry in the JSON, read from its folder (``None`` before its first round)."""
    run_dir = workdir / preset.name / run_name(strategy, seed)
    records = read_metrics(run_dir)
    if not records:
        return None
    meta_path = run_dir / "bench_run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    final_path, diag_path = run_dir / "final_test.json", run_dir / "diagnostic.json"
    final = json.loads(final_path.read_text()) if final_path.is_file() else None
    complete = (
        bool(meta.get("complete"))
        and len(records) >= preset.rounds
        and final is not None
        and final["round"] == len(records)
    )
    slots = high_slots(preset.for_label(strategy), run_dir, len(records)) if complete else None
    rounds = []
    for r in records[: preset.rounds]:
        clients = r.clients
        rounds.append(
            {
                "round": r.round,
                "accuracy": r.eval["score"],
                "bytes_up": sum(c.bytes_up for c in clients),
                "bytes_down": sum(c.bytes_down for c in clients),
                "bytes_round": r.bytes_round,
                "cumulative_bytes": r.cumulative_bytes,
                "num_clients": len(clients),
                "ranks": sorted(c.rank for c in clients),
                "global_rank": r.global_rank,
                "mean_loss": statistics.fmean([c.loss for c in clients]) if clients else None,
                "seconds": r.seconds,
            }
        )
    return {
        "strategy": strategy,
        "seed": seed,
        "status": "complete" if complete else f"partial ({len(rounds)}/{preset.rounds} rounds)",
        "complete": complete,
        "completed_rounds": len(rounds),
        "rounds": rounds,
        "final_test": final if complete else None,
        "diagnostic": json.loads(diag_path.read_text()) if diag_path.is_file() and complete else [],
        "loop_seconds": round(sum(r.seconds["wall"] for r in records), 1),
        "diagnostic_seconds": meta.get("diagnostic_seconds"),
        "final_test_seconds": final["seconds"] if final else None,
        "extended_from": meta.get("extended_from"),
        "chunks": meta.get("chunks", []),
        "high_slots": slots,
    }
