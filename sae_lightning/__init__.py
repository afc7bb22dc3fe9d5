"""sae_lightning: sparse autoencoders with adaptive sparse allocation (TopK, Feature Choice,
Mutual Choice), trained with PyTorch Lightning and configured with Hydra."""

__version__ = "0.1.0"

__all__ = ["SAEModule", "SparseAutoencoder"]


def __getattr__(name: str):
    """``from sae_lightning import SAEModule`` without importing Lightning for every submodule's use."""
    if name == "SAEModule":
        from .module import SAEModule

        return SAEModule
    if name == "SparseAutoencoder":
        from .sae import SparseAutoencoder

        return SparseAutoencoder
    raise AttributeError(f"module 'sae_lightning' has no attribute {name!r}")
