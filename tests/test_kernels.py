"""Generated Triton kernels (interpreter on CPU, fp32) against the oracle derived from the spec,
and the oracle against independent token-by-token references. Tolerance: effc.runtime.verify."""
import pytest
import torch

import effc
from effc.runtime.verify import judge_fp32, max_err, random_inputs, random_state

from naive import NAIVE

LIBRARY = effc.library_names("linear")
DIMS = {"K": 16, "V": 32, "L": 8}  # L: log_linear_attn's levels


def _states(s) -> tuple:
    """A spec's state(s) as a tuple: one tensor, or one per declared state."""
    return s if isinstance(s, tuple) else (s,)


def _setup(name, B=2, T=45, H=2, seed=0):
    op = effc.load(name)
    dims = {d: DIMS[d] for d in op.spec.dims}
    return op, random_inputs(op.spec, B, T, H, dims, seed=seed), random_state(op.spec, B, H, dims)


def test_every_documented_mechanism_has_a_naive_reference():
    assert set(LIBRARY) == set(NAIVE)


@pytest.mark.parametrize("name", LIBRARY)
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_oracle_chunked_equals_recurrent(name):
    op, xs, s0 = _setup(name)
    o, s = op.reference(*xs, initial_state=s0, output_final_state=True, chunk=16)
    r, rs = op.recurrent_reference(*xs, initial_state=s0, output_final_state=True)
    assert max_err(o, r) < 1e-10 * max(1.0, r.abs().max().item())
    for a, b in zip(_states(s), _states(rs)):
        assert max_err(a, b) < 1e-10 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name", LIBRARY)
def test_oracle_equals_naive_reference(name):
    op, xs, s0 = _setup(name)
    o, s = op.reference(*xs, initial_state=s0, output_final_state=True)
    n, ns = NAIVE[name](*xs, initial_state=s0)
    assert max_err(o, n) < 1e-9 * max(1.0, n.abs().max().item())
    for a, b in zip(_states(s), _states(ns)):
        assert max_err(a, b) < 1e-9 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name", LIBRARY)
@pytest.mark.parametrize("segments,defer_merge", [(1, None), (3, None), (3, True)],
                         ids=["P1", "P3", "P3-merge-deferred"])
def test_kernel_matches_oracle(name, segments, defer_merge):
    """T=45 with chunk 16: the last chunk is partial; initial state in, final state out. With merge deferred,
    the (segmented) walk writes each chunk's state and the out kernel evaluates merge from them."""
    op, xs, s0 = _setup(name)
    if segments > 1 and not op.comp.legality.segmentable:  # a general transition: one walk only
        with pytest.raises(effc.SpecError, match="cannot run in 3 segments"):
            op(*xs, initial_state=s0, chunk=16, segments=segments)
        return
    o, s = op(*xs, initial_state=s0, output_final_state=True, chunk=16, segments=segments, defer_merge=defer_merge)
    assert defer_merge is None or op.last_config.defer_merge
    ref, ref_s = op.reference(*xs, initial_state=s0, output_final_state=True)
    assert judge_fp32(o, ref).ok, judge_fp32(o, ref)
    for a, b in zip(_states(s), _states(ref_s)):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)
    n, _ = NAIVE[name](*xs, initial_state=s0)
    assert judge_fp32(o, n).ok


@pytest.mark.parametrize("name", ["gla", "retention"])
def test_kernel_default_chunk_no_state(name):
    op, xs, _ = _setup(name, B=1, T=70, H=3, seed=5)
    o, final = op(*xs)
    assert final is None
    assert judge_fp32(o, op.reference(*xs)[0]).ok


def test_kernel_block_split_and_single_token():
    op, xs, s0 = _setup("simple_gla", T=1)
    o, s = op(*xs, initial_state=s0, output_final_state=True, chunk=16, block=16)
    ref, ref_s = op.reference(*xs, initial_state=s0, output_final_state=True)
    assert judge_fp32(o, ref).ok and judge_fp32(s, ref_s).ok


def test_scale_override():
    op, xs, _ = _setup("linear_attn", T=20)
    o, _ = op(*xs, scale=0.3, chunk=16)
    ref, _ = op.reference(*xs, scale=0.3)
    assert judge_fp32(o, ref).ok
    assert max_err(o, op.reference(*xs)[0]) > 1e-2  # the override took effect


def test_final_state_continues_the_sequence():
    """Running [0:T1] then [T1:T] from its final state equals one run over [0:T]."""
    op, xs, _ = _setup("gla", T=48)
    o_full, s_full = op(*xs, output_final_state=True, chunk=16)
    a = [x[:, :20] for x in xs]
    b = [x[:, 20:] for x in xs]
    o1, s1 = op(*a, output_final_state=True, chunk=16)
    o2, s2 = op(*b, initial_state=s1, output_final_state=True, chunk=16)
    assert judge_fp32(torch.cat([o1, o2], 1), o_full).ok
    assert judge_fp32(s2, s_full).ok
