"""moekit's Triton kernels under Triton's CPU interpreter, against the loop reference: forward
and every gradient (x, w_up, w_down, routing weights), for each activation and dtype, with
empty experts, padding rows, ragged tiles, K=1 and K=8 routing, E=1 and E=128, and the fused
gather / row scale / scatter switched on and off.

The kernels are imported under TRITON_INTERPRET=1 by this folder's conftest.py, which also sets
it around each test (and only there).
"""

import pytest
import torch

pytest.importorskip("triton")

from moekit.kernels import expert_ffn  # noqa: E402
from moekit.kernels.reference import loop_ffn  # noqa: E402
from moekit.kernels.triton import INTERPRETED, triton_ffn, triton_moe_ffn  # noqa: E402
from moekit.kernels.triton.schedule import max_tiles, tile_table  # noqa: E402
from moekit.layer.dispatch import combine, dispatch, plan_dispatch  # noqa: E402
from moekit.layer.experts import ACTIVATIONS, GATED, GroupedExperts  # noqa: E402

if not INTERPRETED:
    pytest.skip("the Triton kernels are not interpreted in this process (see conftest.py)", allow_module_level=True)

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2}


def _close(got, ref, dtype, what):
    """Max-abs error relative to the reference's largest entry."""
    got, ref = got.double(), ref.double()
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-6)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e} ({dtype})"


def _weights(E, D, F, kind, dtype):
    H = 2 * F if GATED[kind] else F
    w_up = torch.randn(E, D, H, dtype=torch.float64) / D**0.5
    w_down = torch.randn(E, F, D, dtype=torch.float64) / F**0.5
    return w_up.to(dtype), w_down.to(dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _check_ffn(x_RD, counts_E, w_up, w_down, kind, dtype):
    """triton_ffn == loop_ffn (evaluated in fp64 on the same rounded inputs), forward and grads."""
    act = ACTIVATIONS[kind]  # the torch reference takes the function, the kernels the name
    x, wu, wd = _leaf(x_RD), _leaf(w_up), _leaf(w_down)
    y = triton_ffn(x, counts_E, wu, wd, kind)
    g = torch.randn(y.shape, dtype=torch.float64)
    gx, gu, gd = torch.autograd.grad(y, (x, wu, wd), g.to(dtype))
    xr, wur, wdr = (_leaf(t.double()) for t in (x_RD, w_up, w_down))
    yr = loop_ffn(xr, counts_E, wur, wdr, act)
    if yr.requires_grad:
        rx, ru, rd = torch.autograd.grad(yr, (xr, wur, wdr), g.to(dtype).double())
    else:  # no real rows: the reference returns constant zeros
        rx, ru, rd = (torch.zeros_like(t) for t in (xr, wur, wdr))
    assert y.dtype == dtype and y.shape == yr.shape
    for name, a, b in [("y", y, yr), ("dx", gx, rx), ("dw_up", gu, ru), ("dw_down", gd, rd)]:
        _close(a, b, dtype, name)
    valid = int(counts_E.sum())
    assert (y[valid:] == 0).all() and (gx[valid:] == 0).all()  # padding rows: zero out, zero grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_matches_loop_ffn(kind, dtype):
    """Every activation and dtype: an empty expert, ragged tiles (R=43, blocks of 16), 4 padding rows."""
    E, D, F = 4, 24, 20
    counts_E = torch.tensor([17, 0, 3, 19])
    x = torch.randn(43, D, dtype=torch.float64).to(dtype)
    _check_ffn(x, counts_E, *_weights(E, D, F, kind, dtype), kind, dtype)


def _counts_from_routing(T, K, E, drop):
    """Counts for T tokens routed to K distinct random experts each, ``drop`` slots emptied."""
    experts_TK = torch.rand(T, E).argsort(-1)[:, :K]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E)
    for _ in range(drop):  # an emptied slot leaves a padding row at the end
        busy = (counts_E > 0).nonzero().reshape(-1)
        counts_E[busy[torch.randint(len(busy), ())]] -= 1
    return counts_E, T * K


