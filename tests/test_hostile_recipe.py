"""The recipe against its operator (issue 16) and the streaming merge in the recipe (issue 14).

Real processes (plain ``python`` and ``accelerate launch``) are interrupted with SIGINT/SIGTERM, the
launcher alone included; a second run on the same folder is refused by the lock; ``--resume`` needs
only the folder; corrupt state is named and cleared by ``--overwrite_output_dir``; operator
mistakes are one line and exit 2; clipping is recorded; the plot has a round 0 and the strategy;
each client is folded into a ``StreamingAggregator`` as it finishes, with the same global adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from testing_utils import (
    RECIPE,
    REPO_ROOT,
    adapter_tensors,
    load_instruct_recipe,
    load_recipe,
    read_metrics,
    recipe_args,
    run_recipe,
)

from hf_fedlora import LoraAdapter
from hf_fedlora.federation.guard import (
    LOCK_NAME,
    Interrupted,
    OutputDirLock,
    RunLockedError,
    install_interrupt_handlers,
    interrupts_held,
)
from hf_fedlora.federation.rounds import RoundRecord, RoundWriter, read_records
from hf_fedlora.federation.state import RunState


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default disposition and unblocked. A child
    inherits an ignored SIGINT (a background job of a non-interactive shell) and a blocked one (a
    thread mask left by what ran earlier in this pytest process, e.g. Ray's core worker in the Flower
    simulation test); either way the launcher would never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


ROUNDS_NEVER_REACHED = 100_000
"""The interrupt tests' run length: a loaded machine must not let the run end by itself first."""


@pytest.fixture
def restore_signals():
    """``cli()`` installs the script's handlers in this process; put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = load_recipe().cli(argv)
    return code, capsys.readouterr().err


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def _wait_for(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _holder_pid(out: Path) -> int | None:
    try:
        return int((out / LOCK_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())


def _assert_clean_stop(out: Path) -> int:
    """Every round folder loads, state.json names a complete round, no lock or temporaries remain."""
    state = json.loads((out / "state.json").read_text())
    for folder in sorted(out.glob("round-*")):
        assert LoraAdapter.from_pretrained(folder).modules
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "lock or temporaries left"
    assert not (out / "_exchange").exists()
    assert [r["round"] for r in read_metrics(out)] == list(range(1, state["completed_round"] + 1))
    return state["completed_round"]


# -- 1 and 2: signals and the lock, with real processes --------------------------------------------


@pytest.mark.parametrize("how", ["python-SIGTERM", "accelerate-launcher-SIGINT"])
def test_an_interrupt_stops_the_run_cleanly(
    how, tiny_model_dir, shared_data, tmp_path, capsys, restore_signals
):
    out = tmp_path / "run"
    argv = recipe_args(tiny_model_dir, shared_data, out, rounds=ROUNDS_NEVER_REACHED)
    if how.startswith("python"):
        command = [sys.executable, str(RECIPE), *argv]
    else:  # the simple launcher: Popen + wait, no signal forwarding
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            str(RECIPE),
            *argv,
        ]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        _wait_for(lambda: (out / "round-0001").is_dir() and _holder_pid(out), process)
        trainer = _holder_pid(out)
        assert trainer == process.pid or how.startswith("accelerate")

        # a second run writing the same folder is refused at once, naming the holder
        code, err = _cli(recipe_args(tiny_model_dir, shared_data, out, resume=True), capsys)
        assert code == 2 and f"pid {trainer}" in err and len(err.strip().splitlines()) == 1, err

        process.send_signal(signal.SIGTERM if how.endswith("SIGTERM") else signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        deadline = time.monotonic() + 30
        while _alive(trainer) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(trainer), "the training process outlived the interrupt"
    finally:
        if process.poll() is None:
            process.kill()
    if how.startswith("python"):
        assert process.returncode == 143, stderr[-3000:]
    completed = _assert_clean_stop(out)
    assert completed < ROUNDS_NEVER_REACHED
    line = f"interrupted in round {completed + 1}; rerun with --resume (output: {out})"
    assert line in stderr, stderr[-3000:]


@pytest.mark.parametrize("sig, raised", [(signal.SIGTERM, Interrupted), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_between_the_metrics_line_and_state_json_waits_for_both(
    sig, raised, tmp_path, restore_signals
):
    """The race CI once hit: a stop after a round's ``metrics.jsonl`` line, before its ``state.json``."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a fresh script starts (Ray, run earlier, sets its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    install_interrupt_handlers()
    terminate, interrupt = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    writer, state = RoundWriter(tmp_path), RunState()
    with pytest.raises(raised) as stopped:
        with interrupts_held():
            writer.append(RoundRecord(round=1, strategy="replication"))
            os.kill(os.getpid(), sig)  # its Python handler would run before the next line
            state.completed_round = 1
            state.save(tmp_path)
    assert getattr(stopped.value, "signum", signal.SIGINT) == sig
    assert RunState.load(tmp_path).completed_round == 1
    assert [r.round for r in read_records(tmp_path)] == [1]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (terminate, interrupt)

    # a block that fails still delivers the stop it held, after its own error
    with pytest.raises(raised) as stopped:
        with interrupts_held():
            os.kill(os.getpid(), sig)
            raise OSError("disk full")
    assert isinstance(stopped.value.__context__, OSError)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (terminate, interrupt)

    signal.signal(sig, signal.SIG_IGN)  # an ignored signal stays ignored through the block
    with interrupts_held():
        os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) == signal.SIG_IGN


