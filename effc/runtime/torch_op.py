"""Compiled ops as `torch.library` custom ops, one mechanism for every family: each op is a pair of
custom ops (forward, backward) with fake implementations and an autograd formula, so calls work under
autograd and `torch.compile` (fullgraph) alike. `register` builds the pair from a `Family`, the functions
a family runs behind it; `linear_torch_ops` is the linear family's (softmax_torch_op.py the softmax
family's). The host side of a call (checks, tile choices) runs in `host_plan`, a compile-time constant.

The linear family's autograd formula runs the derived backward kernel; when the forward did not keep the
per-chunk states (the memory rule in passes.tiling.history_policy), it recomputes them first with one more
forward walk."""
from __future__ import annotations

import hashlib
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..passes.partition import PARTITIONS
from ..policy.tiling import TileConfig
from .checks import check_cu_seqlens, chunk_tile_row, history_dtype
from .launch import Launcher, make_layout

# ints passed to the linear family's ops: the tile configuration, then flags
_CFG = ("chunk", "block", "segments", "num_warps", "num_stages", "defer_merge", "partition", "walk_block",
        "walk_chunk")
# partition: an index into passes.partition.PARTITIONS, -1 for the plan's default
# store the final states; keep for the backward the history (1) or the history and prep's values (2,
# policy.tiling.history_policy); the outputs are wanted (not when the backward recomputes the history alone)
_FLAGS = slice(len(_CFG), len(_CFG) + 3)
# then the position of each sequence's first token (`pos_offset`: specs reading `pos` over a later piece)
_POS = len(_CFG) + 3
_REGISTERED: dict[str, "TorchOps"] = {}

# ops by id for host_plan (torch.compile keeps only the id, a constant); weak, so a dropped op is freed
_LIVE: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


# -- the host side of a call ----------------------------------------------------------------------------
def _constant_under_compile(fn):
    """torch.compiler.assume_constant_result, without importing all of dynamo (~1 s of a process's first
    op call) when the process has not: the decorator only sets this flag, which dynamo reads when it traces
    (tests/test_backward.py checks the flag's name against the installed torch)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def live(op) -> None:
    """Makes `op` reachable from host_plan by its id."""
    _LIVE[id(op)] = op


@_constant_under_compile
def host_plan(op_id: int, *args):
    """`op._plan_call(*args)`: checks and tile choices for one call, from hashable argument descriptions
    (checks.describe), so that under compile it runs once per shape, outside the traced graph."""
    return _LIVE[op_id]._plan_call(*args)


@_constant_under_compile
def host_parts(op_id: int, shapes: tuple, device: str) -> tuple:
    """`op._choose_parts(shapes, device)`: which feature dims of a call run in power-of-two parts, a constant
    per shape and device type under compile (runtime.dim_parts)."""
    return _LIVE[op_id]._choose_parts(shapes, device)


def call_lengths(cu_seqlens, first) -> Optional[int]:
    """The longest packed sequence (None: padded batches, or under compile, where reading cu_seqlens
    would stop the trace; the kernels then size their grids for T), cu_seqlens checked in eager mode."""
    if cu_seqlens is None or torch.compiler.is_compiling():
        return None
    tensor = torch.is_tensor(first)
    check_cu_seqlens(cu_seqlens, first.shape[0] if tensor else 0, first.shape[1] if tensor else 0, first.device
                     if tensor else None)
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


# -- the custom ops, shared by every family ------------------------------------------------------------
@dataclass
class Family:
    """What a family's op pair runs. Both ops take the same arguments in every family:
    forward(xs, init, cu, ints, params) -> outputs; backward(xs, kept, cu, d_outs, d_finals, ints, params)
    -> the gradients of xs, then of init. `ints` carry the tile configuration and flags, `params` the spec's
    params, each in an order the family chooses; `*_fake` give the outputs' shapes for tracing."""
    forward: Callable
    forward_fake: Callable
    backward: Callable
    backward_fake: Callable
    kept: Callable  # (outputs, ints) -> the outputs the backward reads
    grads: Callable  # (Saved, output grads, forward, backward) -> (grads of xs, grads of init)


@dataclass
class Saved:
    """What an autograd formula reads: the forward's arguments and the outputs `Family.kept` chose."""
    xs: list
    init: list
    kept: list
    cu: Optional[torch.Tensor]
    ints: list
    params: list


def _setup_context(family: Family):
    def setup(ctx, inputs, output):
        xs, init, cu, ints, params = inputs
        ctx.save_for_backward(*xs, *init, *family.kept(output, ints), *((cu,) if cu is not None else ()))
        ctx.n_x, ctx.n_init, ctx.has_cu = len(xs), len(init), cu is not None
        ctx.ints, ctx.params = list(ints), list(params)
    return setup


