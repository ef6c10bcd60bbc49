"""HeteroLoraStrategy without a simulation: hand-made replies through configure/aggregate_train."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from hf_fedlora import LoraAdapter, aggregate_adapters  # noqa: E402
from hf_fedlora.flower import (  # noqa: E402
    HeteroLoraStrategy,
    RoundWriter,
    adapter_to_records,
    array_to_tensor,
    client_view,
    tensor_to_array,
    train_reply,
)
from hf_fedlora.flower.records import RANK_KEY  # noqa: E402

pytestmark = pytest.mark.usefixtures("flower_server_identity")
RANKS = {11: 2, 12: 4, 13: 8, 14: 16}


class _Grid:
    """The part of flwr's Grid the strategy uses."""

    def get_node_ids(self):
        return list(RANKS)


def _initial(make_adapter) -> LoraAdapter:
    return LoraAdapter.from_pretrained(make_adapter("init", r=16, lora_alpha=16, seed=0))


def _train_messages(strategy, initial, server_round=1, arrays=None):
    init_arrays, init_config = adapter_to_records(initial)
    config = ConfigRecord({**dict(init_config), "lr": 0.01})
    return strategy.configure_train(server_round, arrays or init_arrays, config, _Grid())


def _reply(msg: Message, seed: int, num_examples: int) -> Message:
    """A client: take its view, perturb it like training would, answer."""
    rank = RANKS[msg.metadata.dst_node_id]
    view = client_view(msg, rank=rank, lora_alpha=2 * rank)
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in view.state_dict().items()}
    trained = LoraAdapter.from_state_dict(view.config, state)
    return train_reply(msg, trained, num_examples, {"train-loss": 1.0 / seed})


def assert_equal_merge(arrays, expected: LoraAdapter) -> None:
    """The strategy's records hold the same adapter as ``expected`` (the list merge of the same replies):
    the same tensors, equal up to float32 summation order (relative difference < 1e-5)."""
    state = expected.state_dict()
    assert sorted(arrays.keys()) == sorted(state)
    for key, tensor in state.items():
        got = array_to_tensor(arrays[key])
        assert got.shape == tensor.shape and got.dtype == tensor.dtype, key
        diff = (got.double() - tensor.double()).norm() / tensor.double().norm().clamp_min(1e-30)
        assert diff < 1e-5, (key, float(diff))


def _as_replies(messages):
    """Node 11..14 answers with 10..40 examples and loss 1/1..1/4 (sampling order is random)."""
    out = []
    for msg in messages:
        i = msg.metadata.dst_node_id - 10
        reply = _reply(msg, seed=i, num_examples=10 * i)
        assert reply.metadata.src_node_id == msg.metadata.dst_node_id
        out.append(reply)
    return out


def test_stock_fedavg_fails_on_heterogeneous_ranks(make_adapter) -> None:
    """The problem this module solves: Flower's FedAvg cannot average ranks 2/4/8/16."""
    strategy = HeteroLoraStrategy(rank_allocation=RANKS)
    replies = _as_replies(_train_messages(strategy, _initial(make_adapter)))
    with pytest.raises(ValueError, match="broadcast"):
        FedAvg().aggregate_train(1, replies)


def test_configure_train_sends_each_node_its_rank_view(make_adapter) -> None:
    initial = _initial(make_adapter)
    strategy = HeteroLoraStrategy(rank_allocation=RANKS, alpha_ratio=2.0)
    messages = list(_train_messages(strategy, initial))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(RANKS)
    for msg in messages:
        rank = RANKS[msg.metadata.dst_node_id]
        config = msg.content["config"]
        assert config[RANK_KEY] == rank and config["lora-alpha"] == 2.0 * rank
        assert config["lr"] == 0.01 and config["server-round"] == 1 and config["lora-send-back"] == "truncate"
        view = client_view(msg)
        expected = initial.to_rank(rank, 2.0 * rank, method="truncate")
        for key, tensor in expected.state_dict().items():
            assert torch.equal(view.state_dict()[key], tensor), key


def test_unknown_client_rank_gets_the_full_adapter_and_chooses(make_adapter) -> None:
    initial = _initial(make_adapter)
    strategy = HeteroLoraStrategy()
    msg = next(iter(_train_messages(strategy, initial)))
    assert msg.content["config"][RANK_KEY] == 16
    view = client_view(msg, rank=4, lora_alpha=8)
    assert set(view.ranks.values()) == {4} and view.config.lora_alpha == 8


@pytest.mark.parametrize("aggregation", ["replication", "zero_padding", "flexlora", "stacking"])
def test_aggregate_train_equals_aggregate_adapters(make_adapter, aggregation) -> None:
    initial = _initial(make_adapter)
    strategy = HeteroLoraStrategy(aggregation=aggregation, rank_allocation=RANKS, keep_replies=True)
    replies = _as_replies(_train_messages(strategy, initial))
    arrays, metrics = strategy.aggregate_train(1, replies)
    record = strategy.rounds[0]
    assert record.node_ids == sorted(RANKS) and record.num_examples == [10, 20, 30, 40]
    expected = aggregate_adapters(
        record.replies, strategy=aggregation, num_examples=[10, 20, 30, 40], previous=initial
    )
    assert_equal_merge(arrays, expected)
    assert (
        metrics["num-examples"] == 100
        and metrics["clients-accepted"] == 4
        and metrics["clients-rejected"] == 0
    )
    assert metrics["train-loss"] == pytest.approx((10 / 1 + 20 / 2 + 30 / 3 + 40 / 4) / 100)
    # next round: the strategy recognises its own output and remembers the reported ranks
    second = list(strategy.configure_train(2, arrays, ConfigRecord(), _Grid()))
    assert {m.metadata.dst_node_id: m.content["config"][RANK_KEY] for m in second} == RANKS


