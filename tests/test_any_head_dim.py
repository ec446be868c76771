"""Feature dims that are not powers of two (or are below 16): tiles padded to the next power of two >= 16,
padded columns masked (interpreter, fp32, bounds-checked by tests/memcheck.py). Forward and every gradient
against the oracle, gla against a naive recurrence written here, packed sequences with an empty one,
grouped heads, the decoding step, the constexpr guards of the masks, and an sm_90 compile."""
import os
import re
import subprocess
import sys

import pytest
import torch

import effc
from effc.runtime.verify import judge_fp32, random_inputs, random_state

# K=30, V=18: rows of 120 and 72 bytes in fp32, so the softmax kernels read leaves stored 32 and 20 wide
DIMS = [{"K": 20, "V": 20}, {"K": 48, "V": 48}, {"K": 60, "V": 60}, {"K": 100, "V": 100}, {"K": 24, "V": 40},
        {"K": 30, "V": 18}]
SPECS = ["gla", "delta_net", "mlstm_sig", "softmax_attn", "swax"]


def _tuple(s) -> tuple:
    return s if isinstance(s, tuple) else (s,)


def _leaves(op, B, T, H, dims, seed=0, heads=None):
    xs = random_inputs(op.spec, B, T, H, dims, seed=seed)
    if heads:  # grouped inputs keep every (H // heads)-th head
        xs = [x[:, :, ::H // heads].contiguous() if d.name in ("k", "v") else x for d, x in zip(op.spec.inputs, xs)]
    s0 = tuple(x.requires_grad_() for x in _tuple(random_state(op.spec, B, H, dims))) if op.spec.states else ()
    return [x.requires_grad_() for x in xs], s0


def _grads(fn, leaves, dtype, seed=1):
    """Outputs (and final states) of fn, and the gradients of the leaves for random cotangents."""
    o, s = fn()
    outs = [o] + (list(_tuple(s)) if s is not None else [])
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype) for x in outs]
    torch.autograd.backward(outs, cot)
    g = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    return [x.detach() for x in outs], g


def _reference(op, xs, s0, cu):
    """The oracle; packed sequences one by one where it does not take cu_seqlens (hybrids). An empty
    sequence leaves its initial state."""
    call = dict(initial_state=s0 or None, output_final_state=bool(s0))
    if cu is None or not hasattr(op, "linear"):
        return op.reference(*xs, **call, **({"cu_seqlens": cu} if cu is not None else {}))
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        init = tuple(x[i:i + 1] for x in s0)
        if a == b:
            finals.append(init)
            continue
        o, f = op.reference(*(x[:, a:b] for x in xs), initial_state=init, output_final_state=True)
        outs.append(o)
        finals.append(_tuple(f))
    final = tuple(torch.cat([f[j] for f in finals]) for j in range(len(s0)))
    return torch.cat(outs, 1), (final[0] if len(final) == 1 else final)


def _check_against_oracle(op, xs, s0, **kw):
    leaves = xs + list(s0)
    call = dict(initial_state=s0 or None, output_final_state=bool(s0))
    ref, ref_g = _grads(lambda: _reference(op, xs, s0, kw.get("cu_seqlens")), leaves, torch.float64)
    out, g = _grads(lambda: op(*xs, **call, **kw), leaves, torch.float32)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and judge_fp32(a, b).ok, judge_fp32(a, b)
    names = [d.name for d in op.spec.inputs] + [f"initial {s.name}" for s in op.spec.states]
    for n, a, b in zip(names, g, ref_g):
        assert a.shape == b.shape and judge_fp32(a, b).ok, f"{op.name} d{n}: {judge_fp32(a, b)}"


@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"K{d['K']}V{d['V']}")
@pytest.mark.parametrize("name", SPECS)
def test_forward_and_gradients_match_the_oracle(name, dims):
    """T = 37: two full chunks of 16 and a partial one; initial and final states where the spec has them."""
    op = effc.load(name)
    xs, s0 = _leaves(op, 1, 37, 1, {d: dims[d] for d in op.spec.dims})
    _check_against_oracle(op, xs, s0, chunk=16)


