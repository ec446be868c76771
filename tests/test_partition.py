"""passes.partition: the gradient kernels per split block, looping over the blocks, or cut at the loop with
the sums through memory; the default from passes.kernel_cost; the `partition=` knob."""
from __future__ import annotations

import textwrap

import pytest
import torch

import effc
from effc.errors import ArgumentError
from effc.passes.kernel_cost import kernel_cost, live_values
from effc.ir.nodes import Op, TileType, C
from effc.runtime.verify import judge_fp32

# a delta rule nobody wrote a kernel for: the writing strength scales the keys but not the values
HIDDEN = """
spec rank_one_delta {
  input q: [B, T, H, K] unitnorm
  input k: [B, T, H, K] unitnorm
  input v: [B, T, H, V]
  input a: [B, T, H] unit
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  intra {
    ka = k * a[:, None]
    t = unit_lower_inv(ka @ k.T)
    w = t @ ka
    u = t @ v
  }
  merge {
    o = q @ S + causal(q @ k.T) @ (u - w @ S)
  }
  inter {
    S = S + k.T @ (u - w @ S)
  }
}
"""

# a gated delta rule nobody wrote a kernel for: the gate scales the keys' writing strength, the values unscaled
GATED_HIDDEN = """
spec scaled_gated_delta {
  input q: [B, T, H, K]
  input k: [B, T, H, K] unitnorm
  input v: [B, T, H, V]
  input g: [B, T, H] logdecay
  input a: [B, T, H] unit
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  intra {
    b = cumsum(g)
    d = exp(causal(b[:, None] - b[None, :], -inf))
    ka = k * a[:, None]
    t = unit_lower_inv((ka @ k.T) * d)
    w = t @ (ka * exp(b)[:, None])
    u = t @ v
  }
  merge {
    o = (q * exp(b)[:, None]) @ S + ((q @ k.T) * d) @ (u - w @ S)
  }
  inter {
    bl = last(b)
    S = S * exp(bl) + (k * exp(bl - b)[:, None]).T @ (u - w @ S)
  }
}
"""


def _kernels(plan, partition):
    return [k.name for k in plan.gradient_kernels(partition)]


def test_the_delta_rule_has_five_partitions_and_the_cut_shares_its_sums():
    """Each partition launches its own gradient kernels; the cut's one sums kernel computes what the q, k and
    beta kernels each recomputed per block (dO S^T, dw = -dv_new S^T, ...) and writes it for their after-parts,
    which read only what they need; v's gradient (it has V) is written in the loop."""
    plan = effc.load("delta_net").comp.plan
    assert [c.name for c in plan.partitions] == ["block", "loop", "cut", "cut_each", "cut_common"]
    assert _kernels(plan, "block") == ["bwd_chunks_q", "bwd_chunks_k", "bwd_chunks_beta"]
    assert _kernels(plan, "cut") == ["bwd_sums", "bwd_chunks_q_after", "bwd_chunks_k_after", "bwd_chunks_beta_after"]
    sums = plan.kernel("bwd_sums")
    assert sums.block_loop is not None and sums.grid == "(1, B*H, chunks)"
    assert [d.name for d, _ in sums.grads] == ["v"]
    written = {d.name for d in sums.stores}
    for name in ("bwd_chunks_q_after", "bwd_chunks_k_after", "bwd_chunks_beta_after"):
        after = plan.kernel(name)
        read = {d.name for d in after.hoisted_loads if d.role == "scratch"}
        assert read and read <= written, name
        assert after.block_loop is not None and not after.block_loop.body  # nothing with V is left
        assert not any("V" in map(str, op.type.shape) for op in after.ops)
    # a [K, C] sum crosses as its transpose (rows are tokens)
    assert {d.dims[3:] for d in sums.stores} <= {("K",), ("C",), ()} and any(n.endswith("_st") for n in written)
    assert plan.partition in ("block", "loop", "cut", "cut_each", "cut_common")
    text = str(plan)
    assert "gradient partition cut" in text and "<- default" in text


def test_a_scalar_sum_crosses_at_the_chunks_last_token():
    """gated_delta_net's dg reads total(dS' * S), a sum over V with no token axis: the sums kernel writes it
    as a [C] row holding it at the chunk's last token (unlast) and dg's after part reads it back (last), so
    dg is cut too and no kernel of the cut chains the 23 dots of its loop kernel."""
    plan = effc.load("gated_delta_net").comp.plan
    cut = _kernels(plan, "cut")
    assert "bwd_chunks_g_after" in cut and "bwd_chunks_g_loop" not in cut
    sums, after = plan.kernel("bwd_sums"), plan.kernel("bwd_chunks_g_after")
    made = {op.out: op for op in sums.ops}
    scalars = [d.name for d in sums.stores if made[d.name].kind == "unlast"]
    assert scalars and all(not made[made[n].args[0]].type.shape for n in scalars)
    read_back = [op for op in after.ops if op.kind == "last" and op.args[0] in scalars]
    assert read_back, [str(op) for op in after.ops]
    dots = lambda k: sum(op.kind == "matmul" for op in plan.kernel(k).ops)
    assert max(map(dots, cut)) < dots("bwd_chunks_g_loop")


