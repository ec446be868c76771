"""Calls whose feature dims run in power-of-two parts (passes.dim_parts). The op runs the split spec's kernels
on the caller's own tensors: a part of an input, output or gradient is a column slice of the caller's tensor,
which the kernels address in place (a part's rows are the caller's width apart, codegen.triton.emit), so no
token tensor is copied. States, small, are cut into their parts and joined by copies."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler import Compilation
from ..ir.nodes import Spec, TensorDecl
from ..passes.dim_parts import NotSplittable, part_of, part_sizes, split_dims


@dataclass(frozen=True)
class Part:
    decl: TensorDecl  # the split spec's declaration
    caller: str  # the caller's tensor it is a slice of
    dim: str | None  # the part dim (None: the whole tensor)
    before: tuple[str, ...] = ()  # the part dims before it in its caller dim (its columns' offset)
    axis: int = 0  # the caller dim's axis among the tensor's feature axes


class PartMap:
    """Where each tensor of a split spec lies in the caller's (`caller`: the caller's spec). It holds no sizes:
    a part's size follows from its caller dim's (`part_sizes`), so one split spec (one generated module, one
    pair of custom ops) serves every call that splits the same dims."""

    def __init__(self, caller: Spec, split: Spec, owner=None):
        """`owner`: the caller's op (its `effc tune` entries are the split op's)."""
        self.caller, self.split, self.owner = caller, split, owner
        self.parts: dict[str, Part] = {}
        for d in split.inputs + split.outputs + split.states:
            hit = part_of(split, d)
            if hit is None:
                self.parts[d.name] = Part(d, d.name, None)
                continue
            name, dim, parts = hit
            self.parts[d.name] = Part(d, name, dim, parts[:parts.index(dim)], d.feature_dims.index(dim))

    def dims(self, caller_dims: dict[str, int]) -> dict[str, int]:
        """The split spec's dim sizes (the caller's, and each part's)."""
        out = dict(caller_dims)
        for parent, parts in self.split.parts:
            out.update(zip(parts, part_sizes(caller_dims[parent])))
        return out

    def members(self, decls: tuple[TensorDecl, ...]) -> dict[str, list[Part]]:
        """The split declarations of `decls` by the caller's tensor they are parts of, in order."""
        out: dict[str, list[Part]] = {}
        for d in decls:
            p = self.parts[d.name]
            out.setdefault(p.caller, []).append(p)
        return out

    def view(self, whole: torch.Tensor, p: Part, dims: dict[str, int], lead: int = 0) -> torch.Tensor:
        """Part `p` of the caller's `whole` (feature axes after B, T, H, or B, H for a state; `lead` axes more
        before them, as a gradient's slots)."""
        if p.dim is None:
            return whole
        return whole.narrow(_first_feature(p.decl) + lead + p.axis, sum(dims[b] for b in p.before), dims[p.dim])

    def views(self, decls, tensors: dict[str, torch.Tensor], dims: dict[str, int]) -> dict[str, torch.Tensor]:
        """Each split declaration of `decls` as a view of its caller's tensor in `tensors`."""
        return {d.name: self.view(tensors[self.parts[d.name].caller], self.parts[d.name], dims) for d in decls}

    def cut_states(self, tensors: dict[str, torch.Tensor], dims: dict[str, int]) -> dict[str, torch.Tensor]:
        """The caller's states cut into the split spec's (contiguous copies: the kernels read whole states)."""
        return {s.name: self.view(tensors[self.parts[s.name].caller], self.parts[s.name], dims).contiguous()
                for s in self.split.states if self.parts[s.name].caller in tensors}

    def join(self, decls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The split declarations' tensors joined into the caller's (a copy where a tensor has parts)."""
        out = {}
        for caller, members in self.members(decls).items():
            if all(m.decl.name in tensors for m in members):
                ts = [tensors[m.decl.name] for m in members]
                first = members[0]
                out[caller] = ts[0] if first.dim is None else torch.cat(ts, _first_feature(first.decl) + first.axis)
        return out


def _first_feature(decl: TensorDecl) -> int:
    return 2 if decl.role == "state" else 3


def parts_of(comp, dims: dict[str, int]) -> dict[str, tuple[int, int]]:
    """The feature dims of a linear spec's call (sizes `dims`) that run in parts: those no program split cuts
    (the split dim's blocks are masked as they are) where two power-of-two parts pad less than one tile."""
    if comp.ir.family != "linear":
        return {}
    split = comp.legality.split_dims[:1]
    out = {}
    for n, s in dims.items():
        sizes = part_sizes(s) if n not in split else None
        if sizes is not None:
            out[n] = sizes
    return out


def tile_widths(comp, dims: dict[str, int]) -> dict[str, int]:
    """The width of the tiles a call's kernels run each feature dim in: the next power of two (padded), or
    the padded parts' where the dim runs in parts (96: 64 + 32, no padding)."""
    from ..policy.tiling import padded
    parts = parts_of(comp, dims)
    return {d: sum(padded(p) for p in parts[d]) if d in parts else padded(v) for d, v in dims.items()}


def describe_parts(parts: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{n}={a + b} as {a} + {b}" for n, (a, b) in parts.items())


def parts_for(op, shapes) -> dict[str, tuple[int, int]]:
    """parts_of for a call's tensor shapes; none where they do not match the spec (the op's checks report it)."""
    dims = {}
    for d, shape in zip(op.spec.inputs, shapes):
        if shape is None or len(shape) != len(d.dims):
            return {}
        dims.update(zip(d.dims[3:], shape[3:]))
    return parts_of(op.comp, dims)


def split_op(op, sizes: dict[str, tuple[int, int]]):
    """The op running `op`'s spec with `sizes`' dims in parts, on the caller's tensors (NotSplittable where the
    spec cannot split them)."""
    spec = op.spec
    split = Compilation.of_ir(split_dims(spec, tuple(sizes)))
    if split.legality.split_dims[:1] != op.comp.legality.split_dims[:1]:  # the programs would split another dim
        raise NotSplittable(f"the parts change the dim split across programs ({op.comp.legality.split_dims[:1]} -> "
                            f"{split.legality.split_dims[:1]})")
    if split.plan.seed_grads:
        raise NotSplittable("an input whose gradient is an output's cotangent")
    return type(op)(split, op.backend, parts=PartMap(spec, split.typed, owner=op))  # an AttentionOp


def choose_parts(op, shapes: tuple, cache: dict, device: str = "cpu") -> tuple:
    """Which dims of a call with these tensor shapes, on a `device` of this type, run in parts: a key of
    `cache`, which holds the split op for those dims (one for every size they take) or None: no dim gains from
    parts, the spec cannot split them, or the GPU would not run them right (policy.triton_faults.parts_fault;
    `op.last_dim_parts` says which and why)."""
    from ..policy.triton_faults import parts_fault
    sizes = parts_for(op, shapes)
    key = tuple(sorted(sizes))
    held = parts_fault(op.spec, sizes) if device == "cuda" and sizes else None
    if held:
        key = ("held",) + key
        cache.setdefault(key, (None, held))
    if key not in cache:
        try:
            cache[key] = (split_op(op, sizes) if sizes else None), ""
        except NotSplittable as e:
            cache[key] = None, f"padded tiles: {e}"
    inner, refused = cache[key]
    op.last_dim_parts = refused or (f"parts: {describe_parts(sizes)}" if sizes else "no parts")
    return key


__all__ = ["PartMap", "choose_parts", "parts_of", "describe_parts", "split_op", "tile_widths"]
