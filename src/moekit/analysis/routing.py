"""Which experts take which tokens: collect the routing of a trained MoE model on fixed validation
windows, and the pure statistics computed from it (load, domain preference, mutual information,
characteristic tokens, dead and overloaded experts).

Every statistic counts routed *slots*: a token sent to K experts counts once at each of them, and
empty slots (the sentinel expert id E: dropped over capacity, not picked under expert choice) are
left out. Without capacity limits the slot counts of a layer sum to tokens x K.

Shape legend: T routed tokens (windows x sequence length), K slots per token, E routed experts,
D domains, V vocabulary, N routed (non-empty) slots, B batch, S sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..data.stream import TokenData, balanced_windows, window
from ..layer import MoE

LN2 = math.log(2.0)
LIFT_PRIOR = 5.0  # pseudo-occurrences at the expert's overall rate that smooth each token's lift
ROUTE_BYTES = 256 * 2**20  # activation memory one routing forward may take (see routing_batch_size)


@dataclass
class RoutingData:
    """The routing of T validation tokens through every MoE layer of a model (CPU tensors)."""

    layers: list  # block index of each MoE layer
    num_experts: list  # E of each MoE layer
    experts: list  # per MoE layer: experts_TK int64, E = empty slot
    entropy: list  # per MoE layer: entropy_T float64, entropy (nats) of the token's routing distribution
    token_T: Tensor  # int64 token id
    domain_T: Tensor  # int64 index into ``domains``
    domains: list  # domain names, e.g. ["prose", "code"]
    windows: int  # validation windows routed
    seq_len: int
    top_k: int  # experts per token asked for (the layer's K may differ: expert choice uses K = E)


# ---------------------------------------------------------------------------------------------- collection
def available_windows(val_tokens: int, seq_len: int) -> int:
    """How many non-overlapping windows of ``seq_len`` input tokens (each with its next token)
    a validation stream of ``val_tokens`` tokens holds: the most :func:`collect_routing` routes."""
    return max(0, (val_tokens - 1) // seq_len) if seq_len > 0 else 0


@torch.no_grad()
def collect_routing(
    model, data: TokenData, windows: int, seq_len: int, batch_size: int, device="cpu", top_k: Optional[int] = None
) -> RoutingData:
    """Run ``model`` in eval mode on ``windows`` fixed validation windows (split evenly over the
    domains, see :func:`moekit.data.stream.balanced_windows`), ``batch_size`` windows per forward
    (:func:`routing_batch_size` gives a memory-bounded one), and record each MoE layer's
    expert per (token, slot), with the token id, domain and routing entropy of each token.
    ``windows`` may be at most :func:`available_windows` of the validation stream: more would
    count the same tokens several times (and grow memory with no new information)."""
    _check_windows(model, data, windows, seq_len, batch_size)
    moe_blocks = [b for b in model.blocks if isinstance(b.ffn, MoE)]
    if not moe_blocks:
        raise ValueError("the model has no MoE layer")
    starts = balanced_windows(data.val_domain_N, seq_len, windows)
    experts, entropies, tokens, domains = _route_windows(
        model, moe_blocks, data, starts, seq_len, batch_size, device, top_k
    )
    k = top_k if top_k is not None else moe_blocks[0].ffn.cfg.top_k
    return RoutingData(
        layers=[b.layer for b in moe_blocks],
        num_experts=[b.ffn.cfg.num_experts for b in moe_blocks],
        experts=experts,
        entropy=entropies,
        token_T=tokens,
        domain_T=domains,
        domains=list(data.domains),
        windows=int(starts.numel()),
        seq_len=seq_len,
        top_k=int(k),
    )


def routing_batch_size(
    model, seq_len: int, batch_size: int, top_k: Optional[int] = None, budget_bytes: int = ROUTE_BYTES
) -> int:
    """Windows per no-grad forward for :func:`collect_routing`: as many as an upper estimate of the
    forward's activations (experts per token: ``top_k`` or the layers') fits in ``budget_bytes``,
    and at least ``batch_size`` (the training batch). Exactly ``batch_size`` where a token's routing
    depends on the rest of the batch (a capacity limit in eval mode, a batch-dependent router such
    as expert choice): the report then routes the windows as training and evaluation did.

    The estimate per token, in the parameters' element size: logits 2V, attention and norms 16D,
    each of the K slots 2D + 6F (dispatched rows, the up projection [gate | up], activation, down
    projection), router 4E. The default model (V=4096, D=128, K=4, F=128, E=16) needs an
    estimated 58 KB per token (47 KB measured as peak RSS growth), so 256 MiB routes 36 windows
    of 128 tokens at once where training batches 16."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes or any(m.cfg.capacity_factor_for(False) is not None or m.router.batch_dependent for m in moes):
        return batch_size
    cfg, elem = model.cfg, next(model.parameters()).element_size()
    K = max(top_k or 0, *(m.cfg.top_k for m in moes))
    F = max(m.cfg.hidden_dim for m in moes)
    E = max(m.cfg.num_experts for m in moes)
    per_token = elem * (2 * cfg.vocab_size + 16 * cfg.dim + K * (2 * cfg.dim + 6 * F) + 4 * E)
    return max(batch_size, budget_bytes // (per_token * seq_len))


def _check_windows(model, data: TokenData, windows: int, seq_len: int, batch_size: int) -> None:
    """Raise ValueError unless the sizes are positive and ``windows`` fit the validation stream and the model."""
    if windows <= 0 or seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"windows, seq_len and batch_size must be positive; got {windows}, {seq_len}, {batch_size}")
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    if data.val_ids_N.numel() < seq_len + 1:
        raise ValueError(
            f"the validation stream ({data.val_ids_N.numel()} tokens) is shorter than seq_len+1 ({seq_len + 1})"
        )
    most = available_windows(data.val_ids_N.numel(), seq_len)
    if windows > most:
        raise ValueError(
            f"windows must be at most {most} (the non-overlapping windows of {seq_len} tokens in the "
            f"{data.val_ids_N.numel():,}-token validation stream); got {windows}"
        )


