"""The softmax family's functions behind the shared custom ops (torch_op.register): the forward kernel
writes the outputs and saves each group's log-sum-exp (and the reductions that are not outputs); the
autograd formula runs the preprocess, dQ and dK/dV kernels on them.

The ops' `xs` are the kernels' leaves (inputs and prefix values, SoftmaxOp.sched.leaves), `init` is empty,
and `ints` encode the call (`encode_call`): each kernel's tiles, whether to save for a backward, the
query rows computed, the feature dim sizes.

`prefix_stage` gives the prefix stage for the ops: PyTorch ops that autograd differentiates and dynamo
traces, except over packed sequences under compile, where splitting at cu_seqlens would read the tensor
on the host: there the per-sequence evaluation runs inside a custom op pair of its own (same mechanism),
its backward differentiating the same evaluation."""
from __future__ import annotations

import hashlib

import torch

from ..ir.nodes import Spec
from ..passes.softmax import SoftmaxTiles
from . import softmax_oracle
from .checks import operand_dtype
from .torch_op import Family, Saved, TorchOps, register, source_key

_KERNELS = ("fwd", "dq", "dkv", "pre")  # SoftmaxTiles' fields, 4 ints each, then head_rows
_SAVE = 4 * len(_KERNELS) + 1


def _dim_names(spec: Spec) -> list[str]:
    """The feature dims, in the order checks.check_inputs finds them."""
    return list(dict.fromkeys(n for d in spec.inputs for n in d.dims[3:]))


def encode_call(spec: Spec, cfg: SoftmaxTiles, save: bool, dims: dict, queries: tuple[int, int]) -> tuple[int, ...]:
    return (*(v for k in _KERNELS for v in getattr(cfg, k)), int(cfg.head_rows), int(save), *queries,
            *(dims[n] for n in _dim_names(spec)))


def _decode(spec: Spec, ints) -> tuple[SoftmaxTiles, bool, tuple[int, int], dict]:
    """(tiles, save, the query rows computed [lo, hi), feature dim sizes)."""
    cfg = SoftmaxTiles(**{k: tuple(ints[4 * i:4 * i + 4]) for i, k in enumerate(_KERNELS)},
                       head_rows=bool(ints[_SAVE - 1]))
    return cfg, bool(ints[_SAVE]), tuple(ints[_SAVE + 1:_SAVE + 3]), dict(zip(_dim_names(spec), ints[_SAVE + 3:]))


def _filled(grads, outs) -> list:
    """The output grads as the backward op takes them: zeros for an output nothing depended on."""
    return [g if g is not None else torch.zeros_like(o) for o, g in zip(outs, grads)]


def softmax_torch_ops(op) -> TorchOps:
    """The custom ops of a SoftmaxOp."""
    spec, sched = op.spec, op.sched
    n_out = len(spec.outputs)
    bwd = op.comp.backward
    # leaves some backward kernel writes a gradient for; the others get none (an empty tensor in the op)
    graded = {x for k in (bwd.pre, bwd.dq, bwd.dkv) for x, _ in k.leaf_grads}

    def call(xs, cu, ints, params):
        cfg, save, queries, dims = _decode(spec, ints)
        n_seq = xs[0].shape[0] if cu is None else cu.shape[0] - 1
        return cfg, save, queries, dims, n_seq, dict(zip((p.name for p in spec.params), params))

    def run_fwd(xs, init, cu, ints, params):
        cfg, save, queries, dims, n_seq, pvals = call(xs, cu, ints, params)
        outs, saved = op._forward(cfg, pvals, cu, n_seq, dims, xs, save, queries)
        return outs + list(saved.values())

    def fake_fwd(xs, init, cu, ints, params):
        _, save, _, dims = _decode(spec, ints)
        x0 = xs[0]
        B, T, H = x0.shape[:3]
        outs = [x0.new_empty((B, T, H) + tuple(dims[n] for n in o.feature_dims)) for o in spec.outputs]
        return outs + [x0.new_empty(shape if save else (1,), dtype=op.saved_dtype(name, x0.dtype))
                       for name, shape in op.saved_shapes(B, T, H, dims).items()]

    def run_bwd(xs, kept, cu, d_outs, d_finals, ints, params):
        cfg, _, queries, dims, n_seq, pvals = call(xs, cu, ints, params)
        B, T, H = xs[0].shape[:3]
        saved = dict(zip(op.saved_shapes(B, T, H, dims), kept[n_out:]))
        grads = op._backward(cfg, pvals, cu, n_seq, dims, xs, kept[:n_out], saved, d_outs, queries)
        return [g if g is not None else x.new_empty(0) for g, x in zip(grads, xs)]

    def fake_bwd(xs, kept, cu, d_outs, d_finals, ints, params):
        return [torch.empty_like(x) if name in graded else x.new_empty(0) for name, x in zip(sched.leaves, xs)]

    def kept(output, ints):
        return output  # the outputs (the backward's delta reads them) and what the forward saved

    def grads_of(saved: Saved, grads, fwd, bwd):
        res = bwd(saved.xs, saved.kept, saved.cu, _filled(grads, saved.kept[:n_out]), [], saved.ints, saved.params)
        return [g if name in graded else None for name, g in zip(sched.leaves, res)], []

    return register(source_key(op, "softmax"), Family(run_fwd, fake_fwd, run_bwd, fake_bwd, kept, grads_of))