@pytest.mark.parametrize("kw", [{}, {"block": 16, "segments": 2}], ids=["model", "blocks16-segments2"])
def test_gla_against_a_naive_recurrence(kw):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = K^-1/2 q_t S_t, in float64 token by token. V = 40 in
    blocks of 16: the last split block is half padding."""
    op = effc.load("gla")
    K, V, T = 24, 40, 29
    q, k, v, g = (x.detach() for x in random_inputs(op.spec, 2, T, 2, {"K": K, "V": V}, seed=5))
    s0 = random_state(op.spec, 2, 2, {"K": K, "V": V})
    o, final = op(q, k, v, g, initial_state=s0, output_final_state=True, chunk=16, **kw)
    S = s0.double()
    expect = torch.empty(2, T, 2, V, dtype=torch.float64)
    for t in range(T):
        qt, kt, vt, gt = (x[:, t].double() for x in (q, k, v, g))  # (B, H, D)
        S = S * gt.exp()[..., None] + kt[..., None] * vt[..., None, :]
        expect[:, t] = torch.einsum("bhk,bhkv->bhv", qt * K ** -0.5, S)
    assert judge_fp32(o, expect).ok, judge_fp32(o, expect)
    assert judge_fp32(final, S).ok, judge_fp32(final, S)


@pytest.mark.parametrize("sizes", [{"K": 24, "V": 40}, {"K": 30, "V": 18}], ids=["K24V40", "K30V18-stored"])
@pytest.mark.parametrize("name", ["gla", "softmax_attn", "swax"])
def test_varlen_with_an_empty_sequence(name, sizes):
    """K=30, V=18: the softmax kernels read packed leaves from rows stored wider than the caller's."""
    op = effc.load(name)
    cu = torch.tensor([0, 5, 5, 30], dtype=torch.int32)  # the second sequence has no token
    dims = {d: sizes[d] for d in op.spec.dims}
    xs, _ = _leaves(op, 1, 30, 2, dims, seed=2)
    s0 = (tuple(x.requires_grad_() for x in _tuple(random_state(op.spec, 3, 2, dims))) if op.spec.states else ())
    _check_against_oracle(op, xs, s0, cu_seqlens=cu, chunk=16)


@pytest.mark.parametrize("name", ["gla", "softmax_attn"])
def test_grouped_heads(name):
    op = effc.load(name)
    xs, s0 = _leaves(op, 1, 21, 4, {d: {"K": 20, "V": 36}[d] for d in op.spec.dims}, heads=2)
    assert xs[1].shape[2] == 2 and xs[0].shape[2] == 4
    _check_against_oracle(op, xs, s0, chunk=16)


def test_step_equals_the_chunked_forward():
    op = effc.load("gla")
    dims = {"K": 20, "V": 40}
    xs = [x.detach() for x in random_inputs(op.spec, 2, 9, 2, dims, seed=4)]
    s0 = random_state(op.spec, 2, 2, dims)
    full, final = op(*xs, initial_state=s0, output_final_state=True, chunk=16)
    state = s0
    for t in range(9):
        o_t, state = op.step(*(x[:, t] for x in xs), state=state)
        assert o_t.shape == (2, 2, 40) and judge_fp32(o_t, full[:, t]).ok
    assert state.shape == (2, 2, 20, 40) and judge_fp32(state, final).ok


@pytest.mark.parametrize("name", ["gla", "delta_net", "softmax_attn", "swax"])
def test_masks_are_behind_constexpr_guards(name):
    """A mask of padded columns is printed only under a constexpr condition that is false for a power-of-two
    dim (K_P != K, or V % BLOCK != 0 for the split dim), so those dims compile to the kernels they had."""
    op = effc.load(name)
    ops = [op] if not hasattr(op, "linear") else [op.linear, op.softmax]
    for o in ops:
        src = o.comp.source("triton")
        for d in o.spec.dims:
            uses = [line for line in src.splitlines() if re.search(rf"\bm_{d}\b", line)
                    and not re.match(rf"\s*m_{d} = r_{d} < {d}\b", line)]
            assert uses, f"{o.name}: no mask of {d}"
            for line in uses:
                assert f"{d}_P != {d}" in line or f"{d} % BLOCK != 0" in line, line


def test_stored_rows_round_up_to_16_bytes():
    from effc.policy.tiling import stored_width
    assert [stored_width(n, 2) for n in (1, 60, 64, 80, 96, 100, 192)] == [8, 64, 64, 80, 96, 104, 192]
    assert [stored_width(n, 4) for n in (30, 60, 18)] == [32, 60, 20]


