"""Run the example in Flower's simulation engine (Ray) in this process, without ``flwr run``.

    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 \
        python simulate.py --num-supernodes 4 --num-cpus 2 --run-config '{"num-server-rounds": 3}'

``flwr run . local-simulation`` runs the same apps (it needs a package index for ``uv sync``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_name, _value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-supernodes", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may use in all")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--run-config", default="{}", help="JSON object overriding [tool.flwr.app.config]")
    args = parser.parse_args()
    os.environ["FEDLORA_FLOWER_RUN_CONFIG"] = json.dumps(
        json.loads(args.run_config)
    )  # read by task.run_config

    from client_app import app as client_app
    from flwr.simulation import run_simulation
    from server_app import app as server_app

    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.num_supernodes,
        backend_config={
            "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.num_cpus, "num_gpus": 0},
        },
    )
    print(f"simulation wall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
