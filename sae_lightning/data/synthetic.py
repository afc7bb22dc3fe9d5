"""The embedded default data: synthetic activations with known ground-truth features.

Each token is a sparse positive combination of unit-norm true features plus a fixed offset
and small noise. The number of active true features per token is heavy-tailed (log-normal:
most tokens need a few latents, some need many), and features are drawn with Zipf-like
frequencies (a few common, many rare), so adaptive allocation has something to adapt to.
Everything is generated from a seed: nothing is downloaded or stored.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..errors import require
from ..spec import setting
from . import DataSpec, data_kind
from .stream import StreamingDataModule


@dataclasses.dataclass(kw_only=True)
class SyntheticSpec:
    """The generator (configs/data/synthetic.yaml composes these defaults)."""

    d_model: int = setting(128, ge=2)  # the activations' dimension
    n_features: int = setting(1024, ge=1)  # ground-truth features
    active_median: float = setting(16.0, gt=0)  # median number of active features per token (log-normal)
    active_sigma: float = setting(0.8, ge=0)  # log-normal σ: the heavier, the more tokens need many latents
    active_max: int = setting(128, ge=1)  # the most active features a token may have
    feature_zipf_alpha: float = setting(0.6, ge=0)  # feature frequency ∝ rank^-alpha
    magnitude_sigma: float = setting(0.5, ge=0)  # coefficient = exp(N(0, σ²))
    noise_std: float = setting(0.01, ge=0)  # per-dimension Gaussian noise, relative to a unit feature
    offset_norm: float = setting(2.0, ge=0)  # a fixed mean vector added to every token
    # a feature hierarchy (0: none): the most frequent features are parents, each with its own
    # children, which fire only with their parent (an active parent brings one of its children
    # with probability child_probability): what feature absorption needs (docs/data.md)
    hierarchy_parents: int = setting(0, ge=0)
    children_per_parent: int = setting(4, ge=1)  # each parent's children
    child_probability: float = setting(0.5, ge=0, le=1)  # the chance an active parent brings a child
    seed: int = 0  # the data (features and token streams); separate from the training seed

    def check(self, prefix: str = "data") -> None:
        require(
            self.active_max <= self.n_features,
            f"{prefix}.active_max",
            self.active_max,
            f"an integer in [1, data.n_features = {self.n_features}]",
        )
        tree = self.hierarchy_parents * (1 + self.children_per_parent)
        require(
            tree < self.n_features,
            f"{prefix}.hierarchy_parents",
            self.hierarchy_parents,
            f"parents whose children (data.children_per_parent = {self.children_per_parent} each) and themselves "
            f"number under data.n_features = {self.n_features}",
        )


@data_kind("synthetic")
@dataclasses.dataclass(kw_only=True)
class SyntheticData(DataSpec, SyntheticSpec):
    """``data.kind = synthetic``: the loader's keys and the generator's."""

    def build(self) -> SyntheticDataModule:
        return SyntheticDataModule(self)


class SyntheticActivations:
    """The generator: fixed features and offset from the seed; token batches on demand."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        self.features = torch.nn.functional.normalize(torch.randn(spec.n_features, spec.d_model, generator=g), dim=1)
        self.offset = torch.nn.functional.normalize(torch.randn(spec.d_model, generator=g), dim=0) * spec.offset_norm
        ranks = torch.arange(1, spec.n_features + 1, dtype=torch.float64)
        p = ranks.pow(-spec.feature_zipf_alpha)
        p = (p / p.sum())[torch.randperm(spec.n_features, generator=g)]  # frequency rank ≠ index
        # the hierarchy (none by default: then nothing below draws, and the streams are as before)
        P, c = spec.hierarchy_parents, spec.children_per_parent
        self.parents = torch.argsort(p, descending=True)[:P]  # the most frequent features
        rest = torch.argsort(p)  # the rarest first: children never fire on their own
        self.children = rest[~torch.isin(rest, self.parents)][: P * c].reshape(P, c)
        if P:
            p = p.clone()
            p[self.children.reshape(-1)] = 0
            p = p / p.sum()
        self.cdf = torch.cumsum(p, 0).to(torch.float32).contiguous()

    def batch(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """n tokens [n, d], the number of true features drawn for each [n] and the true
        coefficients [n, n_features]."""
        s = self.spec
        n_active = torch.exp(math.log(s.active_median) + s.active_sigma * torch.randn(n, generator=g))
        n_active = n_active.round().clamp(1, s.active_max).to(torch.long)
        # features drawn by frequency (inverse CDF, with replacement: a feature drawn twice
        # gets the sum of both coefficients); draws past a token's n_active are masked out
        u = torch.rand(n, s.active_max, generator=g)
        idx = torch.searchsorted(self.cdf, u).clamp_(max=s.n_features - 1)
        keep = torch.arange(s.active_max).unsqueeze(0) < n_active.unsqueeze(1)
        mags = torch.exp(s.magnitude_sigma * torch.randn(n, s.active_max, generator=g)) * keep
        coef = torch.zeros(n, s.n_features).scatter_add_(1, idx, mags)
        noise = s.noise_std * torch.randn(n, s.d_model, generator=g)
        if s.hierarchy_parents:  # each active parent brings one of its children, with probability q
            P, c = s.hierarchy_parents, s.children_per_parent
            bring = (coef[:, self.parents] > 0) & (torch.rand(n, P, generator=g) < s.child_probability)
            which = self.children[torch.arange(P), torch.randint(c, (n, P), generator=g)]  # [n, P]
            child_mags = torch.exp(s.magnitude_sigma * torch.randn(n, P, generator=g)) * bring
            coef.scatter_add_(1, which, child_mags)
        x = coef @ self.features + self.offset + noise
        return x, n_active, coef

    def with_coefficients(self, n: int, stream_seed: int, batch: int = 4096) -> tuple[Tensor, Tensor]:
        """n tokens and their true coefficients [n, n_features] (a stream of its own)."""
        g = torch.Generator().manual_seed(stream_seed)
        parts = [self.batch(min(batch, n - i), g) for i in range(0, n, batch)]
        return torch.cat([x for x, _, _ in parts]), torch.cat([c for _, _, c in parts])

    def tokens(self, n: int, stream_seed: int, batch: int = 4096) -> Tensor:
        g = torch.Generator().manual_seed(stream_seed)
        if n == 0:
            return torch.zeros(0, self.spec.d_model)
        return torch.cat([self.batch(min(batch, n - i), g)[0] for i in range(0, n, batch)])


class SyntheticBatches:
    """Global training batch i: a pure function of (data seed, order seed, i); order seed 0 gives
    the batches of the runs made before the training seed drew the order."""

    def __init__(self, source: SyntheticActivations, batch_size: int, order_seed: int = 0):
        self.source, self.batch_size, self.order_seed = source, batch_size, order_seed

    def __call__(self, i: int) -> Tensor:
        g = torch.Generator().manual_seed(self.source.spec.seed * 1_000_003 + 17 + i + self.order_seed * 7_919_000_003)
        return self.source.batch(self.batch_size, g)[0]


@dataclasses.dataclass
class Hierarchy:
    """Tokens x [N, d] of data with a feature hierarchy, which parents are active in each
    (``parent`` [N, P]), whether one of each parent's children is (``child`` [N, P]), and the
    parents' directions ([P, d])."""

    x: Tensor
    parent: Tensor
    child: Tensor
    parent_features: Tensor


CONTEXT = 128  # tokens per stand-in context of the held-out splits (see SyntheticDataModule.contexts)


class SyntheticDataModule(StreamingDataModule):
    def __init__(self, spec: SyntheticData):
        super().__init__()
        self.spec, self.batch_size, self.num_workers = spec, spec.batch_size, spec.num_workers
        self.val_tokens, self.calibration_tokens_n = spec.val_tokens, spec.calibration_tokens
        self.source = SyntheticActivations(spec)
        self._val: Tensor | None = None

    def open(self) -> None:
        """Nothing to fetch or check: the data are generated from the seed."""

    def downstream(self) -> None:
        """Synthetic data have no language model."""

    @property
    def d_model(self) -> int:
        return self.spec.d_model

    @property
    def true_features(self) -> Tensor:
        return self.source.features

    def hierarchy(self) -> Hierarchy | None:
        """Held-out tokens of a stream of their own with which parents and children are active in
        each (None without a hierarchy): what :func:`metrics.absorption` reads."""
        if not self.spec.hierarchy_parents:
            return None
        x, coef = self.source.with_coefficients(self.val_tokens, stream_seed=self.spec.seed * 1_000_003 + 7)
        src = self.source
        children = (coef[:, src.children.reshape(-1)] > 0).reshape(x.shape[0], *src.children.shape).any(2)
        return Hierarchy(x, coef[:, src.parents] > 0, children, src.features[src.parents])

    def sample(self, n: int) -> Tensor:
        """Tokens for initialisation (normalisation scale, b_pre)."""
        return self.source.tokens(n, stream_seed=self.spec.seed * 1_000_003 + 2)

    def calibration_tokens(self) -> Tensor:
        """Held-out tokens of the training distribution for threshold calibration."""
        return self.source.tokens(self.calibration_tokens_n, stream_seed=self.spec.seed * 1_000_003 + 3)

    def val_tensor(self) -> Tensor:
        if self._val is None:
            self._val = self.source.tokens(self.val_tokens, stream_seed=self.spec.seed * 1_000_003 + 1)
        return self._val

    def test_tensor(self) -> Tensor:
        return self.source.tokens(self.spec.n_test, stream_seed=self.spec.seed * 1_000_003 + 5)

    def contexts(self, split: str) -> Tensor:
        """Synthetic tokens are drawn independently: consecutive groups of CONTEXT tokens stand
        in for contexts (any grouping gives the same bootstrap in expectation)."""
        n = {"validation": self.val_tokens, "calibration": self.calibration_tokens_n, "test": self.spec.n_test}[split]
        return torch.arange(n) // CONTEXT

    def batch_of(self) -> SyntheticBatches:
        return SyntheticBatches(self.source, self.batch_size, self.spec.order_seed or 0)