@pytest.mark.parametrize("name", ["moba", "sink_window"])
def test_stored_rows_with_a_select_stage_and_sinks(name):
    """Leaves (and the backward's reduction cotangents) stored wider than their rows: a select stage's
    kernels read the same stored leaves as the walks; T = 45 is not a multiple of the 16-token key block."""
    op = effc.load(name)
    xs, s0 = _leaves(op, 1, 45, 2, {d: {"K": 30, "V": 18}[d] for d in op.spec.dims}, seed=3)
    _check_against_oracle(op, xs, s0)


def test_tiling_pads_and_splits():
    from effc.policy.tiling import Problem, choose, default_block, padded, split_blocks
    assert [padded(n) for n in (1, 16, 20, 64, 80, 96, 100, 128, 192, 320)] == [16, 16, 32, 64, 128, 128, 128, 128,
                                                                                 256, 512]
    assert [default_block(n) for n in (8, 40, 64, 80, 96, 192, 320)] == [16, 64, 64, 64, 64, 64, 64]
    assert split_blocks(80, 64) == 2 and split_blocks(96, 32) == 3
    op = effc.load("gla")
    cfg = choose(op.spec, op.comp.legality, Problem(2, 1024, 4, (("K", 96), ("V", 80))))
    assert cfg.block == 64


def test_tilelang_masks_the_padded_dims():
    """TileLang runs a program with masked tiles for the dims that need it (tests/test_tilelang_emulated.py runs
    them); power-of-two dims keep the plain program."""
    from effc.runtime.tilelang_backend import masked_dims
    plan = effc.load("gla").comp.plan  # V is the split dim
    assert masked_dims(plan, {"K": 96, "V": 64}, 64) == {"K"}
    assert masked_dims(plan, {"K": 64, "V": 96}, 32) == set()  # 96 in three blocks of 32
    assert masked_dims(plan, {"K": 64, "V": 96}, 64) == {"V"}  # the second block of 64 is half masked
    assert masked_dims(plan, {"K": 128, "V": 128}, 64) == set()


AOT = r"""
import json, re, sys
import effc
from effc.codegen.triton.aot import compile_sm90, compile_softmax_sm90
out = {}
op = effc.load("gla")
for kp in op.comp.plan.kernels:
    if kp.name in ("walk", "bwd_chunks_v"):
        out["gla." + kp.name] = "mma" in compile_sm90(op, kp, dims={"K": 96, "V": 80}).asm["ptx"]
# K=96 in parts (passes.dim_parts): tiles of 64 and 32, the caller's rows 96 wide
from effc.runtime.dim_parts import split_op
sp = split_op(op, {"K": (64, 32)})
for kp in sp.comp.plan.kernels:
    if kp.name in ("walk", "bwd_chunks_g_loop"):
        out["gla parts." + kp.name] = "mma" in compile_sm90(sp, kp, dims={"K__0": 64, "K__1": 32, "V": 96}).asm["ptx"]
s = effc.load("softmax_attn")
out["softmax_attn.fwd"] = "mma" in compile_softmax_sm90(s, "fwd", dims={"K": 80, "V": 80}).asm["ptx"]
# D=60 rows are stored 64 wide: the walk's key and value loads copy 16 bytes at a time, as at D=64
ptx = compile_softmax_sm90(s, "fwd", dims={"K": 60, "V": 60}).asm["ptx"]
sizes = set(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (0x\w+)", ptx))
out["softmax_attn.fwd D=60 16-byte loads"] = sizes == {"0x10"}
print("AOT " + json.dumps(out))
"""


def test_padded_kernels_compile_for_sm90(tmp_path):
    """gla at K=96 (one 128-wide tile; and in parts, 64 + 32), V=80 (two blocks of 64, the second masked),
    softmax_attn at D=80 and
    at D=60 (stored rows: 16-byte loads): Triton's AOT path (no GPU), which checks dot shapes and layouts the
    interpreter does not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EFFC_CACHE_DIR"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", AOT], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    import json
    res = json.loads(p.stdout.split("AOT ", 1)[1])
    assert len(res) == 6 and all(res.values()), res
