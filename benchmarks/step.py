"""Benchmark of the training step: ``python -m benchmarks.step``.

For each dictionary size: the measured matmul peak, a naive dense-autograd TopK reference step
(written here), and the real training step of each variant, run by a Lightning ``Trainer``
exactly as ``train.py`` runs it (forward, losses, backward, gradient clipping, Adam). Every
row of one size (each variant in each dtype) is timed side by side with the others, each in a
fresh process, one step of each in turn (:func:`time_interleaved`; ``--same-process``: one
after the other in this one). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from sae_lightning.atomic import atomic_write_json
from sae_lightning.glibc_malloc import keep_freed_memory
from sae_lightning.losses import total_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---- measurement helpers ---------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dense_product(B: int, d: int, F: int, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """The step's one dense product, [B, d] @ [d, F], at this dtype, on random operands."""
    a = torch.randn(B, d, device=device, dtype=dtype)
    w = torch.randn(F, d, device=device, dtype=dtype)

    def product() -> None:
        a @ w.t()
        _sync(device)

    return product


def matmul_peak(B: int, d: int, F: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of the step's one dense product, [B, d] @ [d, F], at this dtype."""
    return 2 * B * d * F / _median_time(dense_product(B, d, F, dtype, device), device)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the process's peak RSS on CPU
    (Linux: VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = self._status("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = self._status("VmHWM:") - self.base
        return False


class StepTimer(L.Callback):
    """Wall time of each training batch (forward, losses, backward, optimiser); ``before`` is
    called ahead of each batch (outside its time), ``after`` with each batch's time."""

    def __init__(self, before: Callable[[], None] | None = None, after: Callable[[float], None] | None = None):
        self.times: list[float] = []
        self.before, self.after = before, after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.before is not None:
            self.before()
        _sync(pl_module.device)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync(pl_module.device)
        self.times.append(time.perf_counter() - self._t)
        if self.after is not None:
            self.after(self.times[-1])


def bare_trainer(max_steps: int, callbacks: list, accelerator: str = "cpu", progress: bool = False) -> L.Trainer:
    """A Trainer that only trains: no logger, checkpoints, validation or summary."""
    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        callbacks=callbacks,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator=accelerator,
        devices=1,
    )


def size_arguments(p: argparse.ArgumentParser, latents: int = 8192) -> None:
    """--d, --latents (one size), --k, --batch and --variants, the defaults of the benchmarks."""
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--latents", type=int, default=latents)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--variants", nargs="+", default=["topk", "mutual_choice", "feature_choice"])


def write_rows(path: str, a: argparse.Namespace, rows: list[dict]) -> None:
    """The rows of a one-size benchmark as JSON, with its size."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"d": a.d, "n_latents": a.latents, "k": a.k, "batch": a.batch, "rows": rows})
    print(f"written {out}")


# ---- the naive reference ---------------------------------------------------------------------
def naive_topk_step_fn(x: torch.Tensor, F: int, k: int):
    """Dense autograd TopK: z = relu(x W_encᵀ + b), keep the top k per row by a dense mask,
    decode with a dense matmul, Adam (default implementation), unit-norm decoder."""
    d = x.shape[1]
    W_enc = torch.nn.Parameter(torch.randn(F, d, device=x.device) / d**0.5)
    b_enc = torch.nn.Parameter(torch.zeros(F, device=x.device))
    W_dec = torch.nn.Parameter(torch.nn.functional.normalize(W_enc.detach().clone(), dim=1))
    b_pre = torch.nn.Parameter(torch.zeros(d, device=x.device))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_pre], lr=1e-4, eps=6.25e-10)

    def step():
        z = torch.relu((x - b_pre) @ W_enc.t() + b_enc)
        idx = torch.topk(z, k, dim=1).indices
        code = z * torch.zeros_like(z).scatter_(1, idx, 1.0)
        x_hat = code @ W_dec + b_pre
        loss = (x_hat - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g = W_dec.grad
            assert g is not None
            g -= (g * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


# ---- the real step ---------------------------------------------------------------------------
def build_module(variant: str, d: int, F: int, k: int, B: int, dtype: str, extra: list[str]):
    from sae_lightning.config import load_config
    from sae_lightning.module import SAEModule

    overrides = [
        f"variant={variant}",
        f"variant.k={k}",
        f"model.n_latents={F}",
        f"data.batch_size={B}",
        f"data.d_model={d}",
        "data.n_features=4096",
        f"model.affinity_dtype={dtype}",
        "model.init_sample_tokens=4096",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    config = load_config(cfg)
    dm = config.data.build()
    module = SAEModule(config, d)
    return module, dm


def time_variant(
    variant,
    d,
    F,
    k,
    B,
    dtype,
    steps,
    warmup,
    device,
    extra,
    profile=False,
    block: str | None = None,
    before: Callable[[], None] | None = None,
    after: Callable[[float], None] | None = None,
    fresh: bool = False,
) -> dict:
    """One variant's real training step; ``block``: a ``model.block_latents`` value (``null``
    for the dense matrix), None for the configured default; ``before``, ``after``: the
    :class:`StepTimer`'s; ``fresh``: a new batch at every step (else 4 batches in turn, which
    many warm-up steps would overfit)."""
    extra = [*extra, f"model.block_latents={block}"] if block is not None else list(extra)
    module, dm = build_module(variant, d, F, k, B, dtype, extra)
    g = torch.Generator().manual_seed(0)
    batches = [dm.source.batch(B, g)[0] for _ in range(4)]
    module.init_from_data(torch.cat(batches))
    alloc_times: list[float] = []
    allocate = module.allocator.allocate

    def timed_allocate(z, *args, **kwargs):
        _sync(module.device)
        t = time.perf_counter()
        out = allocate(z, *args, **kwargs)
        _sync(module.device)
        alloc_times.append(time.perf_counter() - t)
        return out

    module.allocator.allocate = timed_allocate
    timer = StepTimer(before, after)
    stream: Any
    if fresh:  # a new batch every step, drawn outside the timed part (the same ones for every row)
        stream = FreshBatches(dm.source, B, steps + warmup)
    else:
        stream = [batches[i % len(batches)] for i in range(steps + warmup)]  # a list of batches is a dataset
    loader: torch.utils.data.DataLoader = torch.utils.data.DataLoader(stream, batch_size=None)
    trainer = bare_trainer(steps + warmup, [timer], device.type)
    with PeakMemory(device) as mem:
        trainer.fit(module, train_dataloaders=loader)
    step_times = timer.times[warmup:]
    alloc_train = alloc_times[-steps:]
    result = {
        "variant": variant,
        "block_latents": module.block_latents(B),  # the effective one (None: the dense matrix)
        "block_setting": module.model_spec.block_latents,
        "step_s": statistics.median(step_times),
        "alloc_s": statistics.median(alloc_train),
        "peak_memory_bytes": mem.peak,
    }
    if profile:
        if before is not None:  # (its turn, under time_interleaved)
            before()
        result["profile"] = profile_step(module, batches[0])
    return result


class FreshBatches(torch.utils.data.IterableDataset):
    """``n`` batches of ``B`` tokens drawn one by one from a data source's stream, as they are
    read (seed 1: not the batches the SAE was initialised from); ``--fresh`` here, and
    benchmarks.rescore's training runs."""

    def __init__(self, source, B: int, n: int):
        self.source, self.B, self.n = source, B, n

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for _ in range(self.n):
            yield self.source.batch(self.B, g)[0]


