"""Benchmarks and measurements, run from the repository root: ``python -m benchmarks.<name>``.

- ``step``: the training step of each allocator against a naive dense step (docs/performance.md);
- ``data_pipeline``: harvest against the bare forward pass, the loader against training;
- ``claims``: the paper's claims measured on three datasets (docs/results.md).
"""
