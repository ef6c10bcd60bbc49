"""Every strategy against an independent reference computed from the raw factors (float64, loops)."""

from __future__ import annotations

import pytest
import torch

from hf_fedlora import aggregate_adapters
from hf_fedlora.linalg import lora_a_init, update_norm
from hf_fedlora.strategies import ModuleInputs, get_strategy

OUT, IN = 24, 20


def random_inputs(ranks, seed=0, weights=None, **kwargs) -> ModuleInputs:
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, IN, generator=g) for r in ranks]
    b = [torch.randn(OUT, r, generator=g) for r in ranks]
    w = torch.tensor(weights if weights is not None else [1.0] * len(ranks))
    return ModuleInputs(name="m", a=a, b=b, weights=(w / w.sum()).float(), **kwargs)


def dense_sum(inputs: ModuleInputs) -> torch.Tensor:
    return sum(w.double() * (b.double() @ a.double()) for w, a, b in zip(inputs.weights, inputs.a, inputs.b))


def _zeros(inputs: ModuleInputs, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, inn = inputs.b[0].shape[0], inputs.a[0].shape[1]
    return torch.zeros(rank, inn, dtype=torch.float64), torch.zeros(out, rank, dtype=torch.float64)


def reference_replication(inputs: ModuleInputs, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a_out, b_out = _zeros(inputs, rank)
    for i in range(rank):
        owners = [k for k, r in enumerate(inputs.ranks) if r > i]
        total = sum(float(inputs.weights[k]) for k in owners)
        for k in owners:
            a_out[i] += float(inputs.weights[k]) / total * inputs.a[k][i].double()
            b_out[:, i] += float(inputs.weights[k]) / total * inputs.b[k][:, i].double()
    return a_out, b_out


def reference_zero_padding(
    inputs: ModuleInputs, rank: int, weights=None
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = inputs.weights if weights is None else weights
    a_out, b_out = _zeros(inputs, rank)
    for w, a, b in zip(weights, inputs.a, inputs.b):
        a_out[: a.shape[0]] += float(w) * a.double()
        b_out[:, : b.shape[1]] += float(w) * b.double()
    return a_out, b_out


class TestEqualRanksAgree:
    def test_replication_zero_padding_fedavg_hetlora_uniform_norms(self):
        inputs = random_inputs([6, 6, 6], weights=[1, 2, 3])
        results = {
            name: get_strategy(name).aggregate_module(inputs)
            for name in ("replication", "zero_padding", "fedavg")
        }
        for name in ("zero_padding", "fedavg"):
            torch.testing.assert_close(results[name][0], results["replication"][0])
            torch.testing.assert_close(results[name][1], results["replication"][1])
        ref_a, ref_b = reference_zero_padding(inputs, 6)
        torch.testing.assert_close(results["fedavg"][0].double(), ref_a)
        torch.testing.assert_close(results["fedavg"][1].double(), ref_b)


class TestReplication:
    def test_each_slot_is_the_weighted_mean_over_its_owners(self):
        inputs = random_inputs([2, 5, 8, 8], weights=[4, 1, 2, 3], seed=1)
        a, b = get_strategy("replication").aggregate_module(inputs)
        ref_a, ref_b = reference_replication(inputs, 8)
        assert a.shape == (8, IN) and b.shape == (OUT, 8)
        torch.testing.assert_close(a.double(), ref_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), ref_b, rtol=1e-5, atol=1e-6)

    def test_hand_computed_values(self):
        # client 0 (rank 1, weight 1/4) and client 1 (rank 2, weight 3/4), 1-dim layers.
        inputs = ModuleInputs(
            name="m",
            a=[torch.tensor([[2.0]]), torch.tensor([[6.0], [8.0]])],
            b=[torch.tensor([[1.0]]), torch.tensor([[5.0, 4.0]])],
            weights=torch.tensor([0.25, 0.75]),
        )
        a, b = get_strategy("replication").aggregate_module(inputs)
        assert a.flatten().tolist() == [
            0.25 * 2 + 0.75 * 6,
            8.0,
        ]  # slot 1 owned by client 1 alone: kept whole
        assert b.flatten().tolist() == [0.25 * 1 + 0.75 * 5, 4.0]
        za, zb = get_strategy("zero_padding").aggregate_module(inputs)
        assert za.flatten().tolist() == [5.0, 6.0]  # zero-padding shrinks slot 1 by client 1's share
        assert zb.flatten().tolist() == [4.0, 3.0]

    def test_orphan_slots_keep_previous_global_value(self):
        previous = (torch.full((6, IN), 7.0), torch.full((OUT, 6), -3.0))
        inputs = random_inputs([2, 4], previous=previous)
        a, b = get_strategy("replication").aggregate_module(inputs)
        assert a.shape == (6, IN)
        torch.testing.assert_close(a[4:], previous[0][4:])
        torch.testing.assert_close(b[:, 4:], previous[1][:, 4:])
        ref_a, _ = reference_replication(inputs, 4)
        torch.testing.assert_close(a[:4].double(), ref_a, rtol=1e-5, atol=1e-6)

    def test_orphan_slots_without_previous_are_zero(self):
        a, b = get_strategy("replication").aggregate_module(random_inputs([2, 3], target_rank=5))
        assert torch.count_nonzero(a[3:]) == 0 and torch.count_nonzero(b[:, 3:]) == 0


class TestZeroPaddingAndHetLora:
    def test_zero_padding_matches_reference(self):
        inputs = random_inputs([3, 7, 5], weights=[1, 1, 2], seed=2)
        a, b = get_strategy("zero_padding").aggregate_module(inputs)
        ref_a, ref_b = reference_zero_padding(inputs, 7)
        torch.testing.assert_close(a.double(), ref_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), ref_b, rtol=1e-5, atol=1e-6)

    def test_hetlora_weights_by_update_norm(self):
        inputs = random_inputs([3, 7, 5], weights=[1, 1, 2], seed=3)
        norms = torch.tensor(
            [torch.linalg.matrix_norm(b.double() @ a.double()) for a, b in zip(inputs.a, inputs.b)]
        )
        weights = inputs.weights.double() * norms
        a, b = get_strategy("hetlora").aggregate_module(inputs)
        ref_a, ref_b = reference_zero_padding(inputs, 7, weights / weights.sum())
        torch.testing.assert_close(a.double(), ref_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), ref_b, rtol=1e-5, atol=1e-6)


