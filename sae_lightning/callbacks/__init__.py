"""Lightning callbacks: latent-statistics monitoring, threshold calibration, atomic checkpoints."""

from .calibration import ThresholdCalibration
from .checkpoint_io import AtomicCheckpointIO
from .latent_stats import LatentStatsMonitor

__all__ = ["AtomicCheckpointIO", "LatentStatsMonitor", "ThresholdCalibration"]
