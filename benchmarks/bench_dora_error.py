"""How far a merged DoRA adapter lands from the mean of the clients' merged models.

DoRA (``use_dora=True``) rescales each output of ``W + dW`` to a learned magnitude ``m``:
``W' = m * (W + dW) / ||W + dW||`` (the norm per output). hf_fedlora merges the LoRA part of a DoRA
adapter with the chosen rule and averages the magnitude vectors with the client weights, but the
normalisation is not linear, so even ``stacking`` (exact for plain LoRA) does not give
``sum_k p_k W'_k``. This script measures the gap on a tiny Llama (built from a config, no
download): three clients of ranks 2, 8 (rsLoRA) and 4 (6 on ``v_proj``), trained by PEFT for a few
Adam steps on their own token distributions, are merged by every strategy (``fedavg`` gets three
rank-4 clients) with weights 1:2:3; the global adapter is loaded with plain
``PeftModel.from_pretrained`` and compared with the weighted mean of the clients'
``merge_and_unload()`` models. The same run on plain LoRA is the control.

    python benchmarks/bench_dora_error.py       # 3 seeds x 3 learning rates, about 30 s on 2 cores
    python benchmarks/bench_dora_error.py --seeds 0 --lrs 2e-3 --kinds dora embedding bias mix

Rows are means over the seeds, per client learning rate (larger: larger updates). Over every
weight the adapters change, ``update`` is ``||W_mean - W_base||_F / ||W_base||_F`` (the size of the
mean update) and ``weight err`` is ``||W_global - W_mean||_F / ||W_mean - W_base||_F`` (the error
relative to that update); ``logit diff`` is the largest absolute logit difference on a batch of
4 x 16 tokens, beside ``logit move``, the largest change the mean model makes to the base model's
logits. ``tests/test_adapter_kinds.py`` builds its clients with the helpers here.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

TINY_LLAMA = {
    "vocab_size": 192,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "attention_bias": True,  # a base bias, so PEFT can merge a LoRA bias (`lora_bias=True`)
    "mlp_bias": True,
    "tie_word_embeddings": False,
}
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS: dict[str, dict] = {
    "plain": {"target_modules": ["q_proj", "v_proj"]},
    "embedding": {"target_modules": ["embed_tokens", "q_proj", "v_proj"]},
    "bias": {"target_modules": ALL_PROJECTIONS, "lora_bias": True},
    "dora": {"target_modules": ["embed_tokens", "q_proj", "v_proj", "down_proj"], "use_dora": True},
    "mix": {"target_modules": "all-linear", "modules_to_save": ["lm_head"], "lora_bias": True},
}
"""LoRA kinds by name: ``LoraConfig`` fields shared by a kind's clients. ``mix`` is every linear
layer (``"all-linear"``) with LoRA biases and a trained ``lm_head`` (``modules_to_save``)."""
LINEAR_KINDS = ("plain", "embedding", "bias", "mix")
"""The kinds whose merged model is linear in the update: stacking is exact for them."""
HETEROGENEOUS = [
    {"r": 2, "lora_alpha": 4},
    {"r": 8, "lora_alpha": 16, "use_rslora": True},
    {"r": 4, "lora_alpha": 4, "rank_pattern": {"v_proj": 6}, "alpha_pattern": {"v_proj": 12}},
]
EQUAL = [{"r": 4, "lora_alpha": 8}] * 3
WEIGHTS = [1.0, 2.0, 3.0]


def tiny_llama(seed: int = 0):
    """A 2-layer Llama for causal LM with random weights (same seed, same weights), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def train_client(kind: str, spec: dict, seed: int, steps: int = 6, lr: float = 2e-2):
    """A PEFT client of ``kind`` at ``spec``'s rank, trained for ``steps`` Adam steps on tokens drawn
    from its own 24-token subset of the vocabulary (so clients learn different updates)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", **KINDS[kind], **spec))
    generator = torch.Generator().manual_seed(10_000 + seed)
    vocabulary = torch.randperm(TINY_LLAMA["vocab_size"], generator=generator)[:24]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        batch = vocabulary[torch.randint(0, len(vocabulary), (4, 16), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def write_clients(
    root: Path,
    kind: str,
    specs: Sequence[dict] = HETEROGENEOUS,
    steps: int = 6,
    seed: int = 0,
    lr: float = 2e-2,
) -> list[Path]:
    """Train and save one client per spec under ``root``; returns their folders."""
    folders = []
    for i, spec in enumerate(specs):
        folder = root / f"{kind}-r{spec['r']}-{i}"
        train_client(kind, spec, seed=100 * seed + i + 1, steps=steps, lr=lr).save_pretrained(str(folder))
        folders.append(folder)
    return folders


def normalised(weights: Sequence[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def mean_of_merged(folders: Sequence[Path], weights: Sequence[float]):
    """The base model holding ``sum_k p_k W'_k``: each client merged by PEFT, then averaged."""
    from peft import PeftModel

    mean: dict[str, torch.Tensor] = {}
    for p, folder in zip(normalised(weights), folders):
        merged = PeftModel.from_pretrained(tiny_llama(), str(folder)).merge_and_unload()
        for name, tensor in merged.state_dict().items():
            mean[name] = mean.get(name, 0) + p * tensor.double()
    model = tiny_llama()
    model.load_state_dict({k: v.float() for k, v in mean.items()})
    return model