def test_lock_refuses_a_live_holder_takes_over_a_stale_one_and_is_released(
    tiny_model_dir, shared_data, tmp_path
):
    out = tmp_path / "locked"
    out.mkdir()
    with OutputDirLock(out):  # another open file of this process: flock refuses it like another process
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            run_recipe(recipe_args(tiny_model_dir, shared_data, out, rounds=1))
        assert not (out / "state.json").exists(), "refused before touching the folder"
    assert not (out / LOCK_NAME).exists()
    (out / LOCK_NAME).write_text("999999\n")  # left by a dead run: nobody holds the flock
    lock = OutputDirLock(out).acquire()
    assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not (out / LOCK_NAME).exists()  # a finished run's: see the interrupt and corrupt-state tests


# -- 3: --resume reads the saved options ------------------------------------------------------------


def test_resume_needs_only_the_output_dir(baseline, tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "short"
    run_recipe(recipe_args(tiny_model_dir, shared_data, out, rounds=1))
    recipe = load_recipe()
    _, data_args, client_args, fed_args = recipe.parse(["--output_dir", str(out), "--resume"])
    assert (fed_args.rounds, fed_args.ranks, fed_args.seed, client_args.local_steps) == (1, "2,4,8", 7, 3)
    assert data_args.max_train_samples == 320
    with pytest.raises(ValueError, match="`strategy`: saved 'replication', now 'zero_padding'"):
        run_recipe(["--output_dir", str(out), "--resume", "--strategy", "zero_padding"])
    run_recipe(["--output_dir", str(out), "--resume", "--rounds", "2"])  # extend the run by one round
    resumed, want = adapter_tensors(out / "round-0002"), adapter_tensors(baseline / "round-0002")
    for key in want:
        torch.testing.assert_close(resumed[key], want[key], rtol=0, atol=1e-6, msg=key)
    assert recipe.parse(["--output_dir", str(out), "--resume"])[3].rounds == 2


# -- 4: corrupt state ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, garbage",
    [("state.json", '{"completed_round": 2, "ra'), ("metrics.jsonl", "\x00garbage\n{}\n")],
    ids=["state.json", "metrics.jsonl"],
)
def test_corrupt_state_is_named_and_overwrite_clears_it(
    name, garbage, baseline, tiny_model_dir, shared_data, tmp_path, capsys, restore_signals
):
    out = tmp_path / "corrupt"
    shutil.copytree(baseline, out)
    (out / name).write_text(garbage)
    code, err = _cli(recipe_args(tiny_model_dir, shared_data, out, resume=True), capsys)
    assert code == 2 and name in err and "--overwrite_output_dir" in err, err
    assert len(err.strip().splitlines()) == 1, err
    code, err = _cli(
        recipe_args(tiny_model_dir, shared_data, out, rounds=1, overwrite_output_dir=True), capsys
    )
    assert code == 0, err
    assert not (out / LOCK_NAME).exists(), "the lock is released on exit"
    assert json.loads((out / "state.json").read_text())["completed_round"] == 1
    assert [r["round"] for r in read_metrics(out)] == [1]


# -- 9: operator mistakes: one line, exit 2 -----------------------------------------------------------


