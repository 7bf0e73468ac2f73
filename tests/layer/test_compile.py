"""torch.compile captures the dropless grouped path in one graph (no host sync, no graph break)."""

import pytest
import torch

from moekit import MoE, MoEConfig


@pytest.mark.slow
@pytest.mark.parametrize(
    "router,dtype", [("topk", torch.float32), ("sigmoid", torch.float32), ("topk", torch.bfloat16)]
)
def test_compile_fullgraph_dropless_grouped(router, dtype):
    """fullgraph=True raises on any graph break; outputs and gradients equal eager."""
    torch._dynamo.reset()
    moe = MoE(MoEConfig(dim=32, hidden_dim=64, num_experts=8, top_k=2, router=router, backend="grouped")).to(dtype)
    compiled = torch.compile(moe, fullgraph=True)
    x = torch.randn(4, 24, 32, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    res_c = compiled(x)
    res_e = moe(x)
    torch.testing.assert_close(res_c.out, res_e.out, **tol)
    torch.testing.assert_close(res_c.aux_loss, res_e.aux_loss, **tol)
    g = torch.randn_like(x)
    gc = torch.autograd.grad(res_c.out, x, g)[0]
    ge = torch.autograd.grad(res_e.out, x, g)[0]
    torch.testing.assert_close(gc, ge, **tol)
