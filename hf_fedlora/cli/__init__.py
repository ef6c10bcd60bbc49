"""``hf-fedlora``: merge, inspect and publish LoRA adapters from the shell.

hf-fedlora aggregate clients/a clients/b user/client-c@main --strategy replication --output global
hf-fedlora inspect global
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import torch

from ..adapters import LoraAdapter
from ..aggregation import aggregate_adapters
from ..constants import __version__
from ..errors import AdapterError
from ..hub.errors import redact
from ..strategies import get_strategy, list_strategies
from .push import add_push_parser

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _add_aggregate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate",
        help="merge client adapters of any ranks into one PEFT adapter",
        description="Merge PEFT LoRA adapters (folders or Hub repo ids, 'user/repo@revision') of possibly "
        "different ranks into one global adapter, written atomically to --output.",
    )
    p.add_argument(
        "sources", nargs="+", help="client adapters: PEFT folders or Hub repo ids (user/repo[@revision])"
    )
    p.add_argument("--output", "-o", required=True, help="folder to write the global adapter to")
    p.add_argument(
        "--strategy",
        default="replication",
        choices=list_strategies(),
        help="aggregation rule (default: replication, the rank-heterogeneity fix of Byun & Lee 2025)",
    )
    p.add_argument(
        "--weights",
        type=float,
        nargs="+",
        help="one weight per client (default: example counts, else uniform)",
    )
    p.add_argument(
        "--num-examples", type=int, nargs="+", help="one training-example count per client, used as weights"
    )
    p.add_argument("--target-rank", type=int, help="output rank (flexlora; default: the largest client rank)")
    p.add_argument("--previous", help="last round's global adapter; replication keeps slots no client owns")
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), help="dtype of the written tensors (default: the inputs')"
    )
    p.add_argument(
        "--revision", help="Hub revision applied to every repo-id source without its own @revision"
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle adapter_model.bin files (trusted input only)",
    )
    p.add_argument(
        "--no-check-base-model", action="store_true", help="allow differing base_model_name_or_path"
    )


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show an adapter's ranks, scales, sizes and modules",
        description="Print an adapter's modules with their rank and PEFT scale, its extras and its size.",
    )
    p.add_argument("source", help="PEFT folder or Hub repo id (user/repo[@revision])")
    p.add_argument("--revision", help="Hub branch, tag (e.g. round-0003) or commit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-fedlora`` argument parser (subcommands register themselves here)."""
    parser = argparse.ArgumentParser(
        prog="hf-fedlora",
        description="Federated LoRA with heterogeneous ranks: aggregate, inspect and publish PEFT adapters.",
    )
    parser.add_argument("--version", action="version", version=f"hf-fedlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_aggregate(sub)
    _add_inspect(sub)
    add_push_parser(sub)
    return parser


def _with_revision(source: str, revision: str | None) -> str:
    return f"{source}@{revision}" if revision and "@" not in source else source


def check_output_apart(output: str, sources: Sequence[str | None]) -> None:
    """Refuse an ``--output`` that is, holds or lies inside a local input folder: saving there would
    replace an input (a client's adapter, or the previous round) with the merge."""
    out = os.path.realpath(output)
    for source in sources:
        if source is None or not os.path.isdir(source):
            continue
        src = os.path.realpath(source)
        if out == src or os.path.commonpath([out, src]) in (out, src):
            raise AdapterError(
                f"--output '{output}' is the input '{source}' or shares its folder tree; writing there would "
                "overwrite an input. Choose another --output."
            )


def _run_aggregate(args: argparse.Namespace) -> int:
    check_output_apart(args.output, [*args.sources, args.previous])
    adapter = aggregate_adapters(
        [_with_revision(s, args.revision) for s in args.sources],
        strategy=args.strategy,
        weights=args.weights,
        num_examples=args.num_examples,
        target_rank=args.target_rank,
        previous=args.previous,
        dtype=_DTYPES.get(args.dtype) if args.dtype else None,
        allow_pickle=args.allow_pickle,
        check_base_model=not args.no_check_base_model,
        progress=True,
    )
    adapter.save_pretrained(args.output)
    ranks = sorted(set(adapter.ranks.values()))
    print(f"wrote {args.output}: {len(adapter.modules)} modules, ranks {ranks}, strategy {args.strategy}")
    print(
        f"send clients their view with LoraAdapter.to_rank(r, method={get_strategy(args.strategy).send_back!r})"
    )
    return 0


def inspect_summary(adapter: LoraAdapter) -> dict:
    """A JSON-able description of an adapter: ranks, scales, shapes, extras, sizes, provenance."""
    return {
        "label": adapter.label,
        "base_model": adapter.config.base_model_name_or_path,
        "target_modules": sorted(adapter.config.target_modules)
        if isinstance(adapter.config.target_modules, (set, list))
        else adapter.config.target_modules,
        "r": adapter.config.r,
        "lora_alpha": adapter.config.lora_alpha,
        "use_rslora": bool(adapter.config.use_rslora),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "num_parameters": adapter.num_parameters(),
        "num_bytes": adapter.num_bytes(),
        "modules": {
            m: {
                "rank": adapter.ranks[m],
                "scale": adapter.scale(m),
                "shape_A": list(adapter.factor_shapes(m)[0]),
                "shape_B": list(adapter.factor_shapes(m)[1]),
            }
            for m in adapter.modules
        },
        "extras": {k: list(adapter.tensor_shape(k)) for k in adapter.extras},
        "provenance": adapter.provenance,
    }


def printable(value: object) -> str:
    """``str(value)`` with control characters (terminal escapes, newlines, bidi overrides) escaped, so
    that a client's config or provenance cannot rewrite the operator's terminal."""
    text = str(value)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _run_inspect(args: argparse.Namespace) -> int:
    summary = inspect_summary(LoraAdapter.from_pretrained(args.source, revision=args.revision))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))  # ensure_ascii escapes every control character
        return 0
    summary = json.loads(json.dumps(summary, default=printable), object_hook=_escape_strings)
    print(f"{summary['label']}  base={summary['base_model']}  dtype={summary['dtype']}")
    print(
        f"{len(summary['modules'])} LoRA modules, {summary['num_parameters']:,} values, {summary['num_bytes'] / 2**20:.2f} MiB"
    )
    width = max(len(m) for m in summary["modules"])
    print(f"{'module':<{width}}  rank  scale     A shape       B shape")
    for module, info in summary["modules"].items():
        print(
            f"{module:<{width}}  {info['rank']:>4}  {info['scale']:<8.4g}  {str(info['shape_A']):<12}  {info['shape_B']}"
        )
    for key, shape in summary["extras"].items():
        print(f"extra (modules_to_save): {key} {shape}")
    if summary["provenance"]:
        prov = summary["provenance"]
        print(
            f"provenance: strategy={prov.get('strategy')} clients={prov.get('num_clients')} examples={prov.get('num_examples')}"
        )
    return 0


def _escape_strings(mapping: dict) -> dict:
    return {
        printable(k): printable(v)
        if isinstance(v, str)
        else [printable(i) if isinstance(i, str) else i for i in v]
        if isinstance(v, list)
        else v
        for k, v in mapping.items()
    }


class RedactTokens(logging.Filter):
    """Replaces Hub tokens (and ``HF_TOKEN``'s value) in log records, e.g. third-party DEBUG lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, os.environ.get("HF_TOKEN"))
        if clean != message:
            record.msg, record.args = clean, None
        return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-fedlora`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactTokens())
    handlers = {"aggregate": _run_aggregate, "inspect": _run_inspect}
    if args.command == "push":
        handlers["push"] = args.handler
    try:
        return handlers[args.command](args)
    except (AdapterError, OSError, ValueError) as exc:  # operator or input mistakes: one line, no traceback
        text = printable(redact(str(exc), os.environ.get("HF_TOKEN")))
        kind = "" if isinstance(exc, AdapterError) else f"{type(exc).__name__}: "
        print(f"hf-fedlora {args.command}: error: {kind}{text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-fedlora {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
