"""The random streams of one trained member of a run.

Stochastic depth, RoPE augmentation and any other draw inside a step come from torch's global CPU (and,
on a GPU, CUDA) generators. Each member of a run (one, or one per distilled student) keeps its own copy
of those streams between its steps, so that a member draws the same numbers with or without the others,
and the copies go into its checkpoints, so that a resumed run draws what the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class MemberStreams:
    """``enter()`` before a member's step puts its streams in place; ``leave()`` after it keeps them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state: dict[str, Tensor] = {}

    def leave(self) -> None:
        self.state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            self.state["cuda"] = torch.cuda.get_rng_state(self.device)

    def enter(self, state: dict[str, Tensor] | None = None) -> None:
        state = state or self.state
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def start(
        self, saved: list[dict] | None, seed: int, step: int, rank: int, world_size: int, say: Callable[[str], None]
    ) -> None:
        """The streams of this rank at ``step``: restored from a checkpoint written by as many ranks, else
        seeded by (seed, step, rank): draws differ across ranks, as in the official code."""
        if saved is not None and len(saved) == world_size:
            self.enter(saved[rank])
            return
        if saved is not None:
            say(
                f"note: the checkpoint was written by {len(saved)} ranks, this run has {world_size}: "
                "weights, optimizer, data order and masks carry on exactly; random streams restart"
            )
        torch.manual_seed(seed + 1_000_003 * (step + 1) + rank)
