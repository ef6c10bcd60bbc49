"""Smoke test of the aggregation benchmark: the tiny preset runs and writes sane JSON and markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from testing_utils import load_benchmark


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("results")
    data = tmp_path_factory.mktemp("data")
    load_benchmark("bench_aggregation").main(
        ["--preset", "smoke", "--out", str(out), "--data-dir", str(data)]
    )
    report = json.loads((out / "aggregation.json").read_text())
    report["_out"], report["_data"] = str(out), str(data)
    return report


def test_smoke_writes_every_case(smoke_report: dict) -> None:
    from hf_fedlora import list_strategies

    run = smoke_report["presets"]["smoke"]
    cases = run["cases"]
    for name in list_strategies():
        assert f"strategy/{name}//mixed/3" in cases
    assert cases["strategy/fedavg//mixed/3"]["status"] == "n/a"
    assert "equal ranks" in cases["strategy/fedavg//mixed/3"]["reason"]
    assert cases["strategy/fedavg//equal/3"]["status"] == "ok"
    for key in ("io_floor///mixed/3", "dense_svd///mixed/3", "peft//svd/mixed/3", "peft//cat/mixed/3"):
        assert key in cases


def test_smoke_values_are_sane(smoke_report: dict) -> None:
    run = smoke_report["presets"]["smoke"]
    floor = run["cases"]["io_floor///mixed/3"]
    assert floor["read"]["min"] > 0 and floor["tensor_bytes"] == 2 * 4 * 2 * 256 * (4 + 8 + 16) * 2
    rows = [r for r in run["summary"]["rows"] if r["status"] == "ok"]
    assert {r["strategy"] for r in rows} == set(run["strategies"])
    for row in rows:
        assert 0 < row["min_s"] <= row["median_s"]
        assert row["ratio_floor_min"] > 0 and row["peak_anon_delta"] >= 0 and row["output_bytes"] > 0
        assert row["tensor_bytes"] > 0
    stacking = next(r for r in rows if r["strategy"] == "stacking")
    assert stacking["output_bytes"] == 2 * 4 * 2 * 256 * (4 + 8 + 16) * 2
    dense = run["cases"]["dense_svd///mixed/3"]
    assert dense["rel_diff_reconstructions"] < 1e-3
    assert abs(dense["rel_error_flexlora"] - dense["rel_error_dense"]) < 1e-3
    peft = run["cases"]["peft//cat/mixed/3"]
    assert peft["extrapolation_factor"] == 4 and peft["time_extrapolated"]["median"] > 0
    targets = run["summary"]["targets"]
    assert {"replication_floor_n3", "flexlora_randomized_50x_dense_svd_shared_n3"} <= set(targets)
    assert targets["replication_floor_n3"]["ratio_hash_floor"] > 0
    shared = dense["shared"]
    assert shared["excess_randomized"] <= shared["certificate"] + 1e-9  # the bound holds
    streaming = run["summary"]["streaming"]
    assert [(r["n"], r["strategy"]) for r in streaming] == [(3, "replication")]


def test_smoke_renders_markdown_and_plots(smoke_report: dict) -> None:
    out = Path(smoke_report["_out"])
    page = (out / "aggregation.md").read_text()
    assert "## Preset `smoke`" in page and "I/O floor" in page and "EXTRAPOLATED" in page
    for name in smoke_report["presets"]["smoke"]["plots"]:
        assert (out / name).stat().st_size > 1000
    assert not (Path(smoke_report["_data"]) / "hf_fedlora_bench_aggregation" / "L2_h256_r4-8-16_eq8").exists()


def test_presets_are_yaml_files_that_set_every_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_benchmark("bench_aggregation")
    common = sys.modules["_common"]
    assert common.preset_names("aggregation") == ["full", "quick", "smoke", "streaming"]
    full = common.load_preset(bench.Preset, "aggregation", "full")
    assert (full.layers, full.clients, full.ranks, full.max_seconds) == (32, (10, 50), (8, 16, 32, 64), 45)
    assert list(full.peft_modules.items()) == [("svd", 1), ("cat", 4)] and full.num_modules == 128
    text = (common.CONFIG_DIR / "aggregation_full.yaml").read_text()
    monkeypatch.setattr(common, "CONFIG_DIR", tmp_path)
    (tmp_path / "aggregation_extra.yaml").write_text(text + "\nwarmup: 1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['warmup'\], missing keys \[\]"):
        common.load_preset(bench.Preset, "aggregation", "extra")
    (tmp_path / "aggregation_typo.yaml").write_text(text.replace("layers: 32", "layers: '32'"))
    with pytest.raises(ValueError, match="`layers` should be int, got '32'"):
        common.load_preset(bench.Preset, "aggregation", "typo")


def test_streaming_preset_compares_stream_and_list(tmp_path: Path) -> None:
    from hf_fedlora import get_strategy, list_strategies

    out, data = tmp_path / "results", tmp_path / "data"
    argv = ["--preset", "streaming", "--clients", "2", "3", "--layers", "1", "--repeats", "1"]
    argv += ["--isolation", "inprocess", "--out", str(out), "--data-dir", str(data)]
    run = load_benchmark("bench_aggregation").main(argv)
    heterogeneous = [
        s
        for s in list_strategies()
        if get_strategy(s).supports_heterogeneous_ranks and not get_strategy(s).rank_grows_with_clients
    ]
    rows = run["summary"]["rows"]
    assert sorted((r["n"], r["strategy"]) for r in rows) == [(n, s) for n in (2, 3) for s in heterogeneous]
    for row in rows:
        assert row["ratio_time_min"] > 0 and row["output_bytes"] > 0 and row["stream_peak_anon"] >= 0
    page = (out / "aggregation.md").read_text()
    assert "## Preset `streaming`: streaming vs list" in page and "stream / list" in page
    assert (out / run["plots"][0]).stat().st_size > 1000


def test_results_go_to_a_scratch_folder_unless_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Benchmark commands never overwrite the committed docs/results/ by default (issue 16)."""
    bench = load_benchmark("bench_aggregation")
    published = bench.PUBLISHED / "aggregation.json"
    before = published.stat().st_mtime_ns if published.exists() else None
    report = (
        {"presets": json.loads(published.read_text())["presets"]} if published.exists() else {"presets": {}}
    )
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "aggregation.json").write_text(json.dumps(report))
    monkeypatch.chdir(tmp_path)
    bench.main(["--report-only", "--out", str(tmp_path / "seed")])
    assert (tmp_path / "seed" / "aggregation.md").is_file()
    (tmp_path / "bench_results").mkdir()
    (tmp_path / "bench_results" / "aggregation.json").write_text(json.dumps(report))
    bench.main(["--report-only"])  # default: ./bench_results
    assert (tmp_path / "bench_results" / "aggregation.md").is_file()
    assert (published.stat().st_mtime_ns if published.exists() else None) == before
    with pytest.raises(SystemExit):
        bench.main(["--report-only", "--publish", "--out", str(tmp_path / "elsewhere")])
    assert "--publish" in bench.__doc__
