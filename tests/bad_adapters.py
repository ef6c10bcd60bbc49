"""A gallery of broken and hostile client adapters, built from a good PEFT-written one.

Each case corrupts a copy of a valid adapter folder in one way and states the ``AdapterError``
subclass and the text that must name the fault. ``test_bad_adapter_gallery.py`` runs every case;
``python tests/bad_adapters.py`` regenerates the table in ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile_adapters import hostile_cases  # noqa: E402

import hf_fedlora as hfl  # noqa: E402

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
QUERY0 = "base_model.model.bert.encoder.layer.0.attention.self.query"
QUERY0_A, QUERY0_B = QUERY0 + ".lora_A.weight", QUERY0 + ".lora_B.weight"


@dataclass(frozen=True)
class BadAdapter:
    """One way a client's adapter can be wrong, and what the server must say about it."""

    name: str
    corrupt: Callable[[Path, Path], None]
    error: type
    culprit: str
    group: str = "format"  # the class of issue 16 it belongs to (see docs/reliability.md)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_tensors(folder: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def _set(key, value):
    return lambda good, bad: edit_tensors(bad, lambda t: t.__setitem__(key, value))


def _delete(key):
    return lambda good, bad: edit_tensors(bad, lambda t: t.pop(key))


def _config(**changes):
    return lambda good, bad: edit_config(bad, **changes)


def _poison(key, value):
    def corrupt(good, bad):
        def edit(t):
            t[key][0, 0] = value

        edit_tensors(bad, edit)

    return corrupt


def _different_targets(good, bad):
    import shutil

    from testing_utils import write_peft_adapter

    shutil.rmtree(bad)
    write_peft_adapter(bad, 4, 8, seed=3, target_modules=("query", "key"))


def _truncate(good, bad):
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])


def _garbage(good, bad):
    (bad / WEIGHTS).write_bytes(os.urandom(256))


def _empty_file(good, bad):
    (bad / WEIGHTS).write_bytes(b"")


def _rewrite_header(mutate):
    """Rewrite the safetensors JSON header in place (data bytes unchanged)."""

    def corrupt(good, bad):
        raw = (bad / WEIGHTS).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        mutate(header)
        text = json.dumps(header).encode()
        (bad / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])

    return corrupt


def _lie_about_shape(header):
    header[QUERY0_A]["shape"] = [8, 32]


def _lie_about_offsets(header):
    start, end = header[QUERY0_A]["data_offsets"]
    header[QUERY0_A]["data_offsets"] = [start, end + 10**9]


def _symlink_out(good, bad):
    outside = bad.parent / "outside.json"
    outside.write_text((bad / CONFIG).read_text())
    (bad / CONFIG).unlink()
    (bad / CONFIG).symlink_to(outside)


def _pickle_only(good, bad):
    torch.save(load_file(str(bad / WEIGHTS)), bad / "adapter_model.bin")
    (bad / WEIGHTS).unlink()


def _absurd_rank(good, bad):
    def huge(t):
        for key in list(t):
            if key.endswith("lora_A.weight"):
                t[key] = torch.randn(64, 32)
            elif key.endswith("lora_B.weight"):
                t[key] = torch.randn(32, 64)

    edit_tensors(bad, huge)
    edit_config(bad, r=64)


def _empty_adapter(good, bad):
    save_file({}, str(bad / WEIGHTS))


def _only_head(good, bad):
    edit_tensors(bad, lambda t: [t.pop(k) for k in list(t) if ".lora_" in k])


def _different_head(good, bad):
    edit_tensors(bad, lambda t: t.__setitem__("base_model.model.classifier.weight", torch.randn(5, 32)))


