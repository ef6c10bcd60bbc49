"""Simulate a federation of heterogeneous-rank LoRA clients on a GLUE task (or any text classification).

N clients each hold a shard of the training data; every round a sample of them trains its LoRA
adapter locally at its own rank, the server merges the adapters with the chosen strategy
(replication-based padding by default), sends each client its rank view back, evaluates the global
adapter, checkpoints the round (``round-NNNN/``, ``metrics.jsonl``, ``state.json``) and optionally
pushes it to the Hub.

Usage (2 CPU processes; drop ``--config_file`` for one, or run with plain ``python``)::

    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \\
        recipes/fed_glue.py --config recipes/configs/quickstart.yaml

    # any option of the YAML can be overridden on the command line:
    accelerate launch recipes/fed_glue.py --config recipes/configs/quickstart.yaml \\
        --strategy zero_padding --output_dir outputs/quickstart_zero_padding

    # continue a stopped run from its last complete round (its options are read from state.json):
    accelerate launch recipes/fed_glue.py --output_dir outputs/quickstart --resume

``python recipes/fed_glue.py --help`` lists every option.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_fedlora.federation import (  # noqa: E402
    ClientArguments,
    DataArguments,
    FedArgumentParser,
    FederationArguments,
    FederationResult,
    ModelArguments,
    run_federation,
    set_torch_threads,
)
from hf_fedlora.federation.guard import run_script  # noqa: E402


def main(
    model_args: ModelArguments,
    data_args: DataArguments,
    client_args: ClientArguments,
    fed_args: FederationArguments,
) -> FederationResult:
    """Run the federation described by the four argument groups; returns its per-round records."""
    return run_federation(model_args, data_args, client_args, fed_args)


def parse(args: Sequence[str] | None = None) -> tuple:
    """``--config file.yaml`` plus command-line overrides into the four argument groups."""
    summary = __doc__.split("Usage")[0].strip()
    return FedArgumentParser(description=summary, epilog="Example: " + _EXAMPLE).parse_args_and_config(args)


_EXAMPLE = (
    "accelerate launch recipes/fed_glue.py --config recipes/configs/quickstart.yaml --strategy zero_padding"
)


def cli(argv: Sequence[str] | None = None) -> int:
    """The script: one line and exit 2 for an operator's mistake, a clean stop (exit 130/143) on
    SIGINT/SIGTERM, also when only the ``accelerate launch`` process is signalled."""
    return run_script(
        parse,
        main,
        argv,
        prog="fed_glue.py",
        # after parsing: a config's `env:` block may set OMP_NUM_THREADS
        before_main=lambda arguments: set_torch_threads(arguments[3].threads),
    )


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
