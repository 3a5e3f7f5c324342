"""Shared domain of the FCL system: config, model zoo, FM features, package serde, data, metrics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fcl")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