def _serve(conn, threads: int, kwargs: dict) -> None:
    """A timing process: :func:`time_variant`, each batch when the parent says so. Sends
    "ready" before each batch (its set-up, or the fetch of that batch, done: a fresh batch is
    drawn between two timed steps, which must not run beside another process's step), each
    batch's time, then ("result", row) or ("error", message)."""
    try:
        torch.set_num_threads(threads)
        keep_freed_memory()  # as main() and train.py do
        torch.set_float32_matmul_precision("high")

        # when this process was busy (the system-wide monotonic clock): its timed steps, and its
        # work between them (the next batch's fetch), which must not overlap another's steps
        steps: list[tuple[float, float]] = []
        between: list[tuple[float, float]] = []

        def before() -> None:
            if steps:
                between.append((steps[-1][1], time.monotonic()))
            conn.send("ready")
            conn.recv()
            steps.append((time.monotonic(), float("nan")))

        def after(seconds: float) -> None:
            steps[-1] = (steps[-1][0], time.monotonic())
            conn.send(seconds)

        row = time_variant(**{**kwargs, "device": torch.device(kwargs["device"])}, before=before, after=after)
        conn.send(("result", {**row, "busy": {"steps": steps, "between": between}}))
    except BaseException as e:  # noqa: BLE001 — the parent reports it
        conn.send(("error", f"{type(e).__name__}: {e}"))