def _saved(ctx) -> Saved:
    saved = list(ctx.saved_tensors)
    cu = saved.pop() if ctx.has_cu else None
    n, m = ctx.n_x, ctx.n_x + ctx.n_init
    return Saved(saved[:n], saved[n:m], saved[m:], cu, ctx.ints, ctx.params)


def _gradients(family: Family, ctx, grads, fwd, bwd) -> tuple[list, list]:
    """The gradients of xs and of init (none when no initial state was given) from the output grads."""
    saved = _saved(ctx)
    dxs, dinit = family.grads(saved, list(grads), fwd, bwd)
    return list(dxs), (list(dinit) if saved.init else [])


@dataclass
class TorchOps:
    """`forward`, `backward`: the custom ops torch.compile traces. `call` runs a forward: through the custom
    op under compile; in eager mode through `_Eager`, the same functions and autograd formula without the
    dispatcher, whose first custom-op call in a process imports ~3 s of torch (higher-order ops,
    functionalization) before anything runs."""
    forward: object
    backward: object
    run_forward: object  # the functions the ops wrap
    run_backward: object
    setup_context: object
    family: Family

    def call(self, xs, init, cu, ints, params):
        if torch.compiler.is_compiling():
            return self.forward(xs, init, cu, ints, params)
        return list(_Eager.apply(self, len(xs), cu, ints, params, *xs, *init))


class _Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, n_x, cu, ints, params, *tensors):
        # an output nothing reads (the state history kept for the backward, a final state) gets None, not a
        # zero tensor of its size: each family's grads fills what its backward needs (the history's zeros
        # were 256 MiB of delta_net_l2's 1396 MiB peak at 2x8192, tools.memory)
        ctx.set_materialize_grads(False)
        xs, init = list(tensors[:n_x]), list(tensors[n_x:])
        out = ops.run_forward(xs, init, cu, ints, params)
        ops.setup_context(ctx, (xs, init, cu, ints, params), out)
        ctx.ops = ops
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        ops = ctx.ops
        dxs, dinit = _gradients(ops.family, ctx, grads, ops.run_forward, ops.run_backward)
        return (None, None, None, None, None, *dxs, *dinit)


def register(key: str, family: Family) -> TorchOps:
    """The custom ops `effc::{key}_fwd` and `_bwd` running `family`, registered once per key (the key names
    the generated source: a process may load several versions of one spec)."""
    if key in _REGISTERED:
        return _REGISTERED[key]

    @torch.library.custom_op(f"effc::{key}_fwd", mutates_args=())
    def fwd(xs: list[torch.Tensor], init: list[torch.Tensor], cu: Optional[torch.Tensor], ints: list[int],
            params: list[float]) -> list[torch.Tensor]:
        return family.forward(xs, init, cu, ints, params)

    @torch.library.custom_op(f"effc::{key}_bwd", mutates_args=())
    def bwd(xs: list[torch.Tensor], kept: list[torch.Tensor], cu: Optional[torch.Tensor], d_outs: list[torch.Tensor],
            d_finals: list[torch.Tensor], ints: list[int], params: list[float]) -> list[torch.Tensor]:
        return family.backward(xs, kept, cu, d_outs, d_finals, ints, params)

    fwd.register_fake(family.forward_fake)
    bwd.register_fake(family.backward_fake)

    def formula(ctx, grads):
        # no gradient for cu, ints and params; an empty list stays one (its structure, not a leaf)
        return (*_gradients(family, ctx, grads, fwd, bwd), None, None if ctx.ints else [],
                None if ctx.params else [])

    setup = _setup_context(family)
    fwd.register_autograd(formula, setup_context=setup)
    ops = _REGISTERED[key] = TorchOps(fwd, bwd, family.forward, family.backward, setup, family)
    return ops


def source_key(op, family: str) -> str:
    """A custom-op key naming the op's generated Triton source (every backend's backward runs on it) and its
    spec: two specs of one name may print the same source where they differ in what the calls pass (a select
    stage's block size), and the registered ops call their own op's functions."""
    from ..ir.printer import print_spec
    ident = op.comp.source() + print_spec(op.comp.typed)
    return f"{op.name}_{family}_{op.backend}_{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


# -- the linear family --------------------------------------------------------------------------------
def _config(ints) -> TileConfig:
    *tiles, partition, walk_block, walk_chunk = ints[:len(_CFG)]
    return TileConfig(*tiles, partition=PARTITIONS[partition] if partition >= 0 else None, walk_block=walk_block,
                      walk_chunk=walk_chunk)


