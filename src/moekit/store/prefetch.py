"""Prefetch: while MoE layer l computes, read the experts layer l+1 will probably need.

The guess is layer l+1's router applied to layer l's input (the residual stream changes little
from one layer to the next; Eliseev & Mazur 2023, "Fast inference of Mixture-of-Experts language
models with offloading", report 80-90 % recall for Mixtral this way): its ``top_k`` experts, or
its ``width`` best (a wider guess recalls more and reads more for nothing; guesses are read best
first, so a full pool takes the likeliest). The reads run on one
background thread: ``os.preadv`` releases the GIL, so they overlap the current layer's compute
on another core. The prefetch reads only into free slots or over experts that neither the running
call nor its own guess needs, and layer l+1's call waits for it before it computes. Precision,
recall and the bytes read for nothing are counted per layer (:class:`PrefetchStats`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..layer.moe import MoE
from ..layer.scope import LOCAL_SCOPE
from .experts import PrefetchStats, StoredExperts


class Prefetcher:
    """Hooks on every budgeted MoE layer of a model but the last: each call guesses and starts
    reading the next layer's experts. ``close()`` removes the hooks and the thread."""

    def __init__(self, model: nn.Module, max_tokens: int = 64, width: Optional[int] = None):
        moes = [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, StoredExperts)]
        if len(moes) < 2:
            raise ValueError("prefetch needs a model with at least two MoE layers whose experts are in a store")
        fewest = min(m.cfg.num_experts for m in moes)
        if width is not None and not 1 <= width <= fewest:
            raise ValueError(f"prefetch width must be 1..{fewest} experts per layer (or None: top_k); got {width}")
        self.max_tokens = max_tokens  # longer calls (prompts) need most experts anyway: no guess
        self.width = width
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch")
        self.hooks: list[RemovableHandle] = []
        for here, nxt in zip(moes, moes[1:]):
            if getattr(nxt.router, "learned", False):
                self.hooks.append(here.register_forward_pre_hook(self._guess_for(nxt)))

    def _guess_for(self, nxt: MoE):
        experts = nxt.experts
        assert isinstance(experts, StoredExperts)

        def hook(module: nn.Module, args: tuple, kwargs: Optional[dict] = None):
            x = args[0]
            x_TD = x.reshape(-1, x.shape[-1])
            if torch.is_grad_enabled() or x_TD.shape[0] > self.max_tokens:
                return None
            with torch.no_grad():
                routing = nxt.router(x_TD, self.width or nxt.cfg.top_k, None, scope=LOCAL_SCOPE)
            guess = list(dict.fromkeys(e for e in routing.experts_TK.reshape(-1).tolist() if e < experts.num_experts))
            experts.expect(self.pool.submit(experts.prefetch, guess))
            return None

        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.pool.shutdown(wait=True)


def prefetch_stats(model: nn.Module) -> PrefetchStats:
    total = PrefetchStats()
    for m in model.modules():
        if isinstance(m, StoredExperts):
            s = m.prefetch_stats
            total.guessed += s.guessed
            total.needed += s.needed
            total.right += s.right
            total.wasted_bytes += s.wasted_bytes
    return total


__all__ = ["PrefetchStats", "Prefetcher", "prefetch_stats"]
