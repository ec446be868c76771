"""Calls of a linear op with an initial state that the tiling tests compare (test_walk_block, test_walk_chunk):
the output, the final states and every gradient as one flat list, from the kernels or the oracle."""
import torch

from effc.runtime.verify import judge_fp32


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def value_names(spec) -> list[str]:
    """What outputs_and_grads returns, in order."""
    return (["o"] + [f"final {s.name}" for s in spec.states] + [f"d{d.name}" for d in spec.inputs]
            + [f"d initial {s.name}" for s in spec.states])


def outputs_and_grads(fn, xs, s0, d_o, d_s, **knobs) -> list:
    """The output, the final states and the gradient of every leaf (inputs, then initial states) of
    fn(*xs, initial_state=s0, output_final_state=True, **knobs) for cotangents d_o, d_s (in fn's dtypes)."""
    leaves = list(xs) + list(as_tuple(s0))
    o, s = fn(*xs, initial_state=s0, output_final_state=True, **knobs)
    finals = as_tuple(s)
    grads = torch.autograd.grad([o, *finals], leaves, [d_o.to(o.dtype), *(d.to(x.dtype) for d, x in zip(d_s, finals))])
    return [o.detach(), *(x.detach() for x in finals), *grads]


def assert_fp32_close(spec, got: list, want: list, what: str) -> None:
    for n, a, b in zip(value_names(spec), got, want):
        verdict = judge_fp32(a, b)
        assert verdict.ok, f"{spec.name} {n} against {what}: {verdict}"


def assert_matches_naive(spec, got: list, naive_out, naive_states) -> None:
    """The output and final states of `got` (outputs_and_grads) against a naive recurrence's."""
    for n, a, b in zip(value_names(spec), got, [naive_out, *as_tuple(naive_states)]):
        verdict = judge_fp32(a, b)
        assert verdict.ok, f"{spec.name} {n} against the naive recurrence: {verdict}"


def assert_matches_oracle_and_naive(op, got: list, naive, xs, s0, d_o, d_s) -> None:
    """`got` (outputs_and_grads of op at xs, s0, d_o, d_s) against autograd through the oracle in float64, and
    its output and final states against `naive`, a float64 recurrence written in the test."""
    ref = outputs_and_grads(op.reference, xs, s0, d_o.double(), [d.double() for d in d_s])
    assert_fp32_close(op.spec, got, ref, "the oracle")
    init = tuple(s.detach() for s in s0) if isinstance(s0, tuple) else s0.detach()
    n_o, n_s = naive(*[x.detach() for x in xs], initial_state=init)
    assert_matches_naive(op.spec, got, n_o, n_s)
