"""The row-tile table: which expert and which rows each program of a row-tiled kernel owns.

Built with a handful of torch ops on the rows' device from ``counts_E`` alone, so launching a
grouped kernel never waits for the host (no ``.item()``/``.tolist()``). The grid size is a
static upper bound on the number of tiles that depends only on shapes:

    sum_e ceil(c_e / M) <= (R + n_busy * (M - 1)) // M,   n_busy = min(E, R) experts with rows

and programs past the real tile count find an empty row range and return at once.

Shape legend: E experts, R rows, N_tiles the bound above, M = BLOCK_M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TileTable:
    expert_N: Tensor  # int32 expert of each tile (E for the spare tiles past the real count)
    start_N: Tensor  # int32 first row of the tile
    end_N: Tensor  # int32 end of the tile's expert's rows (the kernel masks rows >= end)
    starts_E: Tensor  # int32 first row of each expert (for the weight-gradient kernels)
    ends_E: Tensor  # int32 one past the last row of each expert
    block_m: int

    @property
    def num_tiles(self) -> int:
        """The grid size (an upper bound; spare tiles exit at once)."""
        return self.expert_N.numel()


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on ``sum_e ceil(counts_E[e] / block_m)`` given ``sum(counts_E) <= R``."""
    busy = min(num_experts, num_rows)
    return (num_rows + busy * (block_m - 1)) // block_m


def tile_table(counts_E: Tensor, num_rows: int, block_m: int) -> TileTable:
    """Tiles of ``block_m`` rows per expert, experts in order, on ``counts_E``'s device."""
    E = counts_E.numel()
    dev = counts_E.device
    counts_E = counts_E.to(torch.int64)
    ends_E = counts_E.cumsum(0)
    starts_E = ends_E - counts_E
    tiles_E = torch.div(counts_E + block_m - 1, block_m, rounding_mode="floor")
    tile_ends_E = tiles_E.cumsum(0)
    n = max_tiles(num_rows, E, block_m)
    t_N = torch.arange(n, device=dev)
    expert_N = torch.searchsorted(tile_ends_E, t_N, right=True)  # first expert whose tiles end after t
    real_N = expert_N < E
    e_N = expert_N.clamp(max=max(E - 1, 0))
    local_N = t_N - (tile_ends_E - tiles_E)[e_N]
    start_N = torch.where(real_N, starts_E[e_N] + local_N * block_m, 0)
    end_N = torch.where(real_N, ends_E[e_N], 0)
    i32 = torch.int32
    return TileTable(expert_N.to(i32), start_N.to(i32), end_N.to(i32), starts_E.to(i32), ends_E.to(i32), block_m)