def test_cut_each_gives_each_cut_kernel_its_own_sums_and_stores_a_sum_once():
    """cut_each: before each after-part, a sums kernel holding only what that part reads (fewer live tiles
    than the shared one); a sum an earlier sums kernel stored is read back, not recomputed or stored again."""
    plan = effc.load("delta_net").comp.plan
    names = _kernels(plan, "cut_each")
    assert names == ["bwd_sums_q", "bwd_chunks_q_after", "bwd_sums_k", "bwd_chunks_k_after", "bwd_sums_beta",
                     "bwd_chunks_beta_after"]
    stored, seen = {}, set()
    for name in names:
        k = plan.kernel(name)
        if name.startswith("bwd_sums_"):
            mine = {d.name for d in k.stores}
            assert not mine & seen, f"{name} stores again {mine & seen}"
            seen |= mine
            stored[name] = mine
        else:
            assert {d.name for d in k.hoisted_loads if d.role == "scratch"} <= seen, name
    assert all(len(ops) < len(plan.kernel("bwd_sums").ops) for ops in (plan.kernel(n).ops for n in stored))
    assert [d.name for d, _ in plan.kernel("bwd_sums_q").grads + plan.kernel("bwd_sums_k").grads
            + plan.kernel("bwd_sums_beta").grads] == ["v"]


@pytest.mark.parametrize("name", ["gated_delta_net", GATED_HIDDEN])
def test_cut_common_computes_the_after_parts_shared_work_once(name):
    """cut_common: what the k, beta (and g) after parts each computed from the sums with matmuls (the adjoint
    of the in-chunk inverse, t^T dA t^T, and t^T dw) is computed once in bwd_common, written per token and read
    back; the after parts keep no matmul that another after part repeats."""
    op = effc.loads(name) if "spec " in name else effc.load(name)
    plan = op.comp.plan
    names = _kernels(plan, "cut_common")
    cut = _kernels(plan, "cut")
    assert names[:2] == [cut[0], "bwd_common"] and [n.removesuffix("_common") for n in names[2:]] == cut[1:]
    common = plan.kernel("bwd_common")
    written = {d.name for d in common.stores}
    assert written and {d.name for d in common.hoisted_loads if d.role == "scratch"} <= {
        d.name for d in plan.kernel("bwd_sums").stores}
    assert any(op.kind == "unit_lower_inv" for op in plan.kernel("prep").ops)
    afters = [plan.kernel(n) for n in names if "_after" in n]
    assert any(written & {d.name for d in k.hoisted_loads} for k in afters)
    matmuls = [(op.kind, op.args) for k in afters for op in k.ops if op.kind == "matmul"]
    assert len(matmuls) == len(set(matmuls)), "an after part repeats another's matmul"
    mm = lambda partition: sum(op.kind == "matmul" for n in _kernels(plan, partition) for op in plan.kernel(n).ops)
    assert mm("cut_common") < mm("cut")


def test_the_default_partition_is_the_fewest_kernels_within_the_models_error():
    """Estimates closer than the cost model's error do not rank: the partition with the fewest kernels among
    them is the default (gated_delta_net_l2's cut, when its dg kernel could not be cut, was estimated 4% under
    its loop and ran 16% slower on the H200; simple_gla's is now); one estimated faster by more than the error
    wins with more kernels (delta_net_l2's cut, and gated_delta_net_l2's since dg is cut too: 5.90 against
    7.98 ms for the loop, H100, 2x8192)."""
    from effc.passes.kernel_cost import RELATIVE_ERROR
    for name in ("gated_delta_net_l2", "delta_net_l2", "mlstm_sig", "simple_gla"):
        plan = effc.load(name).comp.plan
        fastest = min(c.us for c in plan.partitions)
        chosen = next(c for c in plan.partitions if c.name == plan.partition)
        if chosen.refines:  # the fewest-kernels pick, then its refinement (next test)
            chosen = next(c for c in plan.partitions if c.name == chosen.refines)
        assert chosen.us <= fastest * (1 + RELATIVE_ERROR)
        assert all(len(c.kernels) >= len(chosen.kernels) for c in plan.partitions
                   if c.us <= fastest * (1 + RELATIVE_ERROR) and not c.refines), name
    assert effc.load("simple_gla").comp.plan.partition == "loop"
    for name in ("delta_net_l2", "gated_delta_net_l2"):
        plan = effc.load(name).comp.plan
        assert plan.partition == "cut_common", name
        # cut_common refines cut, which the fewest-kernels rule picked first
        cut, common = (next(c for c in plan.partitions if c.name == n) for n in ("cut", "cut_common"))
        assert common.refines == "cut" and common.us < cut.us


def test_a_refinement_estimated_slower_is_not_the_default():
    """rwkv7's cut_common makes its w after part read three more per-token tiles, all loaded at its start: the
    model estimates it slower than cut, so the default stays what the fewest-kernels rule picked."""
    plan = effc.load("rwkv7").comp.plan
    cut, common = (next(c for c in plan.partitions if c.name == n) for n in ("cut", "cut_common"))
    assert common.us > cut.us and plan.partition != "cut_common"


