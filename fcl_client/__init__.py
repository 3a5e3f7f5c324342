"""The fcl edge client: `fcl-client` (cli) and the `FclClient` library API (sdk)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fcl_client.sdk import FclClient, Prediction, Registration, TaskResult

__all__ = ["FclClient", "Prediction", "Registration", "ScopedPrediction", "TaskResult"]


def __getattr__(name: str) -> Any:
    # imported on first use: `fcl_client.connection` and friends stay free of torch and transformers
    if name in __all__:
        from fcl_client import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
