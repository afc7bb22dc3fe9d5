"""Data sources, by kind: each is a spec (its config section) and a LightningDataModule.

A source is one module of this package that registers its spec with ``@data_kind("name")``
(every module here is imported, so nothing else needs editing) plus ``configs/data/<name>.yaml``.
Its DataModule meets :class:`DataSource`: what training reads besides the loaders.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import ConfigError, require_choice
from ..registry import Registry
from ..spec import as_dict, parse, setting

if TYPE_CHECKING:
    from torch import Tensor

DATA_KINDS = Registry("data kind")


def data_kind(name: str):
    """Register a DataSpec subclass as the spec of ``data.kind = name``."""
    return DATA_KINDS.register(name, attribute="KIND")


@dataclass(kw_only=True)
class DataSpec:
    """The keys of every data kind; a kind adds its own."""

    kind: str  # synthetic | activations (the data=... presets set it)
    batch_size: int = setting(1024, ge=1)  # tokens per training step (B)
    val_tokens: int = setting(16384, ge=1)  # the validation split's tokens
    calibration_tokens: int = setting(16384, ge=1)  # the tokens the inference thresholds are calibrated on
    # the test split, disjoint from training, calibration and validation: the headline figures
    # are measured there, while checkpoints, defaults and sweeps choose on validation; null: as
    # many as data.val_tokens; 0: none (runs from before the split had none)
    test_tokens: int | None = setting(None, ge=0, allowed="null (as many as data.val_tokens) or an integer >= 0")
    num_workers: int = setting(0, ge=0)  # DataLoader worker processes (0: in the training process)
    # the seed of the training order; null: the run's training seed, so that seeds vary the data
    # order as well as the initialisation (validation, calibration and the init sample stay fixed
    # by the data's own seed); 0 is the order of the runs made before seeds drew it
    order_seed: int | None = setting(None, ge=0, allowed="null (the training seed) or an integer >= 0")

    KIND: ClassVar[str] = ""

    @classmethod
    def from_raw(cls, raw: Any, prefix: str) -> DataSpec:
        if not isinstance(raw, dict):
            raise ConfigError(prefix, raw, "a mapping (a config section)")
        require_choice(f"{prefix}.kind", raw.get("kind"), sorted(DATA_KINDS))
        return parse(DATA_KINDS[raw["kind"]], raw, prefix, what=f"data kind {raw['kind']!r}")

    def build(self) -> DataSource:
        raise NotImplementedError(f"data kind {self.kind!r} does not build a DataModule")

    def as_dict(self) -> dict:
        return as_dict(self)

    @property
    def n_test(self) -> int:
        """Tokens of the test split (``test_tokens``; null: as many as validation)."""
        return self.val_tokens if self.test_tokens is None else self.test_tokens


@dataclass(frozen=True)
class Downstream:
    """A causal model's activation cache, described for the downstream-loss callback that
    ``train.py`` builds from it (callbacks/downstream.py): the cache, its manifest, how many
    contexts to splice into, when, and which: the last ones wholly inside the validation split
    during training, inside the test split for the final figures (``rows``)."""

    folder: Path
    manifest: dict[str, Any]
    contexts: int
    final_contexts: int
    during_training: bool
    # the cache's context rows that lie wholly in each held-out split ({} : use its last contexts)
    rows: dict[str, Any] = dataclasses.field(default_factory=dict)


class DataSource(Protocol):
    """What training asks of a data module, besides Lightning's loaders."""

    @property
    def d_model(self) -> int: ...

    @property
    def true_features(self) -> Tensor | None:
        """Ground-truth feature directions [n_features, d] when the data have them (synthetic)."""

    def hierarchy(self) -> Any:
        """Held-out tokens with their active parent and child features when the data have a
        feature hierarchy (synthetic.Hierarchy), else None."""

    def open(self) -> None:
        """Make the data ready and check them (harvest a missing cache, verify it); DataError if unusable."""

    def sample(self, n: int) -> Tensor:
        """n training tokens for initialisation."""

    def calibration_tokens(self) -> Tensor:
        """Held-out tokens of the training distribution for threshold calibration."""

    def val_tensor(self) -> Tensor:
        """The held-out validation tokens."""

    def test_tensor(self) -> Tensor:
        """The held-out test tokens (empty when ``data.test_tokens`` = 0)."""

    def contexts(self, split: str) -> Tensor:
        """The context (document window) of each token of a held-out split (``validation``,
        ``calibration`` or ``test``), in the order the split's tensor holds them: the unit a
        bootstrap resamples, since tokens of one context are correlated."""

    def downstream(self) -> Downstream | None:
        """Where a run can measure its downstream loss (a causal model's cache), or None."""

    def has_gradients(self) -> bool:
        """Whether the data hold ∇ₓL of the language model's loss beside each token."""

    def use_gradients(self) -> None:
        """Yield (x, ∇ₓL) training batches from now on (for ``variant.gradient_ranking``)."""

    def sample_gradients(self, n: int) -> Tensor:
        """∇ₓL of the n tokens that ``sample(n)`` returns."""


def build_datamodule(raw: dict, prefix: str = "data") -> DataSource:
    """Parse a data section and build its DataModule."""
    return DataSpec.from_raw(raw, prefix).build()


for _info in pkgutil.iter_modules(__path__):  # every source registers itself
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["DATA_KINDS", "DataSource", "DataSpec", "build_datamodule", "data_kind"]
