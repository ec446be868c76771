"""The derived backward (interpreter, fp32) against torch.autograd through the oracle; variable-length
batches, grouped heads, the decoding step and torch.compile."""
from dataclasses import replace

import pytest
import torch

import effc
from effc.compiler import compile_file
from effc.runtime.verify import judge_fp32, judge_low_precision, random_inputs, random_state

LIBRARY = effc.library_names("linear")
PLANS = {n: compile_file(n).plan for n in LIBRARY}  # collection reads plans only: no op built, no source
DIMS = {"K": 16, "V": 32, "L": 8}  # L: log_linear_attn's levels


def _leaves(op, B, T, H, seed=0, heads=None):
    dims = {d: DIMS[d] for d in op.spec.dims}
    xs = random_inputs(op.spec, B, T, H, dims, seed=seed)
    if heads:  # grouped inputs keep every (H // heads)-th head
        xs = [x[:, :, ::H // heads].contiguous() if d.name in ("k", "v") else x for d, x in zip(op.spec.inputs, xs)]
    s0 = random_state(op.spec, B, H, dims)
    s0 = tuple(x.requires_grad_() for x in s0) if isinstance(s0, tuple) else s0.requires_grad_()
    return [x.requires_grad_() for x in xs], s0


def _tuple(s) -> tuple:
    return s if isinstance(s, tuple) else (s,)


def _grads(fn, leaves, d_o, d_s):
    o, s = fn()
    torch.autograd.backward([o, *_tuple(s)], [d_o, *_tuple(d_s)])
    g = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    return o.detach(), g


@pytest.mark.parametrize("name", LIBRARY)
# block 16 splits V = 32 across two programs: states without V (normalisers, stabilisers) then carry one
# partial adjoint per block, and only one block may take the final-state cotangent; it runs with the states
# recomputed, the whole-V run with them saved (each knob's both values, in two calls a spec)
@pytest.mark.parametrize("save_states,block", [(True, None), (False, 16)])
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_gradients_match_autograd_through_the_oracle(name, save_states, block):
    op = effc.load(name)
    # two sequences (a batch's states and rows), one head: the sweep's cost is every spec x knob under the
    # interpreter; several heads are every other test's
    xs, s0 = _leaves(op, 2, 45, 1)
    d_o = torch.randn(2, 45, 1, DIMS["V"], dtype=torch.float64)
    d_s = tuple(torch.randn(s.shape, dtype=torch.float64) for s in _tuple(s0))
    leaves = xs + list(_tuple(s0))
    ref, ref_g = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True), leaves, d_o, d_s)
    out, g = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True, chunk=16, save_states=save_states,
                                   **({"block": block} if block else {})),
                    leaves, d_o.float(), tuple(d.float() for d in d_s))
    assert judge_fp32(out, ref).ok
    names = [d.name for d in op.spec.inputs] + [f"initial {s.name}" for s in op.spec.states]
    for d, a, b in zip(names, g, ref_g):
        assert judge_fp32(a, b).ok, f"{name} d{d}: {judge_fp32(a, b)}"


@pytest.mark.parametrize("name", ["gla", "retention"])
def test_varlen_equals_sequences_one_by_one(name):
    op = effc.load(name)
    lengths = [1, 7, 16, 23]  # a single token, shorter than a chunk, a chunk, not a multiple
    cu = torch.tensor([0, 1, 8, 24, 47], dtype=torch.int32)
    xs, _ = _leaves(op, 1, sum(lengths), 2, seed=3)
    dims = {d: DIMS[d] for d in op.spec.dims}
    s0 = random_state(op.spec, len(lengths), 2, dims).requires_grad_()
    d_o = torch.randn(1, sum(lengths), 2, DIMS["V"])
    d_s = torch.randn(s0.shape)
    leaves = xs + [s0]
    out, g = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk=16), leaves,
                    d_o, d_s)
    ref, ref_g = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True, cu_seqlens=cu),
                        leaves, d_o.double(), d_s.double())
    assert judge_fp32(out, ref).ok
    for a, b in zip(g, ref_g):
        assert judge_fp32(a, b).ok
    # and the same as running each sequence alone through the kernels
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        o_i, _ = op(*[x[:, a:b].detach() for x in xs], initial_state=s0[i:i + 1].detach(), chunk=16)
        assert judge_fp32(out[:, a:b], o_i).ok


