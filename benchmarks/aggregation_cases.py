"""What the aggregation benchmark measures: the synthetic inputs and one function per kind of case.

Each case takes a JSON-able ``spec`` (built by ``bench_aggregation.plan``) and returns a JSON-able
result. Run as a script, this module measures the one case given as its argument in this fresh
interpreter and hands the result back through ``_common.run_child``:

    python benchmarks/aggregation_cases.py '{"kind": "io_floor", "dirs": [...], ...}'

Imports of torch, safetensors, peft and hf_fedlora stay inside the functions, so the memory baseline
a case measures is that of an interpreter that imported only what the case needs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    AnonPeakSampler,
    io_counters,
    max_rss_bytes,
    proc_status,
    repeat_timed,
    summarize,
    use_one_thread,
    write_child_result,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
KEY = "base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{ab}.weight"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark size, read from ``configs/aggregation_<name>.yaml``. ``peft_modules`` is how
    many modules PEFT's merge is timed on per combination type; its time is extrapolated to all
    modules."""

    name: str
    layers: int
    hidden: int
    clients: tuple[int, ...]
    ranks: tuple[int, ...]
    equal_rank: int
    repeats: int
    max_seconds: float
    peft_modules: dict[str, int]
    isolation: str
    kind: str = "merge"
    """``merge``: every strategy against the I/O floor, PEFT and a dense SVD; ``streaming``:
    ``StreamingAggregator`` against ``aggregate_adapters`` on the same clients."""
    streaming_strategies: tuple[str, ...] = ()
    """In a ``merge`` preset, the strategies also timed as ``StreamingAggregator`` vs list."""
    skip: dict[str, str] = dataclasses.field(default_factory=dict)
    """Cases left out (keys as in the JSON), each with the reason the page gives."""

    @property
    def signature(self) -> str:
        return f"L{self.layers}_h{self.hidden}_r{'-'.join(map(str, self.ranks))}_eq{self.equal_rank}"

    @property
    def num_modules(self) -> int:
        return self.layers * len(PROJECTIONS)


def client_rank(preset: Preset, kind: str, k: int) -> int:
    return preset.equal_rank if kind == "equal" else preset.ranks[k % len(preset.ranks)]