def _route_windows(
    model, moe_blocks: list, data: TokenData, starts: Tensor, seq_len: int, batch_size: int, device, top_k
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """(experts_TK per layer, entropy_T per layer, token_T, domain_T): the model run in eval mode over
    the windows at ``starts``, the router entropies taken by forward hooks (removed afterwards)."""
    was_training = model.training
    model.eval()
    entropies: list[list[Tensor]] = [[] for _ in moe_blocks]
    experts: list[list[Tensor]] = [[] for _ in moe_blocks]
    tokens, domains = [], []

    def hook_for(i: int):
        def hook(_module, _inputs, routing):
            entropies[i].append(_entropy_nats(routing.probs_TE).cpu())

        return hook

    handles = [b.ffn.router.register_forward_hook(hook_for(i)) for i, b in enumerate(moe_blocks)]
    try:
        for i in range(0, starts.numel(), batch_size):
            s_B = starts[i : i + batch_size]
            x_BS, _ = window(data.val_ids_N, s_B, seq_len)
            dom_BS, _ = window(data.val_domain_N.long(), s_B, seq_len)  # the domain of the routed (input) token
            out = model(x_BS.to(device), top_k=top_k)
            moe_out = [r for r in out.moe if r is not None]
            for j, r in enumerate(moe_out):
                experts[j].append(r.experts_TK.detach().cpu())
            tokens.append(x_BS.reshape(-1))
            domains.append(dom_BS.reshape(-1))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(e) for e in experts], [torch.cat(h) for h in entropies], torch.cat(tokens), torch.cat(domains)


