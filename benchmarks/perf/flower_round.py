"""One Flower (flwr) server or client on loopback for the transfer comparison; run with Flower's Python.

Standalone on purpose (no project imports): Flower pins an older protobuf than this project, so it lives
in its own virtualenv. The server times each round from configure_fit to aggregate_fit and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network: never phone home
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import flwr as fl
import numpy as np

MAX_MESSAGE = 1024 * 1024 * 1024


def _arrays(size_bytes: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(size_bytes // 4, dtype=np.float32)]


class TimedStrategy(fl.server.strategy.FedAvg):
    """FedAvg that keeps the client's parameters as they are (no averaging cost) and times each round."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=1,
            min_available_clients=1,
            initial_parameters=fl.common.ndarrays_to_parameters(_arrays(size_bytes)),
        )
        self.started: dict[int, float] = {}
        self.rounds: list[dict[str, float]] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        client_manager.wait_for(1)  # the connection is not part of the round
        self.started[server_round] = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        seconds = time.perf_counter() - self.started[server_round]
        if failures or not results:
            raise RuntimeError(f"Flower round {server_round} failed: {failures}")
        got = sum(len(t) for t in results[0][1].parameters.tensors)
        self.rounds.append({"round": server_round, "seconds": seconds, "bytes_up": got})
        return results[0][1].parameters, {}


class EchoClient(fl.client.NumPyClient):
    """fit() returns the arrays it was sent: the same payload goes back up."""

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return []

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        return parameters, 1, {}


def serve(port: int, size_bytes: int, rounds: int) -> None:
    strategy = TimedStrategy(size_bytes)
    fl.server.start_server(
        server_address=f"127.0.0.1:{port}",
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
        grpc_max_message_length=MAX_MESSAGE,
    )
    sent = sum(len(t) for t in strategy.initial_parameters.tensors) if strategy.initial_parameters else 0
    print(json.dumps({"flwr": fl.__version__, "bytes_down": sent, "rounds": strategy.rounds}), flush=True)


def client(port: int) -> None:
    fl.client.start_client(
        server_address=f"127.0.0.1:{port}",
        client=EchoClient().to_client(),
        grpc_max_message_length=MAX_MESSAGE,
        insecure=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size-bytes", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.role == "server":
        serve(args.port, args.size_bytes, args.rounds)
    else:
        client(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
