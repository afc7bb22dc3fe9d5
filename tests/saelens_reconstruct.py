"""Run by the interop test with the separate SAELens environment's Python (.venv-saelens),
never imported by the suite: load an exported folder with sae_lens.SAE.load_from_disk and
write its codes and reconstruction of the given tokens.

    .venv-saelens/bin/python tests/saelens_reconstruct.py EXPORT_DIR IN.safetensors OUT.safetensors
"""

import sys

import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

folder, inp, out = sys.argv[1:4]
sae = SAE.load_from_disk(folder, device="cpu")
x = load_file(inp)["x"]
with torch.no_grad():
    z = sae.encode(x)
    x_hat = sae.decode(z)
save_file(
    {"x_hat": x_hat.contiguous(), "l0": (z != 0).sum(1).float()}, out, metadata={"architecture": sae.cfg.architecture()}
)
print(type(sae).__name__, sae.cfg.architecture(), tuple(x_hat.shape))