def _entropy_nats(probs_TE: Tensor) -> Tensor:
    p = probs_TE.detach().double()
    return -torch.special.xlogy(p, p).sum(-1)


# ---------------------------------------------------------------------------------------------- counting
def routed_slots(experts_TK: Tensor, num_experts: int, *per_token_T: Tensor) -> tuple[Tensor, ...]:
    """(expert_N, *values_N): every non-empty slot's expert and its token's values (token id, domain, ...)."""
    K = experts_TK.shape[1]
    keep_TK = experts_TK < num_experts
    out = [experts_TK[keep_TK]]
    for v_T in per_token_T:
        out.append(v_T[:, None].expand(-1, K)[keep_TK])
    return tuple(out)


def expert_domain_counts(experts_TK: Tensor, domain_T: Tensor, num_experts: int, num_domains: int) -> Tensor:
    """counts_ED (int64): routed slots of each expert from each domain."""
    e_N, d_N = routed_slots(experts_TK, num_experts, domain_T.long())
    return torch.bincount(e_N * num_domains + d_N, minlength=num_experts * num_domains).view(num_experts, num_domains)


def expert_token_counts(experts_TK: Tensor, token_T: Tensor, num_experts: int, vocab_size: int) -> Tensor:
    """counts_EV (int64): routed slots of each expert holding each token id."""
    e_N, v_N = routed_slots(experts_TK, num_experts, token_T.long())
    return torch.bincount(e_N * vocab_size + v_N, minlength=num_experts * vocab_size).view(num_experts, vocab_size)


def load_share(counts_E: Tensor) -> Tensor:
    """share_E: each expert's share of the layer's routed slots (zeros when nothing was routed)."""
    total = counts_E.sum()
    return counts_E.double() / total if total > 0 else torch.zeros_like(counts_E, dtype=torch.float64)


def domain_share(counts_ED: Tensor) -> Tensor:
    """share_ED: the domain mix of each expert's tokens (rows sum to 1; NaN for an expert with no tokens)."""
    counts_E1 = counts_ED.sum(1, keepdim=True).double()
    return counts_ED.double() / counts_E1  # 0/0 = NaN for dead experts


def base_rate(counts_ED: Tensor) -> Tensor:
    """rate_D: the domain mix of all routed slots of the layer."""
    return load_share(counts_ED.sum(0))


def specialisation(counts_ED: Tensor) -> Tensor:
    """spec_ED = P(domain | expert) / P(domain): 1.0 = no preference, 2.0 = twice the base rate."""
    rate_D = base_rate(counts_ED)
    return domain_share(counts_ED) / rate_D  # NaN for dead experts, inf/NaN for an absent domain


def dead_experts(counts_E: Tensor) -> list[int]:
    """Experts that received no token."""
    return [int(e) for e in (counts_E == 0).nonzero().flatten()]


def overloaded_experts(counts_E: Tensor, factor: float = 2.0) -> list[int]:
    """Experts that received more than ``factor`` times the mean load."""
    mean = counts_E.double().mean()
    return [int(e) for e in (counts_E.double() > factor * mean).nonzero().flatten()] if mean > 0 else []


# ---------------------------------------------------------------------------------------------- information
def _entropy_bits(counts: Tensor) -> float:
    """Plug-in entropy (bits) of the distribution given by non-negative counts."""
    c = counts[counts > 0].double()
    n = c.sum()
    if n <= 0:
        return 0.0
    return float(torch.log2(n) - (c * torch.log2(c)).sum() / n)