def test_operator_mistakes_are_one_line_and_exit_2(
    tiny_model_dir, shared_data, tmp_path, capsys, restore_signals
):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("num_client: 4\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {
        "unknown keys ['num_client']": ["--config", str(bad_yaml), "--output_dir", str(tmp_path / "y")],
        "a_file": recipe_args(tiny_model_dir, shared_data, a_file, rounds=1),
        "missing.tsv": recipe_args(
            tiny_model_dir,
            shared_data,
            tmp_path / "m",
            rounds=1,
            task="custom",
            train_file=tmp_path / "missing.tsv",
            validation_file=tmp_path / "missing.tsv",
        ),
    }
    for expected, argv in cases.items():
        code, err = _cli(argv, capsys)
        assert code == 2, (expected, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fed_glue.py: error:") and expected in lines[0], err
    assert not (tmp_path / "m" / LOCK_NAME).exists(), "the lock is released after a failed start"
    code = load_instruct_recipe().cli(["--config", str(bad_yaml), "--output_dir", str(tmp_path / "i")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fed_instruct.py: error: ") and len(err.strip().splitlines()) == 1


# -- 5, 6: the plot's round 0 and strategy; clipping recorded --------------------------------------


def test_plot_shows_round_0_and_the_strategy(baseline, monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    from hf_fedlora.federation import read_records
    from hf_fedlora.federation.plots import plot_history

    initial = LoraAdapter.from_pretrained(baseline / "round-0000").provenance["eval"]
    assert 0.0 <= initial["accuracy"] <= 1.0  # the untrained global adapter, evaluated once
    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k))
    )
    plot_history(
        read_records(baseline),
        tmp_path / "m.png",
        metric="accuracy",
        strategy="replication",
        baseline=initial,
    )
    (figure,) = figures
    assert "replication" in figure._suptitle.get_text()
    left = figure.axes[0]
    assert left.lines[0].get_xdata()[0] == 0 and left.lines[0].get_ydata()[0] == initial["accuracy"]
    assert {t.get_text() for t in left.get_legend().get_texts()} == {
        "replication",
        "round 0: initial adapter",
    }


def test_clipping_is_recorded_per_client(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "clip"
    run_recipe(recipe_args(tiny_model_dir, shared_data, out, rounds=1, clip_update_norm=1e-4))
    (record,) = read_metrics(out)
    assert len(record["clients"]) == 3 and not record.get("dropped")
    for client in record["clients"]:
        clipped = client["clipped"]
        assert clipped["update_norm"] > 1e-4
        assert clipped["factor"] == pytest.approx(1e-4 / clipped["update_norm"])


# -- 7: threads ---------------------------------------------------------------------------------------


def test_threads_option_sets_torch_threads_and_readme_says_how():
    from hf_fedlora.federation import set_torch_threads

    before = torch.get_num_threads()
    try:
        assert set_torch_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert load_recipe().parse(["--threads", "2"])[3].threads == 2
    readme = (REPO_ROOT / "README.md").read_text()
    assert "--threads" in readme and "cpu_1proc.yaml" in readme


# -- issue 14: each client folded in as it finishes ----------------------------------------------------


def test_streaming_fold_without_client_files_equals_the_list_merge(
    baseline, tiny_model_dir, shared_data, tmp_path, monkeypatch
):
    from hf_fedlora import aggregate_adapters
    from hf_fedlora.federation.server import RoundCollector

    saved_to, trained = [], []
    real_save, real_add = LoraAdapter.save_pretrained, RoundCollector.add

    def save(self, folder, *args, **kwargs):
        saved_to.append(Path(folder))
        return real_save(self, folder, *args, **kwargs)

    def add(self, cid, adapter):
        trained.append(adapter)
        return real_add(self, cid, adapter)

    monkeypatch.setattr(LoraAdapter, "save_pretrained", save)
    monkeypatch.setattr(RoundCollector, "add", add)
    out = tmp_path / "streamed"
    run_recipe(recipe_args(tiny_model_dir, shared_data, out, rounds=1, save_client_adapters=False))
    assert not [p for p in saved_to if "_exchange" in p.parts], "a client adapter was written"
    assert len(trained) == 3 and all(isinstance(a, LoraAdapter) for a in trained)
    # today's merge: aggregate_adapters over the round's whole list of clients
    listed = aggregate_adapters(
        trained, strategy="replication", target_rank=8, previous=out / "round-0000"
    ).state_dict()
    got = adapter_tensors(out / "round-0001")
    for want in (listed, adapter_tensors(baseline / "round-0001")):  # and the run that wrote its clients
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    ids = lambda run: [(c["client"], c["rank"]) for c in read_metrics(run)[0]["clients"]]  # noqa: E731
    assert ids(out) == ids(baseline)


def test_whole_round_screening_keeps_the_list_path(tiny_model_dir, shared_data, tmp_path):
    """``max_norm_ratio`` needs the round's median norm first: the clients are screened together."""
    from hf_fedlora import get_strategy
    from hf_fedlora.federation.server import RoundCollector

    run = type("Run", (), {})()
    run.fed_args = load_recipe().parse(["--max_norm_ratio", "3"])[3]
    run.strategy, run.max_rank = get_strategy("replication"), 8
    assert RoundCollector(run, None, [0, 1], tmp_path).aggregator is None
    run.fed_args = load_recipe().parse(["--max_update_norm", "3", "--clip_update_norm", "1"])[3]
    assert RoundCollector(run, None, [0, 1], tmp_path).streaming
