"""torch.compile(fullgraph=True) over the softmax family and a hybrid: their ops are the same
torch.library custom ops as the linear family's (runtime/torch_op.register), so a compiled function is
one graph with the effc ops in it. Forward and backward against the eager op, the eager op against the
spec oracle and an independent naive reference; packed sequences (with an empty one), an initial and a
final state, call knobs as compile-time constants. Interpreter, fp32, T=40 (not a multiple of the
16-token blocks); the aot_eager backend: what is tested is the trace, not Inductor's code."""
from __future__ import annotations

import pytest
import torch
from naive_softmax import NAIVE_SOFTMAX
from naive_softmax import swax as naive_swax
from torch._dynamo.testing import CompileCounterWithBackend

import effc
from effc.runtime.verify import judge_fp32, random_inputs

DIMS = {"K": 16, "V": 16}
SMALL = {"swax": {"window": 12}}  # a window shorter than T, so the softmax branch's mask bites


def _leaves(op, B, T, H, seed=0):
    xs = random_inputs(op.spec, B, T, H, DIMS, seed=seed)
    return [x.requires_grad_() for x in xs]


def _compiled(fn):
    """fn compiled as one graph (fullgraph: a graph break raises), and a counter of the graphs made."""
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def _grads(fn, leaves):
    """fn()'s scalar and the gradients of `leaves`."""
    for x in leaves:
        x.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [x.grad.clone() for x in leaves]


def _weights(o, seed=1):
    return torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=o.dtype)


def _effc_ops_traced(counter) -> set[str]:
    return {str(n.target) for g in counter.graphs for n in g.graph.nodes if "effc." in str(n.target)}