def time_interleaved(
    rows: list[dict], steps: int, warmup: int, probe: Callable[[], object] | None = None
) -> tuple[list[dict], list[float]]:
    """:func:`time_variant` for each of ``rows`` (its keyword arguments), each in a fresh
    (spawned) process, their batches interleaved: one batch of each in turn, the others
    waiting. So a variant is timed neither on the C heap another left (up to ~10 % measured
    in one process) nor at another time of a shared machine than the variants it is compared
    with. ``probe`` (e.g. the fp32 matmul that "peak %" divides by) is timed here once per
    round of measured steps, in turn with them: the rows and the probe's times."""
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    try:
        for kwargs in rows:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(theirs, torch.get_num_threads(), {**kwargs, "device": str(kwargs["device"])})
            )
            proc.start()
            theirs.close()  # (so that a process that dies is an EOFError here, not a wait)
            procs.append(proc)
            conns.append(mine)

        def reply(i: int, want: type):
            try:
                msg = conns[i].recv()
            except EOFError:
                raise RuntimeError(f"the timing process of {rows[i]['variant']} ended without a result") from None
            if isinstance(msg, tuple) and msg[0] == "error":
                raise RuntimeError(f"timing {rows[i]['variant']}: {msg[1]}")
            assert isinstance(msg, want), msg
            return msg

        for i in range(len(rows)):
            reply(i, str)  # "ready"
        probed: list[float] = []
        results: list[dict | None] = [None] * len(rows)
        for step in range(warmup + steps):
            for i, conn in enumerate(conns):
                conn.send(None)
                reply(i, float)
                # what it does next (fetch its next batch, or end its run) done before another's step
                if step + 1 < warmup + steps or rows[i].get("profile"):
                    reply(i, str)  # "ready"
                else:
                    results[i] = reply(i, tuple)[1]
            if probe is not None and step >= warmup:
                t = time.perf_counter()
                probe()
                probed.append(time.perf_counter() - t)
        for i, conn in enumerate(conns):  # one at a time: a profile runs in its turn
            if results[i] is None:
                conn.send(None)
                results[i] = reply(i, tuple)[1]
    except BaseException:
        for proc in procs:  # the others wait for their next turn
            proc.kill()
        raise
    finally:
        for proc in procs:
            proc.join()
    done = [r for r in results if r is not None]
    busy = [r.pop("busy") for r in done]
    for i, r in enumerate(done):  # its timed steps beside another process's work: none, by the protocol
        others = [span for j, b in enumerate(busy) if j != i for span in b["between"]]
        r["overlap_s"] = sum(_overlap(step, span) for step in busy[i]["steps"] for span in others)
    return done, probed


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Seconds two spans of time share (0 where one has no end: NaN)."""
    shared = min(a[1], b[1]) - max(a[0], b[0])
    return shared if shared > 0 else 0.0


def profile_step(module, x: torch.Tensor, rows: int = 15) -> str:
    """Operator table of one training step (one forward, every loss term, backward, Adam)."""
    opt = torch.optim.Adam(module.parameters(), lr=1e-5, fused=True)

    def step():
        out, _ = module.forward_step(x, "batch", update=False)
        terms = {name: t(out, module.sae, module.stats) for name, t in module.losses.items()}
        loss = total_loss(module.losses, terms, module.sae)
        opt.zero_grad()
        loss.backward()
        module.sae.project_decoder_grad()
        opt.step()
        module.sae.renormalise_decoder()

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=384, help="d_model of the synthetic inputs")
    p.add_argument(
        "--latents", type=int, nargs="+", default=[8192, 16384], help="dictionary sizes F to time, one table each"
    )
    p.add_argument("--k", type=int, default=32, help="target active latents per token")
    p.add_argument("--batch", type=int, default=4096, help="tokens per training step")
    p.add_argument("--steps", type=int, default=16, help="measured steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="a new batch at every step (default: 4 batches in turn); with many --warmup steps, the step "
        "of a training run whose latent densities have settled",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["topk", "mutual_choice", "feature_choice", "jumprelu", "matryoshka_mutual_choice"],
        help="variants to time",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=["float32", "bfloat16"],
        help="dtypes of the affinity matrix batch selection reads (model.affinity_dtype), each timed",
    )
    p.add_argument(
        "--block-latents",
        nargs="+",
        default=["default"],
        help="model.block_latents values to time each variant with: default (the configured one), "
        "null (the dense [B, F] matrix) or an integer",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-reference", action="store_true", help="skip the naive dense reference")
    p.add_argument("--profile", action="store_true", help="print an operator profile of each variant's step")
    p.add_argument(
        "--same-process",
        action="store_true",
        help="time the variants one after the other in this process (default: each in a fresh process, "
        "their steps interleaved)",
    )
    p.add_argument("--out", default="outputs/bench/bench.json", help="where the JSON report goes")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the variants, e.g. optim.fused=false")
    a = p.parse_args(argv)
    keep_freed_memory()  # as train.py does
    device = torch.device(a.device)
    torch.set_float32_matmul_precision("high")
    report = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "d": a.d,
        "k": a.k,
        "batch": a.batch,
        "dtype": a.dtype,
        "steps": a.steps,
        "warmup": a.warmup,
        "fresh": a.fresh,
        "sizes": [],
    }
    for F in a.latents:
        peak = matmul_peak(a.batch, a.d, F, torch.float32, device)  # "peak %" is against fp32's
        nnz = a.k * a.batch
        # FLOPs a step cannot avoid: the dense encoder product, and the sparse products
        # (decode, its two gradients, the encoder's weight gradient): 2·nnz·d each.
        flops = 2 * a.batch * a.d * F + 4 * 2 * nnz * a.d
        size = {"n_latents": F, "matmul_peak_flops": peak, "step_flops": flops, "rows": []}
        if not a.no_reference:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(a.batch, a.d, generator=g).to(device)
            with PeakMemory(device) as mem:
                t = _median_time(naive_topk_step_fn(x, F, a.k), device, repeats=a.steps, warmup=a.warmup)
            size["rows"].append(
                {"variant": "naive_dense_topk", "step_s": t, "alloc_s": float("nan"), "peak_memory_bytes": mem.peak}
            )
        if "bfloat16" in a.dtype:
            size["matmul_peak_flops_bf16"] = matmul_peak(a.batch, a.d, F, torch.bfloat16, device)
        group = [  # every row of this size, timed side by side
            dict(
                variant=v,
                d=a.d,
                F=F,
                k=a.k,
                B=a.batch,
                dtype=dtype,
                steps=a.steps,
                warmup=a.warmup,
                device=device,
                extra=a.overrides,
                profile=a.profile,
                block=None if block == "default" else block,
                fresh=a.fresh,
            )
            for dtype in a.dtype
            for v in a.variants
            for block in a.block_latents
        ]
        if a.same_process:
            timed = [time_variant(**kwargs) for kwargs in group]
        else:  # the fp32 product timed between the rounds of steps: "peak %" in their conditions
            product = dense_product(a.batch, a.d, F, torch.float32, device)
            product()
            timed, probed = time_interleaved(group, a.steps, a.warmup, probe=product)
            size["matmul_peak_flops_interleaved"] = 2 * a.batch * a.d * F / statistics.median(probed)
        size["rows"].extend({**row, "dtype": kwargs["dtype"]} for row, kwargs in zip(timed, group))
        ref = next((r["step_s"] for r in size["rows"] if r["variant"] == "naive_dense_topk"), None)
        for r in size["rows"]:
            # TopK's step with the same block setting and dtype (the naive reference: the first TopK row)
            topk = next(
                (
                    t["step_s"]
                    for t in size["rows"]
                    if t["variant"] == "topk"
                    and r.get("block_setting", t.get("block_setting")) == t.get("block_setting")
                    and r.get("dtype", t["dtype"]) == t["dtype"]
                ),
                None,
            )
            # the same variant and block setting in fp32
            fp32 = next(
                (
                    t["step_s"]
                    for t in size["rows"]
                    if t["variant"] == r["variant"]
                    and t.get("dtype") == "float32"
                    and t.get("block_setting") == r.get("block_setting")
                ),
                None,
            )
            r["tokens_per_s"] = a.batch / r["step_s"]
            r["speedup_vs_naive"] = ref / r["step_s"] if ref else None
            r["time_vs_topk"] = r["step_s"] / topk if topk else None
            r["speedup_vs_fp32"] = fp32 / r["step_s"] if fp32 and "dtype" in r else None
            r["peak_share"] = flops / r["step_s"] / size.get("matmul_peak_flops_interleaved", peak)
            r["peak_share_warm"] = flops / r["step_s"] / peak  # against the product timed back to back
            # the step over its own dtype's encoder product alone, timed back to back (issue 42's measure)
            own = size.get("matmul_peak_flops_bf16") if r.get("dtype") == "bfloat16" else peak
            r["time_vs_product"] = r["step_s"] / (2 * a.batch * a.d * F / own) if own else None
        report["sizes"].append(size)
        print_size(size, a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"written {out}")
    return report


def print_size(size: dict, a) -> None:
    bf16 = size.get("matmul_peak_flops_bf16")
    print(
        f"\nd={a.d} F={size['n_latents']} k={a.k} B={a.batch}: matmul peak "
        f"{size['matmul_peak_flops'] / 1e9:.0f} GFLOP/s (fp32)"
        + (f", {bf16 / 1e9:.0f} (bf16)" if bf16 else "")
        + f", step FLOPs {size['step_flops'] / 1e9:.1f} G"
    )
    if "matmul_peak_flops_interleaved" in size:
        here = size["matmul_peak_flops_interleaved"] / 1e9
        print(
            f'  fp32 matmul between the rounds of steps: {here:.0f} GFLOP/s ("peak %" divides by it; '
            '"warm %" by the one above, timed back to back)'
        )
    head = (
        f"  {'variant':<18}{'dtype':>9}{'block':>8}{'tokens/s':>10}{'step ms':>9}{'alloc ms':>10}"
        f"{'vs naive':>10}{'vs topk':>9}{'vs fp32':>9}{'peak %':>8}{'warm %':>8}{'x prod':>8}{'mem MB':>8}"
    )
    print(
        head + "   (*: model.block_latents=auto; vs topk: its dtype's; peak %: of fp32's; "
        "x prod: step / its dtype's encoder product)"
    )
    for r in size["rows"]:
        vs_naive = f"{r['speedup_vs_naive']:.2f}x" if r["speedup_vs_naive"] else "-"
        vs_topk = f"{r['time_vs_topk']:.2f}" if r["time_vs_topk"] else "-"
        vs_fp32 = f"{r['speedup_vs_fp32']:.2f}x" if r.get("speedup_vs_fp32") else "-"
        vs_prod = f"{r['time_vs_product']:.2f}" if r.get("time_vs_product") else "-"
        alloc = "-" if r["alloc_s"] != r["alloc_s"] else f"{1000 * r['alloc_s']:.1f}"
        block = ("dense" if r.get("block_latents") is None else str(r["block_latents"])) + (
            "*" if r.get("block_setting") == "auto" else ""
        )
        print(
            f"  {r['variant']:<18}{r.get('dtype', 'float32'):>9}{block:>8}{r['tokens_per_s']:>10.0f}"
            f"{1000 * r['step_s']:>9.1f}{alloc:>10}{vs_naive:>10}{vs_topk:>9}{vs_fp32:>9}"
            f"{100 * r['peak_share']:>7.1f}%{100 * r['peak_share_warm']:>7.1f}%{vs_prod:>8}"
            f"{r['peak_memory_bytes'] / 2**20:>8.0f}"
        )
        if "profile" in r:
            print(r["profile"])


if __name__ == "__main__":
    main()
