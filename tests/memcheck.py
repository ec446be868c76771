"""Out-of-bounds loads and stores under Triton's interpreter.

The interpreter reads and writes raw host memory: a masked-in pointer past its tensor returns whatever
lies there, where a GPU faults ("illegal memory access") or corrupts a neighbour. `checked_memory()`
wraps the interpreter so that every masked-in address of a load or store must lie inside one of the
launch's tensor arguments (their views, not their storages), else it raises naming the kernel.
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np
from triton.runtime import interpreter as interp


class OutOfBounds(AssertionError):
    pass


def _spans(args) -> tuple[np.ndarray, np.ndarray, list[str]]:
    spans = []
    for name, arg in args.items():
        if hasattr(arg, "data_ptr") and hasattr(arg, "stride") and arg.numel() > 0:
            last = sum((n - 1) * s for n, s in zip(arg.shape, arg.stride()))
            spans.append((arg.data_ptr(), arg.data_ptr() + (last + 1) * arg.element_size(), name))
    spans.sort()
    return (np.array([s[0] for s in spans], np.uint64), np.array([s[1] for s in spans], np.uint64),
            [s[2] for s in spans])


@contextlib.contextmanager
def checked_memory():
    state = {"spans": None, "kernel": "?"}
    builder = interp.InterpreterBuilder
    old_load, old_store, old_call = builder.create_masked_load, builder.create_masked_store, interp.GridExecutor.__call__

    def check(ptrs, mask, what):
        if state["spans"] is None:
            return
        starts, ends, names = state["spans"]
        p = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64).ravel()
        if p.size == 0:
            return
        size = np.uint64(np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize)
        at = np.searchsorted(starts, p, side="right") - 1
        bad = (at < 0) | (p + size > ends[np.maximum(at, 0)])
        if bad.any():
            first = int(p[bad][0])
            near = names[int(at[bad][0])] if at[bad][0] >= 0 else "none"
            raise OutOfBounds(f"{state['kernel']}: {what} of {int(bad.sum())} element(s) outside every tensor "
                              f"argument (first at {first:#x}; nearest tensor below it: {near})")

    def load(self, ptrs, mask, *rest):
        check(ptrs, mask, "load")
        return old_load(self, ptrs, mask, *rest)

    def store(self, ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return old_store(self, ptrs, value, mask, *rest)

    def call(self, *args, **kwargs):
        bound = inspect.getcallargs(self.fn, *args, **{k: v for k, v in kwargs.items()
                                                       if k in inspect.getfullargspec(self.fn).args})
        saved = dict(state)
        state.update(spans=_spans(bound), kernel=getattr(self.fn, "__name__", "?"))
        try:
            return old_call(self, *args, **kwargs)
        finally:
            state.update(saved)

    builder.create_masked_load, builder.create_masked_store, interp.GridExecutor.__call__ = load, store, call
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store, interp.GridExecutor.__call__ = (
            old_load, old_store, old_call)
