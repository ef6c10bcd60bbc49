"""HeteroLoraStrategy against hostile replies (issue 16), and replies folded as they arrive (issue 14).

Every reply is built as a client would send it (``client_view`` -> perturb -> ``train_reply``), then
broken the way a hostile or buggy client could break it. Each must become that client's
``AdapterError`` (naming the node and the field), the round must go on with the other replies, and
the server must not allocate what the reply declares before checking it: the hostile rounds run
under an address-space limit of 2 GiB above the process's current size, so an allocation of what a
lying array declares (64 GiB) fails the test.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import time
import weakref

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ConfigRecord, Message  # noqa: E402

from hf_fedlora import LoraAdapter, aggregate_adapters, get_strategy, list_strategies  # noqa: E402
from hf_fedlora.flower import (  # noqa: E402
    HeteroLoraStrategy,
    ReplyCollector,
    adapter_from_records,
    adapter_to_records,
    array_to_tensor,
    client_view,
    tensor_to_array,
    train_reply,
)
from hf_fedlora.flower.records import CONFIG_JSON_KEY, NUM_EXAMPLES_KEY, RANK_KEY  # noqa: E402

pytestmark = pytest.mark.usefixtures("flower_server_identity")
RANKS = {11: 2, 12: 4, 13: 8, 14: 16}
BAD = 12  # the node whose reply is broken
HETEROGENEOUS = [name for name in list_strategies() if get_strategy(name).supports_heterogeneous_ranks]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    import hf_fedlora.flower.collect as collect_module
    import hf_fedlora.flower.strategy as strategy_module

    for module in (strategy_module, collect_module):
        monkeypatch.setattr(module, "log", lambda *args: None)
    with contextlib.suppress(ImportError):
        import hf_fedlora.flower.fold as fold_module

        monkeypatch.setattr(fold_module, "log", lambda *args: None)


@contextlib.contextmanager
def address_space_limit(headroom: int = 2 << 30):
    """At most ``headroom`` bytes of address space beyond the process's current size (RLIMIT_AS)."""
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + headroom if hard == resource.RLIM_INFINITY else min(size + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class _Grid:
    def get_node_ids(self):
        return list(RANKS)


@pytest.fixture(scope="module")
def initial(tmp_path_factory: pytest.TempPathFactory) -> LoraAdapter:
    """The round's global adapter: PEFT-written, rank 16, on the tiny BERT (layers 32 x 32)."""
    from testing_utils import write_peft_adapter

    return LoraAdapter.from_pretrained(
        write_peft_adapter(tmp_path_factory.mktemp("flower") / "init", 16, 16, 0)
    )


def _train_messages(strategy: HeteroLoraStrategy, initial: LoraAdapter) -> list[Message]:
    arrays, config = adapter_to_records(initial)
    return list(strategy.configure_train(1, arrays, ConfigRecord({**dict(config), "lr": 0.01}), _Grid()))


def _reply(msg: Message) -> Message:
    """Node 11..14 trains (seeded) and answers with 10..40 examples."""
    node = msg.metadata.dst_node_id
    view = client_view(msg, rank=RANKS[node], lora_alpha=2 * RANKS[node])
    gen = torch.Generator().manual_seed(node)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in view.state_dict().items()}
    trained = LoraAdapter.from_state_dict(view.config, state)
    return train_reply(msg, trained, 10 * (node - 10), {"train-loss": 1.0 / node})


def _decoded(reply: Message) -> LoraAdapter:
    return adapter_from_records(reply.content["arrays"], reply.content["config"])


def assert_equal_merge(arrays, expected: LoraAdapter) -> None:
    """Same tensors as ``expected``, equal up to float32 summation order (relative difference < 1e-5)."""
    state = expected.state_dict()
    assert sorted(arrays.keys()) == sorted(state)
    for key, tensor in state.items():
        got = array_to_tensor(arrays[key])
        assert got.shape == tensor.shape and got.dtype == tensor.dtype, key
        diff = (got.double() - tensor.double()).norm() / tensor.double().norm().clamp_min(1e-30)
        assert diff < 1e-5, (key, float(diff))


