"""A real Flower simulation (Ray backend): 4 clients of ranks 2/4/8/16, 2 rounds, tiny BERT.

The clients save every reply they send; the final global adapter the server wrote must equal
``aggregate_adapters()`` recomputed from those saved replies, round after round (relative
difference < 1e-5: the strategy folds each reply into a ``StreamingAggregator`` as it arrives).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import ConfigRecord, Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from hf_fedlora import LoraAdapter, aggregate_adapters  # noqa: E402
from hf_fedlora.flower import HeteroLoraStrategy, RoundWriter, adapter_to_records, client_view, train_reply  # noqa: E402

CLIENT_RANKS = (2, 4, 8, 16)
NUM_ROUNDS = 2
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=37,
    num_labels=2,
)


def _peft_model(r: int, lora_alpha: float):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**TINY))
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(base, config)


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    from peft import set_peft_model_state_dict

    partition = int(context.node_config["partition-id"])
    rank = CLIENT_RANKS[partition]  # the client's own budget
    view = client_view(msg, rank=rank, lora_alpha=2 * rank)
    model = _peft_model(rank, 2 * rank)
    set_peft_model_state_dict(model, view.state_dict())
    gen = torch.Generator().manual_seed(100 * partition + int(msg.content["config"]["server-round"]))
    ids = torch.randint(0, TINY["vocab_size"], (8, 12), generator=gen)
    labels = torch.randint(0, 2, (8,), generator=gen)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = LoraAdapter.from_peft_model(model)
    num_examples = 8 * (partition + 1)
    folder = Path(str(msg.content["config"]["reply-dir"])) / f"round-{msg.content['config']['server-round']}"
    trained.save_pretrained(folder / str(context.node_id))
    (folder / f"{context.node_id}.json").write_text(json.dumps({"num_examples": num_examples, "rank": rank}))
    return train_reply(msg, trained, num_examples, {"train-loss": loss.item()})


def _server_app(out: Path, strategy: HeteroLoraStrategy) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        model = _peft_model(16, 16)
        initial = LoraAdapter.from_peft_model(model).to_rank(16, 16)  # unit scale
        arrays, adapter_config = adapter_to_records(initial)
        initial.save_pretrained(out / "initial")
        config = ConfigRecord({**dict(adapter_config), "reply-dir": str(out / "replies")})
        strategy.start(grid, initial_arrays=arrays, train_config=config, num_rounds=NUM_ROUNDS, timeout=300)

    return app


def _replies(
    out: Path, server_round: int, nodes: list[int]
) -> tuple[list[LoraAdapter], list[int], list[int]]:
    """The replies the clients saved, in ``nodes`` order (the order the strategy folded them in)."""
    folder = out / "replies" / f"round-{server_round}"
    assert sorted(nodes) == sorted(int(p.name) for p in folder.iterdir() if p.is_dir())
    meta = [json.loads((folder / f"{n}.json").read_text()) for n in nodes]
    return (
        [LoraAdapter.from_pretrained(folder / str(n)) for n in nodes],
        [m["num_examples"] for m in meta],
        [m["rank"] for m in meta],
    )


@pytest.mark.slow
def test_flower_simulation_heterogeneous_ranks_matches_aggregate_adapters(
    tmp_path: Path, monkeypatch
) -> None:
    from flwr.simulation import run_simulation

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the Ray backend rewrites it
    writer = RoundWriter(tmp_path / "rounds")
    strategy = HeteroLoraStrategy(
        aggregation="replication",
        keep_replies=True,
        on_aggregate=writer,
        fraction_evaluate=0.0,
        min_train_nodes=4,
        min_available_nodes=4,
    )
    start = time.perf_counter()
    run_simulation(
        server_app=_server_app(tmp_path, strategy),
        client_app=client_app,
        num_supernodes=len(CLIENT_RANKS),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "num_gpus": 0},
        },
    )
    print(f"simulation wall time: {time.perf_counter() - start:.1f} s")

    assert len(strategy.rounds) == NUM_ROUNDS and all(not r.rejected for r in strategy.rounds)
    previous = LoraAdapter.from_pretrained(tmp_path / "initial")
    for server_round in range(1, NUM_ROUNDS + 1):
        replies, counts, ranks = _replies(tmp_path, server_round, strategy.rounds[server_round - 1].node_ids)
        assert sorted(ranks) == list(CLIENT_RANKS)
        expected = aggregate_adapters(replies, strategy="replication", num_examples=counts, previous=previous)
        saved = LoraAdapter.from_pretrained(tmp_path / "rounds" / f"round-{server_round:04d}")
        assert set(saved.ranks.values()) == {16}
        for key, tensor in expected.state_dict().items():  # folded as they came: equal up to summation order
            diff = (saved.state_dict()[key].double() - tensor.double()).norm() / tensor.double().norm()
            assert diff < 1e-5, (server_round, key, float(diff))
        previous = saved
    final = strategy.global_adapter.state_dict()
    for key, tensor in previous.state_dict().items():
        assert torch.equal(final[key], tensor), key
    rows = [json.loads(line) for line in (tmp_path / "rounds" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients-accepted"] == 4 for r in rows)
    assert rows[0]["num-examples"] == 8 * (1 + 2 + 3 + 4)