def mutual_information(counts_ED: Tensor) -> dict:
    """I(expert; domain) over routed slots, in bits, and normalised by H(domain).

    ``normalised`` is 0 when routing is independent of the domain and 1 when the expert determines
    the domain; it is None when there is a single domain (H(domain) = 0). ``bias_bits`` is the
    expected plug-in value under independence, (E'-1)(D'-1) / (2 N ln 2), for E', D' the experts
    and domains seen: measured values near it mean "no detectable dependence".
    """
    n = int(counts_ED.sum())
    h_e, h_d, h_ed = (
        _entropy_bits(counts_ED.sum(1)),
        _entropy_bits(counts_ED.sum(0)),
        _entropy_bits(counts_ED.flatten()),
    )
    mi = max(0.0, h_e + h_d - h_ed)
    e_seen, d_seen = int((counts_ED.sum(1) > 0).sum()), int((counts_ED.sum(0) > 0).sum())
    bias = (e_seen - 1) * (d_seen - 1) / (2 * n * LN2) if n else 0.0
    return {
        "mi_bits": mi,
        "domain_entropy_bits": h_d,
        "normalised": mi / h_d if h_d > 1e-12 else None,
        "bias_bits": bias,
        "slots": n,
    }


def _mm_entropy_bits(key_N: Tensor) -> float:
    """Miller-Madow bias-corrected entropy (bits) of the empirical distribution of ``key_N``."""
    if key_N.numel() == 0:
        return 0.0
    _, c = torch.unique(key_N, return_counts=True)
    return _entropy_bits(c) + (c.numel() - 1) / (2 * key_N.numel() * LN2)


def permute_within_groups(values_T: Tensor, groups_T: Tensor, generator: torch.Generator) -> Tensor:
    """``values_T`` randomly permuted among the positions of the same group (each group keeps its values)."""

    def grouped_order() -> Tensor:  # positions sorted by group, in random order within each group
        jitter = torch.rand(groups_T.numel(), generator=generator, dtype=torch.float64) * 0.5
        return torch.argsort(groups_T.double() + jitter)

    out = torch.empty_like(values_T)
    out[grouped_order()] = values_T[grouped_order()]
    return out


def _cmi_bits(experts_TK: Tensor, domain_T: Tensor, token_T: Tensor, E: int, D: int) -> tuple[float, float]:
    """(I(expert; domain | token), H(domain | token)) in bits, Miller-Madow corrected."""
    e_N, d_N, v_N = routed_slots(experts_TK, E, domain_T, token_T)
    h_ved = _mm_entropy_bits((v_N * E + e_N) * D + d_N)
    h_ve = _mm_entropy_bits(v_N * E + e_N)
    h_vd = _mm_entropy_bits(v_N * D + d_N)
    h_v = _mm_entropy_bits(v_N)
    return max(0.0, h_ve + h_vd - h_ved - h_v), max(0.0, h_vd - h_v)


def conditional_mutual_information(
    experts_TK: Tensor,
    domain_T: Tensor,
    token_T: Tensor,
    num_experts: int,
    num_domains: int,
    permutations: int = 3,
    seed: int = 0,
) -> dict:
    """I(expert; domain | token id) in bits: what the routing knows about the domain beyond the token
    itself (i.e. from context), normalised by H(domain | token).

    Even Miller-Madow corrected, the estimate is biased upwards where many tokens are rare, so it
    comes with ``null_normalised``: its mean after shuffling the domain labels among the occurrences
    of each token (which keeps token/domain statistics and destroys any further dependence), and
    ``excess`` = normalised - null, the number to read."""
    domain_T, token_T = domain_T.long(), token_T.long()
    cmi, h_d_given_v = _cmi_bits(experts_TK, domain_T, token_T, num_experts, num_domains)
    if h_d_given_v <= 1e-3:
        return {
            "mi_bits": cmi,
            "domain_entropy_bits": h_d_given_v,
            "normalised": None,
            "null_normalised": None,
            "excess": None,
        }
    g = torch.Generator().manual_seed(seed)
    nulls = [
        _cmi_bits(experts_TK, permute_within_groups(domain_T, token_T, g), token_T, num_experts, num_domains)[0]
        for _ in range(permutations)
    ]
    norm = min(1.0, cmi / h_d_given_v)
    null = min(1.0, sum(nulls) / len(nulls) / h_d_given_v) if nulls else 0.0
    return {
        "mi_bits": cmi,
        "domain_entropy_bits": h_d_given_v,
        "normalised": norm,
        "null_normalised": null,
        "excess": max(0.0, norm - null),
    }


