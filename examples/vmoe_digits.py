"""V-MoE (Riquelme et al. 2021) on scikit-learn's 8x8 digits, on CPU in a few minutes.

Trains a small ViT (16 patches of 2x2 pixels, width 64, 4 blocks, an MoE MLP in every other
block: 8 GELU experts, top-2, capacity factor 1.0, Batch Prioritized Routing), reports the test
accuracy, then re-evaluates the *same* weights with k in {1, 2} and capacity factor in
{0.25, 0.5, 1.0, 1.5} and plots accuracy against FLOPs per image.

    PYTHONPATH=src python examples/vmoe_digits.py                  # V-MoE + sweep + plot
    PYTHONPATH=src python examples/vmoe_digits.py --ffn soft       # the same ViT with Soft MoE MLPs
    PYTHONPATH=src python examples/vmoe_digits.py --ffn dense      # the dense ViT baseline
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from moekit.models.vit import VisionTransformer, ViTConfig


def data(seed: int):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


@torch.no_grad()
def evaluate(model, x, y, **kw):
    model.eval()
    res = model(x.unsqueeze(1), **kw)
    acc = (res.logits.argmax(-1) == y).float().mean().item()
    return acc, model.flops_per_image(res, x.shape[0])


def train(cfg: ViTConfig, xtr, ytr, epochs: int, seed: int, lr: float = 3e-3, shift: bool = False, log=print):
    torch.manual_seed(seed)
    model = VisionTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(xtr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=f"train ViT ({cfg.ffn})", dynamic_ncols=True, leave=False)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        tot = 0.0
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            xb = xtr[idx]
            if shift:  # +-1 pixel translation (the digits have an empty border)
                xb = torch.roll(xb, shifts=torch.randint(-1, 2, (2,), generator=g).tolist(), dims=(1, 2))
            res = model(xb.unsqueeze(1))
            loss = F.cross_entropy(res.logits, ytr[idx]) + res.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            bar.update(1)
            bar.set_postfix(epoch=ep + 1, loss=f"{loss.item():.3f}", refresh=False)
        if (ep + 1) % 10 == 0:
            log(f"epoch {ep + 1:3d}  train loss {tot / len(xtr):.4f}")
    bar.close()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ffn", default="moe", choices=["moe", "soft", "dense"])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--shift", action="store_true", help="random +-1 pixel translation (wrapping; it slows training here)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default="docs/images/arch_vmoe_digits.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = data(args.seed)
    cfg = ViTConfig(image_size=8, patch_size=2, dim=64, depth=4, heads=4, mlp_hidden=128, ffn=args.ffn,
                    soft_experts=8, soft_slots_per_expert=2)
    t0 = time.time()
    model = train(cfg, xtr, ytr, args.epochs, args.seed, args.lr, args.shift)
    n_params = sum(p.numel() for p in model.parameters())
    acc, fl = evaluate(model, xte, yte)
    print(f"ffn={args.ffn} params={n_params} train time {time.time() - t0:.0f}s  test accuracy {acc:.4f} "
          f"({len(yte)} images)  FLOPs/image {fl / 1e6:.3f}M")
    if args.ffn != "moe":
        return
    rows = []
    print("\n| k | capacity factor | test accuracy | MFLOPs / image |\n|---|---|---|---|")
    for k in (1, 2):
        for cf in (0.25, 0.5, 1.0, 1.5):
            a, f = evaluate(model, xte, yte, top_k=k, capacity_factor=cf)
            rows.append((k, cf, a, f))
            print(f"| {k} | {cf} | {a:.4f} | {f / 1e6:.3f} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=90)
        for k, mk, dy in ((1, "o-", -10), (2, "s-", 5)):
            pts = [(f / 1e6, a) for kk, cf, a, f in rows if kk == k]
            ax.plot(*zip(*pts), mk, label=f"k={k}")
            for (f, a), cf in zip(pts, (0.25, 0.5, 1.0, 1.5)):
                ax.annotate(f"C={cf}", (f, a), fontsize=7, xytext=(3, dy), textcoords="offset points")
        ax.set_xlabel("MFLOPs per image (dense parts + kept expert slots)")
        ax.set_ylabel("test accuracy")
        ax.set_title("V-MoE on digits: inference k / capacity sweep (BPR)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