CASES: list[BadAdapter] = [
    BadAdapter("truncated safetensors", _truncate, hfl.AdapterFormatError, WEIGHTS),
    BadAdapter("random bytes as safetensors", _garbage, hfl.AdapterFormatError, WEIGHTS),
    BadAdapter("zero-byte safetensors", _empty_file, hfl.AdapterFormatError, WEIGHTS),
    BadAdapter(
        "header lies about a shape", _rewrite_header(_lie_about_shape), hfl.AdapterFormatError, WEIGHTS
    ),
    BadAdapter(
        "header lies about offsets", _rewrite_header(_lie_about_offsets), hfl.AdapterFormatError, WEIGHTS
    ),
    BadAdapter(
        "missing adapter_config.json", lambda g, b: (b / CONFIG).unlink(), hfl.AdapterNotFoundError, CONFIG
    ),
    BadAdapter("missing safetensors", lambda g, b: (b / WEIGHTS).unlink(), hfl.AdapterNotFoundError, WEIGHTS),
    BadAdapter(
        "config is not JSON",
        lambda g, b: (b / CONFIG).write_text("{ r: 4,"),
        hfl.AdapterFormatError,
        "not valid JSON",
    ),
    BadAdapter(
        "config is a JSON list",
        lambda g, b: (b / CONFIG).write_text("[4, 8]"),
        hfl.AdapterFormatError,
        "JSON object",
    ),
    BadAdapter(
        "config is not LoRA (IA3)", _config(peft_type="IA3"), hfl.UnsupportedAdapterError, "`peft_type`"
    ),
    BadAdapter(
        "DoRA config without magnitude vectors", _config(use_dora=True), hfl.AdapterFormatError, "`use_dora`"
    ),
    BadAdapter(
        "LoRA bias tensor but `lora_bias: false`",
        _set(QUERY0 + ".lora_B.bias", torch.zeros(32)),
        hfl.AdapterFormatError,
        "lora_B.bias",
    ),
    BadAdapter(
        "LoRA bias on the A factor",
        _set(QUERY0 + ".lora_A.bias", torch.zeros(4)),
        hfl.UnsupportedAdapterError,
        "lora_A.bias",
    ),
    BadAdapter("negative rank in config", _config(r=-4), hfl.AdapterFormatError, "`r`"),
    BadAdapter(
        "rank_pattern not a mapping", _config(rank_pattern=[4]), hfl.AdapterFormatError, "`rank_pattern`"
    ),
    BadAdapter("config rank contradicts tensors", _config(r=6), hfl.RankMismatchError, "declares rank 6"),
    BadAdapter(
        "A and B disagree on rank", _set(QUERY0_B, torch.randn(32, 3)), hfl.RankMismatchError, QUERY0_B
    ),
    BadAdapter("rank larger than the layer", _absurd_rank, hfl.RankMismatchError, "larger than the layer"),
    BadAdapter(
        "different base model",
        _config(base_model_name_or_path="someone/other"),
        hfl.IncompatibleAdaptersError,
        "base_model_name_or_path",
    ),
    BadAdapter(
        "different target modules", _different_targets, hfl.IncompatibleAdaptersError, "target modules"
    ),
    BadAdapter(
        "different layer shape",
        _set(QUERY0_A, torch.randn(4, 40)),
        hfl.IncompatibleAdaptersError,
        "layer shape",
    ),
    BadAdapter("different head shape", _different_head, hfl.IncompatibleAdaptersError, "classifier.weight"),
    BadAdapter("module missing lora_B", _delete(QUERY0_B), hfl.AdapterFormatError, "no `lora_B.weight`"),
    BadAdapter("module missing lora_A", _delete(QUERY0_A), hfl.AdapterFormatError, "no `lora_A.weight`"),
    BadAdapter(
        "unknown extra tensor",
        _set("base_model.model.spy.weight", torch.zeros(2)),
        hfl.AdapterFormatError,
        "spy.weight",
    ),
    BadAdapter(
        "integer LoRA factor",
        _set(QUERY0_A, torch.ones(4, 32, dtype=torch.int32)),
        hfl.AdapterFormatError,
        "floating point",
    ),
    BadAdapter("1-D LoRA factor", _set(QUERY0_A, torch.ones(4)), hfl.AdapterFormatError, "matrices"),
    BadAdapter("NaN in a LoRA factor", _poison(QUERY0_A, float("nan")), hfl.NonFiniteTensorError, QUERY0_A),
    BadAdapter("Inf in a LoRA factor", _poison(QUERY0_B, float("inf")), hfl.NonFiniteTensorError, QUERY0_B),
    BadAdapter(
        "Inf in the classifier head",
        _poison("base_model.model.classifier.weight", float("-inf")),
        hfl.NonFiniteTensorError,
        "classifier.weight",
    ),
    BadAdapter("empty adapter (no tensors)", _empty_adapter, hfl.AdapterFormatError, "no LoRA tensors"),
    BadAdapter("head only, no LoRA tensors", _only_head, hfl.AdapterFormatError, "no LoRA tensors"),
    BadAdapter("pickle adapter_model.bin only", _pickle_only, hfl.UnsafeFormatError, "allow_pickle"),
    BadAdapter("config symlinked outside the folder", _symlink_out, hfl.AdapterFormatError, "symlink"),
    BadAdapter(
        "'..' in a tensor name",
        _set("base_model.model..._secret.weight", torch.zeros(2)),
        hfl.AdapterFormatError,
        "not a dotted module path",
    ),
    BadAdapter(
        "'/' in a tensor name",
        _set("base_model.model.classifier/../../x", torch.zeros(2)),
        hfl.AdapterFormatError,
        "not a dotted module path",
    ),
    *hostile_cases(BadAdapter, _config, edit_tensors, _rewrite_header),
]