# ---------------------------------------------------------------------------------------------- tokens
def top_tokens_by_count(counts_EV: Tensor, n: int = 8) -> list[list[tuple[int, int]]]:
    """Per expert: its ``n`` most frequent (token id, count), ties broken by the smaller id."""
    out = []
    ids_V = np.arange(counts_EV.shape[1])
    for row_V in counts_EV.numpy():
        order = np.lexsort((ids_V, -row_V))[:n]
        out.append([(int(v), int(row_V[v])) for v in order if row_V[v] > 0])
    return out


def top_tokens_by_lift(
    counts_EV: Tensor, n: int = 8, min_count: int = 5, occurrences_V: Optional[Tensor] = None, prior: float = LIFT_PRIOR
) -> list[list[tuple[int, int, float]]]:
    """Per expert: the ``n`` tokens it over-represents most, as (token id, count, lift), among the
    tokens the expert received >= ``min_count`` times; ties go to the larger count, then the smaller id.

    lift = P~(expert | token) / P(expert), where P(expert) is the expert's share of all token
    occurrences and P~(expert | token) the share of the token's occurrences routed to it, smoothed
    towards P(expert) by ``prior`` pseudo-occurrences (additive smoothing): (c + prior * P(expert))
    / (occurrences + prior). A token seen a few times cannot reach the ceiling 1 / P(expert) that
    every token sent only to this expert would share unsmoothed (top-k routing decided by the token
    alone makes most of them so), so the ranking weighs how often a preference was seen.
    ``prior=0`` gives the plain lift.

    ``occurrences_V``: how often each token occurred (default: its routed slots, exact for K = 1).
    """
    if prior < 0:
        raise ValueError(f"prior must be >= 0; got {prior}")
    c_EV = counts_EV.double().numpy()
    occ_V = c_EV.sum(0) if occurrences_V is None else occurrences_V.double().numpy()[: c_EV.shape[1]]
    total = occ_V.sum()
    rate_E1 = c_EV.sum(1, keepdims=True) / total if total > 0 else np.zeros((c_EV.shape[0], 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        lift_EV = (c_EV + prior * rate_E1) / (occ_V + prior) / rate_E1
    out = []
    ids_V = np.arange(c_EV.shape[1])
    for e in range(c_EV.shape[0]):
        ok_V = (c_EV[e] >= max(1, min_count)) & np.isfinite(lift_EV[e])
        lift = np.where(ok_V, lift_EV[e], -np.inf)
        order = np.lexsort((ids_V, -c_EV[e], -lift))[:n]
        out.append([(int(v), int(c_EV[e, v]), float(lift_EV[e, v])) for v in order if ok_V[v]])
    return out


# ---------------------------------------------------------------------------------------------- tables
def _none_if_nan(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def layer_table(
    experts_TK: Tensor,
    token_T: Tensor,
    domain_T: Tensor,
    num_experts: int,
    domains: list,
    entropy_T: Optional[Tensor] = None,
    token_str: Optional[Callable[[int], str]] = None,
    n_tokens: int = 8,
    min_count: int = 5,
    overload_factor: float = 2.0,
    lift_prior: float = LIFT_PRIOR,
) -> dict:
    """Every statistic of one MoE layer as plain JSON-ready Python values (``top_lift``: see
    :func:`top_tokens_by_lift`; ``lift_prior`` its smoothing)."""
    E, D = num_experts, len(domains)
    token_T, domain_T = token_T.long(), domain_T.long()
    counts_ED = expert_domain_counts(experts_TK, domain_T, E, D)
    counts_E = counts_ED.sum(1)
    experts = _expert_rows(experts_TK, token_T, counts_ED, domains, token_str, n_tokens, min_count, lift_prior)
    rate_D = base_rate(counts_ED)
    table = {
        "num_experts": E,
        "routed_slots": int(counts_E.sum()),
        "empty_slots": int((experts_TK >= E).sum()),
        "tokens": int(experts_TK.shape[0]),
        "slots_per_token": int(experts_TK.shape[1]),
        "base_rate": {d: float(rate_D[i]) for i, d in enumerate(domains)},
        "mi": mutual_information(counts_ED),
        "mi_given_token": conditional_mutual_information(experts_TK, domain_T, token_T, E, D) if D > 1 else None,
        "dead": dead_experts(counts_E),
        "overloaded": overloaded_experts(counts_E, overload_factor),
        "overload_factor": overload_factor,
        "lift_min_count": min_count,
        "lift_prior": lift_prior,
        "experts": experts,
    }
    if entropy_T is not None and entropy_T.numel():
        table.update(_entropy_fields(entropy_T, domain_T, domains, E))
    return table


def _expert_rows(
    experts_TK: Tensor,
    token_T: Tensor,
    counts_ED: Tensor,
    domains: list,
    token_str: Optional[Callable[[int], str]],
    n_tokens: int,
    min_count: int,
    lift_prior: float,
) -> list[dict]:
    """One dict per expert: its load, domain mix, specialisation and characteristic tokens."""
    E = counts_ED.shape[0]
    counts_E = counts_ED.sum(1)
    vocab = int(token_T.max()) + 1 if token_T.numel() else 1
    counts_EV = expert_token_counts(experts_TK, token_T, E, vocab)
    occurrences_V = torch.bincount(token_T, minlength=vocab)
    share_E, dom_ED, spec_ED = load_share(counts_E), domain_share(counts_ED), specialisation(counts_ED)
    by_count = top_tokens_by_count(counts_EV, n_tokens)
    by_lift = top_tokens_by_lift(counts_EV, n_tokens, min_count, occurrences_V, lift_prior)
    name = token_str or str
    return [
        {
            "expert": e,
            "tokens": int(counts_E[e]),
            "share": float(share_E[e]),
            "domain_share": {d: _none_if_nan(float(dom_ED[e, i])) for i, d in enumerate(domains)},
            "specialisation": {d: _none_if_nan(float(spec_ED[e, i])) for i, d in enumerate(domains)},
            "top_tokens": [{"id": v, "token": name(v), "count": c} for v, c in by_count[e]],
            "top_lift": [{"id": v, "token": name(v), "count": c, "lift": round(lift, 4)} for v, c, lift in by_lift[e]],
        }
        for e in range(E)
    ]


def _entropy_fields(entropy_T: Tensor, domain_T: Tensor, domains: list, num_experts: int) -> dict:
    """The layer's mean routing entropy (nats), normalised by log E, and per domain."""
    h = entropy_T.double()
    return {
        "routing_entropy_nats": float(h.mean()),
        "routing_entropy_normalised": float(h.mean() / math.log(num_experts)) if num_experts > 1 else 0.0,
        "routing_entropy_by_domain": {
            d: float(h[domain_T == i].mean()) for i, d in enumerate(domains) if bool((domain_T == i).any())
        },
    }


def routing_table(
    routing: RoutingData, token_str: Optional[Callable[[int], str]] = None, n_tokens: int = 8, min_count: int = 5
) -> list[dict]:
    """:func:`layer_table` of every MoE layer of ``routing`` (with its block index under ``layer``)."""
    out = []
    for layer, E, experts_TK, entropy_T in zip(routing.layers, routing.num_experts, routing.experts, routing.entropy):
        t = layer_table(
            experts_TK, routing.token_T, routing.domain_T, E, routing.domains, entropy_T, token_str, n_tokens, min_count
        )
        out.append({"layer": layer, **t})
    return out
