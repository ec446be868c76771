"""tools.memory: a training step's memory at any shape from a dry run on meta tensors (no kernel runs, no
GPU), against the H200's measurements of the same steps (tools.peers.time_training_step's measure)."""
import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode
from typer.testing import CliRunner

import effc
from effc.runtime.launch import Launcher
from effc.tools.cli import app
from effc.tools.memory import training_memory

D128 = lambda op: {d: 128 for d in op.spec.dims}  # noqa: E731


# dv, which the adjoint scan hands on to bwd_sums (passes.hand_on) since those measurements: [T, H, V] in bf16,
# live at bwd_sums, the peak at chunk 32 (at the delta rules' chunk 64 the peak is elsewhere and unchanged)
HANDED_DV = 2 * 8192 * 16 * 128 * 2 / 2 ** 20


@pytest.mark.parametrize("name, chunk, measured, added", [
    ("gated_delta_net", 32, 1012, HANDED_DV),  # docs/benchmarks.md, H100, fifth 2026-12-06 session (buffer lifetimes)
    ("gated_delta_net_l2", 32, 1012, HANDED_DV),
    ("delta_net", 32, 1011, HANDED_DV),
    ("mlstm_sig", None, 683, 0),  # fourth 2026-12-06 session
    ("gated_delta_net", None, 870, 0),  # H100, eighth 2026-12-07 session
])
def test_the_dry_run_matches_the_h100(name, chunk, measured, added):
    """The default partition's peak, as the runtime is now, against `effc bench --backward`'s measure (the
    delta rules measured at chunk 32, their spec's chunk then), plus what the runtime added since (`added`)."""
    op = effc.load(name)
    m = training_memory(op, 2, 8192, 16, D128(op), **({"chunk": chunk} if chunk else {}))
    assert abs(m.peak_mib - measured - added) <= 0.01 * measured, m