def keepable_prep(op, cfg: TileConfig) -> tuple:
    """Prep's values a forward of `op` at `cfg` can keep for its backward (runtime.launch.Launcher.forward's
    keep_prep): none with dims in parts (the kernels' are the split spec's), with a coarse walk (prep runs at
    both lengths) or on TileLang (its forward writes none)."""
    if op.parts is not None or cfg.serial_chunk != cfg.chunk or op.backend == "tilelang":
        return ()
    return op.comp.plan.hoisted


def linear_torch_ops(op) -> TorchOps:
    """The custom ops of an AttentionOp. They take and return the caller's tensors (`op.interface`); with dims in
    parts (runtime.dim_parts) the kernels are the split spec's, reading and writing slices of them."""
    spec, caller, parts = op.spec, op.interface, op.parts
    n_out, n_state = len(caller.outputs), len(caller.states)
    # prep's values kept from the forward (store_history 2) follow the history; the caller's whole tensors
    # only (with dims in parts the backward recomputes them)
    hoisted = () if parts is not None else op.comp.plan.hoisted
    # the backward's kernels read the outputs (passes.hand_on.read_outputs): autograd keeps them for it
    n_read = n_out if op.comp.fused.outputs_read else 0

    def launcher() -> Launcher:
        return Launcher(spec, op.comp.plan, op.module, parts, late_module=lambda: op.late_module)

    def forward_launcher():
        """The forward runs on the op's backend; the backward always on Triton (it reads the same history)."""
        if op.backend == "tilelang":
            from .tilelang_backend import launcher as tilelang_launcher
            return tilelang_launcher(op.comp.plan)
        return launcher()

    def dims_of(xs):
        """The kernels' dim sizes (each part's too)."""
        dims = {n: s for d, x in zip(caller.inputs, xs) for n, s in zip(d.dims[3:], x.shape[3:])}
        return parts.dims(dims) if parts is not None else dims

    def named_inputs(xs, dims) -> dict:
        """The split spec's inputs: the caller's tensors, each part a column slice of its caller's."""
        named = {d.name: x.contiguous() for d, x in zip(caller.inputs, xs)}
        return parts.views(spec.inputs, named, dims) if parts is not None else named

    def layout(named, cu, chunk, ints, dims):
        xs = [named[d.name] for d in spec.inputs]
        return make_layout(spec, xs, xs[0].shape[2], dims, cu, chunk, pos0=ints[_POS])

    def run_fwd(xs, init, cu, ints, params):
        cfg, (store_final, store_history, outputs) = _config(ints), ints[_FLAGS]
        # the backward's history recompute runs on Triton, as the backward does: the walk alone, merge skipped
        run = forward_launcher() if outputs else launcher()
        if not outputs and op.comp.plan.deferrable:
            cfg = replace(cfg, defer_merge=True)
        dims = dims_of(xs)
        named = named_inputs(xs, dims)
        lay = layout(named, cu, cfg.chunk, ints, dims)
        pvals = dict(zip((p.name for p in spec.params), params))
        inits = {s.name: x.float().contiguous() for s, x in zip(caller.states, init)}
        if parts is not None:
            inits = parts.cut_states(inits, dims)
        dense_parts = parts is not None and not isinstance(run, Launcher)  # TileLang's kernels take dense tensors
        if dense_parts:
            named = {n: x.contiguous() for n, x in named.items()}
        keep = {"keep_prep": True} if store_history == 2 and keepable_prep(op, cfg) else {}  # a Launcher's forward
        outs, finals, hist = run.forward(cfg, lay, named, pvals, inits, bool(store_final), bool(store_history),
                                         outputs=bool(outputs), **keep)
        if dense_parts:  # its outputs are the parts' own tensors (Launcher returns the caller's)
            outs = parts.join(spec.outputs, outs)
        if parts is not None:
            finals = parts.join(spec.states, finals)

        def empty():  # a distinct tensor each: custom-op outputs must not alias
            return xs[0].new_empty(0, dtype=torch.float32)
        return ([outs[o.name] for o in caller.outputs] + [finals.get(s.name, empty()) for s in caller.states]
                + [hist.get(s.name, empty()) for s in spec.states] + [hist.get(d.name, empty()) for d in hoisted])

    def fake_fwd(xs, init, cu, ints, params):
        cfg, (store_final, store_history, _) = _config(ints), ints[_FLAGS]
        x0 = xs[0]
        B, T, H = x0.shape[:3]
        dims = dims_of(xs)
        n_seq = B if cu is None else cu.shape[0] - 1
        outs = [x0.new_empty((B, T, H) + tuple(dims[n] for n in o.feature_dims)) for o in caller.outputs]
        f32 = dict(dtype=torch.float32)
        finals = [x0.new_empty((n_seq, H) + tuple(dims[n] for n in s.dims), **f32) if store_final
                  else x0.new_empty(0, **f32) for s in caller.states]
        if store_history:
            chunks = B * -(-T // cfg.serial_chunk) if cu is None else torch.library.get_ctx().new_dynamic_size()
            hist = [x0.new_empty((chunks, H) + tuple(dims[n] for n in s.dims), dtype=history_dtype(s, x0.dtype))
                    for s in spec.states]
        else:
            hist = [x0.new_empty(0, **f32) for _ in spec.states]
        prep = [x0.new_empty(0, **f32) for _ in hoisted]
        if store_history == 2 and keepable_prep(op, cfg):
            chunks = B * -(-T // cfg.chunk) if cu is None else torch.library.get_ctx().new_dynamic_size()
            rows = [chunk_tile_row(d, cfg.chunk, dims, x0.dtype) for d in hoisted]
            prep = [x0.new_empty((chunks * cfg.chunk, H) + row, dtype=dtype) for row, dtype in rows]
        return outs + finals + hist + prep

    def run_bwd(xs, hist, cu, d_outs, d_finals, ints, params):
        cfg = _config(ints)
        dims = dims_of(xs)
        named = named_inputs(xs, dims)
        lay = layout(named, cu, cfg.chunk, ints, dims)
        pvals = dict(zip((p.name for p in spec.params), params))
        d_out = {o.name: g.contiguous() for o, g in zip(caller.outputs, d_outs)}
        d_fin = {s.name: g.float().contiguous() for s, g in zip(caller.states, d_finals) if g.numel()}
        if parts is not None:
            d_out, d_fin = parts.views(spec.outputs, d_out, dims), parts.cut_states(d_fin, dims)
        outs = {o.name: x.contiguous() for o, x in zip(caller.outputs, hist[:n_read])}
        if parts is not None and outs:
            outs = parts.views(spec.outputs, outs, dims)
        hist = hist[n_read:]
        states, prep = hist[:len(spec.states)], hist[len(spec.states):]
        kept_prep = {d.name: x for d, x in zip(hoisted, prep) if x.numel()}
        grads, dinit = launcher().backward(cfg, lay, {**named, **outs}, pvals,
                                           dict(zip((s.name for s in spec.states), states)),
                                           d_out, d_fin, hoisted=kept_prep if hoisted and len(kept_prep) == len(hoisted)
                                           else None)  # else prep runs again
        if parts is not None:
            dinit = parts.join(spec.states, dinit)
        return [grads[d.name].to(x.dtype) for d, x in zip(caller.inputs, xs)] + [dinit[s.name] for s in caller.states]

    def fake_bwd(xs, hist, cu, d_outs, d_finals, ints, params):
        B, T, H = xs[0].shape[:3]
        n_seq = B if cu is None else cu.shape[0] - 1
        dims = dims_of(xs)
        return ([torch.empty_like(x) for x in xs]
                + [xs[0].new_empty((n_seq, H) + tuple(dims[n] for n in s.dims), dtype=torch.float32)
                   for s in caller.states])

    def kept(output, ints):
        return list(output[:n_read]) + (list(output[n_out + n_state:]) if ints[_FLAGS][1] else [])

    def grads_of(saved: Saved, grads, fwd, bwd):
        xs, ints, params = saved.xs, saved.ints, saved.params
        outs, hist = saved.kept[:n_read], saved.kept[n_read:]
        if not hist:  # recompute the per-chunk states: one more forward walk, keeping only the history
            hist = fwd(xs, saved.init, saved.cu, ints[:len(_CFG)] + [0, 1, 0] + ints[_POS:], params)[n_out + n_state:]
        dims = dims_of(xs)
        B, T, H = xs[0].shape[:3]
        d_outs = [g if g is not None else xs[0].new_zeros((B, T, H) + tuple(dims[n] for n in o.feature_dims))
                  for o, g in zip(caller.outputs, grads[:n_out])]
        # the launch reads every state's final cotangent or none: a state nothing read gets zeros beside the others
        d_finals = grads[n_out:n_out + n_state]
        if ints[_FLAGS][0] and any(g is not None for g in d_finals):
            n_seq = B if saved.cu is None else saved.cu.shape[0] - 1
            d_finals = [g if g is not None else xs[0].new_zeros((n_seq, H) + tuple(dims[n] for n in s.dims),
                                                                dtype=torch.float32)
                        for s, g in zip(caller.states, d_finals)]
        else:
            d_finals = [xs[0].new_empty(0, dtype=torch.float32) for _ in caller.states]
        res = bwd(xs, list(outs) + list(hist), saved.cu, d_outs, d_finals, ints, params)
        return res[:len(xs)], res[len(xs):]

    return register(source_key(op, "linear"), Family(run_fwd, fake_fwd, run_bwd, fake_bwd, kept, grads_of))
