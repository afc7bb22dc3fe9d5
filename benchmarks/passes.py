"""Passes over the [B, F] affinity matrix in one training step: ``python -m benchmarks.passes``.

Every aten operation of one step (forward, each loss term, backward, Adam) is seen through a
``TorchDispatchMode``; an operation that reads or writes a tensor of at least half the matrix's
entries (B·F/2) moves about that much memory and is counted, by operator: each such input is a
read, each such output a write. Views (transpose, slice, reshape) move nothing and are not
counted; gathers (``index``, ``gather``) read only what they pick and are listed apart. What an
operator does inside (``topk`` may read its input more than once) is not visible here: the
count is a lower bound on the memory traffic, and the same rule for every variant.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sae_lightning.losses import total_loss

from .step import build_module, size_arguments, write_rows

GATHERS = {"index.Tensor", "gather.default", "index_select.default", "take.default"}


class PassCounter(TorchDispatchMode):
    """Memory traffic of the operations that touch the matrix, in units of the fp32 matrix
    (4·B·F bytes): an input that lies in a matrix-sized storage (z′ itself, or a chunk of its
    rows) counts its own bytes (a whole read of z′ counts 1, a chunk of 1/16 of its rows 1/16);
    a gather from it counts the bytes it copies out (its output); an output of >= 1/64 of the
    matrix's bytes counts its bytes as a write (a bool mask of every entry: 0.25)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.reads: defaultdict[str, float] = defaultdict(float)
        self.writes: defaultdict[str, float] = defaultdict(float)
        self.gathers: defaultdict[str, float] = defaultdict(float)

    def _in_matrix(self, t: torch.Tensor) -> bool:
        # at least half of the fp32 matrix (a sparse tensor, e.g. a sampled product's pattern, is not)
        return t.layout == torch.strided and t.untyped_storage().nbytes() >= 2 * self.size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        name = f"{func._schema.name.split('::')[-1]}.{func._overloadname}"
        inputs = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor) and self._in_matrix(t)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.layout == torch.strided]
        unit = 4 * self.size
        if name in GATHERS:
            if inputs:
                self.gathers[name] += sum(t.numel() * t.element_size() for t in outs) / unit
            return out
        read = sum(t.numel() * t.element_size() for t in inputs) / unit
        written = sum(b for b in (t.numel() * t.element_size() for t in outs) if b >= unit // 64) / unit
        if read:
            self.reads[name] += read
        if written and (read or written >= 0.5):
            self.writes[name] += written
        return out


def count_step(
    variant: str, d: int, F: int, k: int, B: int, extra: list[str], steps_before: int = 2, dtype: str = "float32"
) -> dict:
    """Passes in one training step of ``variant`` (default losses, unless ``extra`` says), with
    selection reading z′ in ``dtype`` (``model.affinity_dtype``)."""
    module, dm = build_module(variant, d, F, k, B, dtype, extra)
    g = torch.Generator().manual_seed(0)
    batches = [dm.source.batch(B, g)[0] for _ in range(4)]
    module.init_from_data(torch.cat(batches))
    opt = torch.optim.Adam(module.parameters(), lr=1e-5, fused=True)

    def step(i: int) -> None:
        out, _ = module.forward_step(batches[i % len(batches)], "batch", update=True)
        terms = {name: t(out, module.sae, module.stats) for name, t in module.losses.items()}
        loss = total_loss(module.losses, terms, module.sae)
        opt.zero_grad()
        loss.backward()
        module.sae.project_decoder_grad()
        opt.step()
        module.sae.renormalise_decoder()
        module.stats.update(out.code.fire_counts(), B)

    for i in range(steps_before):
        step(i)
    counter = PassCounter(B * F)
    with counter:
        step(steps_before)
    return {
        "variant": variant,
        "dtype": dtype,
        "reads": dict(counter.reads),
        "writes": dict(counter.writes),
        "gathers": dict(counter.gathers),
        "passes": sum(counter.reads.values()) + sum(counter.writes.values()) + sum(counter.gathers.values()),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size_arguments(p)
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model.affinity_dtype of the step"
    )
    p.add_argument("--out", default="outputs/bench/passes.json")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. variant.losses=null")
    a = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    rows = [count_step(v, a.d, a.latents, a.k, a.batch, a.overrides, dtype=a.dtype) for v in a.variants]
    mb = a.batch * a.latents * 4 / 1e6
    print(f"\nd={a.d} F={a.latents} k={a.k} B={a.batch} ({a.dtype}): one pass over an fp32 z' moves {mb:.0f} MB")
    for r in rows:
        print(f"  {r['variant']}: {r['passes']:.2f} passes (matrix-sized reads, writes and gathers)")
        for op in sorted(set(r["reads"]) | set(r["writes"])):
            print(f"    {op:<32} reads {r['reads'].get(op, 0):>5.2f}  writes {r['writes'].get(op, 0):>5.2f}")
        for op, n in sorted(r["gathers"].items()):
            print(f"    {op:<32} gathers {n:>5.2f}")
    write_rows(a.out, a, rows)
    return rows


if __name__ == "__main__":
    main()
