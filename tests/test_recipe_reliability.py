"""A recipe run killed with SIGKILL anywhere resumes to the uninterrupted result; broken or hostile
client updates are dropped (or fail the run, if asked) and recorded in metrics.jsonl."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from testing_utils import REPO_ROOT, adapter_tensors, read_metrics, recipe_args, run_recipe

import hf_fedlora as hfl
from hf_fedlora import LoraAdapter

CRASH_RUNNER = Path(__file__).resolve().parent / "crash_runner.py"
CRASH_POINTS = ["train", "aggregate", "checkpoint", "jsonl", "state"]
SEED = 7  # the seed recipe_args gives every run


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CRASH_TRAIN_CALL": "5", "PYTHONPATH": str(REPO_ROOT)}


def _assert_no_half_written_round(out: Path) -> None:
    for folder in sorted(out.glob("round-*")):
        adapter = LoraAdapter.from_pretrained(folder)  # raises on a partial folder
        assert (folder / "adapter_config.json").is_file() and adapter.modules


def _assert_same_as_uninterrupted(out: Path, reference: Path) -> None:
    resumed, want = adapter_tensors(out / "round-0002"), adapter_tensors(reference / "round-0002")
    assert set(resumed) == set(want)
    for key in want:  # subprocess vs in-process thread counts: float noise only
        torch.testing.assert_close(resumed[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert [r["round"] for r in read_metrics(out)] == [1, 2]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporaries left behind"


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_a_crash_point_then_resume(point, baseline, tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / point
    argv = recipe_args(tiny_model_dir, shared_data, out)
    done = subprocess.run(
        [sys.executable, str(CRASH_RUNNER), point, *argv],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert json.loads((out / "state.json").read_text())["completed_round"] == 1
    _assert_no_half_written_round(out)
    run_recipe(recipe_args(tiny_model_dir, shared_data, out, resume=True))
    _assert_same_as_uninterrupted(out, baseline)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(baseline, tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "random"
    command = [sys.executable, str(CRASH_RUNNER), "none", *recipe_args(tiny_model_dir, shared_data, out)]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not (out / "round-0001").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(20261125).uniform(0.0, 1.5))  # somewhere in round 2 (or just after)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    _assert_no_half_written_round(out)
    run_recipe(recipe_args(tiny_model_dir, shared_data, out, resume=True))
    _assert_same_as_uninterrupted(out, baseline)


def _sabotage(monkeypatch, client_id: int, how: str) -> None:
    """Make one client's local training in round 1 return a NaN or a huge update."""
    from hf_fedlora.federation.client import LocalTrainer
    from hf_fedlora.federation.loop import client_seed

    real_train = LocalTrainer.train
    target_seed = client_seed(SEED, 1, client_id)

    def train(self, view, rank, shard, args, seed, **kwargs):
        adapter, result = real_train(self, view, rank, shard, args, seed, **kwargs)
        if seed == target_seed:
            state = {k: v.clone() for k, v in adapter.state_dict().items()}
            key = next(k for k in state if k.endswith("lora_B.weight"))
            state[key][0, 0] = float("nan") if how == "nan" else 1e6
            adapter = LoraAdapter.from_state_dict(adapter.config, state, provenance=adapter.provenance)
        return adapter, result

    monkeypatch.setattr(LocalTrainer, "train", train)


def _first_sampled_client() -> int:
    from hf_fedlora.federation.loop import sample_clients

    return sample_clients(SEED, 1, 4, 3)[0]  # recipe_args: seed 7, 4 clients, 3 per round


@pytest.mark.parametrize("how, options", [("nan", {}), ("huge", {"max_norm_ratio": 50.0})])
def test_a_broken_client_is_dropped_and_recorded(
    how, options, tiny_model_dir, shared_data, tmp_path, monkeypatch
):
    victim = _first_sampled_client()
    _sabotage(monkeypatch, victim, how)
    out = tmp_path / f"bad-{how}"
    run_recipe(recipe_args(tiny_model_dir, shared_data, out, rounds=1, **options))
    (record,) = read_metrics(out)
    assert [d["client"] for d in record["dropped"]] == [victim]
    reason = record["dropped"][0]["reason"]
    assert ("NonFiniteTensorError" in reason) if how == "nan" else ("median" in reason), reason
    assert victim not in [c["client"] for c in record["clients"]] and len(record["clients"]) == 2
    assert LoraAdapter.from_pretrained(out / "round-0001").provenance["num_clients"] == 2


def test_on_bad_client_fail_stops_the_run(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    victim = _first_sampled_client()
    _sabotage(monkeypatch, victim, "nan")
    with pytest.raises(hfl.AdapterError, match=f"client {victim}: NonFiniteTensorError"):
        run_recipe(
            recipe_args(tiny_model_dir, shared_data, tmp_path / "fail", rounds=1, on_bad_client="fail")
        )
    assert json.loads((tmp_path / "fail" / "state.json").read_text())["completed_round"] == 0