def test_a_spec_with_no_split_dim_has_no_partitions():
    """A merge that sums over V (and contracts K) leaves no dim to split: nothing to partition, and the knob
    says so."""
    spec = textwrap.dedent("""
    spec row_centred {
      input q: [B, T, H, K]
      input k: [B, T, H, K]
      input v: [B, T, H, V]
      output o: [B, T, H, V]
      state S: [K, V]
      intra { }
      merge { o = q @ S - rowsum(q @ S)[:, None] }
      inter { S = S + k.T @ v }
    }""")
    op = effc.loads(spec)
    assert op.comp.plan.split_dim is None and op.comp.plan.partitions == ()
    x = torch.randn(1, 16, 1, 16)
    with pytest.raises(ArgumentError, match="one gradient partition"):
        op(x, x, x, partition="cut")


def test_the_partition_knob_is_checked():
    op = effc.load("delta_net")
    xs = [torch.randn(1, 16, 1, 16) for _ in range(3)] + [torch.rand(1, 16, 1)]
    with pytest.raises(ArgumentError, match=r"partition='blocks'.*'block', 'loop', 'cut', 'cut_each', 'cut_common'"):
        op(*xs, partition="blocks")


@pytest.mark.parametrize("name", ["delta_net", "gated_delta_net_l2", "mlstm_sig", "rwkv7", HIDDEN, GATED_HIDDEN])
def test_every_partition_matches_the_oracle(name):
    """Each partition's gradients over packed sequences (an empty one among them), V in two blocks, T not a
    multiple of the chunk, initial-state and final-state cotangents, against autograd through the oracle."""
    op = effc.loads(name) if "spec " in name else effc.load(name)
    cu = torch.tensor([0, 9, 9, 50, 75], dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    xs = []
    for d in op.spec.inputs:
        shape = (1, 75, 2) + (32,) * len(d.feature_dims)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if "unitnorm" in d.annotations:
            x = torch.nn.functional.normalize(x, dim=-1)
        elif "unit" in d.annotations:
            x = torch.sigmoid(x)
        elif "logdecay" in d.annotations:
            x = torch.nn.functional.logsigmoid(x + 2)
        xs.append(x.requires_grad_())
    states = [torch.randn((4, 2) + (32,) * len(s.dims), generator=gen, dtype=torch.float64).requires_grad_()
              for s in op.spec.states]
    one = lambda t: t[0] if len(t) == 1 else tuple(t)
    d_o = torch.randn(1, 75, 2, 32, generator=gen, dtype=torch.float64)
    d_s = [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in states]
    leaves = xs + states

    def grads(fn, dtype):
        o, s = fn()
        outs = [o] + list(s if isinstance(s, tuple) else (s,))
        return torch.autograd.grad(outs, leaves, [d_o.to(dtype)] + [d.to(dtype) for d in d_s])

    ref = grads(lambda: op.reference(*xs, initial_state=one(states), output_final_state=True, cu_seqlens=cu),
                torch.float64)
    for partition in [c.name for c in op.comp.plan.partitions]:
        f32 = [x.detach().float().requires_grad_() for x in leaves]
        leaves_f = f32

        def run():
            return op(*f32[:len(xs)], initial_state=one(f32[len(xs):]), output_final_state=True, cu_seqlens=cu,
                      chunk=16, block=16, partition=partition)

        o, s = run()
        g = torch.autograd.grad([o] + list(s if isinstance(s, tuple) else (s,)), leaves_f,
                                [d_o.float()] + [d.float() for d in d_s])
        for x, a, b in zip([d.name for d in op.spec.inputs] + [s.name for s in op.spec.states], g, ref):
            assert judge_fp32(a, b).ok, f"{op.name} partition={partition} d{x}: {judge_fp32(a, b)}"


def test_the_cost_model_charges_spills_and_repeats():
    """passes.kernel_cost: a kernel whose live values pass 255 a thread pays for spills and holds one
    program an SM; a loop body's matmuls count once per block."""
    t = lambda *s: TileType(s)
    sizes = {C: 64}
    types = {"a": t(C, C), "b": t(C, C)}
    ops = (Op("m", "matmul", ("a", "b"), t(C, C)),)
    small = kernel_cost(1000, ops, ("m",), types, sizes, {"a": 8192, "b": 8192}, {"m": 16384})
    assert small.spill_kbytes == 0 and small.matmuls == 1
    twice = kernel_cost(1000, ops, ("m",), types, sizes, {"a": 8192, "b": 8192}, {"m": 16384}, {"m": 2})
    assert twice.matmuls == 2 and twice.us > small.us
    big = {C: 512}
    assert live_values(ops, ("m",), types, big) > 255 * 128
    spilled = kernel_cost(1000, ops, ("m",), types, big, {}, {})
    assert spilled.spill_kbytes > 0 and spilled.per_sm == 1 and spilled.us > small.us  # 256 threads x 255: one
