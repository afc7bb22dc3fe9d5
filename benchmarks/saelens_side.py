"""The SAELens half of ``benchmarks.parity``, run with the Python of ``.venv-saelens`` (never
imported by the project; sae-lens is not a dependency of ours).

    .venv-saelens/bin/python benchmarks/saelens_side.py train PLAN.json OUT_DIR [SEED]
    .venv-saelens/bin/python benchmarks/saelens_side.py evaluate PLAN.json SAE_DIR... > figures.json

``PLAN.json`` (written by ``benchmarks.parity``) names the cache's shard files, the training
token indices batch by batch (``order.npy``: the exact sequence our trainer reads) and the
held-out token range. ``train`` runs SAELens's own ``SAETrainer`` on a ``TopKTrainingSAE``
with its defaults but the plan's k, width and learning rate, on those batches, and saves the
inference model. ``evaluate`` scores SAELens-format folders (its own, and ours exported by
``sae_lightning.interop``) with one function: FVU, mean L0 and the share of latents that
never fire on the held-out tokens.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def load_plan(path):
    plan = json.loads(Path(path).read_text())
    shards = [np.load(f, mmap_mode="r") for f in plan["shards"]]
    starts = np.cumsum([0] + [s.shape[0] for s in shards])
    return plan, shards, starts


def gather(shards, starts, index):
    index = np.asarray(index)
    out = np.empty((len(index), shards[0].shape[1]), dtype=np.float32)
    which = np.searchsorted(starts, index, side="right") - 1
    for s in np.unique(which):
        sel = which == s
        out[sel] = shards[s][index[sel] - starts[s]]
    return torch.from_numpy(out)


def train(plan_path, out_dir, seed=None):
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.set_num_threads(int(json.loads(Path(plan_path).read_text()).get("threads", 2)))
    plan, shards, starts = load_plan(plan_path)
    order = np.load(plan["order"])  # [steps, B]
    torch.manual_seed(plan["seed"] if seed is None else int(seed))
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=plan["d_model"], d_sae=plan["n_latents"], k=plan["k"]))
    batches = (gather(shards, starts, order[j]) for j in range(order.shape[0]))
    cfg = SAETrainerConfig(
        total_training_samples=int(order.size),
        train_batch_size_samples=int(order.shape[1]),
        lr=plan["lr"],
        lr_end=plan["lr"],  # a constant rate (the runner sets this; the bare trainer asserts it is set)
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    sae.save_inference_model(out_dir)
    (Path(out_dir) / "train.json").write_text(
        json.dumps({"train_seconds": seconds, "tokens": int(order.size), "tokens_per_second": order.size / seconds})
    )


@torch.no_grad()
def evaluate(plan_path, folders):
    from sae_lens import SAE

    plan, shards, starts = load_plan(plan_path)
    a, b = plan["heldout"]
    x = gather(shards, starts, np.arange(a, b))
    out = {}
    for folder in folders:
        sae = SAE.load_from_disk(folder, device="cpu")
        se = tot = 0.0
        l0 = 0
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
        mean = x.mean(0)
        for chunk in x.split(4096):
            z = sae.encode(chunk)
            x_hat = sae.decode(z)
            se += float((chunk - x_hat).pow(2).sum())
            tot += float((chunk - mean).pow(2).sum())
            l0 += int((z != 0).sum())
            fired |= (z != 0).any(0)
        out[folder] = {"fvu": se / tot, "l0": l0 / x.shape[0], "never_fired": float((~fired).float().mean())}
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(*sys.argv[2:5])
    else:
        evaluate(sys.argv[2], sys.argv[3:])
