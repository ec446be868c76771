"""A spec with branches (passes.branches): each branch's softmax op in order. The earlier branches write
their outputs per token; the last reads them and runs the spec's merge in its walk's epilogue. Autograd
chains the backwards: the last branch's backward gives the earlier outputs' cotangents."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ArgumentError
from .checks import check_inputs
from .softmax_decode import cache_dict

# call knobs every branch takes; `block` goes to the branches without a select stage (a select stage's walk
# runs its own block)
_KNOBS = ("chunk", "num_warps", "num_stages", "segments", "defer_merge")
_OWN_KNOBS = ("block", "partition")  # given to the branches they apply to: block to those without a select stage,
# partition to those choosing key blocks (SoftmaxPlan.partitions)


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
            if k not in params and k not in _KNOBS + _OWN_KNOBS:
                raise ArgumentError(f"{self.name}: unknown argument '{k}'; params: {', '.join(sorted(params))}; "
                                    f"knobs: {', '.join(_KNOBS + _OWN_KNOBS)}")
        out = []
        for op in self.parts:
            kw = {**_own_params(op, given), **{k: v for k, v in given.items() if k in _KNOBS}}
            if "block" in given and op.spec.selection is None:
                kw["block"] = given["block"]
            if "partition" in given and op.comp.plan.partitions:  # the branch with a choice of key blocks
                kw["partition"] = given["partition"]
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

    # -- decoding: each branch's decode in order, sharing one cache ----------------------------------------
    @property
    def cache_names(self) -> tuple[str, ...]:
        """The tensors a KV cache holds: every branch's (softmax_op.SoftmaxOp.cache_names), each once; the
        branches that read the same key input share its cache."""
        return tuple(dict.fromkeys(x for op in self.parts for x in op.cache_names))

    def new_cache(self, *tokens, max_len: int) -> dict[str, torch.Tensor]:
        """Zero caches {name: (B, max_len, Hx, ...)} for requests shaped like `tokens` (every input's new tokens
        as `decode` takes them)."""
        named = self._named(tokens)
        B, tq, H, dims = check_inputs(self.spec, tokens, for_kernels=False)
        # the earlier branches' outputs for the new tokens, as zeros: a branch's cache reads only their shapes
        outs = {d.name: tokens[0].new_zeros((B, tq, H) + tuple(dims[f] for f in d.feature_dims))
                for op in self.parts for d in op.spec.inputs if d.name not in named}
        cache: dict[str, torch.Tensor] = {}
        for op in self.parts:
            need = [x for x in op.cache_names if x not in cache]
            if need:
                made = op.new_cache(*self._branch_tokens(op, named, outs), max_len=max_len)
                cache.update({x: made[x] for x in need})
        return {x: cache[x] for x in self.cache_names}

    @staticmethod
    def _branch_tokens(op, named: dict, outs: dict) -> list:
        """Branch `op`'s inputs for the new tokens: the spec's inputs, and earlier branches' outputs."""
        return [named[d.name] if d.name in named else outs[d.name] for d in op.spec.inputs]

    def decode(self, *tokens, cache, cache_seqlens, splits: int | None = None, **given):
        """Decoding against a KV cache, as SoftmaxOp.decode takes it (`cache` by `cache_names`): each branch
        decodes the new tokens in order, the earlier ones' outputs for them feeding the last, which runs the
        spec's merge. Inputs over a key sequence of their own are passed whole, (B, S, H, D)."""
        named = self._named(tokens)
        cache = cache_dict(cache, self.cache_names)
        knobs = [k for k in given if k in _KNOBS + ("block",)]
        if knobs:
            raise ArgumentError(f"{self.name}.decode: {', '.join(f'{k}=' for k in knobs)}: a knob of the "
                                "whole-sequence call; decode takes splits= and the params")
        outs: dict = {}
        for op, kw, writes in zip(self.parts, self._route(given), self.split.writes + ((),)):
            args = self._branch_tokens(op, named, outs)
            o = op.decode(*args, cache={x: cache[x] for x in op.cache_names}, cache_seqlens=cache_seqlens,
                          splits=splits, **kw)
            o = o if isinstance(o, tuple) else (o,)
            outs.update(zip(writes, (x.to(tokens[0].dtype) for x in o)))
        return o[0] if len(o) == 1 else o

    def step(self, *_, **__):
        raise NotImplementedError(f"{self.name}.step: a spec with branches decodes with decode(...) and a cache "
                                  "(op.new_cache), one call for every branch")


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
