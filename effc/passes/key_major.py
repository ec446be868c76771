"""The dK/dV walk in key-major orientation: BwdKernel -> BwdKernel.

The backward's IR writes every pair tile query-major ([C, CK]: query rows, key columns), as the spec
does. In the dK/dV walk (one program per key block) that orientation makes both per-block matmuls
transpose a register tile: dX = P^T @ dR and dK = Q^T @ ds. On Hopper the left operand of a matmul
may come from registers but only untransposed, so each transposed register tile is a round trip
through shared memory per walk step. Held key-major ([CK, C]) instead, P^T and ds^T are what is in
registers, and the only transposed operands are loaded tiles (Q^T, dR^T), which Triton reads
transposed from shared memory for free.

Each value gets an orientation: stored as written, or stored transposed ("flipped"). Pair tiles
(rank 2 over {C, CK, 1}) produced by element-wise ops, matmuls and expands are flipped; `transpose`
becomes a relabelling (`copy`, no data movement); a row reduction of a flipped tile becomes a column
reduction; a matmul whose result is not a pair tile keeps whichever orientation needs fewer register
transposes of its operands, loaded tiles counting as free. An operand in the wrong orientation gets
an explicit `transpose`. The gradients leave the kernel in their written orientation.
"""
from __future__ import annotations

from ..ir import ops as O
from ..ir.nodes import C, CK, Op, TileType
from .softmax_bwd import BwdKernel, acc_name

_SWAP_REDUCTION = {"rowsum": "colsum", "colsum": "rowsum", "rowmax": "colmax", "colmax": "rowmax"}
_ELEMENTWISE = frozenset(O.UNARY + O.BINARY + O.COMPARE + O.LOGIC + ("where", "bcast", "gtz", "sign"))
_LOADS = ("query", "key")


class NotKeyMajor(Exception):
    """The kernel has an op this pass does not orient; the emitter keeps the query-major kernel."""


def is_pair(t: TileType | None) -> bool:
    return t is not None and t.rank == 2 and set(t.shape) <= {C, CK, 1} and bool({C, CK} & set(t.shape))


def _flip(t: TileType) -> TileType:
    return TileType(tuple(reversed(t.shape)))


class _Orienter:
    def __init__(self, kp: BwdKernel):
        self.types = dict(kp.types)  # stored shapes
        self.flipped: set[str] = set()
        self.loaded: set[str] = set()  # loaded tiles and relabellings of them: free to transpose
        self.converted: dict[tuple[str, bool], str] = {}
        made = {op.out for ops in (kp.outer_ops, kp.loop_fwd, kp.loop_vjp, kp.post_vjp) for op in ops}
        for name, t in kp.types.items():  # values the template provides (qpos, kpos, P): key-major too
            if is_pair(t) and name not in made:
                self._set(name, t, True)

    def _set(self, name: str, logical: TileType, flipped: bool):
        self.types[name] = _flip(logical) if flipped else logical
        (self.flipped.add if flipped else self.flipped.discard)(name)

    def _op(self, out: str, kind: str, args, logical: TileType, flipped: bool) -> Op:
        self._set(out, logical, flipped)
        return Op(out, kind, tuple(args), self.types[out])

    def logical(self, x: str) -> TileType:
        return _flip(self.types[x]) if x in self.flipped else self.types[x]

    def cost(self, x, want_flipped: bool) -> int:
        return int(isinstance(x, str) and x in self.types and (x in self.flipped) != want_flipped
                   and x not in self.loaded)

    def as_(self, x, want_flipped: bool, out: list[Op]):
        """`x` stored in the wanted orientation: itself, or an explicit transpose of it."""
        if not isinstance(x, str) or x not in self.types or (x in self.flipped) == want_flipped:
            return x
        if self.types[x].rank < 2:
            raise NotKeyMajor(f"a rank-{self.types[x].rank} value '{x}' meets a pair tile element-wise")
        key = (x, want_flipped)
        if key not in self.converted:
            name = f"{x}_km" if want_flipped else f"{x}_qm"
            out.append(self._op(name, "transpose", (x,), self.logical(x), want_flipped))
            if x in self.loaded:
                self.loaded.add(name)
            self.converted[key] = name
        return self.converted[key]

    def orient(self, ops: tuple[Op, ...], kp_types: dict) -> tuple[Op, ...]:
        out: list[Op] = []
        for op in ops:
            k, logical = op.kind, kp_types[op.out]
            if k in _LOADS:
                out.append(self._op(op.out, k, op.args, logical, is_pair(logical)))
                if not is_pair(logical):
                    self.loaded.add(op.out)
            elif k == "expand":
                pattern = op.args[1:]
                flip = is_pair(logical)
                out.append(self._op(op.out, k, (op.args[0],) + (tuple(reversed(pattern)) if flip else pattern),
                                    logical, flip))
            elif k in ("transpose", "copy"):
                x = op.args[0]
                # transpose(x) is x's stored tile read the other way: a relabelling
                flip = (x in self.flipped) == (k == "copy")
                out.append(self._op(op.out, "copy", (x,), logical, flip))
                if x in self.loaded:
                    self.loaded.add(op.out)
            elif k in _ELEMENTWISE:
                flip = is_pair(logical)
                args = [self.as_(a, flip, out) if isinstance(a, str) and a in self.types and self.types[a].rank == 2
                        else a for a in op.args]
                if flip and any(isinstance(a, str) and a in self.types and self.types[a].rank == 1 for a in args):
                    raise NotKeyMajor(f"'{op.out} = {k}(...)' broadcasts a vector over a pair tile")
                out.append(self._op(op.out, k, args, logical, flip))
            elif k in O.REDUCTIONS:
                x = op.args[0]
                kind = _SWAP_REDUCTION[k] if x in self.flipped else k
                out.append(self._op(op.out, kind, op.args, logical, False))
            elif k == "total":
                out.append(self._op(op.out, k, op.args, logical, False))
            elif k == "matmul":
                a, b = op.args
                if is_pair(logical):
                    flip = True
                else:  # whichever orientation transposes fewer register tiles; written on a tie
                    flip = self.cost(a, True) + self.cost(b, True) < self.cost(a, False) + self.cost(b, False)
                args = (self.as_(b, True, out), self.as_(a, True, out)) if flip else \
                    (self.as_(a, False, out), self.as_(b, False, out))
                out.append(self._op(op.out, k, args, logical, flip))
            else:
                raise NotKeyMajor(f"op '{k}' ({op.out})")
        return tuple(out)


def key_major(kp: BwdKernel) -> BwdKernel:
    """`kp` with its pair tiles held key-major (see the module's docstring); raises NotKeyMajor for an
    op it does not orient."""
    o = _Orienter(kp)
    outer = o.orient(kp.outer_ops, kp.types)
    loop_fwd = o.orient(kp.loop_fwd, kp.types)
    loop_vjp = o.orient(kp.loop_vjp, kp.types)
    for x, c in kp.accumulators:  # an accumulator is held as its per-block contributions are
        o._set(acc_name(x), kp.types[acc_name(x)], c in o.flipped)
    post = o.orient(kp.post_vjp, kp.types)
    tail: list[Op] = []
    grads = tuple((x, o.as_(g, False, tail)) for x, g in kp.leaf_grads)
    return BwdKernel(kp.name, outer, loop_fwd, loop_vjp, kp.accumulators, post + tuple(tail), grads, o.types)
