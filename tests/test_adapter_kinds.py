"""The adapter kinds LLM users train, merged by every strategy and loaded with plain PEFT.

Clients are written by PEFT on a tiny Llama (``benchmarks/bench_dora_error.py``: 2 layers, vocab
192, hidden 48, base biases so a LoRA bias can be merged), trained for a few Adam steps, at ranks
2, 8 (rsLoRA) and 4 (6 on ``v_proj`` by ``rank_pattern``/``alpha_pattern``); ``fedavg`` gets three
rank-4 clients. Kinds (``bench_dora_error.KINDS``): LoRA on ``embed_tokens`` (``lora_embedding_A/B``),
``lora_bias=True``, DoRA on embeddings and projections, and a mix (``"all-linear"``, LoRA biases,
``lm_head`` in ``modules_to_save``).

- Each merge loads with ``PeftModel.from_pretrained``, and the weights PEFT merges equal an
  independent float64 reference of the rule computed from the raw safetensors (embedding updates
  transposed as PEFT applies them; LoRA biases ``sum_k p_k s_k b_k``; DoRA ``m (W + dW) / ||W + dW||``
  with ``m = sum_k p_k m_k``).
- For the linear kinds, stacking's global model equals the weighted mean of the clients' merged
  models (max logit difference < 1e-4). DoRA's normalisation is not linear: its error is measured
  and recorded (``record_property``), see ``docs/aggregation.md``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import load_benchmark

from hf_fedlora import IncompatibleAdaptersError, LoraAdapter, aggregate_adapters, list_strategies
from hf_fedlora.screening import adapter_update_norm, screen_clients
from hf_fedlora.strategies import get_strategy

bench = load_benchmark("bench_dora_error")
STRATEGIES = list_strategies()
KINDS = ("embedding", "bias", "dora", "mix")
LINEAR_KINDS = [k for k in KINDS if k in bench.LINEAR_KINDS]
WEIGHTS = bench.WEIGHTS
P = bench.normalised(WEIGHTS)
STEPS = 3
SUFFIXES = {".lora_A.weight": ".lora_B.weight", ".lora_embedding_A": ".lora_embedding_B"}


class Clients:
    """Client folders and the mean of their merged models, built once per (kind, rank set)."""

    def __init__(self, root: Path):
        self.root, self._folders, self._means = root, {}, {}

    def folders(self, kind: str, heterogeneous: bool = True) -> list[Path]:
        if (kind, heterogeneous) not in self._folders:
            specs = bench.HETEROGENEOUS if heterogeneous else bench.EQUAL
            folder = self.root / f"{kind}-{'het' if heterogeneous else 'equal'}"
            self._folders[kind, heterogeneous] = bench.write_clients(folder, kind, specs, steps=STEPS)
        return self._folders[kind, heterogeneous]

    def for_strategy(self, kind: str, strategy: str) -> list[Path]:
        return self.folders(kind, get_strategy(strategy).supports_heterogeneous_ranks)

    def mean(self, kind: str, heterogeneous: bool = True):
        if (kind, heterogeneous) not in self._means:
            self._means[kind, heterogeneous] = bench.mean_of_merged(
                self.folders(kind, heterogeneous), WEIGHTS
            )
        return self._means[kind, heterogeneous]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's matrices are too small for threads: one is many times faster on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Clients:
    return Clients(tmp_path_factory.mktemp("kinds"))


# -- an independent reference, from the raw files ---------------------------------------------------


def _pattern_value(pattern: dict, path: str, default: float) -> float:
    hits = [key for key in pattern if re.match(rf"(.*\.)?{key}$", path)]
    return pattern[hits[0]] if hits else default


def raw_client(folder: Path) -> tuple[dict, dict]:
    return load_file(str(folder / "adapter_model.safetensors")), json.loads(
        (folder / "adapter_config.json").read_text()
    )


def folded(client: tuple[dict, dict], module: str, suffix: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(sqrt(s) A, sqrt(s) B, s)`` in float64, the scale read from the config as PEFT does."""
    tensors, config = client
    path = module.removeprefix("base_model.model.")
    rank = _pattern_value(config["rank_pattern"] or {}, path, config["r"])
    alpha = _pattern_value(config["alpha_pattern"] or {}, path, config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank
    a, b = tensors[module + suffix].double(), tensors[module + SUFFIXES[suffix]].double()
    return a * scale**0.5, b * scale**0.5, scale


def _padded_sum(factors, weights, rank):
    a_out = sum(
        w * torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0])) for w, (a, _) in zip(weights, factors)
    )
    b_out = sum(w * torch.nn.functional.pad(b, (0, rank - b.shape[1])) for w, (_, b) in zip(weights, factors))
    return b_out @ a_out


