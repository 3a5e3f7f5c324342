"""Performance and scale benchmark (`python -m benchmarks.perf`): every figure a ratio to a reference."""
