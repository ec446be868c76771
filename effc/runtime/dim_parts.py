"""A call whose feature dims run in power-of-two parts (passes.dim_parts): the caller's tensors sliced at the
parts' offsets, the split spec's op called on them, its outputs and final states joined. Slicing and joining
are PyTorch ops, so autograd carries the gradients back to the caller's tensors."""
from __future__ import annotations

import torch

from ..compiler import Compilation
from ..passes.dim_parts import PARTS, NotSplittable, part_name, part_sizes, split_dims


class PartedCall:
    """The split spec's op for one set of part sizes, and where each tensor is cut."""

    def __init__(self, op, sizes: dict[str, tuple[int, int]]):
        spec = op.spec
        self.sizes = sizes
        self.inner = type(op)(Compilation.of_ir(split_dims(spec, tuple(sizes))), op.backend)  # an AttentionOp
        split = op.comp.legality.split_dims[:1]
        if self.inner.comp.legality.split_dims[:1] != split:  # the programs would split another dim
            raise NotSplittable(f"the parts change the dim split across programs ({split} -> "
                                f"{self.inner.comp.legality.split_dims[:1]})")
        # per input / output (feature axes after B, T, H) and state (after B, H): the axis cut, or None
        self.inputs = [self._axis(d.dims, 0) for d in spec.inputs]
        self.outputs = [self._axis(d.dims, 0) for d in spec.outputs]
        self.states = [self._axis(d.dims, 2) for d in spec.states]

    def _axis(self, dims: tuple[str, ...], lead: int) -> tuple[int, tuple[int, int]] | None:
        for i, d in enumerate(dims):
            if d in self.sizes:
                return lead + i, self.sizes[d]
        return None

    @staticmethod
    def _cut(x, cut) -> list:
        if cut is None or x is None:
            return [x]
        return [p.contiguous() for p in torch.split(x, list(cut[1]), dim=cut[0])]

    @staticmethod
    def _join(values: list, cuts: list) -> list:
        out, it = [], iter(values)
        for cut in cuts:
            out.append(next(it) if cut is None else torch.cat([next(it) for _ in range(PARTS)], dim=cut[0]))
        return out

    def __call__(self, tensors, init: list, output_final_state: bool, **kw):
        xs = [p for x, cut in zip(tensors, self.inputs) for p in self._cut(x, cut)]
        states = [p for s, cut in zip(init, self.states) for p in self._cut(s, cut)] if init else None
        o, finals = self.inner(*xs, initial_state=states, output_final_state=output_final_state, **kw)
        outs = self._join(list(o) if isinstance(o, tuple) else [o], self.outputs)
        o = outs[0] if len(outs) == 1 else tuple(outs)
        if not output_final_state:
            return o, None
        finals = self._join(list(finals) if isinstance(finals, tuple) else [finals], self.states)
        return o, (finals[0] if len(finals) == 1 else tuple(finals))


def parts_of(comp, dims: dict[str, int]) -> dict[str, tuple[int, int]]:
    """The feature dims of a linear spec's call (sizes `dims`) that run in parts: those no program split cuts
    (the split dim's blocks are masked as they are) where two power-of-two parts pad less than one tile."""
    if comp.ir.family != "linear":
        return {}
    split = comp.legality.split_dims[:1]
    return {n: p for n, s in dims.items() if n not in split and (p := part_sizes(s)) is not None}


def part_dims(dims: dict[str, int], parts: dict[str, tuple[int, int]]) -> dict[str, int]:
    """`dims` with each parted dim replaced by its parts' sizes (the split spec's dims)."""
    out = {n: s for n, s in dims.items() if n not in parts}
    out.update({part_name(n, i): size for n, sizes in parts.items() for i, size in enumerate(sizes)})
    return out


def describe_parts(parts: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{n}={a + b} as {a} + {b}" for n, (a, b) in parts.items())


def parts_for(op, tensors) -> dict[str, tuple[int, int]]:
    """parts_of for a call's tensors; none where they do not match the spec (the op's checks report it)."""
    dims = {}
    for d, x in zip(op.spec.inputs, tensors):
        if not torch.is_tensor(x) or x.dim() != len(d.dims):
            return {}
        dims.update(zip(d.dims[3:], x.shape[3:]))
    return parts_of(op.comp, dims)


def parted_call(op, tensors, cache: dict):
    """The PartedCall for this call's dims (memoised per part sizes), or None: no dim gains from parts, or
    the spec cannot split them (`op.last_dim_parts` says which and why)."""
    sizes = parts_for(op, tensors)
    key = tuple(sorted(sizes.items()))
    if key not in cache:
        try:
            cache[key] = (PartedCall(op, sizes) if sizes else None), (f"parts: {describe_parts(sizes)}" if sizes
                                                                      else "no parts")
        except NotSplittable as e:
            cache[key] = None, f"padded tiles: {e}"
    call, op.last_dim_parts = cache[key]
    return call


__all__ = ["PartedCall", "parted_call", "parts_of", "part_dims", "describe_parts"]