def write_client(folder: Path, preset: Preset, rank: int, seed: int) -> None:
    """One client adapter exactly as PEFT writes it (config + bf16 safetensors), atomically."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    h = preset.hidden
    tensors = {}
    for layer in range(preset.layers):
        for proj in PROJECTIONS:
            a = torch.randn(rank, h, generator=gen) / math.sqrt(h)
            b = torch.randn(h, rank, generator=gen) * 0.02
            tensors[KEY.format(layer=layer, proj=proj, ab="A")] = a.to(torch.bfloat16)
            tensors[KEY.format(layer=layer, proj=proj, ab="B")] = b.to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(PROJECTIONS),
        task_type="CAUSAL_LM",
        base_model_name_or_path="synthetic/llama-7b-shapes",
    ).save_pretrained(str(tmp))
    os.replace(tmp, folder)


def input_dirs(root: Path, preset: Preset, kind: str, count: int) -> list[str]:
    """Client folders ``0..count-1`` of a set (``kind`` is ``mixed`` or ``equal``)."""
    return [str(root / preset.signature / kind / f"client_{k:03d}") for k in range(count)]


def ensure_inputs(preset: Preset, dirs: list[str]) -> None:
    """Write the client folders that are missing (inputs are cached between runs)."""
    for folder in map(Path, dirs):
        if not (folder / "adapter_model.safetensors").is_file():
            k, kind = int(folder.name.split("_")[1]), folder.parent.name
            write_client(
                folder, preset, client_rank(preset, kind, k), seed=k + (10_000 if kind == "equal" else 0)
            )


def _tensor_bytes(dirs: list[str]) -> int:
    from safetensors import safe_open

    total = 0
    for d in dirs:
        with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as handle:
            for key in handle.keys():
                s = handle.get_slice(key)
                total += math.prod(s.get_shape()) * 2  # bf16
    return total


def case_io_floor(spec: dict) -> dict:
    """Read every input tensor once with safetensors (copied into process memory), and hash the
    files as ``aggregate_adapters`` does for provenance (``LoraAdapter.sha256``)."""
    import hashlib
    import struct

    import torch
    from safetensors import safe_open

    from hf_fedlora import LoraAdapter

    use_one_thread()  # as the strategy cases
    warnings.filterwarnings(
        "ignore", message="The given buffer is not writable"
    )  # read-only bytes: fine here
    files = [os.path.join(d, "adapter_model.safetensors") for d in spec["dirs"]]
    adapters = [LoraAdapter.from_pretrained(d) for d in spec["dirs"]]  # opened lazily: nothing read yet

    def read(convert):
        for f in files:
            with safe_open(f, "pt") as handle:
                for key in handle.keys():
                    convert(handle.get_tensor(key))

    def read_hash_materialise() -> None:
        """Each file read once into memory, its sha256 taken from that buffer, and every tensor made
        from it (``frombuffer``: no further copy): the floor of a merge that records provenance."""
        for f in files:
            with open(f, "rb", buffering=0) as handle:
                buffer = handle.read()  # one read into memory that is not zeroed first
            hashlib.sha256(buffer).hexdigest()
            (length,) = struct.unpack("<Q", buffer[:8])
            header = json.loads(buffer[8 : 8 + length])
            header.pop("__metadata__", None)
            for info in header.values():
                start, end = (8 + length + o for o in info["data_offsets"])
                torch.frombuffer(
                    memoryview(buffer), dtype=torch.bfloat16, count=(end - start) // 2, offset=start
                )

    # get_tensor may return a view of the mapped file; clone() makes it an actual read into memory.
    variants = {
        "read": lambda: read(lambda t: t.clone()),
        "read_f32": lambda: read(lambda t: t.float()),
        "sha256": lambda: [a.sha256() for a in adapters],
        "read_sha256": read_hash_materialise,
    }
    out = {
        name: summarize(repeat_timed(fn, spec["repeats"], spec["max_seconds"]))
        for name, fn in variants.items()
    }
    out["file_bytes"] = sum(os.path.getsize(f) for f in files)
    out["tensor_bytes"] = _tensor_bytes(spec["dirs"])
    return out


def case_strategy(spec: dict) -> dict:
    """``aggregate_adapters`` on the folders: wall time with and without the provenance hashing,
    peak memory, bytes read."""
    import torch

    import hf_fedlora
    from hf_fedlora import aggregate_adapters

    dirs, name = spec["dirs"], spec["strategy"]
    use_one_thread()  # a loaded intra-op pool thrashes on 2 shared cores (the read helper still runs)
    base = {"maxrss": max_rss_bytes(), **proc_status()}
    info: dict[str, Any] = {}

    held: list = []

    def run() -> None:
        held.append(aggregate_adapters(dirs, strategy=name))

    def run_unhashed() -> None:  # the same call without the provenance sha256
        held.append(aggregate_adapters(dirs, strategy=name, record_sha256=False))

    def release() -> None:  # untimed: measure the output, free it
        result = held.pop()
        if "output_bytes" not in info:
            state = result.state_dict()
            info["output_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
            info["output_rank_max"] = max(result.ranks.values())
        del result
        gc.collect()

    try:
        # the first call, untimed, gives the peak memory (the sampler's thread would slow timed calls,
        # and later calls start from a heap the first one grew) and the bytes read from storage
        io0 = io_counters()
        with AnonPeakSampler() as sampler:
            run()
            release()
        io1 = io_counters()
        times = repeat_timed(run, spec["repeats"], spec["max_seconds"], cleanup=release)
        no_hash = repeat_timed(run_unhashed, spec["repeats"], spec["max_seconds"], cleanup=release)
        peak_rss_delta = max_rss_bytes() - base["maxrss"]  # before the inputs are loaded below
        if spec.get("in_memory"):
            info["time_in_memory"] = summarize(_time_in_memory(dirs, name, spec, held, release))
    except hf_fedlora.AdapterError as exc:
        return {"status": "n/a", "reason": str(exc)}
    ranks = [int(json.load(open(os.path.join(d, "adapter_config.json")))["r"]) for d in dirs]
    a_dim = b_dim = spec["hidden"]
    module_inputs_f32 = sum(r * (a_dim + b_dim) * 4 for r in ranks)
    return {
        "status": "ok",
        "time": summarize(times),
        "time_no_hash": summarize(no_hash),
        "peak_anon_delta": sampler.delta,
        "peak_rss_delta": peak_rss_delta,
        "baseline_rss": base["VmRSS"],
        "rchar_per_run": io1["rchar"] - io0["rchar"],
        "storage_read_bytes_first_run": io1["read_bytes"] - io0["read_bytes"],
        "tensor_bytes": _tensor_bytes(dirs),
        "module_inputs_f32_bytes": module_inputs_f32,
        "torch_threads": torch.get_num_threads(),
        **info,
    }


def _time_in_memory(dirs: list[str], name: str, spec: dict, held: list, release) -> list[float]:
    """The merge of every client already in memory (``LoraAdapter.from_state_dict``), without the
    provenance hash: no I/O at all, so what the rule's arithmetic and per-call work cost alone."""
    from safetensors.torch import load_file

    from hf_fedlora import LoraAdapter, aggregate_adapters

    adapters = [
        LoraAdapter.from_state_dict(
            LoraAdapter.from_pretrained(d).config, load_file(os.path.join(d, "adapter_model.safetensors"))
        )
        for d in dirs
    ]

    def run_in_memory() -> None:
        held.append(aggregate_adapters(adapters, strategy=name, record_sha256=False))

    run_in_memory()
    release()
    return repeat_timed(run_in_memory, spec["repeats"], spec["max_seconds"], cleanup=release)


