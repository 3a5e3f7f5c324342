"""Shared domain of the FCL system: config, model zoo, FM features, package serde, data, metrics."""
