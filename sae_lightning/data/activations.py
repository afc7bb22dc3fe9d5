"""A LightningDataModule that streams an activation cache (see shards.py) from memory maps.

Split: the cache's last ``test_tokens`` tokens are the test split (the headline figures), the
``val_tokens`` before them validation, the ``calibration_tokens`` before those calibrate
thresholds, the rest (cut to whole batches) is training. The held-out splits are read in a
fixed permutation of their own tokens (seeded by ``data.seed``),
so that a validation or calibration batch mixes many contexts as a training batch does (read in
order, a batch of 1024 tokens would be ~8 neighbouring contexts of one document).

Training order: batch j of an endless stream; epoch e = j // n_batches. Each epoch cuts the
training tokens into blocks of one batch, permutes the blocks (seed, e), groups them in
windows of ``shuffle_buffer_tokens`` and permutes the tokens inside each window (seed, e, w):
a batch mixes tokens of many far-apart contexts, only one window's pages are read at a time
(the bounded buffer), every training token comes exactly once per epoch, and batch j is a
pure function of (seed, j): so the position saved with a checkpoint restores the stream
exactly. Rank r of W trains batches r, r+W, ...; loader workers split a rank's batches.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..spec import setting
from . import DataSpec, Downstream, data_kind
from .cache_identity import check_matches
from .harvest_spec import HarvestSpec
from .shards import ShardReader, fingerprint, read_manifest, verify_cache
from .stream import StreamingDataModule


@dataclass(kw_only=True)
class DownstreamSpec:
    """ΔCE / loss recovered of a causal model's cache (see callbacks/downstream.py)."""

    enabled: bool = True  # measure ΔCE and KL with the SAE spliced into the cache's causal model
    during_training: bool = True  # also at each validation during training (else only the final figures)
    contexts: int = setting(16, ge=1)  # at each validation during training
    final_contexts: int = setting(128, ge=1)  # for the final figures in metrics.json


# the seed stream of each held-out split's permutation (with data.seed)
HELDOUT_STREAMS = {"validation": 11, "calibration": 13, "test": 17}


def token_contexts(folder: Path, manifest: dict[str, Any]) -> np.ndarray:
    """For every token of the cache, the global row of the token-id arrays (the context) it was
    harvested from: a context keeps its ids that are not padding (-1) nor dropped."""
    dropped = np.asarray(manifest["harvest"]["dropped_token_ids"], dtype=np.int64)
    counts = []
    for entry in manifest["shards"]:
        ids = np.load(Path(folder) / entry["ids"]["file"])
        counts.append(((ids >= 0) & ~np.isin(ids, dropped)).sum(axis=1))
    per_row = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    return np.repeat(np.arange(per_row.size, dtype=np.int64), per_row)


@data_kind("activations")
@dataclass(kw_only=True)
class ActivationsData(DataSpec):
    """``data.kind = activations``: an activation cache, harvested on first use when a harvest
    section says how."""

    path: str = setting(allowed="the folder of an activation cache")  # the cache folder (harvested there if missing)
    d_model: int | None = setting(
        None, ge=1, allowed="null (the cache's) or an integer >= 1"
    )  # checked against the cache
    seed: int = 0  # the shuffle order
    shuffle_buffer_tokens: int = setting(262144, ge=1)  # tokens mixed at a time (the loader's memory bound)
    verify: Literal["checksum", "size"] = "checksum"  # how the shards are checked when the cache opens
    harvest: HarvestSpec | None = None  # how to make the cache when it is missing (None: only read)
    downstream: DownstreamSpec = setting(default_factory=DownstreamSpec)

    def build(self) -> ActivationsDataModule:
        return ActivationsDataModule(self)


class Order:
    """The global token indices of training batch j (see the module docstring)."""

    def __init__(self, n_batches: int, batch_size: int, window_batches: int, seed: int, order_seed: int = 0):
        self.nb, self.B, self.m, self.seed = n_batches, batch_size, max(1, window_batches), seed
        # the generators' keys: order seed 0 keeps the order of runs made before seeds drew it
        self.key = [seed, order_seed] if order_seed else [seed]
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._blocks: dict[int, np.ndarray] = {}

    def _block_perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._blocks:
            self._blocks = {epoch: np.random.default_rng([*self.key, epoch]).permutation(self.nb)}
        return self._blocks[epoch]

    def window(self, epoch: int, w: int) -> np.ndarray:
        """All token indices of window w of an epoch, in their shuffled order."""
        if (epoch, w) not in self._cache:
            blocks = self._block_perm(epoch)[w * self.m : (w + 1) * self.m]
            tokens = (blocks[:, None] * self.B + np.arange(self.B)[None, :]).reshape(-1)
            perm = np.random.default_rng([*self.key, epoch, w]).permutation(len(tokens))
            self._cache = {(epoch, w): tokens[perm]}
        return self._cache[(epoch, w)]

    def batch(self, j: int) -> np.ndarray:
        epoch, i = divmod(j, self.nb)
        w, p = divmod(i, self.m)
        return self.window(epoch, w)[p * self.B : (p + 1) * self.B]