@pytest.mark.parametrize(
    "T,K,E,drop,kind",
    [
        (23, 1, 1, 0, "swiglu"),  # one expert, K=1
        (37, 1, 6, 5, "gelu"),  # K=1, padding
        (7, 8, 8, 0, "swiglu"),  # K=8 of 8: every expert busy, R=56
        (6, 8, 16, 3, "geglu"),  # K=8 of 16, padding
        (9, 2, 128, 2, "relu"),  # E=128, most experts empty
        (5, 1, 3, 5, "swiglu"),  # every row padding: no real tile at all
    ],
)
def test_routing_shapes(T, K, E, drop, kind):
    counts_E, R = _counts_from_routing(T, K, E, drop)
    D, F = (16, 16) if E > 16 else (32, 24)
    x = torch.randn(R, D, dtype=torch.float64)
    _check_ffn(x, counts_E, *_weights(E, D, F, kind, torch.float64), kind, torch.float64)


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("scatter", [False, True])
def test_fused_gather_scale_scatter(gather, scale, scatter):
    """y[out_idx[r]] = s[r] * ffn(x[token_idx[r]]) against gather -> loop_ffn -> scale -> scatter,
    with grads for x, both weights and s; slots emptied by a capacity sort last as padding."""
    T, K, E, D, F, dtype = 11, 3, 5, 16, 24, torch.float64
    kind = "swiglu" if scale else "gelu"
    experts_TK = torch.rand(T, E).argsort(-1)[:, :K]
    experts_TK[torch.rand(T, K) < 0.2] = E  # empty slots
    plan = plan_dispatch(experts_TK, E, has_empty=True)
    R, S = plan.order_R.numel(), T * K
    x_TD = torch.randn(T, D, dtype=dtype)
    x_src = x_TD if gather else x_TD[plan.token_R]  # without the fused gather: already gathered rows
    s_R = torch.rand(R, dtype=dtype)
    w_up, w_down = _weights(E, D, F, kind, dtype)

    x, wu, wd, s = _leaf(x_src), _leaf(w_up), _leaf(w_down), _leaf(s_R)
    y = triton_moe_ffn(
        x,
        plan.counts_E,
        wu,
        wd,
        kind,
        token_idx_R=plan.token_R if gather else None,
        scale_R=s if scale else None,
        out_idx_R=plan.order_R if scatter else None,
        num_out_rows=S if scatter else None,
    )
    xr, wur, wdr, sr = (_leaf(t) for t in (x_src, w_up, w_down, s_R))
    y_ref = loop_ffn(xr[plan.token_R] if gather else xr, plan.counts_E, wur, wdr, ACTIVATIONS[kind])
    if scale:
        y_ref = y_ref * sr[:, None]
    if scatter:
        y_ref = y_ref.new_zeros(S, D).index_copy(0, plan.order_R, y_ref)
    g = torch.randn_like(y_ref)
    inputs, ref_inputs = [x, wu, wd], [xr, wur, wdr]
    if scale:
        inputs.append(s), ref_inputs.append(sr)
    grads = torch.autograd.grad(y, inputs, g)
    ref_grads = torch.autograd.grad(y_ref, ref_inputs, g)
    _close(y, y_ref, dtype, "y")
    for name, a, b in zip(["dx", "dw_up", "dw_down", "ds"], grads, ref_grads):
        _close(a, b, dtype, name)


@pytest.mark.parametrize("slot_mode", [True, False])
def test_fused_path_makes_combine_a_sum_over_k(slot_mode):
    """Gather + routing-weight scale + scatter to slot order: moekit's dispatch -> experts ->
    combine becomes one call and a plain sum over K (fp32, all gradients), in slot mode (top_k:
    the input gradient summed per token in the kernel's slot order) and with an explicit gather."""
    T, K, E, D, F, dtype = 13, 2, 4, 16, 16, torch.float32
    kind = "swiglu"
    experts_TK = torch.rand(T, E).argsort(-1)[:, :K]
    experts_TK[3, 1] = E  # one empty slot
    weights_TK = torch.rand(T, K, dtype=dtype)
    plan = plan_dispatch(experts_TK, E, has_empty=True)
    w_up, w_down = _weights(E, D, F, kind, dtype)
    x_TD = torch.randn(T, D, dtype=dtype)

    x, wu, wd, w = _leaf(x_TD), _leaf(w_up), _leaf(w_down), _leaf(weights_TK)
    routing = dict(top_k=K) if slot_mode else dict(token_idx_R=plan.token_R, num_out_rows=T * K)
    y_SD = triton_moe_ffn(
        x, plan.counts_E, wu, wd, kind, scale_R=w.reshape(-1)[plan.order_R], out_idx_R=plan.order_R, **routing
    )
    out = y_SD.view(T, K, D).sum(1)
    xr, wur, wdr, wr = (_leaf(t) for t in (x_TD, w_up, w_down, weights_TK))
    ref = combine(loop_ffn(dispatch(xr, plan), plan.counts_E, wur, wdr, ACTIVATIONS[kind]), plan, wr)
    g = torch.randn_like(ref)
    for name, a, b in zip(
        ["out", "dx", "dw_up", "dw_down", "dweights"],
        (out, *torch.autograd.grad(out, (x, wu, wd, w), g)),
        (ref, *torch.autograd.grad(ref, (xr, wur, wdr, wr), g)),
    ):
        _close(a, b, dtype, name)