# -- issue 14: replies folded as they arrive ---------------------------------------------------------


class _LazyGrid:
    """A grid whose node ``order[k]`` has its reply ready ``(k + 1) * step`` seconds after the push and
    builds it only when it is pulled; ``silent`` nodes never answer. ``arrivals`` lists the nodes in
    the order their replies were pulled; ``held`` records, at each pull, how many earlier replies were
    still reachable (without running the cyclic garbage collector)."""

    def __init__(
        self,
        order: list[int],
        silent: frozenset[int] = frozenset(),
        broken: dict | None = None,
        step: float = 0.05,
    ):
        self.ready = {node: (k + 1) * step for k, node in enumerate(order)}
        self.silent, self.broken = silent, broken or {}
        self.instructions: dict[str, Message] = {}
        self.pushed_at = 0.0
        self.built: list[weakref.ref] = []
        self.held: list[int] = []
        self.arrivals: list[int] = []

    def get_node_ids(self):
        return list(RANKS)

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        ids = []
        for msg in messages:
            self.instructions[f"m{msg.metadata.dst_node_id}"] = msg
            ids.append(f"m{msg.metadata.dst_node_id}")
        return ids

    def pull_messages(self, message_ids):
        out = []
        now = time.monotonic() - self.pushed_at
        for message_id in message_ids:
            node = int(message_id[1:])
            if node in self.silent or now < self.ready[node]:
                continue
            self.held.append(sum(ref() is not None for ref in self.built))
            reply = _reply(self.instructions[message_id])
            self.broken.get(node, lambda r: None)(reply)
            reply.metadata.__dict__["_reply_to_message_id"] = message_id
            self.built.append(weakref.ref(reply.content["arrays"]))
            self.arrivals.append(node)
            out.append(reply)
        return out


def _collect(strategy: HeteroLoraStrategy, grid: _LazyGrid, initial: LoraAdapter, timeout: float = 30):
    strategy.collector = ReplyCollector(grid, poll_interval=0.01, on_reply=strategy.on_reply)
    leftover = strategy.collector.send_and_receive(_train_messages(strategy, initial), timeout=timeout)
    return leftover, strategy.aggregate_train(1, leftover)


def _expected(grid: _LazyGrid, nodes: list[int], aggregation: str, initial: LoraAdapter) -> LoraAdapter:
    """The list merge (aggregate_adapters) of the same replies, rebuilt, in arrival order."""
    replies = [_decoded(_reply(grid.instructions[f"m{node}"])) for node in nodes]
    counts = [10 * (node - 10) for node in nodes]
    return aggregate_adapters(replies, strategy=aggregation, num_examples=counts, previous=initial)


@pytest.mark.parametrize("aggregation", HETEROGENEOUS)
def test_replies_are_folded_as_they_arrive_one_held_at_a_time(initial, aggregation) -> None:
    strategy = HeteroLoraStrategy(aggregation=aggregation, rank_allocation=RANKS)
    grid = _LazyGrid(order=[13, 11, 14, 12])
    leftover, (arrays, metrics) = _collect(strategy, grid, initial)
    assert leftover == []  # every reply was consumed by the strategy as it came
    assert grid.held == [0, 0, 0, 0]  # no earlier reply was still reachable when the next one came
    assert sorted(grid.arrivals) == sorted(RANKS) and strategy.rounds[0].node_ids == grid.arrivals
    assert metrics["clients-accepted"] == 4 and metrics["num-examples"] == 100
    assert metrics["train-loss"] == pytest.approx((10 / 11 + 20 / 12 + 30 / 13 + 40 / 14) / 100)
    assert_equal_merge(arrays, _expected(grid, grid.arrivals, aggregation, initial))