@pytest.mark.parametrize("name", ["simple_gla", "delta_net"])  # delta_net: grouped k, v read by prep and out
def test_grouped_heads(name):
    op = effc.load(name)
    xs, s0 = _leaves(op, 1, 40, 4, heads=2)
    assert xs[1].shape[2] == 2 and xs[0].shape[2] == 4
    d_o = torch.randn(1, 40, 4, DIMS["V"], dtype=torch.float64)
    d_s = torch.randn(s0.shape, dtype=torch.float64)
    leaves = xs + [s0]
    ref, ref_g = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True), leaves, d_o, d_s)
    out, g = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True, chunk=16), leaves, d_o.float(),
                    d_s.float())
    assert judge_fp32(out, ref).ok
    for a, b in zip(g, ref_g):
        assert a.shape == b.shape and judge_fp32(a, b).ok


def test_step_equals_the_chunked_forward():
    op = effc.load("gla")
    xs, s0 = _leaves(op, 2, 20, 2)
    xs = [x.detach() for x in xs]
    full, final = op(*xs, initial_state=s0.detach(), output_final_state=True)
    state = s0.detach()
    for t in range(20):
        o_t, state = op.step(*(x[:, t] for x in xs), state=state)
        assert judge_fp32(o_t, full[:, t]).ok
    assert judge_fp32(state, final).ok


@pytest.mark.parametrize("name", ["retention", "delta_net"])  # delta_net: prep, deferred out, bwd_inject
def test_torch_compile_fullgraph(name):
    op = effc.load(name)
    xs, _ = _leaves(op, 1, 24, 2)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(*xs):
        o, s = op(*xs, output_final_state=True, chunk=16)
        return (o * 2).sum() + s.sum()

    loss = f(*xs)
    loss.backward()
    g = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    o, s = op.reference(*xs, output_final_state=True)
    ((o * 2).sum() + s.sum()).backward()
    for a, x in zip(g, xs):
        assert judge_fp32(a, x.grad).ok


def test_eager_calls_bypass_the_custom_op_and_compile_traces_it(monkeypatch):
    """Eager calls run the same functions and autograd formula without the dispatcher (its first use costs
    seconds of imports); under torch.compile the custom op is what gets traced."""
    op = effc.load("retention")
    ops = op._torch_ops
    calls = []
    monkeypatch.setattr(ops, "forward", lambda *a: calls.append("custom op") or ops.run_forward(*a))
    xs, _ = _leaves(op, 1, 24, 2)
    o, _ = op(*xs, chunk=16)
    o.sum().backward()
    assert calls == [] and all(x.grad is not None for x in xs)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    op(*[x.detach() for x in xs], chunk=16)
    assert calls == ["custom op"]


def test_host_plan_is_marked_constant_as_dynamo_marks_it():
    """effc marks its host-side planning constant for torch.compile without importing dynamo; the flag must
    be the one the installed torch's decorator sets."""
    from effc.runtime.torch_op import host_plan
    marked = torch.compiler.assume_constant_result(lambda: 0)
    flags = [a for a in vars(marked) if "constant" in a]
    assert flags and all(getattr(host_plan, a, None) == getattr(marked, a) for a in flags)


