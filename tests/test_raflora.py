"""raflora: rank-partition averaging, then SVD truncation, against a dense reference computed here."""

from __future__ import annotations

import torch

from hf_fedlora.strategies import ModuleInputs, get_strategy


def _inputs(ranks, weights, out=64, inp=48, target=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, inp, generator=g) for r in ranks]
    b = [torch.randn(out, r, generator=g) for r in ranks]
    w = torch.tensor(weights, dtype=torch.float32)
    return ModuleInputs("m", a, b, w / w.sum(), target_rank=target)


def _dense_reference(inputs):
    """Slot by slot: slot i's rank-one products averaged over the clients that own slot i (weights
    renormalised among them), summed over slots; then the dense SVD truncated to the target rank."""
    p = inputs.weights.double()
    total = torch.zeros(inputs.b[0].shape[0], inputs.a[0].shape[1], dtype=torch.float64)
    for i in range(max(inputs.ranks)):
        owners = [k for k, r in enumerate(inputs.ranks) if r > i]
        norm = sum(float(p[k]) for k in owners)
        for k in owners:
            total += float(p[k]) / norm * torch.outer(inputs.b[k][:, i].double(), inputs.a[k][i].double())
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    r = inputs.target_rank or max(inputs.ranks)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _product(a, b):
    return b.double() @ a.double()


def test_matches_the_slotwise_owner_average_then_svd() -> None:
    inputs = _inputs([5, 20, 5, 8], [3.0, 1.0, 2.0, 4.0])
    a, b = get_strategy("raflora").aggregate_module(inputs)
    assert a.shape == (20, 48) and b.shape == (64, 20)
    torch.testing.assert_close(_product(a, b), _dense_reference(inputs), atol=1e-4, rtol=1e-4)


def test_truncates_to_the_target_rank() -> None:
    inputs = _inputs([2, 6, 6], [1.0, 1.0, 2.0], target=3)
    a, b = get_strategy("raflora").aggregate_module(inputs)
    assert a.shape == (3, 48)
    torch.testing.assert_close(_product(a, b), _dense_reference(inputs), atol=1e-4, rtol=1e-4)


def test_high_slots_keep_full_weight_where_flexlora_dilutes_them() -> None:
    # one rank-20 client among nine rank-5 ones: slots 5..19 are its own update, not a tenth of it
    inputs = _inputs([20] + [5] * 9, [1.0] * 10)
    for k in range(
        1, 10
    ):  # everyone agrees on slots 0..4, so the merged update has rank <= 20: no truncation
        inputs.a[k].copy_(inputs.a[0][:5])
        inputs.b[k].copy_(inputs.b[0][:, :5])
    a, b = get_strategy("raflora").aggregate_module(inputs)
    high = _product(inputs.a[0][5:], inputs.b[0][:, 5:])
    low = sum(_product(x[:5], y[:, :5]) for x, y in zip(inputs.a, inputs.b)) / 10
    torch.testing.assert_close(_product(a, b), low + high, atol=1e-4, rtol=1e-4)
    fa, fb = get_strategy("flexlora").aggregate_module(inputs)
    assert not torch.allclose(_product(fa, fb), low + high, atol=1e-2)


def test_equal_ranks_give_flexlora() -> None:
    inputs = _inputs([4, 4, 4], [1.0, 2.0, 3.0])
    a, b = get_strategy("raflora").aggregate_module(inputs)
    fa, fb = get_strategy("flexlora").aggregate_module(inputs)
    torch.testing.assert_close(_product(a, b), _product(fa, fb), atol=1e-5, rtol=1e-5)