def run_case(case: BadAdapter, workdir: Path) -> tuple[str, str]:
    """Build the case under ``workdir``, aggregate it beside a good client, return (error type, message)."""
    from testing_utils import write_peft_adapter

    good = write_peft_adapter(workdir / "good", 4, 8, seed=1)
    bad = write_peft_adapter(workdir / "bad", 4, 8, seed=2)
    case.corrupt(good, bad)
    try:
        hfl.aggregate_adapters([good, bad])
    except hfl.AdapterError as exc:
        return type(exc).__name__, str(exc)
    return "accepted", ""


def markdown_table(outcomes: list[tuple[BadAdapter, str, bool]]) -> str:
    """The gallery as a markdown table: case, expected error, outcome, and totals."""
    rows = ["| # | bad input | expected error | outcome |", "|---|---|---|---|"]
    for i, (case, got, ok) in enumerate(outcomes, 1):
        rows.append(
            f"| {i} | {case.name} | `{case.error.__name__}` | {'rejected, culprit named' if ok else 'FAILED: ' + got} |"
        )
    passed = sum(ok for _, _, ok in outcomes)
    groups: dict[str, list[bool]] = {}
    for case, _, ok in outcomes:
        groups.setdefault(case.group, []).append(ok)
    rows.append("")
    rows.append(
        "By class: "
        + ", ".join(f"{name} {sum(oks)}/{len(oks)}" for name, oks in groups.items())
        + " (classes of issue 16; 'format' are the earlier cases)."
    )
    rows.append("")
    rows.append(
        f"Bad-adapter gallery: {passed} of {len(outcomes)} cases rejected with the expected error naming the client and the fault."
    )
    return "\n".join(rows)


def run_gallery() -> list[tuple[BadAdapter, str, bool]]:
    """Run every case in a fresh temporary folder: ``(case, error type raised, as expected?)``."""
    import tempfile

    outcomes = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            got, message = run_case(case, Path(tmp))
        outcomes.append(
            (case, got, got == case.error.__name__ and case.culprit in message and "client 1" in message)
        )
    return outcomes


DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
START, END = "<!-- bad-adapter-gallery:start -->", "<!-- bad-adapter-gallery:end -->"


def replace_section(text: str, table: str) -> str:
    """``text`` with the generated gallery table between its markers."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


if __name__ == "__main__":
    DOC.write_text(replace_section(DOC.read_text(), markdown_table(run_gallery())))
    print(f"updated {DOC}")
