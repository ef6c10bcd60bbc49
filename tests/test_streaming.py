"""``StreamingAggregator``: the same merge as ``aggregate_adapters``, one client at a time.

- For every registered strategy, on PEFT-written clients of heterogeneous ranks, alphas, rsLoRA and
  rank patterns (tiny BERT), and on the LoRA kinds LLM users train (embedding LoRA, DoRA, LoRA
  biases, ``modules_to_save``; ``benchmarks/bench_dora_error.py``'s tiny Llama), adding the clients
  one by one gives ``aggregate_adapters``'s result (relative difference < 1e-5 per tensor), config
  and provenance.
- Every bad client of the error gallery (``bad_adapters.py``) is refused at ``add`` with the error
  ``aggregate_adapters`` raises; the running state is unchanged, so the round goes on without it.
- Peak memory of the running-sum rules does not grow with the number of clients (8 vs 40 clients,
  each count in a fresh interpreter); ``flexlora``, which keeps the factor stacks, is the control.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_adapters import CASES
from testing_utils import REPO_ROOT, load_benchmark, tiny_bert, write_peft_adapter

from hf_fedlora import (
    AdapterError,
    IncompatibleAdaptersError,
    InvalidWeightsError,
    LoraAdapter,
    NonFiniteTensorError,
    StreamingAggregator,
    aggregate_adapters,
    list_strategies,
)
from hf_fedlora.errors import StrategyRegistrationError
from hf_fedlora.strategies import ModuleInputs, Strategy, get_strategy, register_strategy

STRATEGIES = list_strategies()
WEIGHTS = [1.0, 2.0, 3.0]
HETEROGENEOUS = [
    {"r": 2, "lora_alpha": 4},
    {"r": 8, "lora_alpha": 16, "use_rslora": True},
    {"r": 4, "lora_alpha": 4, "rank_pattern": {"value": 6}, "alpha_pattern": {"value": 12}},
]
EQUAL = [{"r": 4, "lora_alpha": 8}] * 3
KINDS = ("dora", "mix")  # embedding LoRA + DoRA magnitudes; all-linear + lora_bias + lm_head saved


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], list[Path]]:
    """Client folders by (kind, heterogeneous ranks): PEFT-written, made once and only read."""
    root = tmp_path_factory.mktemp("streaming_clients")
    bench = load_benchmark("bench_dora_error")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a busy CPU
    sets = {}
    for het, specs in ((True, HETEROGENEOUS), (False, EQUAL)):
        tag = "het" if het else "equal"
        sets["bert", het] = [
            write_peft_adapter(root / f"bert-{tag}{i}", seed=i + 1, **spec) for i, spec in enumerate(specs)
        ]
        for kind in KINDS:
            kind_specs = bench.HETEROGENEOUS if het else bench.EQUAL
            sets[kind, het] = bench.write_clients(root / f"{kind}-{tag}", kind, kind_specs, steps=1)
    torch.set_num_threads(before)
    return sets


def for_strategy(clients: dict, kind: str, strategy: str) -> list[Path]:
    return clients[kind, get_strategy(strategy).supports_heterogeneous_ranks]


def stream(sources, strategy, weights=None, num_examples=None, **options) -> LoraAdapter:
    agg = StreamingAggregator(strategy, **options)
    for k, source in enumerate(sources):
        agg.add(
            source,
            weight=None if weights is None else weights[k],
            num_examples=None if num_examples is None else num_examples[k],
        )
    return agg.result()


def assert_same_merge(got: LoraAdapter, want: LoraAdapter, rtol: float = 1e-5) -> None:
    assert got.config.to_dict() == want.config.to_dict()
    mine, theirs = got.state_dict(), want.state_dict()
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, key
        diff = (mine[key].double() - value.double()).norm()
        assert diff <= rtol * value.double().norm() + 1e-12, (key, float(diff / value.double().norm()))
    got_clients, want_clients = got.provenance.pop("clients"), want.provenance.pop("clients")
    assert got.provenance == want.provenance
    for mine_c, theirs_c in zip(got_clients, want_clients, strict=True):
        assert mine_c.pop("weight") == pytest.approx(theirs_c.pop("weight"), rel=1e-6)
        assert mine_c == theirs_c


@pytest.mark.parametrize("kind", ["bert", *KINDS])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_streaming_equals_aggregate_adapters(strategy, kind, clients) -> None:
    sources = for_strategy(clients, kind, strategy)
    want = aggregate_adapters(sources, strategy, weights=WEIGHTS)
    assert_same_merge(stream(sources, strategy, weights=WEIGHTS), want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_streaming_equals_with_counts_target_rank_and_previous(strategy, clients) -> None:
    sources = for_strategy(clients, "bert", strategy)
    previous = aggregate_adapters(sources, strategy)
    options = {"previous": previous, "dtype": torch.bfloat16}
    if not get_strategy(strategy).rank_grows_with_clients:
        options["target_rank"] = 5
    counts = [10, 30, 7]
    want = aggregate_adapters(sources, strategy, num_examples=counts, **options)
    assert_same_merge(stream(sources, strategy, num_examples=counts, **options), want, rtol=1e-2)
    # a slot no client owns keeps the previous value (replication), streamed as listed
    want = aggregate_adapters(sources[:1], strategy, previous=previous)
    assert_same_merge(stream(sources[:1], strategy, previous=previous), want)


def test_in_memory_sources_and_a_source_gone_after_add(clients, tmp_path) -> None:
    from peft import PeftModel

    folders = [shutil.copytree(f, tmp_path / f.name) for f in clients["bert", True]]
    model = PeftModel.from_pretrained(tiny_bert(), str(folders[2]))
    want = aggregate_adapters([folders[0], LoraAdapter.from_pretrained(folders[1]), model], "replication")
    agg = StreamingAggregator("replication")
    agg.add(folders[0])
    shutil.rmtree(folders[0])  # read once at add, not kept
    agg.add(LoraAdapter.from_pretrained(folders[1]))
    agg.add(model)
    assert_same_merge(agg.result(), want)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return write_peft_adapter(root / "good", 4, 8, seed=1), write_peft_adapter(root / "bad", 4, 8, seed=2)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_client_is_refused_with_aggregate_adapters_error_and_the_round_goes_on(case, pair, tmp_path):
    good, bad = (Path(shutil.copytree(p, tmp_path / p.name)) for p in pair)
    case.corrupt(good, bad)
    with pytest.raises(case.error) as listed:
        aggregate_adapters([good, bad])
    agg = StreamingAggregator("replication")
    agg.add(good)
    with pytest.raises(case.error) as streamed:
        agg.add(bad)
    # the same error; the list, with no reference given, also says that 1 vs 1 has no majority
    assert str(listed.value).startswith(str(streamed.value))
    agg.add(good)
    merged = agg.result()
    assert [c["source"] for c in merged.provenance["clients"]] == [str(good)] * 2
    assert_same_merge(merged, aggregate_adapters([good, good]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_nan_client_leaves_the_running_state_unchanged(strategy, clients) -> None:
    sources = for_strategy(clients, "bert", strategy)
    adapter = LoraAdapter.from_pretrained(sources[1])
    state = adapter.state_dict()
    key = max(k for k in state if k.endswith("lora_A.weight"))  # the last module: earlier ones pass
    state[key][-1, 0] = float("nan")
    broken = LoraAdapter.from_state_dict(adapter.config, state, label="nan-client")
    agg = StreamingAggregator(strategy)
    agg.add(sources[0], weight=1.0)
    with pytest.raises(NonFiniteTensorError, match=r"client 1 \(nan-client\).*" + key.replace(".", r"\.")):
        agg.add(broken, weight=2.0)
    agg.add(sources[2], weight=3.0)
    assert agg.num_clients == 2
    want = aggregate_adapters([sources[0], sources[2]], strategy, weights=[1.0, 3.0])
    got = agg.result()
    assert [c["source"] for c in got.provenance["clients"]] == [str(sources[0]), str(sources[2])]
    assert_same_merge(got, want)


def test_refused_options_and_weights(clients, make_adapter) -> None:
    het, equal = clients["bert", True], clients["bert", False]
    agg = StreamingAggregator("fedavg")
    agg.add(equal[0])
    with pytest.raises(IncompatibleAdaptersError, match=r"client 1 .*strategy 'fedavg' needs equal ranks"):
        agg.add(het[1])
    other = make_adapter("other", 4, 8, target_modules=("query", "key"))
    with pytest.raises(IncompatibleAdaptersError, match="client 2 .*different target modules"):
        agg.add(other)
    with pytest.raises(InvalidWeightsError, match="client 3 .*given a `weight`, but the clients before"):
        agg.add(equal[1], weight=2.0)
    with pytest.raises(InvalidWeightsError, match="client 4 .*`num_examples` entry is 0"):
        agg.add(equal[1], num_examples=0)
    counted = StreamingAggregator("replication")
    counted.add(het[0], num_examples=5)
    with pytest.raises(
        InvalidWeightsError, match="client 1 .*weighted uniformly.*weighted by example counts"
    ):
        counted.add(het[1])
    with pytest.raises(InvalidWeightsError, match="client 0 .*`weight` entry is nan"):
        StreamingAggregator().add(het[0], weight=float("nan"))
    with pytest.raises(AdapterError, match="target_rank"):
        StreamingAggregator("stacking", target_rank=4)
    with pytest.raises(AdapterError, match="target_rank"):
        StreamingAggregator("replication", target_rank=0)
    with pytest.raises(AdapterError, match="no client adapter was accepted"):
        StreamingAggregator().result()
    agg.add(equal[1])
    assert agg.result().provenance["num_clients"] == 2
    for call in (agg.result, lambda: agg.add(equal[2])):
        with pytest.raises(AdapterError, match="closed: `result\\(\\)` was already called"):
            call()


def test_previous_is_the_compatibility_reference(clients, make_adapter) -> None:
    het = clients["bert", True]
    previous = aggregate_adapters(het, "replication")
    agg = StreamingAggregator("replication", previous=previous)
    with pytest.raises(IncompatibleAdaptersError, match=r"client 0 .*previous global adapter"):
        agg.add(make_adapter("other", 4, 8, target_modules=("query", "key")))
    agg.add(het[0])
    assert agg.result().provenance["previous"] == previous.label


class _MeanOfStacks(Strategy):
    """A rule written the classic way (``aggregate_module`` only): streamed through the default stacks."""

    name = "mean_of_stacks_test"
    paper = "test"
    supports_heterogeneous_ranks = False

    def aggregate_module(self, inputs: ModuleInputs) -> tuple[torch.Tensor, torch.Tensor]:
        w = inputs.weights[:, None, None]
        return (w * torch.stack(inputs.a)).sum(0), (w * torch.stack(inputs.b)).sum(0)


def test_a_rule_of_either_form_streams_and_a_rule_of_neither_is_refused(clients) -> None:
    equal = clients["bert", False]
    rule = _MeanOfStacks()
    want = aggregate_adapters(equal, rule, weights=WEIGHTS)
    assert_same_merge(stream(equal, rule, weights=WEIGHTS), want)
    fedavg = aggregate_adapters(equal, "fedavg", weights=WEIGHTS).state_dict()
    for key, value in want.state_dict().items():
        torch.testing.assert_close(value, fedavg[key], msg=key)

    class NoRule(Strategy):
        name = "no_rule_test"
        paper = "test"

    with pytest.raises(StrategyRegistrationError, match="aggregate_module`, or the incremental"):
        register_strategy(NoRule)
    with pytest.raises(NotImplementedError):
        NoRule().aggregate_module(ModuleInputs("m", [], [], torch.ones(0)))


MEMORY_SCRIPT = r"""
import json, sys
import torch
from hf_fedlora import StreamingAggregator


