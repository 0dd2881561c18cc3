"""Benchmarks (GPU): each module has `main(argv)` that prints JSON and appends it to bench/results/<name>.json."""
