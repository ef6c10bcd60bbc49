"""The gallery cases of issue 16 (hostile inputs, round two), grouped by class: silent non-finite
numbers, one client stopping the round, hangs and memory, weak messages. ``bad_adapters.CASES``
appends them to the earlier cases; each is aggregated beside a good client and must raise the
stated ``AdapterError`` naming client 1 and the culprit, in bounded time and memory.
"""

from __future__ import annotations

import json
import os
import struct

import torch

import hf_fedlora as hfl

WEIGHTS, CONFIG, PROVENANCE = "adapter_model.safetensors", "adapter_config.json", "fedlora_provenance.json"
QUERY0 = "base_model.model.bert.encoder.layer.0.attention.self.query"
QUERY0_A, QUERY0_B = QUERY0 + ".lora_A.weight", QUERY0 + ".lora_B.weight"


def _raw_config(**fields_as_json_text):
    """Set config fields to raw JSON text (``1e400``, ``NaN``, a 5,000-digit integer)."""

    def corrupt(good, bad):
        config = json.loads((bad / CONFIG).read_text())
        for key in fields_as_json_text:
            config[key] = f"@@{key}@@"
        text = json.dumps(config)
        for key, raw in fields_as_json_text.items():
            text = text.replace(f'"@@{key}@@"', raw)
        (bad / CONFIG).write_text(text)

    return corrupt


def _provenance(raw_value: str):
    return lambda good, bad: (bad / PROVENANCE).write_text('{"num_examples": ' + raw_value + "}")


def _nested(name: str, depth: int = 100_000):
    return lambda good, bad: (bad / name).write_text('{"a": ' + "[" * depth + "]" * depth + "}")


def _loop(name: str):
    def corrupt(good, bad):
        (bad / name).unlink()
        (bad / name).symlink_to(name)  # a link to itself: ELOOP

    return corrupt


def _fifo(name: str):
    def corrupt(good, bad):
        (bad / name).unlink()
        os.mkfifo(bad / name)  # opening it for reading would block until a writer comes

    return corrupt


def _sparse(name: str, size: int, prefix: bytes = b""):
    """Replace ``name`` by a file of ``size`` bytes costing no disk (sparse): only its size matters."""

    def corrupt(good, bad):
        with open(bad / name, "wb") as handle:
            handle.write(prefix)
            handle.truncate(size)

    return corrupt


def _unknown_dtype(header):
    header[QUERY0_A]["dtype"], header[QUERY0_A]["shape"] = "F8_E8M0", [4, 128]  # same bytes, 1 byte each


