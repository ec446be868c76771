"""A spec with branches (passes.branches): each branch's softmax op in order. The earlier branches write
their outputs per token; the last reads them and runs the spec's merge in its walk's epilogue. Autograd
chains the backwards: the last branch's backward gives the earlier outputs' cotangents."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ArgumentError

# call knobs every branch takes; `block` goes to the branches without a select stage (a select stage's walk
# runs its own block)
_KNOBS = ("chunk", "num_warps", "num_stages", "segments", "defer_merge")


@dataclass(frozen=True)
class BranchConfigs:
    """The tiles of each branch's last call. chunk, block, warps and stages read as the last branch's (the one
    running the spec's merge), for the tools that print one config; str() gives them all."""

    parts: tuple

    def __getattr__(self, knob: str):
        if knob.startswith("_"):
            raise AttributeError(knob)
        return getattr(self.parts[-1][1], knob)

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f"{name}: {r}" for name, cfg in self.parts for r in cfg.reasons)

    def __str__(self) -> str:
        return "; ".join(f"{name}: {cfg}" for name, cfg in self.parts)


class BranchedOp:
    """Call like a softmax op: `op(*inputs, cu_seqlens=None, chunk=, block=, **params)` -> (outputs, None)."""

    def __init__(self, comp, parts: list, backend: str = "triton"):
        """`parts`: the branches' softmax ops, in the order they run (runtime.softmax_op.make_op)."""
        self.comp, self.backend = comp, backend
        self.split = comp.branch_split
        self.parts = parts
        self.name = self.split.spec
        self.spec = _signature(self.name, self.split.module, self.parts)
        self.last_config = None

    def __repr__(self) -> str:
        return (f"<effc branched op {self.name}({', '.join(d.name for d in self.spec.inputs)}): "
                f"{' -> '.join(p.name for p in self.parts)} backend={self.backend}>")

    def _named(self, tensors) -> dict:
        names = [d.name for d in self.spec.inputs]
        if len(tensors) != len(names):
            raise ArgumentError(f"{self.name} takes {len(names)} inputs ({', '.join(names)}), got {len(tensors)}")
        return dict(zip(names, tensors))

    def _route(self, given: dict) -> list[dict]:
        """Each branch's call arguments: the knobs, and the params it declares (a param no branch declares is
        an error naming the ones there are)."""
        params = {p.name for op in self.parts for p in op.spec.params}
        for k in given:
            if k not in params and k not in _KNOBS + ("block",):
                raise ArgumentError(f"{self.name}: unknown argument '{k}'; params: {', '.join(sorted(params))}; "
                                    f"knobs: {', '.join(_KNOBS + ('block',))}")
        out = []
        for op in self.parts:
            kw = {**_own_params(op, given), **{k: v for k, v in given.items() if k in _KNOBS}}
            if "block" in given and op.spec.selection is None:
                kw["block"] = given["block"]
            out.append(kw)
        return out

    def _run(self, call, tensors, cu_seqlens, given: dict, cast):
        named = self._named(tensors)
        outs: dict = {}
        for op, kw, writes in zip(self.parts, self._route(given), self.split.writes + ((),)):
            args = [named[d.name] if d.name in named else cast(outs[d.name]) for d in op.spec.inputs]
            o, _ = call(op)(*args, cu_seqlens=cu_seqlens, **kw)
            o = o if isinstance(o, tuple) else (o,)
            outs.update(zip(writes, o))
        return (o[0] if len(o) == 1 else o), None

    def __call__(self, *tensors, cu_seqlens=None, **given):
        dtype = tensors[0].dtype if tensors else None
        out = self._run(lambda op: op, tensors, cu_seqlens, given, lambda x: x.to(dtype))
        self.last_config = BranchConfigs(tuple((op.name, op.last_config) for op in self.parts))
        return out

    def reference(self, *tensors, cu_seqlens=None, dtype=torch.float64, matmul_dtype=None, initial_state=None,
                  output_final_state: bool = False, **params):
        """The branches' oracles chained as the kernels chain (the earlier outputs in the inputs' dtype)."""
        if initial_state is not None or output_final_state:
            raise ArgumentError(f"{self.name} has no state: initial_state / output_final_state do not apply")
        cast = tensors[0].dtype if tensors else dtype

        def call(op):
            return lambda *a, **kw: op.reference(*a, dtype=dtype, matmul_dtype=matmul_dtype, **kw)
        return self._run(call, tensors, cu_seqlens, params, lambda x: x.to(cast))

    def param_values(self, dims: dict[str, int], given: dict) -> dict[str, float]:
        """Every branch's param values at these dims (a param several branches read has one value)."""
        out: dict[str, float] = {}
        for op in self.parts:
            out.update(op.param_values(dims, _own_params(op, given)))
        return out

    def recurrent_reference(self, *tensors, **kw):
        return self.reference(*tensors, **kw)

    def flops(self, B: int, T: int, H: int, dims: dict[str, int], backward: bool = False, **params) -> float:
        return sum(op.flops(B, T, H, dims, backward, **_own_params(op, params)) for op in self.parts)

    def _no_decoding(self, *_, **__):
        raise NotImplementedError(f"{self.name}: decoding a spec with branches (passes.branches) is not "
                                  "implemented (no decode kernels chain the branches); call the op on the whole "
                                  "query sequence")

    step = decode = new_cache = _no_decoding


def _own_params(op, given: dict) -> dict:
    """The call-time values of the params branch `op` declares."""
    own = {p.name for p in op.spec.params}
    return {k: v for k, v in given.items() if k in own}


def _signature(name: str, module, parts) -> "Spec":  # noqa: F821
    """The spec's interface as the ops of one family present it (inputs in declaration order with their
    lowered declarations, the outputs, the branches' params, the key sequence): what random_inputs and the
    checks read. Its stages are empty: the branches' specs hold the computation."""
    from ..ir.nodes import Stage
    sdef = next(s for s in module.specs if s.name == name)
    decls = {d.name: d for op in parts for d in op.spec.inputs}
    inputs = tuple(decls[d.name] for d in sdef.decls if d.kind == "input" and d.name in decls)
    params = tuple({p.name: p for op in parts for p in op.spec.params}.values())
    keyseq = next((op.spec.keyseq for op in parts if op.spec.keyseq is not None), None)
    last = parts[-1].spec
    empty = {st: Stage(st, ()) for st in ("intra", "merge", "inter", "prefix", "score", "select")}
    return replace(last, name=name, inputs=inputs, params=params, keyseq=keyseq, masks=(), selection=None,
                   **empty)