def reference_delta(strategy: str, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``B @ A`` of the merged module by the rule's definition (float64, loops)."""
    rank = max(a.shape[0] for a, _ in factors)
    if strategy == "stacking":
        return sum(p * b @ a for p, (a, b) in zip(P, factors))
    if strategy in ("zero_padding", "fedavg"):
        return _padded_sum(factors, P, rank)
    if strategy == "hetlora":
        norms = [p * float((b @ a).norm()) for p, (a, b) in zip(P, factors)]
        return _padded_sum(factors, [n / sum(norms) for n in norms], rank)
    if strategy == "flexlora":
        u, s, vh = torch.linalg.svd(sum(p * b @ a for p, (a, b) in zip(P, factors)))
        return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    if strategy == "replication":
        a_out = torch.zeros(rank, factors[0][0].shape[1], dtype=torch.float64)
        b_out = torch.zeros(factors[0][1].shape[0], rank, dtype=torch.float64)
        for i in range(rank):
            owners = [(p, a, b) for p, (a, b) in zip(P, factors) if a.shape[0] > i]
            total = sum(p for p, _, _ in owners)
            for p, a, b in owners:
                a_out[i] += p / total * a[i]
                b_out[:, i] += p / total * b[:, i]
        return b_out @ a_out
    if strategy == "raflora":  # each rank partition averaged over its owners, summed, truncated
        total, lo = 0, 0
        for hi in sorted({a.shape[0] for a, _ in factors}):
            owners = [(p, a, b) for p, (a, b) in zip(P, factors) if a.shape[0] >= hi]
            mass = sum(p for p, _, _ in owners)
            total = total + sum(p / mass * b[:, lo:hi] @ a[lo:hi] for p, a, b in owners)
            lo = hi
        u, s, vh = torch.linalg.svd(total)
        return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    raise NotImplementedError(f"no reference for {strategy!r}: add one here")


def expected_weights(strategy: str, folders: list[Path]) -> dict[str, torch.Tensor]:
    """Every base-model tensor the merged global adapter changes, as PEFT must merge it."""
    raw = [raw_client(f) for f in folders]
    base = {k: v.double() for k, v in bench.tiny_llama().state_dict().items()}
    tensors, config = raw[0]
    want = {}
    for key in tensors:
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        module = key[: -len(suffix)]
        path = module.removeprefix("base_model.model.")
        factors = [folded(c, module, suffix) for c in raw]
        delta = reference_delta(strategy, [(a, b) for a, b, _ in factors])
        embedding = suffix == ".lora_embedding_A"
        weight = base[path + ".weight"] + (delta.T if embedding else delta)
        if config["use_dora"]:  # m * V / ||V||, the norm per output (per embedding dimension)
            magnitude = sum(p * c[0][module + ".lora_magnitude_vector"].double() for p, c in zip(P, raw))
            norm = weight.norm(dim=0 if embedding else 1)
            weight = weight * (magnitude / norm if embedding else (magnitude / norm)[:, None])
        want[path + ".weight"] = weight
        if config["lora_bias"] and not embedding:
            bias = sum(
                p * s * c[0][module + ".lora_B.bias"].double() for p, (_, _, s), c in zip(P, factors, raw)
            )
            want[path + ".bias"] = base[path + ".bias"] + bias
    for name in config["modules_to_save"] or []:
        key = f"base_model.model.{name}.weight"
        want[f"{name}.weight"] = sum(p * c[0][key].double() for p, c in zip(P, raw))
    return want


# -- the tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_peft_wrote_the_kind_and_hf_fedlora_reads_it(kind, clients):
    adapter = LoraAdapter.from_pretrained(clients.folders(kind)[1])
    layout = adapter.layout
    assert sorted(
        {r for c in clients.folders(kind) for r in LoraAdapter.from_pretrained(c).ranks.values()}
    ) == [2, 4, 6, 8]
    assert bool(layout.embeddings) == (kind in ("embedding", "dora"))
    assert bool(layout.biases) == (kind in ("bias", "mix"))
    assert layout.magnitudes == (set(adapter.modules) if kind == "dora" else set())
    assert layout.saved_embeddings == {m + ".base_layer.weight" for m in layout.embeddings}
    if kind == "mix":
        assert len(adapter.modules) == 14 and adapter.extras == ("base_model.model.lm_head.weight",)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_strategy_merges_a_kind_that_plain_peft_loads_and_applies(kind, strategy, clients, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    folders = clients.for_strategy(kind, strategy)
    merged = aggregate_adapters(folders, strategy, weights=WEIGHTS)
    model = PeftModel.from_pretrained(bench.tiny_llama(), str(merged.save_pretrained(tmp_path / "global")))
    loaded, saved = get_peft_model_state_dict(model), merged.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert torch.isfinite(bench.logits(model)).all()
    for key in merged.layout.saved_embeddings:  # the frozen base embedding is copied bit for bit
        assert torch.equal(saved[key], load_file(str(folders[0] / "adapter_model.safetensors"))[key])

    got = model.merge_and_unload().state_dict()
    want = expected_weights(strategy, folders)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=1e-4, atol=2e-6, msg=name)
    base = bench.tiny_llama().state_dict()
    assert all(torch.equal(got[n], base[n]) for n in base if n not in want), "nothing else changed"


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_stacking_equals_the_mean_of_the_clients_merged_models(kind, clients, tmp_path):
    from peft import PeftModel

    folder = aggregate_adapters(clients.folders(kind), "stacking", weights=WEIGHTS).save_pretrained(
        tmp_path / "g"
    )
    merged = PeftModel.from_pretrained(bench.tiny_llama(), str(folder))
    mean = clients.mean(kind)
    assert float((bench.logits(merged) - bench.logits(mean)).abs().max()) < 1e-4
    assert float((bench.logits(mean) - bench.logits(bench.tiny_llama())).abs().max()) > 1e-2, "a real update"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dora_error_against_the_mean_of_merged_clients_is_measured(
    strategy, clients, tmp_path, record_property
):
    from peft import PeftModel

    heterogeneous = get_strategy(strategy).supports_heterogeneous_ranks
    folders, mean = clients.folders("dora", heterogeneous), clients.mean("dora", heterogeneous)
    folder = aggregate_adapters(folders, strategy, weights=WEIGHTS).save_pretrained(tmp_path / "g")
    model = PeftModel.from_pretrained(bench.tiny_llama(), str(folder))
    logit_diff = float((bench.logits(model) - bench.logits(mean)).abs().max())
    error = bench.weight_error(model.merge_and_unload(), mean, bench.tiny_llama())
    update = bench.update_size(mean, bench.tiny_llama())
    record_property("dora_weight_error", error)
    record_property("dora_logit_diff", logit_diff)
    print(f"DoRA {strategy}: update {update:.3g}, weight error {error:.3g}, logit diff {logit_diff:.3g}")
    assert 0 < error < 3 and math.isfinite(logit_diff)
    if strategy == "stacking":  # first-order exact: the error is second order in the update
        assert error < 4 * update


@pytest.mark.parametrize("kind", ["embedding", "bias", "dora"])
def test_a_client_view_keeps_the_update_of_each_kind(kind, clients, tmp_path):
    from peft import PeftModel

    merged = aggregate_adapters(clients.folders(kind), "zero_padding", weights=WEIGHTS)
    view = merged.to_rank(10, lora_alpha=5, use_rslora=True)  # above the global rank: nothing dropped
    outputs = []
    for adapter, name in ((merged, "global"), (view, "view")):
        model = PeftModel.from_pretrained(bench.tiny_llama(), str(adapter.save_pretrained(tmp_path / name)))
        outputs.append(bench.logits(model))
    assert float((outputs[0] - outputs[1]).abs().max()) < 1e-4
    for module in view.layout.embeddings:  # fresh slots get PEFT's embedding initialisation: A = 0
        a, b = view.lora_factors(module)
        assert not a[8:].any() and b[:, 8:].abs().sum() > 0


def test_screening_clips_a_lora_bias_with_the_update(clients):
    folder = clients.folders("bias")[1]
    norm = adapter_update_norm(LoraAdapter.from_pretrained(folder))
    accepted, verdicts = screen_clients([folder], clip_update_norm=norm / 2)
    original, clipped = LoraAdapter.from_pretrained(folder), accepted[0]
    assert verdicts[0].clipped and math.isclose(adapter_update_norm(clipped), norm / 2, rel_tol=1e-5)
    for module in sorted(original.layout.biases)[:3]:
        torch.testing.assert_close(clipped.delta_bias(module), original.delta_bias(module) / 2)
        torch.testing.assert_close(clipped.delta_weight(module), original.delta_weight(module) / 2)


@pytest.mark.parametrize(("kind", "field"), [("dora", "use_dora"), ("bias", "lora_bias")])
def test_clients_of_different_kinds_are_refused(kind, field, clients):
    import copy

    adapter = LoraAdapter.from_pretrained(clients.folders(kind)[0])
    config = copy.deepcopy(adapter.config)
    setattr(config, field, False)
    state = {k: v for k, v in adapter.state_dict().items() if not k.endswith((".lora_B.bias", "_vector"))}
    plain = LoraAdapter.from_state_dict(config, state, label="plain")
    assert not (plain.layout.biases or plain.layout.magnitudes)
    with pytest.raises(IncompatibleAdaptersError, match=rf"client 1 \(plain\): `{field}` differs"):
        aggregate_adapters([adapter, plain])