@pytest.mark.parametrize("save_states", [True, False])
def test_gradients_after_a_deferred_segmented_forward(save_states):
    """gla with 2 segments and merge deferred to the out kernel: the walk's states feed out and (kept or
    recomputed) the backward."""
    op = effc.load("gla")
    xs, s0 = _leaves(op, 2, 45, 2, seed=4)
    d_o = torch.randn(2, 45, 2, DIMS["V"], dtype=torch.float64)
    d_s = torch.randn(s0.shape, dtype=torch.float64)
    leaves = xs + [s0]
    ref, ref_g = _grads(lambda: op.reference(*xs, initial_state=s0, output_final_state=True), leaves, d_o, d_s)
    out, g = _grads(lambda: op(*xs, initial_state=s0, output_final_state=True, chunk=16, segments=2,
                               defer_merge=True, save_states=save_states), leaves, d_o.float(), d_s.float())
    assert op.last_config.defer_merge and op.last_config.segments == 2
    assert judge_fp32(out, ref).ok
    for a, b in zip(g, ref_g):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


# log_linear_attn's 16 level states take ~30 s here under the interpreter: the full tier only
SEGMENTABLE = [pytest.param(n, marks=pytest.mark.slow) if n == "log_linear_attn" else n
               for n in LIBRARY if PLANS[n].segmentable]


def _packed_sequences(op, seed: int, partitions=None, bounds=(0, 9, 50, 75), **knobs):
    """(out, reference out, gradients, reference gradients) over packed sequences (`bounds`, cu_seqlens; by
    default of 1, 3 and 2 chunks of 16), with initial- and final-state cotangents, against autograd through
    the float64 oracle; one head (the sweeps over every spec and partition run under the interpreter). With
    `partitions`, (the list of (out, gradients) per partition, reference out, reference gradients): every
    partition against one oracle run."""
    cu = torch.tensor(bounds, dtype=torch.int32)
    T, n = bounds[-1], len(bounds) - 1
    xs, _ = _leaves(op, 1, T, 1, seed=seed)
    dims = {d: DIMS[d] for d in op.spec.dims}
    s0 = tuple(x.requires_grad_() for x in _tuple(random_state(op.spec, n, 1, dims)))
    d_o = torch.randn(1, T, 1, DIMS["V"], dtype=torch.float64)
    d_s = tuple(torch.randn(s.shape, dtype=torch.float64) for s in s0)
    one = lambda t: t if len(s0) > 1 else t[0]
    leaves = xs + list(s0)
    ref, ref_g = _grads(lambda: op.reference(*xs, initial_state=one(s0), output_final_state=True, cu_seqlens=cu),
                        leaves, d_o, one(d_s))
    runs = [_grads(lambda: op(*xs, initial_state=one(s0), output_final_state=True, cu_seqlens=cu, chunk=16,
                              **knobs, **({} if p is None else {"partition": p})),
                   leaves, d_o.float(), one(tuple(d.float() for d in d_s))) for p in partitions or [None]]
    if partitions is not None:
        return runs, ref, ref_g
    out, g = runs[0]
    return out, ref, g, ref_g


@pytest.mark.parametrize("name", SEGMENTABLE)
def test_segmented_reverse_scan_over_packed_sequences(name):
    """The reverse scan in 3 segments (summaries of the later segments folded into the earlier ones) over
    packed sequences of 1, 3 and 2 chunks, V in two blocks (states without V carry per-block partials),
    with initial- and final-state cotangents."""
    op = effc.load(name)
    out, ref, g, ref_g = _packed_sequences(op, 5, segments=3, block=16)
    assert op.last_config.segments == 3
    assert judge_fp32(out, ref).ok
    for a, b in zip(g, ref_g):
        assert judge_fp32(a, b).ok, f"{name}: {judge_fp32(a, b)}"


