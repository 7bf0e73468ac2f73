"""Hierarchical MoE (Shazeer et al. 2017, appendix B) on a task with a two-level structure.

Inputs come from G=4 clusters, each made of 4 sub-clusters; the target is a different random
nonlinear map per sub-cluster (16 in all). Compares, with the same expert FFNs (16 experts of
width 32) and the same active experts per token (2):

* HierarchicalMoE, 4 groups x 4 experts, gate weights = raw softmax probabilities
  (``renormalize=False``, so that a top-1 gate still gets a gradient from the task loss):
  "hier 1x2" = 1 group then 2 experts inside it; "hier 2x1" = 2 groups, 1 expert in each;
* a flat top-2 MoE over the 16 experts (moekit.MoE);
* a dense FFN as wide as the two active experts.

Prints test MSE (mean +- std over 3 seeds) and, for "hier 1x2", how purely each input cluster
goes to one group.

    PYTHONPATH=src python examples/hmoe_clusters.py
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moekit import FeedForward, HierarchicalMoE, MoE, MoEConfig

D, G, SUB, HID = 16, 4, 4, 32


def make_task(seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(G, D, generator=g) * 3.0
    sub = centers[:, None, :] + torch.randn(G, SUB, D, generator=g) * 1.0
    maps = torch.randn(G * SUB, D, D, generator=g) / D ** 0.5

    def sample(n, s):
        gs = torch.Generator().manual_seed(s)
        c = torch.randint(0, G * SUB, (n,), generator=gs)
        x = sub.view(-1, D)[c] + 0.3 * torch.randn(n, D, generator=gs)
        y = torch.tanh(torch.einsum("nd,nde->ne", x, maps[c]))
        return x, y, c // SUB
    return sample


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(D, D)
        if kind == "hier 1x2":
            self.ffn = HierarchicalMoE(D, HID, G, SUB, top_k_groups=1, top_k_experts=2, expert="gelu", renormalize=False,
                                       importance_loss_weight=1e-2, balance_loss_weight=1e-2)
        elif kind == "hier 2x1":
            self.ffn = HierarchicalMoE(D, HID, G, SUB, top_k_groups=2, top_k_experts=1, expert="gelu", renormalize=False,
                                       importance_loss_weight=1e-2, balance_loss_weight=1e-2)
        elif kind == "flat":
            self.ffn = MoE(MoEConfig(dim=D, hidden_dim=HID, num_experts=G * SUB, top_k=2, expert="gelu",
                                     importance_loss_weight=1e-2, z_loss_weight=0.0))
        else:
            self.ffn = FeedForward(D, 2 * HID, "gelu")

    def forward(self, x):
        h = self.inp(x)
        if self.kind == "dense":
            return h + self.ffn(h), h.new_zeros(()), None
        res = self.ffn(h)
        return h + res.out, res.aux_loss, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    results = {k: [] for k in ("hier 1x2", "hier 2x1", "flat", "dense")}
    purity = []
    bar = tqdm(total=args.seeds * len(results), desc="hierarchical MoE runs", dynamic_ncols=True, leave=False)
    for seed in range(args.seeds):
        sample = make_task(seed)
        xtr, ytr, _ = sample(8000, 1)
        xte, yte, cte = sample(2000, 2)
        for kind in results:
            torch.manual_seed(seed)
            net = Net(kind)
            opt = torch.optim.Adam(net.parameters(), lr=3e-3)
            g = torch.Generator().manual_seed(seed)
            for _ in range(args.steps):
                idx = torch.randint(0, len(xtr), (128,), generator=g)
                out, aux, _ = net(xtr[idx])
                loss = F.mse_loss(out, ytr[idx]) + aux
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                out, _, res = net(xte)
                results[kind].append(F.mse_loss(out, yte).item())
                if kind == "hier 1x2":
                    group = res.experts_TK[:, 0] // SUB
                    joint = torch.zeros(G, G).index_put_((cte, group), torch.ones(len(cte)), accumulate=True)
                    purity.append((joint.max(1).values.sum() / joint.sum()).item())
            bar.update(1)
    bar.close()
    print(f"{args.seeds} seeds x {args.steps} steps, batch 128, {time.time() - t0:.0f}s\n")
    print("| model | active expert width / token | test MSE |\n|---|---|---|")
    for kind, width in (("hier 1x2", "2 x 32"), ("hier 2x1", "2 x 32"), ("flat", "2 x 32"), ("dense", "64")):
        r = torch.tensor(results[kind])
        print(f"| {kind} | {width} | {r.mean():.4f} ± {r.std():.4f} |")
    p = torch.tensor(purity)
    print(f"\nhier 1x2: share of test inputs whose cluster goes to that cluster's majority group: "
          f"{p.mean():.3f} ± {p.std():.3f} (1/{G} = chance)")


if __name__ == "__main__":
    main()
