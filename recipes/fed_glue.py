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

    # continue a killed run from its last complete round:
    accelerate launch recipes/fed_glue.py --config recipes/configs/quickstart.yaml --resume

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


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    set_torch_threads()  # after parsing: a config's `env:` block may set OMP_NUM_THREADS
    main(*arguments)
