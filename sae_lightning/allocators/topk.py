"""TopK (Gao et al. 2024): at most k matches per token; the same in both modes."""

from __future__ import annotations

from torch import Tensor

from ..blockwise import AffinityBlocks
from ..rescore import topk_rows
from ..sparse import Selection
from .base import PLAIN, Allocator, BatchContext, register


@register("topk")
class TopK(Allocator):
    def allocate(
        self,
        z: Tensor | AffinityBlocks,
        batch: BatchContext = PLAIN,
    ) -> Selection:
        return topk_rows(z, self.cfg.k, batch.exact)[0]
