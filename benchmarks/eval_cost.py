"""What the evaluation after training costs, and what its two shortcuts save:
``python -m benchmarks.eval_cost RUN [RUN ...] [--contexts N]`` (docs/performance.md).

For each finished run:

- the description length's precision search (description_length.choose_precision) with the
  certificate (:meth:`HeldOutCodes.passes_for_sure`) and without it (every grid step decoded), in
  threshold and batch mode on the test split: decodes, seconds, and that Δ and FVU are equal;
- for a run on a causal model's cache, the downstream loss of the final validation
  (callbacks/downstream.py) over ``--contexts`` test contexts, the clean pass and the two modes'
  splices, with full forward passes and with the blocks before the site replayed: seconds, and
  that every figure is equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any


def dl_search(module, x) -> list[dict]:
    from sae_lightning.description_length import choose_precision, held_out_codes

    rows = []
    for mode in ("threshold", "batch"):
        codes = held_out_codes(module, x, mode)
        got = {}
        for name, c in (("decode every step", dataclasses.replace(codes, directions=None)), ("certified", codes)):
            calls = [0]
            plain = c.fvu

            def counted(values, plain=plain, calls=calls):
                calls[0] += 1
                return plain(values)

            object.__setattr__(c, "fvu", counted)
            t = time.perf_counter()
            result = choose_precision(c, 0.01)
            got[name] = (result, calls[0], time.perf_counter() - t)
        (a, na, ta), (b, nb, tb) = got["decode every step"], got["certified"]
        rows.append({"mode": mode, "same": a == b, "decodes": (na, nb), "seconds": (round(ta, 2), round(tb, 2))})
    return rows


def downstream(module, source, contexts: int) -> dict | None:
    from sae_lightning.callbacks.downstream import MODES, DownstreamLoss

    down = source.downstream()
    if down is None:
        return None
    cb = DownstreamLoss.of(down, module.batch_size)[0]
    cb.use(contexts, "test")
    cb._load(module.device)
    module.eval()

    def splicer(mode):
        return lambda x: module.reconstruct(x, mode)

    replacers = {"clean": None, **{str(mode): splicer(mode) for mode in MODES}}
    t = time.perf_counter()
    full = cb._losses(replacers)
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    _, recorded = cb.site_pass()
    replayed = cb._losses(replacers, recorded=recorded)
    t_replay = time.perf_counter() - t
    return {
        "contexts": contexts,
        "same": full == replayed,
        "seconds": {"full passes": round(t_full, 1), "site pass + replayed": round(t_replay, 1)},
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--contexts", type=int, default=32, help="test contexts for the downstream loss")
    a = p.parse_args(argv)
    from sae_lightning.runs import load_run

    out = []
    for run in a.runs:
        module, data = load_run(run)
        source = data.build()
        source.open()
        row: dict[str, Any] = {"run": str(run), "dl_search": dl_search(module, source.test_tensor())}
        row["downstream"] = downstream(module, source, a.contexts)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    main()
