"""The synthetic experiment of Ma et al. 2018 (MMoE), section 3/5: two regression tasks whose
correlation is set by the cosine similarity of their weight vectors (0.5, 0.9, 1.0); shared-bottom
vs one-gate MoE (OMoE) vs multi-gate MoE (MMoE) with similar parameter counts, over 3 seeds.

Models as in the paper: input 100, MoEs with 8 experts of 16 ReLU units, shared bottom with 113
ReLU units, towers of 8 ReLU units. Prints the test-MSE table (mean over the two tasks, mean
+- std over seeds) and saves the mean training-loss curves.

    PYTHONPATH=src python examples/mmoe_synthetic.py
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm
import torch.nn.functional as F

from moekit import MultiGateMoE
from moekit.models.multitask import SharedBottom, synthetic_tasks

MODELS = {
    "shared-bottom": lambda: SharedBottom(100, 113, 2, 8),
    "OMoE": lambda: MultiGateMoE(100, 16, 8, 2, 8, shared_gate=True),
    "MMoE": lambda: MultiGateMoE(100, 16, 8, 2, 8),
}


def run(name, corr, seed, steps, batch, n_train, log_every):
    train = synthetic_tasks(n_train, corr, seed=0, data_seed=seed)
    test = synthetic_tasks(2000, corr, seed=1, data_seed=seed)
    torch.manual_seed(seed)
    model = MODELS[name]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    curve, acc = [], 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        res = model(train.x_BI[idx])
        loss = sum(F.mse_loss(o.squeeze(-1), train.y_BT[idx, t]) for t, o in enumerate(res.outs)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc += loss.item()
        if step % log_every == 0:
            curve.append(acc / log_every)
            acc = 0.0
    with torch.no_grad():
        res = model(test.x_BI)
        mse = [F.mse_loss(o.squeeze(-1), test.y_BT[:, t]).item() for t, o in enumerate(res.outs)]
    return sum(mse) / 2, curve, sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--plot", default="docs/images/arch_mmoe_synthetic.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    corrs = (0.5, 0.9, 1.0)
    log_every = 50
    t0 = time.time()
    table, curves, params = {}, {}, {}
    bar = tqdm(total=len(corrs) * len(MODELS) * args.seeds, desc="MMoE synthetic runs", dynamic_ncols=True, leave=False)
    for corr in corrs:
        for name in MODELS:
            res = []
            for s in range(args.seeds):
                bar.set_postfix(corr=corr, model=name, seed=s, refresh=False)
                res.append(run(name, corr, s, args.steps, args.batch, args.n_train, log_every))
                bar.update(1)
            table[corr, name] = torch.tensor([r[0] for r in res])
            curves[corr, name] = torch.tensor([r[1] for r in res]).mean(0)
            params[name] = res[0][2]
    bar.close()
    print(f"{args.seeds} seeds x {args.steps} steps (batch {args.batch}, {args.n_train} training examples), "
          f"{time.time() - t0:.0f}s\n")
    print("| model | params | " + " | ".join(f"test MSE, corr {c}" for c in corrs) + " |")
    print("|---|---|" + "---|" * len(corrs))
    for name in MODELS:
        cells = [f"{table[c, name].mean():.4f} ± {table[c, name].std():.4f}" for c in corrs]
        print(f"| {name} | {params[name]} | " + " | ".join(cells) + " |")
    print("\nMMoE's gain over OMoE / shared-bottom (difference of mean test MSE):")
    for c in corrs:
        mm = table[c, "MMoE"].mean()
        print(f"  corr {c}: vs OMoE {table[c, 'OMoE'].mean() - mm:+.4f}, vs shared-bottom {table[c, 'shared-bottom'].mean() - mm:+.4f}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(corrs), figsize=(10, 3.2), dpi=80, sharey=True)
        x = [log_every * (i + 1) for i in range(len(next(iter(curves.values()))))]
        for ax, c in zip(axes, corrs):
            for name in MODELS:
                ax.plot(x, curves[c, name].numpy(), label=name, lw=1.2)
            ax.set_yscale("log")
            ax.set_title(f"correlation {c}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"training MSE (mean of {args.seeds} seeds)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
