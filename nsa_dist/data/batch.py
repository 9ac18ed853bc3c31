"""`Batch`, what every data source yields (inputs, targets shifted by one, the answer positions), and
`SeededStream`, what every source is: batches drawn from one explicit generator, resumable from its state."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64, inputs shifted left by one
    answer_mask: torch.Tensor | None = None  # [B, T] bool, targets that are answer bytes

    def to(self, device) -> "Batch":
        mask = None if self.answer_mask is None else self.answer_mask.to(device, non_blocking=True)
        return Batch(self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True), mask)


def windows_to_batch(windows: torch.Tensor, answer_mask: torch.Tensor | None = None) -> Batch:
    """`[B, T + 1]` token windows as inputs and targets shifted by one: the one place the shift is written."""
    return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), answer_mask)


class SeededStream:
    """A batch source whose every draw comes from `generator`: its state is the stream's place, which a
    checkpoint saves and a resume puts back."""

    generator: torch.Generator

    def sample(self, batch_size: int) -> Batch:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