def prefix_stage(spec: Spec, kernel=None, narrow: frozenset = frozenset()):
    """`values(named, pvals, H, cu)`: the prefix stage's per-token values the kernels read, traceable under
    torch.compile. Made with the op: the custom ops register outside any trace. `kernel(xs, cu, H, params)`:
    the generated prefix kernel (passes.softmax_plan.prefix_lowered), which then computes them, its backward
    generated too (passes.prefix_bwd). Without one, the PyTorch evaluation runs (softmax_oracle.prefix_values
    in fp32), differentiated by autograd. `narrow`: the values read only as products, handed over in the
    inputs' 16-bit dtype (SoftmaxSchedule.operand_prefix)."""
    ops = _prefix_torch_ops(spec, kernel, narrow) if spec.prefix.ops else None
    names = prefix_params(spec)
    outs = _prefix_outputs(spec, kernel)

    def values(named: dict, pvals: dict, H: int, cu) -> dict:
        if ops is None or (kernel is None and (cu is None or not torch.compiler.is_compiling())):
            return softmax_oracle.prefix_values(spec, named, pvals, H, torch.float32, cu)
        out = ops.call([named[d.name] for d in spec.inputs], [], cu, [H], [float(pvals[n]) for n in names])
        return dict(zip(outs, out))
    return values


def prefix_params(spec: Spec) -> list[str]:
    """The params the prefix stage reads (a hybrid's op knows only its softmax branch's)."""
    read = spec.prefix.reads
    return [p.name for p in spec.params if p.name in read]


def _prefix_outputs(spec: Spec, kernel) -> list[str]:
    """The values the prefix custom op returns: the kernel's stores (the values other stages read), else
    every per-token prefix value."""
    if kernel is not None:
        return list(kernel.stores)
    return [op.out for op in softmax_oracle.per_token_prefix(spec)]


def _prefix_torch_ops(spec: Spec, kernel=None, narrow: frozenset = frozenset()) -> TorchOps:
    """The prefix stage as a custom op pair: xs are the spec's inputs, ints [H]. Forward: the prefix kernel
    where there is one, else the PyTorch evaluation; backward: the prefix kernel's generated backward
    (passes.prefix_bwd), else the evaluation's VJP (torch.func)."""
    inputs, outs = [d.name for d in spec.inputs], _prefix_outputs(spec, kernel)
    read = spec.prefix.reads

    def evaluate(xs, cu, ints, params):
        pvals = dict(zip(prefix_params(spec), params))
        pre = softmax_oracle.prefix_values(spec, dict(zip(inputs, xs)), pvals, ints[0], torch.float32, cu)
        low = operand_dtype(xs[0].dtype)
        # copies: custom-op outputs must not alias the inputs (a prefix value may be an input as it is)
        return [pre[n].to(low) if n in narrow else pre[n].clone(memory_format=torch.contiguous_format)
                for n in outs]

    def run_fwd(xs, init, cu, ints, params):
        if kernel is not None:
            return kernel(xs, cu, ints[0], params)
        return evaluate(xs, cu, ints, params)

    def fake_fwd(xs, init, cu, ints, params):
        return evaluate(xs, None, ints, params)  # the shapes of the packed values are the padded ones

    def run_bwd(xs, kept, cu, d_outs, d_finals, ints, params):
        if xs[0].is_meta:  # effc memory's meta run: the gradients' allocations (the VJP's temporaries uncounted)
            return fake_bwd(xs, kept, cu, d_outs, d_finals, ints, params)
        if kernel is not None:  # the generated backward (passes.prefix_bwd)
            grads = kernel.backward(xs, d_outs, cu, ints[0], params)
            return [grads[n] if n in grads else torch.zeros_like(x) if n in read else x.new_empty(0)
                    for n, x in zip(inputs, xs)]
        # torch.func: a custom op's implementation runs below autograd, where torch.autograd records nothing
        wanted = [i for i, n in enumerate(inputs) if n in read]

        def of_read(*ys):
            full = list(xs)
            for i, y in zip(wanted, ys):
                full[i] = y
            return evaluate(full, cu, ints, params)

        _, vjp = torch.func.vjp(of_read, *(xs[i] for i in wanted))
        grads = dict(zip(wanted, vjp(list(d_outs))))
        return [grads[i] if i in grads else x.new_empty(0) for i, x in enumerate(xs)]

    def fake_bwd(xs, kept, cu, d_outs, d_finals, ints, params):
        return [torch.empty_like(x) if n in read else x.new_empty(0) for n, x in zip(inputs, xs)]

    def grads_of(saved: Saved, grads, fwd, bwd):
        res = bwd(saved.xs, [], saved.cu, _filled(grads, saved.kept), [], saved.ints, saved.params)
        return [g if n in read else None for n, g in zip(inputs, res)], []

    digest = hashlib.sha256(repr((spec.inputs, spec.params, spec.prefix, kernel is not None,
                                  sorted(narrow))).encode()).hexdigest()[:10]
    key = f"{spec.name}_prefix_{digest}"
    return register(key, Family(run_fwd, fake_fwd, run_bwd, fake_bwd, lambda output, ints: output, grads_of))
