"""Lightning callbacks: latent-statistics monitoring, threshold calibration, atomic checkpoints, downstream loss."""

from .calibration import ThresholdCalibration
from .checkpoint_io import AtomicCheckpointIO
from .downstream import DownstreamLoss
from .latent_stats import LatentStatsMonitor

__all__ = ["AtomicCheckpointIO", "DownstreamLoss", "LatentStatsMonitor", "ThresholdCalibration"]