@pytest.mark.parametrize("name", ["mlstm_sig", "gated_delta_net", "gla", "delta_net", "retention"])
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_bf16_storage_under_the_interpreter(name):
    """bf16 inputs through the interpreter (its matmuls run in fp32: DOT_DTYPE), so what a GPU stores in
    16 bits is rounded here too: the state history and its adjoints, prep's scratch, gradients stored in the
    input dtype. Judged as on the GPU (tests/gpu): no worse than 2x a PyTorch reference with bf16 matmul
    operands, against the float64 oracle. Segmented where the spec allows, V in two blocks; every gradient
    partition (their sums cross kernels in bf16)."""
    op = effc.load(name)
    # 100 tokens: 3 chunks of 32 and a ragged 4 (T not a multiple of the chunk), a chunk or two per segment
    B, T, H = 1, 100, 2
    dims = {d: 32 for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, B, T, H, dims, torch.bfloat16, "cpu", seed=7)]
    s0 = tuple(x.requires_grad_() for x in _tuple(random_state(op.spec, B, H, dims, "cpu")))
    gen = torch.Generator().manual_seed(11)
    d_o = torch.randn((B, T, H, 32), generator=gen, dtype=torch.float64)
    d_s = tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in s0)
    one = lambda t: t if len(s0) > 1 else t[0]
    leaves = xs + list(s0)
    knobs = dict(chunk=32, block=16, **({"segments": 3} if op.comp.plan.segmentable else {}))
    _, ref = _grads(lambda: op.reference(*xs, initial_state=one(s0), output_final_state=True), leaves, d_o,
                    one(d_s))
    _, low = _grads(lambda: op.reference(*xs, initial_state=one(s0), output_final_state=True, dtype=torch.float32,
                                         matmul_dtype=torch.bfloat16), leaves, d_o.float(), one(tuple(d.float() for d in d_s)))
    names = [d.name for d in op.spec.inputs] + [f"initial {s.name}" for s in op.spec.states]
    for partition in [c.name for c in op.comp.plan.partitions] or [None]:  # passes.partition: the sums in bf16
        _, got = _grads(lambda: op(*xs, initial_state=one(s0), output_final_state=True, partition=partition,
                                   **knobs), leaves, d_o.bfloat16(), one(tuple(d.float() for d in d_s)))
        assert [g.dtype for g in got[:len(xs)]] == [torch.bfloat16] * len(xs)
        for n, a, b, c in zip(names, got, ref, low):
            assert judge_low_precision(a.float(), b, c).ok, \
                f"{name} partition={partition} d{n}: {judge_low_precision(a.float(), b, c)}"


# test_partition.py runs every partition of these over packed sequences in the fast tier
PARTITIONED_ELSEWHERE = {"delta_net", "gated_delta_net_l2", "mlstm_sig"}
SPLIT = [n for n in LIBRARY if PLANS[n].split_dim and n not in PARTITIONED_ELSEWHERE]


@pytest.mark.parametrize("name", SPLIT)
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_every_gradient_partition_over_packed_sequences(name):
    """passes.partition: each partition of the gradient kernels the plan lists (one program per V block with
    fp32 partials summed, one per chunk looping over the blocks, or cut at the loop with the sums through
    memory) over packed sequences with V in two blocks and initial- and final-state cotangents, against
    autograd through the oracle, every access bounds-checked (conftest)."""
    op = effc.load(name)
    names = [c.name for c in op.comp.plan.partitions] or [None]
    # two sequences, of 1 chunk and of 3 (both ragged): what the partitions sum crosses chunk and sequence
    # boundaries as in the 3-sequence layout of the segmented test above, at 4 chunks rather than 6
    runs, _, ref_g = _packed_sequences(op, 6, partitions=names, bounds=(0, 9, 43), block=16)
    for partition, (_, g) in zip(names, runs):  # the oracle's gradients once, every partition's against them
        for a, b in zip(g, ref_g):
            assert judge_fp32(a, b).ok, f"{name} partition={partition}: {judge_fp32(a, b)}"