def _tiny_model(hidden: int, modules: list[tuple[int, str]]):
    """Just the sampled Linear layers of a Llama, at the paths PEFT's keys name."""
    import torch
    from torch import nn

    layers = nn.ModuleList()
    for layer in range(max(m[0] for m in modules) + 1):
        block, attn = nn.Module(), nn.Module()
        for proj in PROJECTIONS:
            if (layer, proj) in modules:
                setattr(attn, proj, nn.Linear(hidden, hidden, bias=False, dtype=torch.float32))
        block.self_attn = attn
        layers.append(block)
    inner, outer = nn.Module(), nn.Module()
    inner.layers = layers
    outer.model = inner
    outer.prepare_inputs_for_generation = lambda *args, **kwargs: {}  # PeftModelForCausalLM asks for it
    return outer


def case_peft(spec: dict) -> dict:
    """PEFT's ``add_weighted_adapter`` on a sample of modules, extrapolated to all of them."""
    import logging

    from peft import PeftModel

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    sample = [(layer, proj) for layer in range(spec["layers"]) for proj in sorted(PROJECTIONS)][
        : spec["sample"]
    ]
    model = _tiny_model(spec["hidden"], sample)
    dirs = spec["dirs"]
    start = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, dirs[0], adapter_name="c0")
    for k, d in enumerate(dirs[1:], 1):
        peft_model.load_adapter(d, adapter_name=f"c{k}")
    load_s = time.perf_counter() - start
    names = [f"c{k}" for k in range(len(dirs))]
    weights = [1.0 / len(dirs)] * len(dirs)

    def merge() -> None:
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=spec["combination"])
        peft_model.delete_adapter("merged")

    times = summarize(repeat_timed(merge, spec["repeats"], spec["max_seconds"]))
    factor = spec["num_modules"] / len(sample)
    return {
        "combination_type": spec["combination"],
        "sampled_modules": [f"layers.{layer}.self_attn.{proj}" for layer, proj in sample],
        "time_sample": times,
        "extrapolation_factor": factor,
        "time_extrapolated": {"median": times["median"] * factor, "min": times["min"] * factor},
        "load_adapters_s": load_s,
    }


