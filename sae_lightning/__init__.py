"""sae_lightning: sparse autoencoders with adaptive sparse allocation (TopK, Feature Choice,
Mutual Choice), trained with PyTorch Lightning and configured with Hydra."""

__version__ = "0.1.0"