def probe_batch() -> torch.Tensor:
    """A fixed batch of 4 x 16 token ids."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, TINY_LLAMA["vocab_size"], (4, 16), generator=generator)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=probe_batch()).logits.double()


def weight_error(merged, mean, base) -> float:
    """``||W_merged - W_mean||_F / ||W_mean - W_base||_F`` over the weights the mean changed."""
    got, want, start = merged.state_dict(), mean.state_dict(), base.state_dict()
    error = update = 0.0
    for name, tensor in want.items():
        moved = float((tensor.double() - start[name].double()).square().sum())
        if moved > 0:
            update += moved
            error += float((got[name].double() - tensor.double()).square().sum())
    return math.sqrt(error / update) if update else 0.0


def update_size(mean, base) -> float:
    """``||W_mean - W_base||_F / ||W_base||_F`` over the weights the mean changed."""
    start, moved, size = base.state_dict(), 0.0, 0.0
    for name, tensor in mean.state_dict().items():
        change = float((tensor.double() - start[name].double()).square().sum())
        if change > 0:
            moved, size = moved + change, size + float(start[name].double().square().sum())
    return math.sqrt(moved / size) if size else 0.0


def measure(
    kind: str,
    root: Path,
    steps: int = 6,
    seed: int = 0,
    lr: float = 2e-2,
    strategies: Sequence[str] | None = None,
) -> list[dict]:
    """Rows ``{kind, strategy, update, weight_err, logit_diff, logit_move}``: every strategy's merge
    of ``kind`` loaded with plain PEFT and compared with the mean of the merged clients."""
    from peft import PeftModel

    from hf_fedlora import aggregate_adapters, list_strategies
    from hf_fedlora.strategies import get_strategy

    sets = {
        True: write_clients(root / "het", kind, HETEROGENEOUS, steps, seed, lr),
        False: write_clients(root / "equal", kind, EQUAL, steps, seed, lr),
    }
    means = {key: mean_of_merged(folders, WEIGHTS) for key, folders in sets.items()}
    base_logits = logits(tiny_llama())
    rows = []
    for name in strategies or list_strategies():
        heterogeneous = get_strategy(name).supports_heterogeneous_ranks
        folder = aggregate_adapters(sets[heterogeneous], name, weights=WEIGHTS).save_pretrained(
            root / f"global-{name}"
        )
        loaded, mean = PeftModel.from_pretrained(tiny_llama(), str(folder)), means[heterogeneous]
        logit_diff = float((logits(loaded) - logits(mean)).abs().max())  # PEFT's forward, unmerged
        rows.append(
            {
                "kind": kind,
                "strategy": name,
                "update": update_size(mean, tiny_llama()),
                "weight_err": weight_error(loaded.merge_and_unload(), mean, tiny_llama()),
                "logit_diff": logit_diff,
                "logit_move": float((logits(mean) - base_logits).abs().max()),
            }
        )
    return rows


def table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table, one line per kind and strategy (means over seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["lr"], row["strategy"]), []).append(row)
    columns = ("update", "weight_err", "logit_diff", "logit_move")
    lines = [
        "| kind | lr | strategy | update | weight err | logit diff | logit move |",
        "|---|---|---|---|---|---|---|",
    ]
    for (kind, lr, strategy), group in groups.items():
        mean = {k: sum(r[k] for r in group) / len(group) for k in columns}
        lines.append(
            f"| {kind} | {lr:g} | {strategy} | " + " | ".join(f"{mean[k]:.2e}" for k in columns) + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=6, help="Adam steps per client")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[2e-4, 2e-3, 2e-2], help="client learning rates"
    )
    parser.add_argument("--kinds", nargs="+", default=["plain", "dora"], choices=sorted(KINDS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the tiny model's matrices are too small for threads
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="bench-dora-") as tmp:
        for seed in args.seeds:
            for kind in args.kinds:
                for lr in args.lrs:
                    folder = Path(tmp) / f"{kind}-{seed}-{lr:g}"
                    found = measure(kind, folder, steps=args.steps, seed=seed, lr=lr)
                    rows += [{**row, "lr": lr} for row in found]
    text = table(rows)
    print(text)
    print(f"\n{len(args.seeds)} seed(s), {args.steps} steps per client, {time.perf_counter() - start:.0f} s")
    return text


if __name__ == "__main__":
    main()