def status_kib(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


torch.set_num_threads(1)
strategy, folders = sys.argv[1], json.loads(sys.argv[2])
agg = StreamingAggregator(strategy)
agg.add(folders[0])  # the first add warms up the allocator and the lazy imports
# reset the peak to the current RSS: the imports' transient peak would otherwise hide any growth
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
base = status_kib("VmRSS")
for folder in folders[1:]:
    agg.add(folder)
agg.result()
print(json.dumps({"growth_kib": status_kib("VmHWM") - base}))
"""
HIDDEN, MODULES = 1024, 4
"""Memory clients: 4 modules of 1024 x 1024 at ranks 16-64: about 1.3 MiB of float32 factors each."""


def _write_memory_clients(root: Path, count: int) -> list[str]:
    from peft import LoraConfig
    from safetensors.torch import save_file

    folders = []
    for k in range(count):
        rank = (16, 32, 48, 64)[k % 4]
        gen = torch.Generator().manual_seed(k)
        tensors = {}
        for m in range(MODULES):
            key = f"base_model.model.layers.{m}.proj.lora_"
            tensors[key + "A.weight"] = torch.randn(rank, HIDDEN, generator=gen).to(torch.bfloat16)
            tensors[key + "B.weight"] = torch.randn(HIDDEN, rank, generator=gen).to(torch.bfloat16)
        folder = root / f"client{k:02d}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]).save_pretrained(str(folder))
        folders.append(str(folder))
    return folders


def _peak_growths(runs: list[tuple[str, list[str]]]) -> list[int]:
    """Peak RSS growth of each (strategy, folders) run, each in its own interpreter (run together)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MEMORY_SCRIPT, strategy, json.dumps(folders)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        for strategy, folders in runs
    ]
    growths = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        growths.append(json.loads(out.strip().splitlines()[-1])["growth_kib"] * 1024)
    return growths


def test_peak_memory_of_running_sums_does_not_grow_with_the_clients(tmp_path, record_property) -> None:
    folders = _write_memory_clients(tmp_path, 40)
    client_bytes = 2 * HIDDEN * 40 * MODULES * 4  # one client of mean rank 40, float32
    # allocator slack (six interpreters at once; measured up to 4 clients' worth): a quarter of the
    # 32 clients more of the second run, which a rule keeping its clients would add
    tolerance = 8 * client_bytes
    runs = [(s, f) for s in ("replication", "hetlora", "flexlora") for f in (folders[:8], folders)]
    few, many, normed_few, normed_many, stacked_few, stacked_many = _peak_growths(runs)
    record_property("peak_rss_growth_replication_8_40", [few, many])
    record_property("peak_rss_growth_hetlora_8_40", [normed_few, normed_many])
    record_property("peak_rss_growth_flexlora_8_40", [stacked_few, stacked_many])
    assert many - few < tolerance, (few, many)
    assert normed_many - normed_few < tolerance, (normed_few, normed_many)
    # the control: flexlora keeps every client's folded factors, so its peak grows with them
    assert stacked_many - stacked_few > 20 * client_bytes, (stacked_few, stacked_many)
