"""The same training path on a GPU (skipped without CUDA, as in CI)."""

import pytest
import torch

from sae_lightning.allocators import ALLOCATORS, get_allocator_class
from sae_lightning.sae import SparseAutoencoder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_cuda_step_matches_cpu(name):
    torch.manual_seed(0)
    B, d, F, k = 256, 64, 1024, 8
    sae = SparseAutoencoder(d, F, normalisation="none", b_pre_init="zeros")
    x = torch.randn(B, d)
    alloc = get_allocator_class(name).from_dict({"k": k}, F, B)

    def step(model, xs, device):
        model = model.to(device)
        a = alloc.to(device)
        z = model.affinities(xs.to(device), layout=a.layout)
        code = model.code(xs.to(device), z, a.allocate(z), a.layout)
        loss = (model.decode(code) - xs.to(device)).pow(2).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss.item(), [g.cpu() for g in grads], code.nnz

    cpu = step(sae, x, "cpu")
    gpu = step(sae, x, "cuda")
    assert cpu[2] == gpu[2]
    assert abs(cpu[0] - gpu[0]) <= 1e-3 * abs(cpu[0])
    for a, b in zip(cpu[1], gpu[1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