def _break(reply: Message, how: str) -> None:
    arrays, config = reply.content["arrays"], reply.content["config"]
    key = next(k for k in arrays.keys() if k.endswith("lora_A.weight"))
    tensor = array_to_tensor(arrays[key])
    if how == "shape":
        arrays[key] = tensor_to_array(tensor[:-1])
    elif how == "rank":
        del config[RANK_KEY]
    elif how == "nan":
        tensor[0, 0] = float("nan")
        arrays[key] = tensor_to_array(tensor)
    elif how == "layer":
        arrays[key] = tensor_to_array(torch.zeros(tensor.shape[0], tensor.shape[1] + 1))


@pytest.mark.parametrize(
    "how, message",
    [
        ("shape", r"round 1, reply from node 12.*hold rank 3/4 but .* declares rank 4"),
        ("rank", r"round 1, reply from node 12: the ConfigRecord has no `lora-r`"),
        ("nan", r"round 1, reply from node 12: tensor `.*lora_A.weight` holds 1 NaN/Inf"),
        (
            "layer",
            r"round 1, reply from node 12: array `.*lora_A.weight` declares shape \[4, 33\], but module `.*` "
            r"has layer shape \[r, 32\]",
        ),
    ],
)
def test_bad_reply_is_rejected_and_the_round_goes_on(make_adapter, monkeypatch, how, message) -> None:
    initial = _initial(make_adapter)
    strategy = HeteroLoraStrategy(rank_allocation=RANKS, keep_replies=True)
    replies = _as_replies(_train_messages(strategy, initial))
    bad = next(r for r in replies if r.metadata.src_node_id == 12)
    _break(bad, how)
    import hf_fedlora.flower.fold as fold_module

    logged: list[
        str
    ] = []  # Flower's logger may be disabled or re-levelled by other libraries: record the calls
    monkeypatch.setattr(
        fold_module, "log", lambda level, msg, *args: logged.append(msg % args if args else msg)
    )
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-accepted"] == 3 and metrics["clients-rejected"] == 1
    ((node, reason),) = strategy.rounds[0].rejected
    assert node == 12
    assert __import__("re").search(message, reason), reason
    assert any("rejected round 1, reply from node 12" in line for line in logged), logged
    good = strategy.rounds[0].replies
    expected = aggregate_adapters(good, num_examples=[10, 30, 40], previous=initial)
    assert_equal_merge(arrays, expected)


def test_all_replies_bad_keeps_the_previous_global(make_adapter) -> None:
    initial = _initial(make_adapter)
    strategy = HeteroLoraStrategy(rank_allocation=RANKS)
    replies = _as_replies(_train_messages(strategy, initial))
    for reply in replies:
        _break(reply, "nan")
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.global_adapter is not None and strategy.rounds[0].global_adapter is None
    assert [node for node, _ in strategy.rounds[0].rejected] == sorted(RANKS)


def test_round_writer_saves_peft_rounds_and_metrics(make_adapter, tmp_path) -> None:
    initial = _initial(make_adapter)
    writer = RoundWriter(tmp_path / "out")
    strategy = HeteroLoraStrategy(rank_allocation=RANKS, on_aggregate=writer)
    strategy.aggregate_train(1, _as_replies(_train_messages(strategy, initial)))
    saved = LoraAdapter.from_pretrained(tmp_path / "out" / "round-0001")
    for key, tensor in strategy.global_adapter.state_dict().items():
        assert torch.equal(saved.state_dict()[key], tensor)
    line = (tmp_path / "out" / "metrics.jsonl").read_text().strip()
    assert '"round": 1' in line and '"clients-accepted": 4' in line


def test_round_writer_records_a_failed_push_and_keeps_the_round(make_adapter, tmp_path, monkeypatch) -> None:
    import hf_fedlora.hub

    def failing_push(round_dir, repo_id, round_index, **kwargs):
        raise ConnectionError(f"could not reach the Hub with token {kwargs['token']}")

    monkeypatch.setattr(hf_fedlora.hub, "push_round", failing_push)
    writer = RoundWriter(tmp_path / "out", hub_repo_id="me/run", token="hf_secret")
    folder = writer(1, _initial(make_adapter), {"train-loss": 0.5, "eval-loss": float("nan")})
    assert (folder / "adapter_model.safetensors").is_file()
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert row["round"] == 1 and row["train-loss"] == 0.5 and row["eval-loss"] is None
    assert row["hub_push"]["ok"] is False and "ConnectionError" in row["hub_push"]["error"]
    assert "hf_secret" not in row["hub_push"]["error"]


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="`send_back` must be one of 'truncate', 'svd', got 'pad'"):
        HeteroLoraStrategy(send_back="pad")
    with pytest.raises(ValueError, match="Unknown|unknown|valid"):
        HeteroLoraStrategy(aggregation="nope")


def test_a_reported_rank_is_capped_by_the_smallest_layer(make_adapter) -> None:
    """A rank remembered from a node's last reply never asks the next view for more than every layer holds."""
    initial = _initial(make_adapter)
    strategy = HeteroLoraStrategy()
    strategy.client_ranks = {11: 10**7, 12: 4}
    messages = {m.metadata.dst_node_id: m for m in _train_messages(strategy, initial)}
    assert messages[11].content["config"][RANK_KEY] == 32  # the tiny BERT's layers are 32 x 32
    assert messages[12].content["config"][RANK_KEY] == 4