def hostile_cases(BadAdapter, _config, edit_tensors, _rewrite_header) -> list:  # noqa: N803
    """The cases, built with ``bad_adapters``' case type and corruption helpers."""

    def _three_d_b(good, bad):
        edit_tensors(bad, lambda t: t.__setitem__(QUERY0_B, torch.randn(32, 4, 2)))

    return [
        # 1. silent non-finite: every config number is a finite positive number of the right type
        BadAdapter("`r` 8.5", _config(r=8.5), hfl.AdapterFormatError, "`r`", "non-finite"),
        BadAdapter("`r` true", _config(r=True), hfl.AdapterFormatError, "`r`", "non-finite"),
        BadAdapter("`r` 1e400 (inf)", _raw_config(r="1e400"), hfl.AdapterFormatError, "`r`", "non-finite"),
        BadAdapter(
            "`r` of 5,000 digits", _raw_config(r="9" * 5000), hfl.AdapterFormatError, CONFIG, "non-finite"
        ),
        BadAdapter(
            "`lora_alpha` 1e300 (folding overflows)",
            _config(lora_alpha=1e300),
            hfl.AdapterFormatError,
            "overflows",
            "non-finite",
        ),
        BadAdapter(
            "`lora_alpha` 1e400 (inf)",
            _raw_config(lora_alpha="1e400"),
            hfl.AdapterFormatError,
            "`lora_alpha`",
            "non-finite",
        ),
        BadAdapter(
            "`lora_alpha` NaN",
            _raw_config(lora_alpha="NaN"),
            hfl.AdapterFormatError,
            "`lora_alpha`",
            "non-finite",
        ),
        BadAdapter(
            "`alpha_pattern` value NaN",
            _raw_config(alpha_pattern='{"query": NaN}'),
            hfl.AdapterFormatError,
            "`alpha_pattern`",
            "non-finite",
        ),
        BadAdapter(
            "`alpha_pattern` value negative",
            _config(alpha_pattern={"query": -8}),
            hfl.AdapterFormatError,
            "`alpha_pattern`",
            "non-finite",
        ),
        BadAdapter(
            "`rank_pattern` value a string",
            _config(rank_pattern={"query": "4"}),
            hfl.AdapterFormatError,
            "`rank_pattern`",
            "non-finite",
        ),
        BadAdapter(
            "`num_examples` NaN in provenance",
            _provenance("NaN"),
            hfl.AdapterFormatError,
            "`num_examples`",
            "non-finite",
        ),
        BadAdapter(
            "`num_examples` 1e400 in provenance",
            _provenance("1e400"),
            hfl.AdapterFormatError,
            "`num_examples`",
            "non-finite",
        ),
        BadAdapter(
            "`num_examples` 0 in provenance",
            _provenance("0"),
            hfl.AdapterFormatError,
            "`num_examples`",
            "non-finite",
        ),
        BadAdapter(
            "`num_examples` 2.9 in provenance",
            _provenance("2.9"),
            hfl.AdapterFormatError,
            "`num_examples`",
            "non-finite",
        ),
        # 2. one client stops the round: each is now that client's AdapterError
        BadAdapter("3-D lora_B", _three_d_b, hfl.AdapterFormatError, QUERY0_B, "stops the round"),
        BadAdapter(
            "config is a symlink loop", _loop(CONFIG), hfl.AdapterFormatError, "symlink", "stops the round"
        ),
        BadAdapter(
            "weights are a symlink loop", _loop(WEIGHTS), hfl.AdapterFormatError, "symlink", "stops the round"
        ),
        BadAdapter(
            "config nested 100k deep",
            _nested(CONFIG),
            hfl.AdapterFormatError,
            "nested deeper",
            "stops the round",
        ),
        BadAdapter(
            "provenance nested 100k deep",
            _nested(PROVENANCE),
            hfl.AdapterFormatError,
            "nested deeper",
            "stops the round",
        ),
        BadAdapter(
            '`peft_type: "lora"` (lower case)',
            _config(peft_type="lora"),
            hfl.AdapterFormatError,
            "`peft_type`",
            "stops the round",
        ),
        BadAdapter(
            "`peft_type` a list",
            _config(peft_type=["LORA"]),
            hfl.UnsupportedAdapterError,
            "`peft_type`",
            "stops the round",
        ),
        BadAdapter(
            "`rank_pattern` key an invalid regex",
            _config(rank_pattern={"query(": 4}),
            hfl.AdapterFormatError,
            "not a valid regex",
            "stops the round",
        ),
        # 3. hangs and memory: bounded before reading, parsing or matching
        BadAdapter(
            "FIFO as adapter_config.json",
            _fifo(CONFIG),
            hfl.AdapterFormatError,
            "not a regular file",
            "hangs and memory",
        ),
        BadAdapter(
            "FIFO as the safetensors file",
            _fifo(WEIGHTS),
            hfl.AdapterFormatError,
            "not a regular file",
            "hangs and memory",
        ),
        BadAdapter(
            "100 MB adapter_config.json",
            _sparse(CONFIG, 100 << 20, b"{"),
            hfl.AdapterFormatError,
            "over the limit",
            "hangs and memory",
        ),
        BadAdapter(
            "98 MB safetensors header",
            _sparse(WEIGHTS, 99 << 20, struct.pack("<Q", 98 << 20) + b"{"),
            hfl.AdapterFormatError,
            "over the limit",
            "hangs and memory",
        ),
        BadAdapter(
            "catastrophic regex `(a+)+$` in rank_pattern",
            _config(rank_pattern={"(a+)+$": 4}),
            hfl.AdapterFormatError,
            "exponential",
            "hangs and memory",
        ),
        BadAdapter(
            "repeated alternation `(q|qu)*y` in alpha_pattern",
            _config(alpha_pattern={"(q|qu)*y": 8}),
            hfl.AdapterFormatError,
            "exponential",
            "hangs and memory",
        ),
        BadAdapter(
            "many `.*` in a rank_pattern key",
            _config(rank_pattern={".*.*.*.*x": 4}),
            hfl.AdapterFormatError,
            "unbounded repeats",
            "hangs and memory",
        ),
        BadAdapter(
            "rank_pattern key of 10,000 characters",
            _config(rank_pattern={"q" * 10_000: 4}),
            hfl.AdapterFormatError,
            "over the limit",
            "hangs and memory",
        ),
        # 5. weak messages made clear
        BadAdapter(
            '`use_dora: "false"` (a string)',
            _config(use_dora="false"),
            hfl.AdapterFormatError,
            "`use_dora` must be true or false",
            "weak message",
        ),
        BadAdapter(
            "factor dtype torch cannot read (F8_E8M0)",
            _rewrite_header(_unknown_dtype),
            hfl.AdapterFormatError,
            "'F8_E8M0'",
            "weak message",
        ),
    ]