def test_the_history_gets_no_zero_cotangent(monkeypatch):
    """The state history (and prep's values kept with it) are outputs of the forward's autograd node only so
    that the backward can read them; autograd gives them None, not a zero tensor of their size (128 + 160 MiB
    of delta_net_l2's step at 2x8192)."""
    op = effc.load("delta_net_l2")
    now = training_memory(op, 2, 8192, 16, D128(op), partition="cut")
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "set_materialize_grads", lambda ctx, value: None)
    before = training_memory(op, 2, 8192, 16, D128(op), partition="cut")
    history = 2 * (8192 // op.spec.chunk) * 16 * 128 * 128 * 2 / 2 ** 20  # chunks x heads x [K, V] in bf16
    prep = 2 * 8192 * 16 * (op.spec.chunk + 128 + 128) * 2 / 2 ** 20  # t [C, C], w [C, K], u [C, V] in bf16
    assert abs(before.peak_mib - now.peak_mib - history - prep) < 1, (before, now)


def test_what_the_partitions_hold():
    """One program per V block keeps an fp32 partial per block of each gradient without V; the loop sums on
    chip and stores the gradients in bf16; the cut adds its per-token sums: block > cut > loop. The forward
    keeps the same in every partition, and the gradients are the inputs' size in their dtype."""
    op = effc.load("delta_net_l2")
    m = {p.name: training_memory(op, 2, 4096, 8, D128(op), partition=p.name) for p in op.comp.plan.partitions}
    assert m["block"].peak_mib > m["cut"].peak_mib > m["loop"].peak_mib
    assert len({round(x.kept_mib, 3) for x in m.values()}) == 1
    inputs = 2 * 4096 * 8 * (3 * 128 + 1) * 2 / 2 ** 20
    assert all(abs(x.grads_mib - inputs) < 0.01 for x in m.values())
    assert all(x.peak_mib >= x.grads_mib + x.kept_mib - 2 * 4096 * 8 * 128 * 2 / 2 ** 20 for x in m.values())


def test_the_dry_run_launches_nothing(monkeypatch):
    def no(*a, **k):
        raise AssertionError("a kernel ran in the dry run")
    monkeypatch.setattr(Launcher, "_fn", no)
    op = effc.load("gla")
    assert training_memory(op, 1, 1000, 2, {d: 60 for d in op.spec.dims}).peak_mib > 0


def test_effc_memory_lists_each_partition_and_marks_the_default(tmp_path):
    r = CliRunner().invoke(app, ["memory", "delta_net_l2", "--shape", "1,4096,4"])
    assert r.exit_code == 0, r.output
    plan = effc.load("delta_net_l2").comp.plan
    for p in plan.partitions:
        assert f"partition {p.name}{' (default)' if p.name == plan.partition else ''}: peak " in r.output
    r = CliRunner().invoke(app, ["compile", "delta_net_l2", "--shape", "1,4096,4", "-o", str(tmp_path)])
    assert r.exit_code == 0 and "training memory at that shape in bf16: peak " in r.output, r.output
    r = CliRunner().invoke(app, ["memory", "softmax_attn", "--dtype", "int8"])
    assert r.exit_code != 0 and "int8" in r.output
    r = CliRunner().invoke(app, ["memory", "softmax_attn", "--shape", "1,512,4", "--kv-heads", "2"])
    assert r.exit_code == 0 and "(2 key heads)" in r.output and "peak " in r.output, r.output
    r = CliRunner().invoke(app, ["memory", "softmax_attn", "--shape", "1,512,4", "--kv-heads", "3"])
    assert r.exit_code != 0 and "divisor of H=4" in r.output, r.output


def test_effc_memory_names_a_partition_the_call_cannot_take():
    """DSA's head rows need 9 or more query heads a key head: with 4 the tool says so and reports the other."""
    r = CliRunner().invoke(app, ["memory", "dsa", "--shape", "1,1000,4"])
    assert r.exit_code == 0, r.output
    assert "partition heads: not for this call: partition='heads'" in r.output
    assert "partition tokens" in r.output and "peak " in r.output


def test_the_op_still_runs_under_the_interpreter_after_a_dry_run():
    """The dry run takes the GPU's choices, but the op's kernels keep the process's mode (triton.jit fixes it
    when the module is imported): a later call on CPU tensors runs under the interpreter as before."""
    op = effc.load("retention")
    training_memory(op, 1, 64, 1, {d: 16 for d in op.spec.dims})
    x = torch.randn(1, 40, 1, 16)
    o = op(x, x, x)[0]
    assert torch.allclose(o.double(), op.reference(x, x, x)[0], atol=1e-4)


def test_softmax_attention_holds_the_output_its_gradients_and_two_rows():
    """A softmax step at 2x8192, H=16, D=128 in bf16 holds the output, the three gradients and two fp32
    values a row (log-sum-exp, D); the walks read the output's cotangent itself, no copy of it (the H200
    measured 322 MiB when pre still wrote one: 64 MiB more)."""
    op = effc.load("softmax_attn")
    m = training_memory(op, 2, 8192, 16, D128(op))
    tile = 2 * 8192 * 16 * 128 * 2 / 2 ** 20
    assert abs(m.peak_mib - (4 * tile + 2 * 2 * 8192 * 16 * 4 / 2 ** 20)) < 0.5, m


def test_grouped_key_heads_hold_at_most_a_query_sized_copy():
    """GQA at 2x8192, H=16, D=128, bf16: dK/dV's per-query-head copies (bf16, as FlashAttention-2's) take at
    most the query's 64 MiB (passes.softmax.copies_heads). With 4 key heads: the gradients (64 + 2 x 16), the
    copies (64), the output and its two fp32 rows, as MHA's step holds its gradients: 226 MiB (466 with one
    head a program and fp32 copies). NSA with one key head: 590 MiB (the H100 measured 623 while its selected
    branch's head rows still stored dK/dV at each group's first query head of H, the others zero; 794 before
    the copies' budget; fla's parallel_nsa 527, docs/benchmarks.md)."""
    op = effc.load("softmax_attn")
    tile = 2 * 8192 * 16 * 128 * 2 / 2 ** 20
    m = training_memory(op, 2, 8192, 16, D128(op), kv_heads=4)
    assert abs(m.peak_mib - (tile + 2 * tile / 4 + tile + tile + 2 * 2 * 8192 * 16 * 4 / 2 ** 20)) < 1, m
    # head rows sum a key head's 16 query heads in one program: dK/dV stored once per key head, no copies
    rows = effc.load("infllm_v2")
    m = training_memory(rows, 8, 2048, 16, D128(rows), kv_heads=1, partition="heads")
    assert m.peak_mib < 172 and m.grads_mib < 72.1, m  # 292 while the rows stored at H heads beside zeros
    nsa = effc.load("nsa")
    assert abs(training_memory(nsa, 2, 8192, 16, D128(nsa), kv_heads=1).peak_mib - 590) < 1 < 1.2 * 527 - 590


@pytest.mark.parametrize("name", effc.library_names())
def test_every_library_spec_has_a_training_memory(name):
    """Every family (a hybrid's two branches, select stages, key sequences) runs its dry run."""
    op = effc.load(name)
    m = training_memory(op, 2, 300, 2, {d: 32 for d in op.spec.dims})
    assert m.peak_mib >= m.grads_mib > 0


def test_a_hybrids_cotangent_gradient_is_one_copy_in_the_input_dtype():
    """swax's state branch reads the softmax branch's output as an input whose gradient is the output's
    cotangent itself (passes.fusion.seed_gradients): one bf16 copy, no fp32 buffer beside it. At 2x8192 in
    bf16 the step peaks at the state history and its adjoint (256 MiB each) beside five [B, T, H, D] tiles
    (64 MiB each: the two branches' outputs and the gradients made by then): 836 MiB (1348 with an fp32
    buffer, 900 with every gradient made before the first gradient kernel)."""
    op = effc.load("swax")
    assert op.linear.comp.plan.seed_grads
    m = training_memory(op, 2, 8192, 16, D128(op))
    assert abs(m.peak_mib - (2 * 256 + 5 * 64)) < 8, m


def test_the_backward_holds_a_buffer_only_while_a_kernel_needs_it(monkeypatch):
    """gated_delta_net's cut at 2x8192 in bf16 at chunk 32: bwd_sums alone reads the adjoint history (256 MiB), the
    hoisted w and u and the scan's dv (64 MiB each); the kernels after it run without them, each making the
    gradient it writes (64 MiB) as it starts, and the cut's sums go after their last reader."""
    live = {}
    launch = Launcher._launch

    def record(self, kp, grid, values, options):
        live[kp.name] = _get_current_dispatch_mode().live / 2 ** 20  # tools.memory's count, as kp starts
        return launch(self, kp, grid, values, options)
    monkeypatch.setattr(Launcher, "_launch", record)
    op = effc.load("gated_delta_net")
    m = training_memory(op, 2, 8192, 16, D128(op), chunk=32, partition="cut")
    assert m.peak_mib == pytest.approx(live["bwd_sums"], abs=0.01)
    assert live["bwd_chunks_q_after"] == pytest.approx(live["bwd_sums"] - 256 - 3 * 64 + 64, abs=0.01)
    assert live["bwd_chunks_k_after"] == pytest.approx(live["bwd_chunks_q_after"] + 64, abs=0.01)
    reads = {kp.name: {d.name for d in kp.hoisted_loads} for kp in op.comp.plan.gradient_kernels("cut")}
    freed = reads["bwd_chunks_g_after"] - reads["bwd_chunks_beta_after"]
    assert freed and live["bwd_chunks_beta_after"] < live["bwd_chunks_g_after"] - 64


def test_views_of_the_inputs_are_no_allocation():
    """A call in dim parts (K=96 as 64 + 32) reads and writes column slices of the caller's tensors: views, which
    allocate nothing, so it keeps what the padded call keeps (the history and outputs have the real sizes)."""
    op = effc.load("gla")
    dims = {"K": 96, "V": 96}
    parted = training_memory(op, 2, 256, 2, dims)
    assert op.last_dim_parts == "parts: K=96 as 64 + 32"
    padded = training_memory(op, 2, 256, 2, dims, dim_parts=False)
    assert parted.kept_mib == padded.kept_mib and parted.grads_mib == padded.grads_mib


def test_the_dry_run_leaves_the_interpreters_modules_alone():
    """effc memory imports generated modules with TRITON_INTERPRET unset (the compiled mode's choices); a later
    op of the same spec, called under the interpreter, still gets interpreted kernels: one module per mode
    (runtime.cache). A copy of gla named for this test, so no earlier test imported its modules; K=96 and 48
    run the split spec's module too."""
    from effc.runtime.verify import judge_fp32, random_inputs
    text = (effc.library.LIBRARY_DIR / "gla.attn").read_text().replace("spec gla", "spec gla_dry_run")
    training_memory(effc.loads(text), 1, 64, 2, {"K": 96, "V": 16})
    op = effc.loads(text)
    xs = random_inputs(op.spec, 1, 20, 2, {"K": 48, "V": 16})
    out, _ = op(*xs)
    assert op.last_dim_parts == "parts: K=48 as 32 + 16"
    assert judge_fp32(out, op.reference(*xs)[0]).ok


@pytest.mark.parametrize("name, partition", [("hidden", "cut"), ("gated_delta_net", "cut_each")])
def test_the_adjoint_history_lives_until_its_last_reader(name, partition, monkeypatch):
    """The lifetimes come from the plan, not from names: in a delta rule that is not in the library (its writing
    strength scales the keys only) and in gated_delta_net's cut_each, each gradient kernel takes a state's
    history only where its ops read it, and the adjoint history is held exactly until the last kernel that
    reads it has been launched."""
    from tests.test_partition import HIDDEN
    op = effc.loads(HIDDEN) if name == "hidden" else effc.load(name)
    plan = op.comp.plan
    for p in plan.partitions:
        for kp in plan.gradient_kernels(p.name):
            reads = {a for o in kp.ops for a in o.args if isinstance(a, str)}
            takes = "S_dhist_ptr" in kp.arg_names
            assert takes == bool(reads & {"S", "_seed__next_S"}), (p.name, kp.name)
    held = {}
    launch = Launcher._launch

    def record(self, kp, grid, values, options):
        held[kp.name] = "S_dhist_ptr" in values  # the launcher passes the buffers it still holds
        return launch(self, kp, grid, values, options)
    monkeypatch.setattr(Launcher, "_launch", record)
    training_memory(op, 1, 1024, 2, D128(op), partition=partition)
    order = plan.gradient_kernels(partition)
    last = max(i for i, kp in enumerate(order) if kp.states)
    assert [held[kp.name] for kp in order] == [i <= last for i in range(len(order))]


def test_top_names_the_largest_buffers_live_at_the_peak_and_the_line_that_made_them():
    """gated_delta_net at 2x4096: the output and the state history are live at the peak; the list is sorted,
    holds at most `top` buffers, adds up to no more than the peak, and each names a runtime line."""
    op = effc.load("gated_delta_net")
    m = training_memory(op, 2, 4096, 16, D128(op), top=4)
    assert len(m.at_peak) == 4 and [b.mib for b in m.at_peak] == sorted((b.mib for b in m.at_peak), reverse=True)
    assert sum(b.mib for b in m.at_peak) <= m.peak_mib + 1e-6
    assert all(b.where.startswith("runtime/") and ":" in b.where for b in m.at_peak), m.at_peak
    assert (2, 4096, 16, 128) in {b.shape for b in m.at_peak}  # the output o (or a gradient of its shape)
    assert training_memory(op, 2, 4096, 16, D128(op)).at_peak == ()  # not asked: no stack walks


def test_the_cli_lists_the_buffers_at_the_peak():
    result = CliRunner().invoke(app, ["memory", "delta_net", "--shape", "1,2048,4", "--top", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "MiB  " in line and "(runtime/" in line]
    assert len(lines) == 2 * sum("peak" in line for line in result.output.splitlines()), result.output