def test_a_bad_reply_mid_round_is_dropped_and_the_rest_are_folded(initial) -> None:
    strategy = HeteroLoraStrategy(rank_allocation=RANKS)
    grid = _LazyGrid(order=[11, BAD, 13, 14], broken={BAD: lambda reply: _nan(reply)})
    _, (arrays, metrics) = _collect(strategy, grid, initial)
    ((node, reason),) = strategy.rounds[0].rejected
    assert node == BAD and re.search(rf"reply from node {BAD}: tensor `.*` holds 1 NaN/Inf", reason), reason
    assert metrics["clients-accepted"] == 3 and metrics["clients-rejected"] == 1
    assert grid.held == [0, 0, 0, 0]  # the refused reply was let go too
    good = [node for node in grid.arrivals if node != BAD]
    assert strategy.rounds[0].node_ids == good
    assert_equal_merge(arrays, _expected(grid, good, "replication", initial))


def test_min_train_replies_and_lost_nodes_with_replies_folded_as_they_come(initial) -> None:
    broken = {BAD: _nan, 13: _nan}
    strategy = HeteroLoraStrategy(rank_allocation=RANKS, min_train_replies=2)
    grid = _LazyGrid(order=[11, BAD, 13, 14], silent=frozenset({14}), broken=broken)
    _, result = _collect(strategy, grid, initial, timeout=0.5)
    assert result == (None, None) and strategy.rounds[0].global_adapter is None  # 1 usable reply < 2
    assert_equal_merge(adapter_to_records(strategy.global_adapter)[0], initial)  # the previous adapter kept
    record = strategy.rounds[0]
    assert [n for n, _ in record.lost] == [14] and [n for n, _ in record.rejected] == [BAD, 13]
    strategy = HeteroLoraStrategy(rank_allocation=RANKS, min_train_replies=1)
    grid = _LazyGrid(order=[11, BAD, 13, 14], silent=frozenset({14}), broken=broken)
    _, (arrays, _) = _collect(strategy, grid, initial, timeout=0.5)
    assert strategy.rounds[0].node_ids == [11]
    assert_equal_merge(arrays, _expected(grid, [11], "replication", initial))


# -- issue 16: hostile replies ---------------------------------------------------------------------


def _first_key(reply: Message, suffix: str = "lora_A.weight") -> str:
    return next(k for k in reply.content["arrays"].keys() if k.endswith(suffix))


def _nan(reply: Message) -> None:
    key = _first_key(reply)
    tensor = array_to_tensor(reply.content["arrays"][key])
    tensor[0, 0] = float("nan")
    reply.content["arrays"][key] = tensor_to_array(tensor)


def _hostile_round(initial, breaker, **strategy_kwargs):
    """Round 1 with node 12's reply broken by ``breaker``, aggregated under an address-space limit;
    returns (the reason node 12 was left out, the seconds the round took)."""
    strategy = HeteroLoraStrategy(rank_allocation=RANKS, keep_replies=True, **strategy_kwargs)
    replies = [_reply(msg) for msg in _train_messages(strategy, initial)]
    breaker(next(r for r in replies if r.metadata.src_node_id == BAD))
    start = time.perf_counter()
    with address_space_limit():
        arrays, metrics = strategy.aggregate_train(1, replies)
    took = time.perf_counter() - start
    record = strategy.rounds[0]
    assert [node for node, _ in record.rejected] == [BAD], record.rejected
    assert metrics["clients-accepted"] == 3 and record.node_ids == [11, 13, 14]
    expected = aggregate_adapters(record.replies, num_examples=[10, 30, 40], previous=initial)
    assert_equal_merge(arrays, expected)
    return record.rejected[0][1], took, strategy


