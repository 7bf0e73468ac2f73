"""Multi-task models and the synthetic data of Ma et al. 2018 (MMoE, KDD), section 3.

* :class:`SharedBottom`: the classic hard-parameter-sharing baseline (Caruana 1993): one shared
  ReLU layer, one tower per task.
* ``MultiGateMoE(..., shared_gate=True)`` is the paper's OMoE; ``shared_gate=False`` is MMoE
  (see :mod:`moekit.layer.multigate`).
* :func:`synthetic_tasks`: two regression tasks whose correlation is controlled by the cosine
  similarity ``p`` of their weight vectors:

      u1, u2 orthonormal in R^d;  w1 = c u1;  w2 = c (p u1 + sqrt(1 - p^2) u2)
      x ~ N(0, I_d)
      y_t = w_t^T x + sum_{i=1..m} sin(alpha_i w_t^T x + beta_i) + eps_t,   eps_t ~ N(0, 0.01)

  The paper leaves alpha_i, beta_i as "given parameters"; here they are drawn once per data seed
  from N(0, 1) and shared by both tasks, so ``p = 1`` gives two copies of the same function
  (up to noise).

Shape legend: B examples, I input width, T tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layer.multigate import MultiGateMoE, MultiGateOutput


class SharedBottom(nn.Module):
    """Shared-bottom multi-task network: ``tower_t(relu(x W + b))``. Returns a
    :class:`MultiGateOutput` (with empty gates) so the three baselines share a training loop."""

    def __init__(self, in_dim: int, bottom_dim: int, num_tasks: int, tower_hidden: int, out_dim: int = 1):
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(in_dim, bottom_dim), nn.ReLU())
        self.towers = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(bottom_dim, tower_hidden), nn.ReLU(), nn.Linear(tower_hidden, out_dim))
                for _ in range(num_tasks)
            ]
        )

    def forward(self, x_BI: Tensor) -> MultiGateOutput:
        h = self.bottom(x_BI)
        return MultiGateOutput(
            [t(h) for t in self.towers], x_BI.new_zeros(len(self.towers), x_BI.shape[0], 0), x_BI.new_zeros(())
        )


@dataclass
class SyntheticTasks:
    x_BI: Tensor  # inputs
    y_BT: Tensor  # the two task labels
    w_TI: Tensor  # the task weight vectors (cosine similarity = correlation)


def synthetic_tasks(
    n: int,
    correlation: float,
    dim: int = 100,
    c: float = 1.0,
    m: int = 10,
    noise_var: float = 0.01,
    seed: int = 0,
    data_seed: int = 0,
) -> SyntheticTasks:
    """``n`` examples of the paper's two tasks with weight cosine similarity ``correlation``.

    ``data_seed`` fixes the task (u1, u2, alpha, beta); ``seed`` draws the examples and noise, so
    train and test sets of one task share ``data_seed`` and differ in ``seed``."""
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1]; got {correlation!r}")
    g = torch.Generator().manual_seed(data_seed)
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = c * u1
    w2 = c * (correlation * u1 + math.sqrt(max(0.0, 1 - correlation**2)) * u2)
    alpha = torch.randn(m, generator=g, dtype=torch.float64)
    beta = torch.randn(m, generator=g, dtype=torch.float64)
    gx = torch.Generator().manual_seed(1_000_003 * (seed + 1) + data_seed)
    x = torch.randn(n, dim, generator=gx, dtype=torch.float64)
    ys = []
    for w in (w1, w2):
        z = x @ w
        y = z + torch.sin(alpha[None, :] * z[:, None] + beta[None, :]).sum(-1)
        ys.append(y + math.sqrt(noise_var) * torch.randn(n, generator=gx, dtype=torch.float64))
    return SyntheticTasks(x.float(), torch.stack(ys, 1).float(), torch.stack([w1, w2]).float())


__all__ = ["MultiGateMoE", "SharedBottom", "SyntheticTasks", "synthetic_tasks"]
