"""On the GPU: gradients of every library spec in bf16 (B=2, T=2048, H=16, D=128) against the float64
oracle's autograd, no worse than 2x a PyTorch reference with bf16 matmul operands."""
import pytest
import torch

import effc
from effc.compiler import compile_file
from effc.errors import BackwardRefused
from effc.runtime.verify import judge_low_precision, random_inputs, random_state

pytestmark = [pytest.mark.gpu, pytest.mark.isolated,  # one spec's fault fails that spec alone (conftest.py)
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tuple(s) -> tuple:
    return s if isinstance(s, tuple) else (s,)


def _grads(fn, leaves, d_o, d_s):
    o, s = fn()
    torch.autograd.backward([o, *_tuple(s)], [d_o.to(o.dtype), *(d.to(x.dtype) for d, x in zip(d_s, _tuple(s)))])
    g = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    return g


def _check_gradients(op, B, T, H, D, seed: int, **knobs) -> None:
    """Every input's and initial state's gradient of op(**knobs) in bf16 against the float64 oracle's, judged by
    the bf16 rule against a reference with bf16 matmul operands."""
    dims = {d: D for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, dims, torch.bfloat16, "cuda", seed=seed)]
    s0 = tuple(x.requires_grad_() for x in _tuple(random_state(op.spec, B, H, dims, "cuda")))
    gen = torch.Generator(device="cpu").manual_seed(seed + 4)
    d_o = torch.randn((B, T, H, D), generator=gen).cuda()
    d_s = tuple(torch.randn(x.shape, generator=gen).cuda() for x in s0)
    leaves = xs + list(s0)
    try:
        got = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True, **knobs), leaves, d_o.bfloat16(), d_s)
    except BackwardRefused as e:  # a backward policy.triton_faults refuses on this GPU and Triton
        pytest.skip(str(e))
    ref = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True), leaves, d_o, d_s)
    low = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True, dtype=torch.float32,
                                      matmul_dtype=torch.bfloat16), leaves, d_o, d_s)
    names = [d.name for d in op.spec.inputs] + [f"initial {s.name}" for s in op.spec.states]
    tag = "".join(f" {k}={v}" for k, v in knobs.items())
    for n, a, b, c in zip(names, got, ref, low):
        v = judge_low_precision(a.float(), b, c)
        print(f"{op.name}{tag} d{n}: {v}")
        assert torch.isfinite(a).all(), f"{op.name}{tag} d{n} has non-finite values"
        assert v.ok, f"{op.name}{tag} d{n}: {v}"


@pytest.mark.parametrize("name", effc.library_names("linear"))
def test_bf16_gradients(name):
    _check_gradients(effc.load(name), 2, 2048, 16, 128, seed=7)


def _partitioned_specs():
    return [n for n in effc.library_names("linear") if len(compile_file(n).plan.partitions) > 1]


@pytest.mark.parametrize("name", _partitioned_specs())
def test_bf16_gradients_every_partition(name):
    """Each gradient partition (passes.partition) gives the same gradients within the bf16 rule, not only the
    one the model picks: `effc tune` may record any of them."""
    op = effc.load(name)
    B, T, H, D = 1, 1000, 4, 128
    dims = {d: D for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, dims, torch.bfloat16, "cuda", seed=5)]
    d_o = torch.randn((B, T, H, D), generator=torch.Generator(device="cpu").manual_seed(3)).cuda()
    ref = _grads(lambda: (op.reference(*xs)[0], ()), xs, d_o, ())
    low = _grads(lambda: (op.reference(*xs, dtype=torch.float32, matmul_dtype=torch.bfloat16)[0], ()), xs, d_o, ())
    for p in op.comp.plan.partitions:
        try:
            got = _grads(lambda: (op(*xs, partition=p.name)[0], ()), xs, d_o.bfloat16(), ())
        except BackwardRefused as e:  # refused on this GPU and Triton (policy.triton_faults)
            pytest.skip(str(e))
        for d, a, b, c in zip(op.spec.inputs, got, ref, low):
            v = judge_low_precision(a.float(), b, c)
            print(f"{name} partition {p.name} d{d.name}: {v}")
            assert torch.isfinite(a).all() and v.ok, f"{name} partition {p.name} d{d.name}: {v}"


@pytest.mark.parametrize("name,chunk,walk_chunk", [("mlstm_sig", 64, 256), ("mlstm", 64, 256), ("gla", 64, 256),
                                                   ("gated_delta_net", 32, 128), ("delta_net_l2", 32, 128)])
def test_bf16_gradients_with_a_coarse_walk(name, chunk, walk_chunk):
    """A coarse walk refined in finer chunks (TileConfig.walk_chunk): the gradients within the bf16 rule (the
    fine walks start from the coarse history, stored in bf16 as every history is), at T = 2000 (a partial
    last coarse chunk)."""
    _check_gradients(effc.load(name), 2, 2000, 8, 128, seed=9, chunk=chunk, walk_chunk=walk_chunk)


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("name", ["delta_net", "gated_delta_net"])
def test_bf16_gradients_at_every_block(name, block):
    """The split dim's block as a call knob (`block=`): every block the tiling model accepts runs the backward
    right. At block=32 the delta rules' backward faulted (an illegal memory access) at 2x8192, D=128 on an H200
    with Triton 3.6 (2026-12-07), with every kernel clean under the CPU's bounds-checked interpreter."""
    _check_gradients(effc.load(name), 2, 2048, 16, 128, seed=11, block=block)
