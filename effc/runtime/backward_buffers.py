"""The lifetimes of the gradient kernels' buffers: each made before the first kernel that needs it and dropped
after the last one that reads it, so that the backward's peak holds what one kernel touches, not the sum of
every buffer of the step (gated_delta_net at 2x8192: the adjoint history, 256 MiB, is read by the first
gradient kernel only; the gradients are written by the later ones)."""
from __future__ import annotations

from typing import Callable

import torch


def last_readers(kernels, names_of: Callable) -> dict[str, int]:
    """Per buffer name that `names_of(kernel)` lists, the index in `kernels` of the last kernel reading it."""
    return {name: i for i, kp in enumerate(kernels) for name in names_of(kp)}


def release_after(i: int, last: dict[str, int], buffers: dict) -> None:
    """Drop the launcher's references to the buffers kernel `i` was the last to read (the caching allocator
    gives their memory to the next kernels' buffers)."""
    for name, j in last.items():
        if j == i:
            buffers.pop(name, None)


class GradientBuffers:
    """The buffers the gradient kernels write, one per caller input (its parts' kernels write column slices of
    it), each allocated when a kernel first writes one of its parts: `for_kernel(kp)`. `allocate(group)` makes
    one group's buffer; `members[name]` names the group of each input."""

    def __init__(self, groups: dict, allocate: Callable):
        self.groups, self._allocate = groups, allocate
        self.members = {m.name: caller for caller, (_, ms) in groups.items() for m in ms}
        self.dx, self.whole = {}, {}

    def _make(self, caller: str) -> None:
        if caller in self.whole:
            return
        views, whole = self._allocate(*self.groups[caller])
        self.dx.update(views)
        self.whole[caller] = whole

    def for_kernel(self, kp) -> dict[str, torch.Tensor]:
        """The `<x>_dx_ptr` arguments of gradient kernel `kp`, allocating the buffers it is the first to write."""
        for d, _ in kp.grads:
            self._make(self.members[d.name])
        return {f"{d.name}_dx_ptr": self.dx[d.name] for d, _ in kp.grads}

    def all(self) -> tuple[dict, dict]:
        """(per input, its buffer; per caller input, (whole buffer, the input whose slots it has)), allocating the
        buffers no kernel wrote (zeros: an input without a gradient term)."""
        for caller in self.groups:
            self._make(caller)
        return self.dx, self.whole
