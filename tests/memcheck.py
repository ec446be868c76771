"""Out-of-bounds loads and stores under Triton's interpreter.

The interpreter reads and writes raw host memory: a masked-in pointer past its tensor returns whatever
lies there, where a GPU faults ("illegal memory access") or corrupts a neighbour. `checked_memory()`
wraps the interpreter so that every masked-in address of a load or store must lie inside one of the
launch's tensor arguments (their views, not their storages), else it raises naming the kernel.

`checked_memory(races=True)` also catches races between the programs of one launch, which the interpreter
hides by running programs one after another: an element one program stores must not be loaded or stored by
another program of the same launch (a GPU runs them in any order). Programs storing the same value to an
element are allowed (each writes what the others write).
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np
from triton.runtime import interpreter as interp


class OutOfBounds(AssertionError):
    pass


class Race(AssertionError):
    pass


class _Accesses:
    """One launch's masked-in element addresses, by program; `check` looks for an element a program stores
    and another program touches."""

    def __init__(self, kernel: str):
        self.kernel, self.program = kernel, 0
        self.addrs, self.programs, self.writes, self.values = [], [], [], []

    def add(self, p: np.ndarray, write: bool, values: np.ndarray | None = None) -> None:
        self.addrs.append(p)
        self.programs.append(np.full(p.shape, self.program, np.int64))
        self.writes.append(np.full(p.shape, write))
        self.values.append(values.astype(np.float64).ravel() if write else np.full(p.shape, np.nan))

    def check(self) -> None:
        if not self.addrs:
            return
        addr, prog = np.concatenate(self.addrs), np.concatenate(self.programs)
        write, value = np.concatenate(self.writes), np.concatenate(self.values)
        order = np.lexsort((prog, addr))
        addr, prog, write, value = addr[order], prog[order], write[order], value[order]
        starts = np.flatnonzero(np.r_[True, addr[1:] != addr[:-1]])
        stored = np.maximum.reduceat(write.astype(np.int8), starts).astype(bool)
        several = np.minimum.reduceat(prog, starts) != np.maximum.reduceat(prog, starts)
        for i in np.flatnonzero(stored & several):
            lo, hi = starts[i], starts[i + 1] if i + 1 < len(starts) else len(addr)
            w = write[lo:hi]
            if w.all() and np.unique(value[lo:hi]).size == 1:  # every program stores the same value
                continue
            touching = sorted(set(prog[lo:hi].tolist()))
            raise Race(f"{self.kernel}: element at {int(addr[lo]):#x} is stored by program(s) "
                       f"{sorted(set(prog[lo:hi][w].tolist()))} and touched by {touching} in one launch "
                       f"({int((stored & several).sum())} such element(s))")


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
def checked_memory(races: bool = False):
    state = {"spans": None, "kernel": "?", "accesses": None}
    builder = interp.InterpreterBuilder
    old_load, old_store, old_call = builder.create_masked_load, builder.create_masked_store, interp.GridExecutor.__call__
    old_idx = builder.set_grid_idx

    def check(ptrs, mask, what, value=None):
        if state["spans"] is None:
            return
        starts, ends, names = state["spans"]
        # a mask the interpreter holds as integers (a vector & a 0-d flag gives int32 there) selects by its
        # truth, not as indices
        keep = np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)
        p = ptrs.data[keep].astype(np.uint64).ravel()
        if p.size == 0:
            return
        if state["accesses"] is not None:
            state["accesses"].add(p, what == "store", None if value is None else
                                  np.broadcast_to(value.data, ptrs.data.shape)[keep])
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
        check(ptrs, mask, "store", value)
        return old_store(self, ptrs, value, mask, *rest)

    def grid_idx(self, x, y, z):
        if state["accesses"] is not None:
            state["accesses"].program = (x * self.grid_dim[1] + y) * self.grid_dim[2] + z
        return old_idx(self, x, y, z)

    def call(self, *args, **kwargs):
        bound = inspect.getcallargs(self.fn, *args, **{k: v for k, v in kwargs.items()
                                                       if k in inspect.getfullargspec(self.fn).args})
        saved = dict(state)
        kernel = getattr(self.fn, "__name__", "?")
        state.update(spans=_spans(bound), kernel=kernel, accesses=_Accesses(kernel) if races else None)
        try:
            out = old_call(self, *args, **kwargs)
            if state["accesses"] is not None:
                state["accesses"].check()
            return out
        finally:
            state.update(saved)

    builder.create_masked_load, builder.create_masked_store, interp.GridExecutor.__call__ = load, store, call
    builder.set_grid_idx = grid_idx
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store, interp.GridExecutor.__call__ = (
            old_load, old_store, old_call)
        builder.set_grid_idx = old_idx
