"""Run ``recipes/fed_glue.py`` and SIGKILL it at a chosen point of round 2 (for the crash tests).

    python tests/crash_runner.py <point> <recipe options...>

Points: ``train`` (a client of round 2 starts training after another finished), ``aggregate``
(the server finishes merging round 2), ``checkpoint`` (round-0002's weights are in its temporary
folder, not yet renamed into place), ``jsonl`` (half of round 2's metrics line is written),
``state`` (round 2 is written, ``state.json`` not yet updated).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    import hf_fedlora.adapters.adapter as adapter_module
    import hf_fedlora.federation.rounds as rounds
    import hf_fedlora.federation.server as server
    from hf_fedlora.federation.client import LocalTrainer
    from hf_fedlora.federation.state import RunState

    calls = {"train": 0, "aggregate": 0}
    if point == "train":
        real_train = LocalTrainer.train

        def train(self, view, rank, shard, *args, **kwargs):
            calls["train"] += 1
            if calls["train"] == int(os.environ["CRASH_TRAIN_CALL"]):
                die()
            return real_train(self, view, rank, shard, *args, **kwargs)

        LocalTrainer.train = train
    elif point == "aggregate":
        real_merge = server.RoundCollector.merge

        def merge(self):
            calls["aggregate"] += 1
            if calls["aggregate"] == 2:
                die()
            return real_merge(self)

        server.RoundCollector.merge = merge
    elif point == "checkpoint":
        real_save = adapter_module.save_file

        def save_file(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            if Path(filename).parent.name.startswith(".round-0002.tmp-"):
                die()

        adapter_module.save_file = save_file
    elif point == "jsonl":
        real_append = rounds.append_record

        def append_record(output_dir, record):
            if record.round == 2:
                with open(Path(output_dir) / "metrics.jsonl", "a", encoding="utf-8") as handle:
                    handle.write('{"round": 2, "clients": [')
                die()
            real_append(output_dir, record)

        rounds.append_record = append_record
    elif point == "state":
        real_state_save = RunState.save

        def save(self, output_dir):
            if self.completed_round == 2:
                die()
            real_state_save(self, output_dir)

        RunState.save = save
    elif point != "none":
        raise SystemExit(f"unknown crash point {point!r}")


if __name__ == "__main__":
    point, argv = sys.argv[1], sys.argv[2:]
    arm(point)
    spec = importlib.util.spec_from_file_location("fed_glue_recipe", REPO / "recipes" / "fed_glue.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    arguments = recipe.parse(argv)
    recipe.set_torch_threads()  # as the script does
    recipe.main(*arguments)
