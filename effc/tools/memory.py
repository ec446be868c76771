"""The memory of a training step at any shape, without a GPU: the op runs forward and backward on meta
tensors (shapes, no data; the launches are skipped: runtime.checks.on_meta), so every buffer the runtime
allocates on a GPU is allocated here, in the same order and dtypes, and a dispatch mode follows each
storage from its allocation to its release. What it reports matches the bench's measure (tools.peers
.time_training_step: the peak a step allocates beyond what was live): delta_net_l2 at 2x8192, H=16, D=128,
bf16 gives 1395.5 MiB, the H200 measured 1396 (docs/benchmarks.md).

    effc memory delta_net_l2 --shape 2,8192,16        (each gradient partition of a linear spec)
"""
from __future__ import annotations

import os
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2 ** 20


@dataclass(frozen=True)
class Buffer:
    """One allocation live at the peak: its size, shape, dtype and the line of effc that made it."""

    mib: float
    shape: tuple[int, ...]
    dtype: str
    where: str

    def __str__(self) -> str:
        return f"{self.mib:8.1f} MiB  {self.dtype.removeprefix('torch.')} {list(self.shape)}  ({self.where})"


@dataclass(frozen=True)
class TrainingMemory:
    kept_mib: float  # live after the forward, beyond the inputs: the outputs and what the backward reads
    peak_mib: float  # the most live at once in forward + backward, beyond the inputs and the cotangents
    grads_mib: float  # of which the gradients returned
    at_peak: tuple[Buffer, ...] = ()  # the largest buffers live at the peak (training_memory's `top`)

    def __str__(self) -> str:
        return (f"peak {self.peak_mib:.0f} MiB beyond the inputs (the forward keeps {self.kept_mib:.0f} MiB "
                f"for the backward, outputs included; the gradients are {self.grads_mib:.0f} MiB)")


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops allocate while it is active, and their peak; a storage counts from
    the op that makes it until its last reference is gone."""

    def __init__(self, describe: bool = False):
        """`describe`: note each allocation's shape and the line of effc that made it, and keep the live ones
        at the peak (`at_peak`); off by default, a stack walk per allocation."""
        super().__init__()
        self.live = self.peak = 0
        self.counting = True
        self._seen: set[int] = set()
        self.describe = describe
        self._about: dict[int, Buffer] = {}
        self.at_peak: tuple[Buffer, ...] = ()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        n = storage.nbytes()
        self._seen.add(key)
        self.live += n
        if self.describe:
            self._about[key] = Buffer(n / MIB, tuple(t.shape), str(t.dtype), _allocated_at())
            if self.live > self.peak:
                self.at_peak = tuple(self._about.values())
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, n)

    def existing(self, tensors) -> None:
        """Storages that exist before the step (the inputs, the cotangents): a view of one is no allocation."""
        self._seen.update(t.untyped_storage()._cdata for t in tensors)

    def _release(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self._about.pop(key, None)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if self.counting and isinstance(t, torch.Tensor) and t.is_meta:
                self._track(t)
        return out


def _allocated_at() -> str:
    """The innermost line of effc's runtime on the stack (file:line), outside this module."""
    for frame in reversed(traceback.extract_stack(limit=24)):
        if "/effc/" in frame.filename and not frame.filename.endswith(("tools/memory.py", "_python_dispatch.py")):
            return f"{frame.filename.split('/effc/')[-1]}:{frame.lineno}"
    return "torch"


@contextmanager
def _as_on_a_gpu():
    """The runtime's GPU choices (16-bit scratch, gradients stored in the input dtype), not the
    interpreter's, whatever TRITON_INTERPRET says. A generated module imported inside is the compiled mode's
    and stays apart from the interpreter's (runtime.cache.op_module); no kernel runs on meta tensors."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def _meta_inputs(spec, B: int, T: int, H: int, dims: dict, dtype, kv_heads: int | None) -> list[torch.Tensor]:
    from ..runtime.verify import input_shape
    return [torch.empty(input_shape(spec, d, B, T, H, dims, kv_heads), dtype=dtype, device="meta",
                        requires_grad=True) for d in spec.inputs]


def training_memory(op, B: int, T: int, H: int, dims: dict, dtype=torch.bfloat16, kv_heads: int | None = None,
                    top: int = 0, **knobs) -> TrainingMemory:
    """One forward + backward of `op` at (B, T, H, dims) in `dtype` with the call knobs `knobs` (e.g.
    partition=), measured on meta tensors; `kv_heads`: the heads of the key inputs (H without it); `top`: the
    result names the `top` largest buffers live at the peak."""
    with _as_on_a_gpu():
        xs = _meta_inputs(op.spec, B, T, H, dims, dtype, kv_heads)
        with _LiveBytes(describe=top > 0) as live:
            live.existing(xs)
            out = op(*xs, **knobs)
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            kept = live.live
            live.counting = False  # the cotangents, as the bench's are, exist before the step
            cotangents = [torch.empty_like(o) for o in outs]
            live.existing(cotangents)
            live.counting = True
            del out
            grads = torch.autograd.grad(outs, xs, cotangents, allow_unused=True)
            grad_bytes = sum(g.untyped_storage().nbytes() for g in grads if g is not None)
    largest = tuple(sorted(live.at_peak, key=lambda b: -b.mib)[:top])
    return TrainingMemory(kept / MIB, live.peak / MIB, grad_bytes / MIB, largest)