def test_partial_requires_grad_and_no_grad():
    """Only the weights need grads; then no grads at all (inference keeps no pre-activation)."""
    E, D, F, kind = 3, 16, 16, "geglu"
    counts_E = torch.tensor([4, 9, 0])
    x = torch.randn(15, D, dtype=torch.float64)
    w_up, w_down = _weights(E, D, F, kind, torch.float64)
    wu, wd = _leaf(w_up), _leaf(w_down)
    y = triton_ffn(x, counts_E, wu, wd, kind)
    gu, gd = torch.autograd.grad(y.square().sum(), (wu, wd))
    wur, wdr = _leaf(w_up), _leaf(w_down)
    ru, rd = torch.autograd.grad(loop_ffn(x, counts_E, wur, wdr, ACTIVATIONS[kind]).square().sum(), (wur, wdr))
    _close(gu, ru, torch.float64, "dw_up")
    _close(gd, rd, torch.float64, "dw_down")
    with torch.no_grad():
        y0 = triton_ffn(x, counts_E, w_up, w_down, kind)
    assert not y0.requires_grad
    _close(y0, y.detach(), torch.float64, "no_grad y")


def test_expert_ffn_and_grouped_experts_route_to_triton():
    """expert_ffn(..., backend='triton') and GroupedExperts(backend='triton') run these kernels."""
    experts = GroupedExperts(4, 16, 16, "swiglu").double()
    counts_E = torch.tensor([5, 0, 6, 2])
    x = torch.randn(14, 16, dtype=torch.float64)
    ref = loop_ffn(x, counts_E, experts.w_up, experts.w_down, ACTIVATIONS["swiglu"])
    _close(expert_ffn(x, counts_E, experts.w_up, experts.w_down, "swiglu", "triton"), ref, torch.float64, "expert_ffn")
    _close(experts(x, counts_E, backend="triton"), ref, torch.float64, "GroupedExperts")


