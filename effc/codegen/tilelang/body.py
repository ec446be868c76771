"""The statements of one TileLang kernel: buffers, T.Parallel loops, and how a value is read.

TileLang distributes a fragment (registers) over the threads with a layout that its passes infer
from the loops and gemms that touch it; a T.Parallel loop can read a fragment only where each
thread already holds the element: the loop's own index over the fragment's own shape. Any other
read (a broadcast, a transpose, `last`) goes through a shared-memory mirror, copied once per chunk
before the loop that needs it. Shared memory can be read at any index.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ...ir.nodes import C
from .printer import TileLangPrinter, token_ok
from .schedule import KernelSchedule

F32 = '"float32"'
IN = "dtype"  # the factory's input dtype: loads, stores and gemm operands
SPILL_CHARS = 1200  # an inline expression longer than this is computed once into shared memory
_ONE = sympy.Integer(1)


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[str, ...]  # extents as printed: C, a dim, BLOCK, 1
    scope: str  # shared | fragment
    dtype: str  # a dtype expression: "float32" or dtype


@dataclass
class _Loop:
    shape: tuple[str, ...]
    vars: tuple[str, ...]


@dataclass
class Body:
    printer: TileLangPrinter
    sched: KernelSchedule
    split: str | None
    # feature dims whose tiles pass their real size (a dim of `padded` columns, or the split dim in blocks that
    # do not divide it): loads read 0 past the real size, stores skip those columns, and sums and maxima over
    # such an axis see 0 / -inf there. Empty for power-of-two dims: their program has no mask at all.
    masked: frozenset = frozenset()
    allocs: list[str] = field(default_factory=list)
    where: dict[str, Buffer] = field(default_factory=dict)  # value -> the buffer holding it
    loads: set[str] = field(default_factory=set)  # raw inputs: zero past T, in the input dtype
    lines: list[str] = field(default_factory=list)
    gemm_shapes: list[tuple[str, ...]] = field(default_factory=list)  # (M, N) of each T.gemm
    pass_configs: dict[str, bool] = field(default_factory=dict)  # for tilelang.compile
    _names: set[str] = field(default_factory=set)
    _loops: list[_Loop] = field(default_factory=list)
    _mirrors: dict[str, Buffer] = field(default_factory=dict)
    _fresh: set[str] = field(default_factory=set)  # fragments whose mirror holds their current value
    _staged: dict[tuple, str] = field(default_factory=dict)  # (purpose, value, mask) -> its buffer
    prelude: list[str] = field(default_factory=list)  # scalars bound once per program, before the chunk loop
    consts: dict[str, str] = field(default_factory=dict)  # factory-level constants of the sizes (name -> value)
    _scalars: dict[str, str] = field(default_factory=dict)

    # -- shapes and buffers -------------------------------------------------------------------
    def extents(self, shape) -> tuple[str, ...]:
        out = []
        for d in shape:
            if d == _ONE:
                out.append("1")
            elif d == C:
                out.append("C")
            elif str(d) == self.split:
                out.append("BLOCK")
            else:
                out.append(f"{d}_P" if str(d) in self.masked else str(d))
        return tuple(out) or ("1",)

    def axis_ok(self, extent: str, i: str) -> str | None:
        """The condition under which element i of an axis of this printed extent is real: a token of the
        sequence, a column inside a masked dim's real size; None where every element is."""
        if extent == "C":
            return token_ok(i)
        if extent == "BLOCK" and self.split in self.masked:
            return f"(pid_s * BLOCK + {i} < {self.split})"
        if extent.endswith("_P") and extent[:-2] in self.masked:
            return f"({i} < {extent[:-2]})"
        return None

    def real(self, extents, ivars) -> list[str]:
        """The conditions (possibly none) under which the element at ivars of a tile of `extents` is real."""
        return [c for c in (self.axis_ok(e, i) for e, i in zip(extents, ivars)) if c is not None]

    def has_padding(self, extents) -> bool:
        return any(self.axis_ok(e, "i") is not None for e in extents)

    def _masking(self, extents, axes) -> tuple[int, ...]:
        """The axes among `axes` that have elements which are not real (tokens, masked columns)."""
        return tuple(ax for ax in axes if self.axis_ok(extents[ax], "i") is not None)

    def reserve(self, names) -> None:
        """Names the kernel uses otherwise (arguments, sizes, loop variables): no buffer takes them."""
        self._names.update(names)

    def _fresh_name(self, base: str) -> str:
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return name

    def alloc(self, base: str, shape: tuple[str, ...], scope: str, dtype: str) -> Buffer:
        name = self._fresh_name(base)
        call = "T.alloc_fragment" if scope == "fragment" else "T.alloc_shared"
        self.allocs.append(f"{name} = {call}(({', '.join(shape)},), {dtype})")
        return Buffer(name, shape, scope, dtype)

    def fragment(self, value: str, shape) -> str:
        buf = self.alloc(f"f_{value}", self.extents(shape), "fragment", F32)
        self.where[value] = buf
        return buf.name

    def shared(self, value: str, shape) -> str:
        buf = self.alloc(f"s_{value}", self.extents(shape), "shared", F32)
        self.where[value] = buf
        return buf.name

    # -- statements -----------------------------------------------------------------------------
    def section(self) -> list[str]:
        """Start a new run of statements (the chunk body, a prologue, ...); mirrors and staged operands
        do not carry over (a state may have changed in between)."""
        self.lines = []
        self._fresh = set()
        self._staged = {}
        return self.lines

    def stmt(self, line: str) -> None:
        self.lines.append(line)

    def wrote(self, buf_name: str) -> None:
        self._fresh.discard(buf_name)

    def loop(self, shape: tuple[str, ...], lvalue, value, guard=None, dtype: str = F32) -> None:
        """`for i.. in T.Parallel(shape): [if guard(i):] lvalue(i) = value(i)`. Printing the value first lets
        mirrors and spills it needs land before the loop."""
        ivars = tuple(f"i{k}" for k in range(len(shape)))
        self._loops.append(_Loop(shape, ivars))
        try:
            text = value(ivars)
        finally:
            self._loops.pop()
        if dtype != F32:
            text = f"T.Cast({dtype}, {text})"
        self.stmt(f"for {', '.join(ivars)} in T.Parallel({', '.join(shape)}):")
        if guard is not None:
            self.stmt(f"    if {guard(ivars)}:")
            self.stmt(f"        {lvalue(ivars)} = {text}")
        else:
            self.stmt(f"    {lvalue(ivars)} = {text}")

    def nest(self, headers, shape: tuple[str, ...], lines_fn) -> None:
        """`for i.. in T.Parallel(shape):` running the statements lines_fn(i) returns, inside `headers` (a
        serial loop, an if; each inside the one before). lines_fn runs twice: first for the statements its
        reads need (mirror copies, spills), which land before the headers rather than once per serial step."""
        ivars = tuple(f"i{k}" for k in range(len(shape)))
        self._loops.append(_Loop(shape, ivars))
        try:
            lines_fn(ivars)
            text = lines_fn(ivars)
        finally:
            self._loops.pop()
        pad = ["    " * d for d in range(len(headers) + 2)]
        self.lines.extend(p + h for p, h in zip(pad, headers))
        self.stmt(f"{pad[len(headers)]}for {', '.join(ivars)} in T.Parallel({', '.join(shape)}):")
        self.lines.extend(pad[len(headers) + 1] + ln for ln in text)

    def fill(self, buf: Buffer, value_fn, mask_axes=(), fill: str = "0.0") -> None:
        """buf = value_fn(i) elementwise; on `mask_axes`, rows of padded tokens and masked feature columns get
        `fill` (a select, so inf or nan there is dropped)."""
        def value(ivars):
            text = value_fn(ivars)
            for ax in self._masking(buf.shape, mask_axes):
                text = f"T.if_then_else({self.axis_ok(buf.shape[ax], ivars[ax])}, {text}, {fill})"
            return text

        self.loop(buf.shape, lambda iv: f"{buf.name}[{', '.join(iv)}]", value, dtype=buf.dtype)
        self.wrote(buf.name)

    def assign(self, buf: Buffer, value, mask_axes=(), fill: str = "0.0") -> None:
        """buf = value, elementwise over buf's shape (the value's tile shape)."""
        self.fill(buf, lambda iv: self.read(value, iv), mask_axes, fill)

    # -- reading values ---------------------------------------------------------------------------
    def read(self, a, idx) -> str:
        idx = tuple(idx)
        leaf = self.printer.leaf(a, idx)
        if leaf is not None:
            return leaf
        buf = self.where.get(a)
        if buf is not None:
            return self.load(buf, idx)
        op = self.sched.defs.get(a)
        if op is None:
            raise KeyError(f"TileLang backend: no buffer or op defines '{a}'")
        if op.type.rank == 0 and a in self._scalars:
            return self._scalars[a]
        text = self.printer.expr(op, idx, self.read)
        if op.type.rank == 0 and "T." in text and "[" not in text and "n_valid" not in text:
            # a per-program constant (of the head, params, sizes): computed once, not once per element of
            # every loop that reads it. Not chunk values: a binding inside T.Pipelined does not survive
            # its stage split
            name = self._fresh_name(f"c_{a}")
            self.prelude.append(f"{name} = {text}")
            self._scalars[a] = name
            return name
        if len(text) > SPILL_CHARS and op.type.rank > 0:
            buf = self.alloc(f"s_{a}", self.extents(op.type.shape), "shared", F32)
            self.fill(buf, lambda iv: self.printer.expr(op, iv, self.read))
            self.where[a] = buf
            return self.load(buf, idx)
        return text

    def load(self, buf: Buffer, idx) -> str:
        idx = tuple(idx) or ("0",)
        loop = self._loops[-1] if self._loops else None
        own = loop is not None and loop.shape == buf.shape and idx == loop.vars
        if buf.scope == "fragment" and not own:
            buf = self.mirror(buf)
        text = f"{buf.name}[{', '.join(idx)}]"
        return text if buf.dtype == F32 else f'T.Cast("float32", {text})'

    def mirror(self, frag: Buffer) -> Buffer:
        m = self._mirrors.get(frag.name)
        if m is None:
            m = self._mirrors[frag.name] = self.alloc(f"{frag.name}_sh", frag.shape, "shared", F32)
        if frag.name not in self._fresh:
            self.stmt(f"T.copy({frag.name}, {m.name})")
            self._fresh.add(frag.name)
        return m

    # -- operands for anchors ---------------------------------------------------------------------
    def _tile(self, value) -> tuple[str, ...]:
        return self.extents(self.printer.types[value].shape)

    def gemm_operand(self, value: str, contract_axis: int) -> tuple[str, bool]:
        """A shared buffer in the input dtype holding `value` (or the tile it transposes), and
        whether T.gemm must transpose it. Along the contracted axis, rows of padded tokens and
        masked feature columns are zeroed; raw loads are zero there already."""
        op = self.sched.defs.get(value)
        transposed = op is not None and op.kind == "transpose" and self.sched.is_inline(value)
        base = op.args[0] if transposed else value
        axis = 1 - contract_axis if transposed else contract_axis
        if base in self.loads:  # zero on padded tokens and masked columns already
            return self.where[base].name, transposed
        # the contracted axis: padded token rows (when it is the token axis) or masked feature columns
        axes = self._masking(self._tile(base), (axis,))
        key = ("gemm", base, axes)
        if key not in self._staged:
            buf = self.alloc(f"g_{base}", self._tile(base), "shared", IN)
            self.assign(buf, base, mask_axes=axes)
            self._staged[key] = buf.name
        return self._staged[key], transposed

    def stage_shared(self, value: str, mask_axes=()) -> str:
        mask_axes = self._masking(self._tile(value), mask_axes)
        buf = self.where.get(value)
        if buf is not None and buf.scope == "shared" and buf.dtype == F32 and not mask_axes:
            return buf.name
        key = ("shared", value, tuple(mask_axes))
        if key not in self._staged:
            b = self.alloc(f"t_{value}", self._tile(value), "shared", F32)
            self.assign(b, value, mask_axes)
            self._staged[key] = b.name
        return self._staged[key]

    def stage_fragment(self, value: str, mask_axes=(), fill: str = "0.0") -> str:
        mask_axes = self._masking(self._tile(value), mask_axes)
        buf = self.where.get(value)
        if buf is not None and buf.scope == "fragment" and not mask_axes:
            return buf.name
        b = self.alloc(f"r_{value}", self._tile(value), "fragment", F32)
        self.assign(b, value, mask_axes, fill)
        return b.name

    def fill_fragment(self, base: str, shape, term, mask_axes=()) -> str:
        b = self.alloc(f"f_{base}", self.extents(shape), "fragment", F32)
        self.fill(b, term, mask_axes)
        return b.name