def test_gradients_one_kernel_writes_whole_are_stored_in_the_input_dtype():
    """Plan.whole_grads and runtime.launch.direct_grads, on the gated delta rule normalising q and k in the
    kernel with the split dim V in blocks: k and beta get one partial gradient per V block from their
    per-block kernels (fp32, summed), g parts from three kernels; q (its kernel loops over the blocks) and
    v (it has V) are written whole, stored bf16 by their kernel with no conversion pass; one block: all
    single-writer gradients whole; grouped heads sum over the group (fp32). At chunk 32, where dg's terms go to
    three kernels (at the library's 64 they stay in their own)."""
    from effc.runtime.launch import direct_grads, make_layout
    text = (effc.library.LIBRARY_DIR / "gated_delta_net_l2.attn").read_text()
    op = effc.loads(text.replace("  input k: [B, T, H, K]\n", "  input k: [B, T, H, K]\n  chunk 32\n", 1))
    plan = op.comp.plan
    assert plan.split_dim == "V"
    # the mix the model once chose: q's kernel looping, k's and beta's one program per block
    mixed = replace(plan, kernels=tuple(k for k in plan.kernels if k.role != "bwd_chunks") + tuple(
        plan.kernel(n) for n in ("bwd_chunks_q_loop", "bwd_chunks_k", "bwd_chunks_beta")), partition="block")
    mixed = replace(mixed, kernels=tuple(replace(k, partitions=("block",)) if k.role == "bwd_chunks" else k
                                         for k in mixed.kernels))
    assert mixed.whole_grads(n_split=2) == {"q", "v"}
    assert mixed.whole_grads(n_split=1) == {"q", "k", "v", "beta"}
    assert mixed.grad_slot("g", "bwd_chunks_beta") == (1, 1) and mixed.grad_slot("g", None) == (2, 1)
    plan = mixed
    dims = {"K": 16, "V": 32}
    xs = random_inputs(op.spec, 1, 8, 4, dims, torch.bfloat16, "cpu")
    lay = make_layout(op.spec, xs, 4, dims, None, 16)
    assert direct_grads(plan, lay, n_split=2) == {"q", "v"}
    assert direct_grads(plan, lay, n_split=1) == {"q", "k", "v", "beta"}
    grouped = [xs[0], xs[1][:, :, :2]] + xs[2:]
    assert direct_grads(plan, make_layout(op.spec, grouped, 4, dims, None, 16), 1) == {"q", "v", "beta"}
    xs = [x.requires_grad_() for x in xs]
    o = op(*xs, block=16)[0]  # two V blocks
    grads = torch.autograd.grad(o, xs, torch.randn_like(o))
    assert all(g.dtype == torch.bfloat16 and g.shape == x.shape and torch.isfinite(g.float()).all()
               for g, x in zip(grads, xs))


def test_a_final_state_nothing_reads_beside_one_that_is_read():
    """Autograd gives an unread output None (runtime.torch_op: no zero tensor the size of the history): the
    backward still reads every state's final cotangent when any is read, the unread ones as zeros. lion's
    forward states S, Z feed the loss, its reverse states and the output do not."""
    op = effc.load("lion")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 40, 2, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3)]
    dS = torch.randn(1, 2, 16, 16, generator=gen, dtype=torch.float64)

    def loss(fn, dtype):
        _, (S, Z, R, ZR) = fn([x.to(dtype) for x in xs])
        return (S * dS.to(dtype)).sum() + Z.sum()

    def grads(fn, dtype):  # q reaches no state: its gradient is zero
        gs = torch.autograd.grad(loss(fn, dtype), xs, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, xs)]

    ref = grads(lambda t: op.reference(*t, output_final_state=True), torch.float64)
    got = grads(lambda t: op(*t, output_final_state=True, chunk=16), torch.float32)
    assert ref[1].abs().max() > 0 and ref[2].abs().max() > 0
    for n, a, b in zip("qkv", got, ref):
        assert judge_fp32(a, b).ok, f"d{n}: {judge_fp32(a, b)}"