def _npy(shape, dtype: str = "<f4", body: bytes = b"") -> bytes:
    """An .npy buffer whose header declares ``shape`` and ``dtype``, followed by ``body``."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


def _set_array(key_suffix: str, make_array):
    def breaker(reply: Message) -> None:
        key = _first_key(reply, key_suffix)
        reply.content["arrays"][key] = make_array(array_to_tensor(reply.content["arrays"][key]))

    return breaker


EMPTY_ARRAYS = {
    "npy-no-bytes": lambda t: Array(dtype="float32", shape=tuple(t.shape), stype="numpy.ndarray", data=b""),
    "raw-no-bytes": lambda t: Array(
        dtype="bfloat16", shape=tuple(t.shape), stype="hf_fedlora.torch.raw", data=b""
    ),
    "npy-zero-elements": lambda t: tensor_to_array(torch.zeros(0, t.shape[1])),
}


@pytest.mark.parametrize("how", list(EMPTY_ARRAYS))
def test_an_empty_array_is_the_clients_error(initial, how) -> None:
    reason, took, _ = _hostile_round(initial, _set_array("lora_A.weight", EMPTY_ARRAYS[how]))
    assert re.search(rf"reply from node {BAD}: array `.*lora_A.weight` declares (shape|rank)", reason) or (
        how == "npy-no-bytes" and "holds no readable .npy array" in reason
    ), reason
    assert took < 10


LYING_ARRAYS = {
    # 200 bytes whose .npy header and Array both declare 2**34 float32 elements (64 GiB)
    "npy-2**34-elements": lambda t: Array(
        dtype="float32",
        shape=(2**17, 2**17),
        stype="numpy.ndarray",
        data=_npy((2**17, 2**17), body=bytes(200)),
    ),
    # the Array declares the layer's shape, its .npy header 2**34 elements
    "npy-header-lies": lambda t: Array(
        dtype="float32",
        shape=tuple(t.shape),
        stype="numpy.ndarray",
        data=_npy((2**17, 2**17), body=bytes(200)),
    ),
    # the right shape everywhere, but half the bytes
    "npy-short-data": lambda t: Array(
        dtype="float32",
        shape=tuple(t.shape),
        stype="numpy.ndarray",
        data=_npy(t.shape, body=bytes(t.numel() * 2)),
    ),
    "raw-2**34-elements": lambda t: Array(
        dtype="bfloat16", shape=(2**17, 2**17), stype="hf_fedlora.torch.raw", data=bytes(200)
    ),
    "npy-object-dtype": lambda t: Array(
        dtype="object", shape=tuple(t.shape), stype="numpy.ndarray", data=_npy(t.shape, "|O", bytes(200))
    ),
}


@pytest.mark.parametrize("how", list(LYING_ARRAYS))
def test_a_lying_array_is_refused_before_allocating(initial, how) -> None:
    reason, took, _ = _hostile_round(initial, _set_array("lora_A.weight", LYING_ARRAYS[how]))
    assert re.search(rf"reply from node {BAD}: array `.*lora_A.weight`", reason), reason
    assert re.search(r"declares (shape|rank)|its data holds|\.npy header says|holds dtype", reason), reason
    assert took < 10


def test_a_lying_array_is_refused_without_a_reference_too() -> None:
    """The client side (no global adapter to compare with): sizes are checked against the bytes."""
    for how in ("npy-2**34-elements", "raw-2**34-elements", "npy-header-lies"):
        array = LYING_ARRAYS[how](torch.zeros(4, 32))
        with address_space_limit(), pytest.raises(ValueError, match="its data holds|.npy header says"):
            array_to_tensor(array, "reply from node 7: array `x`")


def _rank_pattern_config(reply: Message, rank: int) -> None:
    """``lora-r`` ``rank`` with a ``rank_pattern`` giving every module its true rank: the tensors agree."""
    config = reply.content["config"]
    data = json.loads(config[CONFIG_JSON_KEY])
    true_rank = config[RANK_KEY]
    data["rank_pattern"] = {"query": true_rank, "value": true_rank}
    config[CONFIG_JSON_KEY] = json.dumps(data)
    config[RANK_KEY] = rank


ANNOUNCED_RANKS = {
    "10**7-agreeing-rank-pattern": (
        lambda r: _rank_pattern_config(r, 10**7),
        r"`lora-r` is 10000000, larger",
    ),
    "10**7": (lambda r: r.content["config"].__setitem__(RANK_KEY, 10**7), r"`lora-r` is 10000000, larger"),
    "10**5000": (lambda r: r.content["config"].__setitem__(RANK_KEY, 10**5000), r"`lora-r` is an integer of"),
    "negative": (lambda r: r.content["config"].__setitem__(RANK_KEY, -4), r"`lora-r` must be a positive int"),
    "non-integer": (lambda r: r.content["config"].__setitem__(RANK_KEY, 4.5), r"`lora-r` must be int"),
    "nan": (lambda r: r.content["config"].__setitem__(RANK_KEY, math.nan), r"`lora-r` must be int"),
}


@pytest.mark.parametrize("how", list(ANNOUNCED_RANKS))
def test_an_announced_rank_is_bounded_by_the_layers(initial, how) -> None:
    breaker, message = ANNOUNCED_RANKS[how]
    reason, took, strategy = _hostile_round(initial, breaker)
    assert re.search(rf"reply from node {BAD}: field {message}", reason), reason
    assert took < 10
    # the next round asks no node for more than its layers hold
    assert BAD not in strategy.client_ranks
    with address_space_limit():
        second = list(strategy.configure_train(2, strategy._global_arrays, ConfigRecord(), _Grid()))
    assert {m.metadata.dst_node_id: m.content["config"][RANK_KEY] for m in second} == RANKS


def _set_count(value):
    def breaker(reply: Message) -> None:
        reply.content["metrics"]["num-examples"] = value

    return breaker


def _no_count(reply: Message) -> None:
    del reply.content["metrics"]["num-examples"]
    del reply.content["config"][NUM_EXAMPLES_KEY]


EXAMPLE_COUNTS = {
    "nan": (_set_count(math.nan), "is nan"),
    "1e400": (_set_count(float("1e400")), "is inf"),
    "zero": (_set_count(0), "is 0; .* a client that trained on no examples adds nothing"),
    "negative": (_set_count(-5), "is -5"),
    "non-integer": (_set_count(2.5), "is 2.5"),
    "2**60": (_set_count(2**60), "is 1152921504606846976"),
    "a-list": (_set_count([10, 20]), r"is \[10, 20\]"),
    "missing": (_no_count, "no example count"),
}


@pytest.mark.parametrize("how", list(EXAMPLE_COUNTS))
def test_a_bad_example_count_drops_the_client(initial, how) -> None:
    breaker, message = EXAMPLE_COUNTS[how]
    reason, took, _ = _hostile_round(initial, breaker)
    assert re.search(
        rf"reply from node {BAD}: (MetricRecord 'metrics' field `num-examples` )?{message}", reason
    ), reason
    assert took < 10


def _config_json(text: str):
    def breaker(reply: Message) -> None:
        reply.content["config"][CONFIG_JSON_KEY] = text

    return breaker


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param(
            json.dumps({"peft_type": "LORA", "pad": "x" * (2 << 20)}),
            "over the limit of 1,048,576",
            id="2-MiB",
        ),
        pytest.param("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels", id="100k-deep"),
    ],
)
def test_an_oversized_or_deeply_nested_lora_config_is_refused(initial, text, message) -> None:
    reason, took, _ = _hostile_round(initial, _config_json(text))
    assert re.search(rf"reply from node {BAD}: field `lora-config` .*{message}", reason), reason
    assert took < 10


def test_an_array_the_global_adapter_does_not_have_is_refused(initial) -> None:
    def breaker(reply: Message) -> None:
        reply.content["arrays"]["base_model.model.smuggled.weight"] = tensor_to_array(torch.zeros(256, 1024))

    reason, _, _ = _hostile_round(initial, breaker)
    assert "array `base_model.model.smuggled.weight` is not a tensor of the global adapter" in reason, reason


def test_a_second_reply_from_one_node_is_refused(initial) -> None:
    strategy = HeteroLoraStrategy(rank_allocation=RANKS, keep_replies=True)
    messages = _train_messages(strategy, initial)
    replies = [_reply(msg) for msg in messages]
    replies.append(_reply(next(m for m in messages if m.metadata.dst_node_id == BAD)))
    arrays, metrics = strategy.aggregate_train(1, replies)
    record = strategy.rounds[0]
    assert record.node_ids == [11, BAD, 13, 14] and metrics["num-examples"] == 100
    ((node, reason),) = record.rejected
    assert node == BAD and "a second reply from this node" in reason
    assert_equal_merge(
        arrays, aggregate_adapters(record.replies, num_examples=[10, 20, 30, 40], previous=initial)
    )