@pytest.mark.parametrize("name", ["softmax_attn", "alibi", "forgetting_transformer", "swax", "softmax_rope"])
def test_compiled_forward_and_backward_match_eager_and_the_oracle(name):
    op = effc.load(name)
    params = SMALL.get(name, {})
    xs = _leaves(op, 1, 40, 2)
    w = _weights(op.reference(*[x.detach() for x in xs], **params)[0])

    def loss(*xs):
        o, _ = op(*xs, chunk=16, block=16, **params)
        return (o * w).sum()

    compiled, counter = _compiled(loss)
    c_loss, c_grads = _grads(lambda: compiled(*xs), xs)
    e_loss, e_grads = _grads(lambda: loss(*xs), xs)
    assert counter.frame_count == 1 and _effc_ops_traced(counter), "one graph, through the effc custom ops"
    assert torch.allclose(c_loss, e_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(c_grads, e_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # the eager op against the spec oracle (fp64) and a naive reference written from the paper
    r64 = [x.detach().double().requires_grad_() for x in xs]
    o_ref = op.reference(*r64, **params)[0]
    naive = (NAIVE_SOFTMAX[name] if name != "swax" else lambda *a, **k: naive_swax(*a, **k)[0])(
        *[x.detach() for x in xs], **params)
    assert judge_fp32(o_ref, naive).ok
    r_loss, r_grads = _grads(lambda: (o_ref * w.double()).sum(), r64)
    assert judge_fp32(e_loss, r_loss).ok
    for a, b in zip(e_grads, r_grads):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_knobs_are_compile_time_constants():
    """chunk= and block= reach the kernels' tiles through the host plan, which runs at trace time; a new
    value is a new constant, so a new graph (a recompile), not a tensor argument."""
    op = effc.load("softmax_attn")
    xs = [x.detach() for x in _leaves(op, 1, 40, 2)]
    counter = CompileCounterWithBackend("aot_eager")
    # dynamic=False: a knob passed as an argument (not a literal) stays a constant after the recompile
    compiled = torch.compile(lambda *xs, chunk, block: op(*xs, chunk=chunk, block=block)[0], fullgraph=True,
                             backend=counter, dynamic=False)
    o16 = compiled(*xs, chunk=16, block=16)
    assert (op.last_config.fwd[:2]) == (16, 16)
    o32 = compiled(*xs, chunk=32, block=16)
    assert (op.last_config.fwd[:2]) == (32, 16) and counter.frame_count == 2
    ref = op.reference(*xs)[0]
    assert judge_fp32(o16, ref).ok and judge_fp32(o32, ref).ok


@pytest.mark.parametrize("name", ["softmax_attn", "forgetting_transformer"])
def test_compiled_packed_sequences_with_an_empty_one(name):
    op = effc.load(name)
    xs = _leaves(op, 1, 40, 2, seed=3)
    cu = torch.tensor([0, 17, 17, 40])  # the middle sequence is empty
    w = _weights(op.reference(*[x.detach() for x in xs], cu_seqlens=cu)[0])

    def loss(*xs):
        return (op(*xs, cu_seqlens=cu, chunk=16, block=16)[0] * w).sum()

    compiled, counter = _compiled(loss)
    c_loss, c_grads = _grads(lambda: compiled(*xs), xs)
    e_loss, e_grads = _grads(lambda: loss(*xs), xs)
    assert counter.frame_count == 1
    assert torch.allclose(c_loss, e_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(c_grads, e_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # packed equals each sequence on its own (the naive reference knows nothing of cu_seqlens)
    naive = torch.cat([NAIVE_SOFTMAX[name](*[x.detach()[:, a:b] for x in xs]) for a, b in ((0, 17), (17, 40))], 1)
    assert judge_fp32(c_loss, (naive * w.double()).sum()).ok
    r64 = [x.detach().double().requires_grad_() for x in xs]
    _, r_grads = _grads(lambda: (op.reference(*r64, cu_seqlens=cu)[0] * w.double()).sum(), r64)
    for a, b in zip(c_grads, r_grads):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_compiled_hybrid_with_states_and_packed_sequences():
    """swax: the softmax branch's op feeds the state branch's op, both custom ops in one graph; gradients
    reach the initial state, and the final state's gradient flows back."""
    op = effc.load("swax")
    params = SMALL["swax"]
    xs = _leaves(op, 1, 40, 2, seed=5)
    cu = torch.tensor([0, 23, 40])
    s0 = (0.1 * torch.randn(2, 2, DIMS["K"], DIMS["V"], generator=torch.Generator().manual_seed(6))).requires_grad_()
    leaves = xs + [s0]
    ref_o, ref_s = op.reference(*[x.detach() for x in xs], initial_state=s0.detach(), output_final_state=True,
                                cu_seqlens=cu, **params)
    w, ws = _weights(ref_o), _weights(ref_s, seed=2)

    def loss(*leaves):
        o, s = op(*leaves[:-1], initial_state=leaves[-1], output_final_state=True, cu_seqlens=cu, chunk=16, **params)
        return (o * w).sum() + (s * ws).sum()

    compiled, counter = _compiled(loss)
    c_loss, c_grads = _grads(lambda: compiled(*leaves), leaves)
    e_loss, e_grads = _grads(lambda: loss(*leaves), leaves)
    assert counter.frame_count == 1 and len(_effc_ops_traced(counter)) >= 2  # both branches' ops
    assert torch.allclose(c_loss, e_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(c_grads, e_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # the naive recurrence, one sequence at a time from its own initial state
    pieces = [naive_swax(*[x.detach()[:, a:b] for x in xs], initial_state=s0.detach()[i:i + 1], **params)
              for i, (a, b) in enumerate(((0, 23), (23, 40)))]
    naive_o, naive_s = torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 0)
    assert judge_fp32(c_loss, (naive_o * w.double()).sum() + (naive_s * ws.double()).sum()).ok
    r64 = [x.detach().double().requires_grad_() for x in leaves]

    def ref_loss():
        o, s = op.reference(*r64[:-1], initial_state=r64[-1], output_final_state=True, cu_seqlens=cu, **params)
        return (o * w.double()).sum() + (s * ws.double()).sum()

    _, r_grads = _grads(ref_loss, r64)
    for a, b in zip(c_grads, r_grads):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_compiled_hybrid_whose_state_branch_reads_a_prefix_value_over_packed_sequences():
    """fox_gla: the prefix cumsum feeds both branches; over packed sequences under compile it runs in its
    own custom op pair (splitting at cu_seqlens reads the tensor on the host). The packed run equals each
    sequence run on its own by the oracle: the cumsum restarts at every sequence."""
    from test_real_inputs_ops import PREFIX_HYBRID
    op = effc.loads(PREFIX_HYBRID)
    xs = _leaves(op, 1, 40, 2, seed=7)
    cu = torch.tensor([0, 9, 9, 40])
    w = _weights(op.reference(*[x.detach() for x in xs], cu_seqlens=cu)[0])

    def loss(*xs):
        return (op(*xs, cu_seqlens=cu, chunk=16)[0] * w).sum()

    compiled, counter = _compiled(loss)
    c_loss, c_grads = _grads(lambda: compiled(*xs), xs)
    e_loss, e_grads = _grads(lambda: loss(*xs), xs)
    assert counter.frame_count == 1 and any("prefix" in t for t in _effc_ops_traced(counter))
    assert torch.allclose(c_loss, e_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(c_grads, e_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    r64 = [x.detach().double().requires_grad_() for x in xs]

    def per_sequence():
        o = torch.cat([op.reference(*[x[:, a:b] for x in r64])[0] for a, b in ((0, 9), (9, 40))], 1)
        return (o * w.double()).sum()

    r_loss, r_grads = _grads(per_sequence, r64)
    assert judge_fp32(c_loss, r_loss).ok
    for a, b in zip(c_grads, r_grads):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)
