"""TopK (Gao et al. 2024): at most k matches per token; the same in both modes."""

from __future__ import annotations

from torch import Tensor

from ..blockwise import AffinityBlocks, topk_per_row_blocks
from ..collective import Collective
from ..selection import topk_per_row
from ..sparse import Selection
from .base import Allocator, register


@register("topk")
class TopK(Allocator):
    def allocate(
        self,
        z: Tensor | AffinityBlocks,
        *,
        step: int = 0,
        density: Tensor | None = None,
        update: bool = False,
        collective: Collective | None = None,
    ) -> Selection:
        if isinstance(z, AffinityBlocks):
            return topk_per_row_blocks(z, self.cfg.k)[0]
        return topk_per_row(z, self.cfg.k)[0]
