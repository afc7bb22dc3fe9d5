"""TopK (Gao et al. 2024): at most k matches per token; the same in both modes."""

from __future__ import annotations

from torch import Tensor

from ..blockwise import AffinityBlocks
from ..collective import Collective
from ..rescore import Exact, topk_rows
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
        exact: Exact | None = None,
    ) -> Selection:
        return topk_rows(z, self.cfg.k, exact)[0]