class TestLinalgHelpers:
    def test_update_norm_is_the_frobenius_norm_of_the_product(self):
        inputs = random_inputs([5], seed=6)
        a, b = inputs.a[0], inputs.b[0]
        expected = torch.linalg.matrix_norm(b.double() @ a.double())
        torch.testing.assert_close(update_norm(a, b).double(), expected, rtol=1e-5, atol=0.0)

    def test_lora_a_init_is_peft_kaiming_uniform_and_seeded(self):
        rows = lora_a_init(4, 100, torch.Generator().manual_seed(0))
        assert rows.shape == (4, 100) and rows.dtype == torch.float32
        assert float(rows.abs().max()) <= 0.1 and float(rows.abs().max()) > 0.09
        torch.testing.assert_close(
            rows, lora_a_init(4, 100, torch.Generator().manual_seed(0)), rtol=0, atol=0
        )


class TestExactStrategies:
    def test_stacking_reproduces_weighted_sum_of_updates(self):
        inputs = random_inputs([2, 4, 8, 16], weights=[5, 1, 1, 3], seed=4)
        a, b = get_strategy("stacking").aggregate_module(inputs)
        assert a.shape[0] == 30
        torch.testing.assert_close((b.double() @ a.double()), dense_sum(inputs), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("target", [None, 3, 12])
    def test_flexlora_equals_dense_svd_truncation(self, target):
        inputs = random_inputs([2, 4, 8], weights=[1, 2, 3], seed=5, target_rank=target)
        a, b = get_strategy("flexlora").aggregate_module(inputs)
        rank = target or 8
        assert a.shape == (rank, IN) and b.shape == (OUT, rank)
        u, s, vh = torch.linalg.svd(dense_sum(inputs))
        keep = min(rank, 14)  # the sum has rank at most 2 + 4 + 8
        reference = (u[:, :keep] * s[:keep]) @ vh[:keep]
        error = torch.linalg.matrix_norm(b.double() @ a.double() - reference) / torch.linalg.matrix_norm(
            reference
        )
        assert error < 1e-5


def _reference_delta(name: str, inputs: ModuleInputs, rank: int) -> torch.Tensor:
    """The rule's update worked out from its definition in DESIGN.md, never through the rule's code."""
    if name == "replication":
        a, b = reference_replication(inputs, rank)
    elif name == "zero_padding":
        a, b = reference_zero_padding(inputs, rank)
    elif name == "hetlora":
        norms = torch.stack(
            [torch.linalg.matrix_norm(b.double() @ a.double()) for a, b in zip(inputs.a, inputs.b)]
        )
        weights = inputs.weights.double() * norms
        a, b = reference_zero_padding(inputs, rank, weights / weights.sum())
    elif name == "flexlora":
        u, s, vh = torch.linalg.svd(dense_sum(inputs))
        return (u[:, :rank] * s[:rank]) @ vh[:rank]
    else:  # stacking: exactly the weighted sum of updates
        return dense_sum(inputs)
    return b.double() @ a.double()


@pytest.mark.parametrize("name", ["replication", "zero_padding", "hetlora", "flexlora", "stacking"])
def test_strategy_through_aggregate_matches_reference_on_peft_files(name, make_adapter):
    """The same rules, through files PEFT wrote with different ranks and alphas (scales folded)."""
    from hf_fedlora import LoraAdapter

    paths = [
        make_adapter("a", 2, 4, seed=1),
        make_adapter("b", 8, 32, seed=2),
        make_adapter("c", 4, 4, seed=3),
    ]
    clients = [LoraAdapter.from_pretrained(p) for p in paths]
    result = aggregate_adapters(paths, strategy=name, weights=[1, 2, 1])
    for module in clients[0].modules:
        folded = [c.folded_factors(module) for c in clients]
        inputs = ModuleInputs(
            module, [f[0] for f in folded], [f[1] for f in folded], torch.tensor([0.25, 0.5, 0.25])
        )
        expected = _reference_delta(name, inputs, 8)
        torch.testing.assert_close(result.delta_weight(module).double(), expected, rtol=1e-4, atol=1e-5)


def _many_clients(shared: bool, seed: int = 0, dim: int = 192) -> ModuleInputs:
    """12 clients of ranks 8-16 on a dim x dim layer (summed rank 144 >= 4 (8 + 16)): independent
    random updates (a flat spectrum), or updates that share 6 directions of decaying strength."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(dim, 6, generator=g), torch.randn(6, dim, generator=g)
    a, b = [], []
    for k in range(12):
        r = 8 if k % 2 else 16
        ak, bk = torch.randn(r, dim, generator=g), torch.randn(dim, r, generator=g)
        if shared:
            bk[:, :6] = u * (0.5 ** torch.arange(6)) * 30 + 1e-2 * bk[:, :6]
            ak[:6] = v
            bk[:, 6:] *= 1e-2
        a.append(ak)
        b.append(bk)
    return ModuleInputs(name="m", a=a, b=b, weights=torch.full((12,), 1 / 12), target_rank=8)


def _excess(inputs: ModuleInputs, result, exact) -> float:
    """(||M - M_r||^2 - ||M - M_e||^2) / ||M||^2 in float64."""
    m = dense_sum(inputs)
    error = lambda ab: float(torch.linalg.matrix_norm(m - ab[1].double() @ ab[0].double()) ** 2)  # noqa: E731
    return (error(result) - error(exact)) / float(torch.linalg.matrix_norm(m) ** 2)


def test_randomized_flexlora_is_certified_and_used_where_updates_share_directions():
    from hf_fedlora.linalg import factored_svd, randomized_factored_svd
    from hf_fedlora.strategies import FlexLoraStrategy

    inputs = _many_clients(shared=True)
    roots = inputs.weights.sqrt()
    bs, as_ = [r * b for r, b in zip(roots, inputs.b)], [r * a for r, a in zip(roots, inputs.a)]
    a, b, bound = randomized_factored_svd(bs, as_, 8)
    exact = factored_svd(bs, as_, 8)
    excess = _excess(inputs, (a, b), exact)
    assert -1e-9 <= excess <= bound <= 1e-3  # the certificate holds and passes
    auto = FlexLoraStrategy("auto")
    first, second = auto.aggregate_module(inputs), auto.aggregate_module(inputs)
    assert torch.equal(first[0], a) and torch.equal(first[1], b)  # auto kept the randomised result
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # seeded: reproducible


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_flexlora_falls_back_to_exact_on_a_flat_spectrum(seed):
    from hf_fedlora.linalg import factored_svd, randomized_factored_svd
    from hf_fedlora.strategies import FlexLoraStrategy

    inputs = _many_clients(shared=False, seed=seed)
    roots = inputs.weights.sqrt()
    bs, as_ = [r * b for r, b in zip(roots, inputs.b)], [r * a for r, a in zip(roots, inputs.a)]
    a, b, bound = randomized_factored_svd(bs, as_, 8)
    exact = factored_svd(bs, as_, 8)
    excess = _excess(inputs, (a, b), exact)
    assert 0 <= excess <= bound and bound > 1e-3  # honest: the bound says it cannot vouch for it
    got = FlexLoraStrategy("auto").aggregate_module(inputs)
    assert torch.equal(got[0], exact[0]) and torch.equal(got[1], exact[1])
    with pytest.raises(ValueError, match="svd"):
        FlexLoraStrategy("fast")


@pytest.mark.parametrize("shared", [False, True])
def test_factored_svd_of_a_wide_sum_is_the_truncated_svd_of_the_dense_sum(shared):
    """A sum of 320 stacked ranks (the core's leading triplets come from a partial eigen-solve, the
    Q of each stack is never formed), of independent or of direction-sharing (rank-deficient)
    clients: the rank-8 result is the dense sum's truncated SVD."""
    from hf_fedlora.linalg import PARTIAL_EIGH_MIN_SIZE, factored_svd

    gen = torch.Generator().manual_seed(3)
    out_dim, in_dim, rank = 600, 500, 8
    shared_b, shared_a = torch.randn(out_dim, 4, generator=gen), torch.randn(4, in_dim, generator=gen)
    bs, as_ = [], []
    for k in range(20):  # 20 clients of rank 16
        b, a = torch.randn(out_dim, 16, generator=gen), torch.randn(16, in_dim, generator=gen)
        if shared:  # the first 4 directions shared by every client: A's stack has rank 4 + 20 * 12
            b[:, :4], a[:4] = shared_b * (k + 1), shared_a
        bs.append(b)
        as_.append(a)
    assert sum(b.shape[1] for b in bs) >= 4 * rank and sum(b.shape[1] for b in bs) >= PARTIAL_EIGH_MIN_SIZE
    a, b = factored_svd(bs, as_, rank)
    dense = sum(b.double() @ a.double() for a, b in zip(as_, bs))
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    want = (u[:, :rank] * s[:rank]) @ vh[:rank]
    got = b.double() @ a.double()
    assert float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)) < 1e-5
    # split evenly between the factors, as the exact SVD: ||A_i|| = ||B_i|| = sqrt(s_i)
    torch.testing.assert_close(a.double().norm(dim=1), s[:rank].sqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(b.double().norm(dim=0), s[:rank].sqrt(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(400, 300), (300, 400), (300, 300)])
def test_top_singular_equals_the_truncated_svd(shape):
    from hf_fedlora.linalg import top_singular

    gen = torch.Generator().manual_seed(4)
    core = torch.randn(*shape, generator=gen, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -6, shape[1], dtype=torch.float64)
    )
    u, s, vh = top_singular(core, 20)
    want_u, want_s, want_vh = torch.linalg.svd(core, full_matrices=False)
    torch.testing.assert_close(s, want_s[:20], rtol=1e-10, atol=0)
    torch.testing.assert_close(
        u @ torch.diag(s) @ vh, want_u[:, :20] @ torch.diag(want_s[:20]) @ want_vh[:20]
    )
    torch.testing.assert_close(u.T @ u, torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(vh @ vh.T, torch.eye(20, dtype=torch.float64))


@pytest.mark.parametrize("clients", [2, 20])  # a core of 32 (full SVD) and of 320 (partial eigen-solve)
def test_factored_svd_refuses_non_finite_factors(clients):
    """A NaN in one client's factors raises (the merge then names the client), never a silent
    zero module."""
    from hf_fedlora.linalg import factored_svd

    gen = torch.Generator().manual_seed(5)
    bs = [torch.randn(600, 16, generator=gen) for _ in range(clients)]
    as_ = [torch.randn(16, 500, generator=gen) for _ in range(clients)]
    as_[1][3, 7] = float("nan")
    with pytest.raises(RuntimeError):
        factored_svd(bs, as_, 8)


def test_factored_svd_without_scipy_takes_the_full_svd(monkeypatch):
    """scipy is optional (the `recipes` extra): without it the core's triplets come from the full SVD."""
    import sys

    from hf_fedlora.linalg import factored_svd

    gen = torch.Generator().manual_seed(6)
    bs = [torch.randn(600, 16, generator=gen) for _ in range(20)]
    as_ = [torch.randn(16, 500, generator=gen) for _ in range(20)]
    with_scipy = factored_svd(bs, as_, 8)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    without = factored_svd(bs, as_, 8)
    product = lambda pair: pair[1].double() @ pair[0].double()  # noqa: E731
    torch.testing.assert_close(product(without), product(with_scipy), rtol=1e-5, atol=1e-5)
