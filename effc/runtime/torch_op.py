"""Each compiled spec becomes a pair of `torch.library` custom ops (forward, backward) with fake
implementations and an autograd formula, so calls work under autograd and `torch.compile`
(fullgraph) alike. The autograd formula runs the derived backward kernel; when the forward did
not keep the per-chunk states (the memory rule in passes.tiling.history_policy), it recomputes
them first with one more forward walk."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..policy.tiling import TileConfig
from .checks import history_dtype
from .launch import Launcher, make_layout

# ints passed to the ops: the tile configuration, then flags
_CFG = ("chunk", "block", "segments", "num_warps", "num_stages", "defer_merge")
# store the final states; keep the history for the backward; the outputs are wanted (not when the backward
# recomputes the history alone)
_FLAGS = slice(len(_CFG), len(_CFG) + 3)
_REGISTERED: dict[str, "TorchOps"] = {}


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
    grads: object  # (ctx, output grads, forward, backward) -> input and initial-state grads

    def call(self, xs, init, cu, ints, params):
        if torch.compiler.is_compiling():
            return self.forward(xs, init, cu, ints, params)
        return list(_Eager.apply(self, len(xs), cu, ints, params, *xs, *init))


class _Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, n_x, cu, ints, params, *tensors):
        xs, init = list(tensors[:n_x]), list(tensors[n_x:])
        out = ops.run_forward(xs, init, cu, ints, params)
        ops.setup_context(ctx, (xs, init, cu, ints, params), out)
        ctx.ops = ops
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        dxs, dinit, *_ = ctx.ops.grads(ctx, list(grads), ctx.ops.run_forward, ctx.ops.run_backward)
        return (None, None, None, None, None, *dxs, *dinit)


def _config(ints) -> TileConfig:
    return TileConfig(*ints[:len(_CFG)])


def torch_ops(op) -> TorchOps:
    """The custom ops of an AttentionOp, registered once per generated source."""
    key = f"{op.name}_{op.backend}_{hashlib.sha256(op.comp.source().encode()).hexdigest()[:10]}"
    if key in _REGISTERED:
        return _REGISTERED[key]
    spec = op.spec
    n_out, n_state = len(spec.outputs), len(spec.states)

    def launcher() -> Launcher:
        return Launcher(spec, op.comp.plan, op.module)

    def forward_launcher():
        """The forward runs on the op's backend; the backward always on Triton (it reads the same history)."""
        if op.backend == "tilelang":
            from .tilelang_backend import launcher as tilelang_launcher
            return tilelang_launcher(op.comp.plan)
        return launcher()

    def layout(xs, cu, chunk):
        dims = {n: s for d, x in zip(spec.inputs, xs) for n, s in zip(d.dims[3:], x.shape[3:])}
        return make_layout(spec, xs, xs[0].shape[2], dims, cu, chunk)

    def run_fwd(xs, init, cu, ints, params):
        cfg, (store_final, store_history, outputs) = _config(ints), ints[_FLAGS]
        # the backward's history recompute runs on Triton, as the backward does: the walk alone, merge skipped
        run = forward_launcher() if outputs else launcher()
        if not outputs and op.comp.plan.deferrable:
            cfg = replace(cfg, defer_merge=True)
        lay = layout(xs, cu, cfg.chunk)
        named = {d.name: x.contiguous() for d, x in zip(spec.inputs, xs)}
        pvals = dict(zip((p.name for p in spec.params), params))
        inits = {s.name: x.float().contiguous() for s, x in zip(spec.states, init)}
        outs, finals, hist = run.forward(cfg, lay, named, pvals, inits, bool(store_final), bool(store_history),
                                         outputs=bool(outputs))
        def empty():  # a distinct tensor each: custom-op outputs must not alias
            return xs[0].new_empty(0, dtype=torch.float32)
        return ([outs[o.name] for o in spec.outputs] + [finals.get(s.name, empty()) for s in spec.states]
                + [hist.get(s.name, empty()) for s in spec.states])

    @torch.library.custom_op(f"effc::{key}_fwd", mutates_args=())
    def fwd(xs: list[torch.Tensor], init: list[torch.Tensor], cu: Optional[torch.Tensor], ints: list[int],
            params: list[float]) -> list[torch.Tensor]:
        return run_fwd(xs, init, cu, ints, params)

    @fwd.register_fake
    def _(xs, init, cu, ints, params):
        cfg, (store_final, store_history, _) = _config(ints), ints[_FLAGS]
        x0 = xs[0]
        B, T, H = x0.shape[:3]
        dims = {n: s for d, x in zip(spec.inputs, xs) for n, s in zip(d.dims[3:], x.shape[3:])}
        n_seq = B if cu is None else cu.shape[0] - 1
        outs = [x0.new_empty((B, T, H) + tuple(dims[n] for n in o.feature_dims)) for o in spec.outputs]
        f32 = dict(dtype=torch.float32)
        finals = [x0.new_empty((n_seq, H) + tuple(dims[n] for n in s.dims), **f32) if store_final
                  else x0.new_empty(0, **f32) for s in spec.states]
        if store_history:
            chunks = B * -(-T // cfg.chunk) if cu is None else torch.library.get_ctx().new_dynamic_size()
            hist = [x0.new_empty((chunks, H) + tuple(dims[n] for n in s.dims), dtype=history_dtype(s, x0.dtype))
                    for s in spec.states]
        else:
            hist = [x0.new_empty(0, **f32) for _ in spec.states]
        return outs + finals + hist

    def run_bwd(xs, hist, cu, d_outs, d_finals, ints, params):
        cfg = _config(ints)
        lay = layout(xs, cu, cfg.chunk)
        named = {d.name: x.contiguous() for d, x in zip(spec.inputs, xs)}
        pvals = dict(zip((p.name for p in spec.params), params))
        d_out = {o.name: g for o, g in zip(spec.outputs, d_outs)}
        d_fin = {s.name: g.float().contiguous() for s, g in zip(spec.states, d_finals) if g.numel()}
        grads, dinit = launcher().backward(cfg, lay, named, pvals, dict(zip((s.name for s in spec.states), hist)),
                                           d_out, d_fin)
        return [grads[d.name].to(x.dtype) for d, x in zip(spec.inputs, xs)] + [dinit[s.name] for s in spec.states]

    @torch.library.custom_op(f"effc::{key}_bwd", mutates_args=())
    def bwd(xs: list[torch.Tensor], hist: list[torch.Tensor], cu: Optional[torch.Tensor], d_outs: list[torch.Tensor],
            d_finals: list[torch.Tensor], ints: list[int], params: list[float]) -> list[torch.Tensor]:
        return run_bwd(xs, hist, cu, d_outs, d_finals, ints, params)

    @bwd.register_fake
    def _(xs, hist, cu, d_outs, d_finals, ints, params):
        B, T, H = xs[0].shape[:3]
        n_seq = B if cu is None else cu.shape[0] - 1
        dims = {n: s for d, x in zip(spec.inputs, xs) for n, s in zip(d.dims[3:], x.shape[3:])}
        return ([torch.empty_like(x) for x in xs]
                + [xs[0].new_empty((n_seq, H) + tuple(dims[n] for n in s.dims), dtype=torch.float32)
                   for s in spec.states])

    def setup_context(ctx, inputs, output):
        xs, init, cu, ints, params = inputs
        kept = output[n_out + n_state:] if ints[_FLAGS][1] else []
        ctx.save_for_backward(*xs, *init, *kept, *((cu,) if cu is not None else ()))
        ctx.n_x, ctx.n_init, ctx.has_cu = len(xs), len(init), cu is not None
        ctx.ints, ctx.params = list(ints), list(params)

    def grads_of(ctx, grads, fwd, bwd):
        saved = list(ctx.saved_tensors)
        cu = saved.pop() if ctx.has_cu else None
        xs, init, kept = saved[:ctx.n_x], saved[ctx.n_x:ctx.n_x + ctx.n_init], saved[ctx.n_x + ctx.n_init:]
        ints, params = ctx.ints, ctx.params
        if kept:
            hist = kept
        else:  # recompute the per-chunk states: one more forward walk, keeping only the history
            hist = fwd(xs, init, cu, ints[:len(_CFG)] + [0, 1, 0], params)[n_out + n_state:]
        dims = _dims(xs)
        B, T, H = xs[0].shape[:3]
        d_outs = [g if g is not None else xs[0].new_zeros((B, T, H) + tuple(dims[n] for n in o.feature_dims))
                  for o, g in zip(spec.outputs, grads[:n_out])]
        d_finals = [g if (g is not None and ints[_FLAGS][0]) else xs[0].new_empty(0, dtype=torch.float32)
                    for g in grads[n_out:n_out + n_state]]
        res = bwd(xs, hist, cu, d_outs, d_finals, ints, params)
        return list(res[:ctx.n_x]), list(res[ctx.n_x:]) if ctx.n_init else [], None, None, None

    def _dims(xs):
        return {n: s for d, x in zip(spec.inputs, xs) for n, s in zip(d.dims[3:], x.shape[3:])}

    fwd.register_autograd(lambda ctx, grads: grads_of(ctx, grads, fwd, bwd), setup_context=setup_context)
    ops = _REGISTERED[key] = TorchOps(fwd, bwd, run_fwd, run_bwd, setup_context, grads_of)
    return ops
