"""Optuna sweeps of the sparsity–reconstruction Pareto front, driven by Hydra multirun."""