class CacheBatches:
    """Global training batch j: the cache's tokens at ``order.batch(j)``, with their gradients
    (an (x, ∇ₓL) pair) when a ``gradients`` reader is given."""

    def __init__(self, reader: ShardReader, order: Order, gradients: ShardReader | None = None):
        self.reader, self.order, self.gradients = reader, order, gradients

    def __call__(self, j: int) -> Tensor | tuple[Tensor, Tensor]:
        index = self.order.batch(j)
        if self.gradients is None:
            return self.reader.gather(index)
        return self.reader.gather(index), self.gradients.gather(index)


class ActivationsDataModule(StreamingDataModule):
    prefetch_factor = 4

    def __init__(self, spec: ActivationsData):
        super().__init__()
        self.spec, self.path = spec, Path(spec.path).expanduser()
        self.batch_size, self.num_workers = spec.batch_size, spec.num_workers
        self.harvest_spec = spec.harvest
        self.manifest: dict[str, Any] | None = read_manifest(self.path)
        self._reader: ShardReader | None = None
        self._val: Tensor | None = None
        self._token_contexts: np.ndarray | None = None
        self._gradients: ShardReader | None = None  # set by use_gradients()
        self._restored: dict[str, Any] | None = None
        if self.manifest is None and self.harvest_spec is None:
            raise DataError(
                f"no activation cache at {self.path} (no manifest.json) and no data.harvest section to make "
                "one: harvest it first (python harvest.py data=...) or point data.path at a cache"
            )
        if self.manifest is not None:
            self._check_d_model(self.manifest["d_model"])
            if self.harvest_spec is not None:
                check_matches(self.manifest, self.harvest_spec, self.path)

    # ---- the cache ------------------------------------------------------------------------------
    def _check_d_model(self, d: int) -> None:
        want = self.spec.d_model
        if want is not None and want != d:
            raise ConfigError("data.d_model", want, f"null or {d}: the cache {self.path} holds d_model {d}")

    def ready(self) -> bool:
        m = self.manifest
        return (
            m is not None
            and m.get("complete", False)
            and (
                self.harvest_spec is None
                or m["tokens"] >= self.harvest_spec.token_budget
                or m.get("corpus_exhausted", False)
            )
        )

    def prepare_data(self) -> None:
        """Harvest on first use (and finish an interrupted harvest); a no-op once the cache is
        complete. In a multi-process run only local rank 0 harvests; the others wait."""
        if self.ready():
            return
        if self.harvest_spec is None:
            raise DataError(
                f"the activation cache at {self.path} is incomplete (its harvest was stopped) and this data "
                "config has no harvest section to finish it: re-run the harvest command that made it"
            )
        rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        if rank == 0:
            from .harvest import harvest

            print(f"activation cache {self.path} is {'incomplete' if self.manifest else 'missing'}: harvesting it now")
            harvest(self.path, self.harvest_spec)
        else:
            while not self.ready():
                time.sleep(5)
                self.manifest = read_manifest(self.path)
        self.manifest = read_manifest(self.path)
        if self.manifest is None:
            raise DataError(f"no activation cache at {self.path} (no manifest.json) after its harvest")
        self._check_d_model(self.manifest["d_model"])

    def complete_manifest(self) -> dict[str, Any]:
        """The manifest of the cache, harvested first if it is missing or incomplete."""
        if not self.ready():
            self.prepare_data()
        assert self.manifest is not None  # prepare_data raised otherwise
        return self.manifest

    def open(self) -> None:
        """Harvest the cache if it is missing or incomplete, then check it against its manifest
        (shapes, dtypes, sizes, checksums) and split it: every DataError before training."""
        self.prepare_data()
        _ = self.reader

    @property
    def reader(self) -> ShardReader:
        if self._reader is None:
            manifest = self.complete_manifest()
            verify_cache(self.path, manifest, checksum=self.spec.verify == "checksum")
            reader = ShardReader(self.path, manifest)
            self._split(reader.n_tokens)  # a DataError leaves the reader unopened
            self._reader = reader
        return self._reader

    def _split(self, n: int) -> None:
        B = self.batch_size
        val, cal, test = self.spec.val_tokens, self.spec.calibration_tokens, self.spec.n_test
        self.n_batches = (n - test - val - cal) // B
        if self.n_batches < 1:
            raise DataError(
                f"activation cache {self.path} holds {n} tokens: too few for data.test_tokens={test} + "
                f"data.val_tokens={val} + data.calibration_tokens={cal} + one training batch of {B}; harvest more "
                "(data.harvest.token_budget) or lower those"
            )
        self.train_tokens = self.n_batches * B
        end = n - test
        self.ranges = {"calibration": (end - val - cal, end - val), "validation": (end - val, end), "test": (end, n)}
        self.cal_range, self.val_range = self.ranges["calibration"], self.ranges["validation"]
        window = max(1, self.spec.shuffle_buffer_tokens // B)
        self.order = Order(self.n_batches, B, window, self.spec.seed, self.spec.order_seed or 0)

    @property
    def d_model(self) -> int:
        return (self.manifest or self.complete_manifest())["d_model"]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.manifest or self.complete_manifest())

    # ---- what training asks for (DataSource) -------------------------------------------------
    true_features = None

    def hierarchy(self) -> None:
        """Real activations have no known feature hierarchy."""
        return None

    def downstream(self) -> Downstream | None:
        """The cache, when its model is causal and the downstream loss is on."""
        down = self.spec.downstream
        if self.manifest is None or not self.manifest["harvest"]["lm"].get("causal") or not down.enabled:
            return None
        rows = {split: self.split_rows(split) for split in ("validation", "test")}
        return Downstream(self.path, self.manifest, down.contexts, down.final_contexts, down.during_training, rows)

    def split_rows(self, split: Literal["validation", "test"]) -> np.ndarray:
        """The context rows (of the cache's token ids) whose kept tokens all lie in ``split``, in order."""
        _ = self.reader  # opens the cache and sets the split
        if self._token_contexts is None:
            self._token_contexts = token_contexts(self.path, self.manifest or self.complete_manifest())
        tc, (start, stop) = self._token_contexts, self.ranges[split]
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        rows = np.unique(tc[start:stop])
        straddle = {int(tc[start])} if start > 0 and tc[start - 1] == tc[start] else set()
        if stop < tc.size and tc[stop] == tc[stop - 1]:
            straddle.add(int(tc[stop - 1]))
        return rows[~np.isin(rows, list(straddle))]

    def _sample_index(self, n: int) -> np.ndarray:
        _ = self.reader  # opens the cache and sets the split
        n = min(n, self.train_tokens)
        return np.sort(np.random.default_rng([self.spec.seed, 7]).choice(self.train_tokens, n, replace=False))

    def sample(self, n: int) -> Tensor:
        """Training tokens for initialisation: n spread uniformly at random (fixed by data.seed)."""
        return self.reader.gather(self._sample_index(n))

    # ---- gradients (a cache harvested with data.harvest.gradients=true) ---------------------------
    def has_gradients(self) -> bool:
        return bool((self.manifest or self.complete_manifest()).get("gradients"))

    def use_gradients(self) -> None:
        """Training batches become (x, ∇ₓL) pairs (train.py checks :meth:`has_gradients` first,
        naming the key that asks for them)."""
        if not self.has_gradients():
            super().use_gradients()  # refuses: no gradients here
        self._gradients = ShardReader(self.path, self.manifest or self.complete_manifest(), part="gradients")

    def sample_gradients(self, n: int) -> Tensor:
        """∇ₓL of the tokens :meth:`sample` returns."""
        grads = self._gradients or ShardReader(self.path, self.manifest or self.complete_manifest(), "gradients")
        return grads.gather(self._sample_index(n))

    def heldout_index(self, split: Literal["validation", "calibration", "test"]) -> np.ndarray:
        """The global token indices of a held-out split in the order they are read: a permutation
        of the split's range, fixed by (data.seed, split)."""
        _ = self.reader  # opens the cache and sets the split
        start, stop = self.ranges[split]
        rng = np.random.default_rng([self.spec.seed, HELDOUT_STREAMS[split]])
        return start + rng.permutation(stop - start)

    def test_tensor(self) -> Tensor:
        return self.reader.gather(self.heldout_index("test"))

    def contexts(self, split: str) -> Tensor:
        """The row of the cache's token ids (one context) each token of ``split`` came from."""
        if self._token_contexts is None:
            self._token_contexts = token_contexts(self.path, self.manifest or self.complete_manifest())
        return torch.from_numpy(self._token_contexts[self.heldout_index(split)])  # type: ignore[arg-type]

    def calibration_tokens(self) -> Tensor:
        reader = self.reader  # opens the cache and sets the split that heldout_index reads
        return reader.gather(self.heldout_index("calibration"))

    def val_tensor(self) -> Tensor:
        if self._val is None:
            reader = self.reader
            self._val = reader.gather(self.heldout_index("validation"))
        return self._val

    # ---- loaders --------------------------------------------------------------------------------
    def batch_of(self) -> CacheBatches:
        return CacheBatches(self.reader, self.order, self._gradients)

    def start_position(self) -> int:
        """The position a restored checkpoint saved, else the trainer's."""
        return self._restored.pop("position") if self._restored and "position" in self._restored else self.position()

    # ---- the position in the checkpoint -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position(),
            "fingerprint": self.fingerprint,
            "seed": self.spec.seed,
            "order_seed": self.spec.order_seed or 0,
            "batch_size": self.batch_size,
            "path": str(self.path),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(
                f"the checkpoint was trained on the activation cache {state.get('path')} (fingerprint "
                f"{state.get('fingerprint')}), but data.path={self.path} holds other activations "
                f"(fingerprint {self.fingerprint}); point data.path at the checkpoint's cache"
            )
        mine = (self.spec.seed, self.spec.order_seed or 0, self.batch_size)
        theirs = (state.get("seed"), state.get("order_seed", 0), state.get("batch_size"))
        if mine != theirs:
            raise ConfigError(
                "data.seed / data.order_seed / data.batch_size",
                mine,
                f"the checkpoint's {theirs} to resume its data stream",
            )
        self._restored = state