def _shared_directions(folded: list, seed: int = 0) -> list:
    """The clients' factors made to share 32 directions of decaying strength (plus their own noise):
    the kind of sum whose spectrum decays, as updates of one task do, unlike independent random ones."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out_dim, in_dim = folded[0][1].shape[0], folded[0][0].shape[1]
    u, v = torch.randn(out_dim, 32, generator=gen), torch.randn(32, in_dim, generator=gen)
    scale = folded[0][1].std()
    shared = []
    for a, b in folded:
        a, b = a.clone(), b.clone()
        k = min(a.shape[0], 32)
        b[:, :k] = u[:, :k] * (0.5 ** torch.arange(k)) * scale + 1e-3 * b[:, :k]
        a[:k] = v[:k] * a.std()
        shared.append((a, b))
    return shared


def case_dense_svd(spec: dict) -> dict:
    """FlexLoRA on one module: the exact factored SVD, the randomised range finder (forced, and as
    ``svd="auto"`` decides), against ``torch.linalg.svd`` of the dense sum; on the benchmark's
    independent clients and on the same factors made to share directions."""
    import torch

    from hf_fedlora import LoraAdapter
    from hf_fedlora.strategies import FlexLoraStrategy, ModuleInputs

    use_one_thread()
    adapters = [LoraAdapter.from_pretrained(d) for d in spec["dirs"]]
    module = adapters[0].modules[0]
    p = torch.full((len(adapters),), 1.0 / len(adapters))
    norm = lambda x: float(torch.linalg.matrix_norm(x))  # noqa: E731
    out: dict[str, Any] = {"module": module}
    base = [a.folded_factors(module) for a in adapters]
    for variant, folded in (("independent", base), ("shared", _shared_directions(base))):
        inputs = ModuleInputs(name=module, a=[f[0] for f in folded], b=[f[1] for f in folded], weights=p)
        holder: dict[str, Any] = {}
        rules = {
            "flexlora": FlexLoraStrategy("exact"),
            "randomized": FlexLoraStrategy("randomized"),
            "auto": FlexLoraStrategy("auto"),
        }
        res: dict[str, Any] = {}
        for label, rule in rules.items():
            res[label] = summarize(
                repeat_timed(
                    lambda rule=rule, label=label, h=holder, x=inputs: h.__setitem__(
                        label, rule.aggregate_module(x)
                    ),
                    spec["repeats"],
                    spec["max_seconds"],
                )
            )
        res["certificate"] = rules["randomized"].last_bound
        w = sum(float(pk) * (b.double() @ a.double()) for pk, (a, b) in zip(p, folded))
        rank = inputs.max_rank
        energy = norm(w) ** 2
        recon = {k: (v[1].double() @ v[0].double()) for k, v in holder.items()}
        errors = {k: norm(w - r) ** 2 / energy for k, r in recon.items()}
        res["excess_randomized"] = errors["randomized"] - errors["flexlora"]
        res["auto_used_randomized"] = bool(torch.equal(holder["auto"][0], holder["randomized"][0]))
        res["rel_error_flexlora"] = errors["flexlora"] ** 0.5
        res["rel_error_randomized"] = errors["randomized"] ** 0.5
        out[variant] = res
        if variant == "independent":

            def dense_sum(h=holder, f=folded) -> None:
                h["w"] = sum(float(pk) * (b @ a) for pk, (a, b) in zip(p, f))

            t_sum = summarize(repeat_timed(dense_sum, spec["repeats"], spec["max_seconds"]))
            t_svd = summarize(
                repeat_timed(
                    lambda h=holder: h.__setitem__("svd", torch.linalg.svd(h["w"], full_matrices=False)),
                    spec["svd_repeats"],
                    spec["max_seconds"],
                )
            )
            u, s, vh = holder["svd"]
            dense = ((u[:, :rank] * s[:rank]) @ vh[:rank]).double()
            out.update(
                shape=list(w.shape),
                sum_ranks=sum(inputs.ranks),
                target_rank=rank,
                flexlora=res["flexlora"],
                dense_sum=t_sum,
                dense_svd=t_svd,
                speedup_svd_only=t_svd["median"] / res["flexlora"]["median"],
                speedup_sum_plus_svd=(t_svd["median"] + t_sum["median"]) / res["flexlora"]["median"],
                rel_diff_reconstructions=norm(recon["flexlora"] - dense) / norm(dense),
                rel_error_flexlora=res["rel_error_flexlora"],
                rel_error_dense=norm(w - dense) / norm(w),
            )
    for variant in ("independent", "shared"):
        res = out[variant]
        res["speedup_randomized_vs_dense_svd"] = out["dense_svd"]["median"] / res["randomized"]["median"]
        res["speedup_randomized_vs_exact"] = res["flexlora"]["median"] / res["randomized"]["median"]
    return out


def case_streaming(spec: dict) -> dict:
    """One merge of ``spec["dirs"]``, as a list (``aggregate_adapters``) or streamed
    (``StreamingAggregator.add`` per folder, then ``result``): wall time and peak memory, each
    mode in its own interpreter so that the peaks do not mix."""
    import torch

    from hf_fedlora import StreamingAggregator, aggregate_adapters

    dirs, name = spec["dirs"], spec["strategy"]
    # the clients' matrices are tiny: on a shared CPU, torch's thread pool costs more than it gives
    # (hetlora's Gram products took 10-25 ms each with 2 threads under load, 0.1 ms with one)
    use_one_thread()

    def merge():
        if spec["mode"] == "list":
            return aggregate_adapters(dirs, strategy=name)
        agg = StreamingAggregator(name)
        for folder in dirs:
            agg.add(folder)
        return agg.result()

    held: list = []
    info: dict[str, Any] = {}

    def release() -> None:
        result = held.pop()
        info.setdefault(
            "output_bytes", sum(t.numel() * t.element_size() for t in result.state_dict().values())
        )
        del result
        gc.collect()

    base = max_rss_bytes()
    with AnonPeakSampler() as sampler:
        times = repeat_timed(
            lambda: held.append(merge()), spec["repeats"], spec["max_seconds"], cleanup=release
        )
    return {
        "mode": spec["mode"],
        "time": summarize(times),
        "peak_anon_delta": sampler.delta,
        "peak_rss_delta": max_rss_bytes() - base,
        "tensor_bytes": _tensor_bytes(dirs),
        "torch_threads": torch.get_num_threads(),
        **info,
    }


CASES = {
    "streaming": case_streaming,
    "io_floor": case_io_floor,
    "strategy": case_strategy,
    "peft": case_peft,
    "dense_svd": case_dense_svd,
}


def run_case(spec: dict) -> dict:
    """Measure one case (``spec["kind"]`` names it) in this process."""
    return CASES[spec["kind"]](spec)


if __name__ == "__main__":
    write_child_result(run_case(json.loads(sys.argv[1])))