def test_slot_mode_bad_arguments_raise():
    x, counts_E = torch.randn(4, 16), torch.tensor([3, 5])
    w_up, w_down = torch.randn(2, 16, 32), torch.randn(2, 16, 16)
    act = "swiglu"
    slots = torch.arange(8)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        triton_moe_ffn(x, counts_E, w_up, w_down, act, out_idx_R=slots, top_k=0)
    with pytest.raises(ValueError, match="needs out_idx_R"):
        triton_moe_ffn(x, counts_E, w_up, w_down, act, top_k=2)
    with pytest.raises(ValueError, match="no token_idx_R"):
        triton_moe_ffn(x, counts_E, w_up, w_down, act, out_idx_R=slots, token_idx_R=slots // 2, top_k=2)
    with pytest.raises(ValueError, match="T \\* top_k = 8"):
        triton_moe_ffn(x, counts_E, w_up, w_down, act, out_idx_R=slots, top_k=2, num_out_rows=9)


def test_unknown_activation_and_bad_shapes_raise():
    x, counts_E = torch.randn(4, 16), torch.tensor([2, 2])
    w_up, w_down = torch.randn(2, 16, 32), torch.randn(2, 16, 16)
    with pytest.raises(ValueError, match="activations"):
        triton_ffn(x, counts_E, w_up, w_down, torch.tanh)
    with pytest.raises(ValueError, match="activations"):
        triton_ffn(x, counts_E, w_up, w_down, lambda h: h)
    with pytest.raises(ValueError, match="H = F"):
        triton_ffn(x, counts_E, w_up, w_down, "relu")  # non-gated needs H == F


@pytest.mark.parametrize("block_m", [1, 16])
def test_tile_table_covers_each_expert_once(block_m):
    counts_E = torch.tensor([0, 17, 1, 0, 32, 5])
    R = int(counts_E.sum()) + 3
    t = tile_table(counts_E, R, block_m)
    assert t.num_tiles == max_tiles(R, 6, block_m)
    covered = torch.zeros(R, dtype=torch.int64)
    owner = torch.full((R,), -1)
    for e, lo, hi in zip(t.expert_N.tolist(), t.start_N.tolist(), t.end_N.tolist()):
        rows = torch.arange(lo, min(lo + block_m, hi))
        covered[rows] += 1
        owner[rows] = e
    ends = counts_E.cumsum(0)
    assert (covered[: ends[-1]] == 1).all() and (covered[ends[-1] :] == 0).all()
    assert (owner[: ends[-1]] == torch.repeat_interleave(torch.arange(6), counts_E)).all()


def test_auto_backend_on_cpu_stays_grouped():
    """'auto' is 'grouped' on CPU and CUDA alike (the Triton kernels are opt-in); on a CPU input
    the 'triton' backend is accepted only under the interpreter (as in this folder's tests)."""
    from moekit.kernels import resolve_backend, triton_available

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "grouped"
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "grouped"
    assert triton_available()  # interpreted here
    assert resolve_backend("triton", cpu) == "triton"


def test_fused_path_computes_in_the_autocast_dtype():
    """Under autocast the fused kernels get autocast's dtype, as a matmul would (here fp16 on
    CPU): the same bits as feeding fp16 rows without autocast."""
    experts = GroupedExperts(4, 16, 16, "swiglu")
    T, K = 9, 2
    experts_TK = torch.rand(T, 4).argsort(-1)[:, :K]
    plan = plan_dispatch(experts_TK, 4)
    w_TK = torch.rand(T, K)
    x = torch.randn(T, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        got = experts.fused(x, plan, w_TK)
        got_rows = experts(x[plan.token_R], plan.counts_E, backend="triton")
    assert got.dtype == torch.float16 and got_rows.dtype == torch.float16
    assert torch.equal(got, experts.fused(x.half(), plan, w_TK))
    assert torch.equal(got_rows, experts(x[plan.token_R].half(), plan.counts_E, backend="triton"))


@pytest.mark.parametrize(
    "extra",
    [
        dict(top_k=2),
        dict(top_k=2, capacity_factor=0.75, num_shared_experts=1),
        dict(router="expert_choice", top_k=2),
        dict(top_k=1, router="switch", expert="gelu"),
    ],
)
def test_moe_layer_with_the_fused_triton_path_equals_the_loop(extra):
    """MoE(backend='triton') runs dispatch, experts and combine in the fused kernels: same output
    and gradients as the loop backend, with drops, empty slots and shared experts."""
    from moekit import MoE, MoEConfig

    torch.manual_seed(0)
    cfg = dict(dim=16, hidden_dim=16, num_experts=6, router_dtype="float64", balance_loss_weight=0.1)
    cfg.update(extra)
    ref = MoE(MoEConfig(**cfg, backend="loop")).double()
    fast = MoE(MoEConfig(**cfg, backend="triton")).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    xa, xb = _leaf(x), _leaf(x)
    a, b = ref(xa), fast(xb)
    _close(b.out, a.out, torch.float64, "output")
    g = torch.randn_like(a.out)
    ((a.out * g).sum() + a.aux_loss).backward()
    ((b.out * g).sum() + b.aux_loss).backward()
    _close(xb.grad, xa.grad, torch.float64, "input gradient")
    mine = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        _close(mine[name].grad, p.grad, torch.float64, f"gradient of {name}")


@pytest.mark.parametrize("D,F,E,K", [(64, 48, 8, 2), (32, 64, 16, 4)])
def test_fused_path_keeps_less_for_backward_than_the_dense_chain(D, F, E, K):
    """The issue's memory target: the fused layer (router included) keeps no more activation
    memory for backward than the same-FLOPs dense chain x_(TK)D -> SwiGLU -> W2 (which keeps its
    (TK, 2F) pre-activation, (TK, F) activation and product, and its (TK, D) output): no
    gathered (TK, D) input copy and no (TK, D) expert output is saved. The grouped path keeps both."""
    from moekit import MoE, MoEConfig
    from moekit.analysis.saved import saved_activation_bytes

    T = 48
    kept = {}
    for backend in ("grouped", "triton"):
        moe = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, backend=backend))
        x = torch.randn(T, D, requires_grad=True)
        kept[backend] = saved_activation_bytes(lambda: moe(x).out, [x, *moe.parameters(), *moe.buffers()])
    xd = torch.randn(T * K, D, requires_grad=True)
    w1, w2 = torch.randn(D, 2 * F, requires_grad=True), torch.randn(F, D, requires_grad=True)

    def dense():
        g, u = (xd @ w1).chunk(2, -1)
        return (torch.nn.functional.silu(g) * u) @ w2

    kept["dense"] = saved_activation_bytes(dense, [xd, w1, w2])
    assert kept["dense"] == T * K * (4 * F + D) * 4  # the counter sees exactly the chain's tensors
    assert kept["triton"] <= 0.75 * kept["dense"], kept
    assert kept["triton"] < kept["grouped"] - T * K * D * 4, kept  # at least the (TK, D) copy less
