"""Compile every library spec's kernels for sm_90 with Triton's AOT path (no GPU needed):
catches what the interpreter does not (dot shapes, layouts, register and shared-memory limits).
Runs in subprocesses because the interpreter (set for the other tests) replaces @triton.jit.
The linear family compiles at BLOCK=64; the softmax family at the tiles its model picks for the H100."""
import json
import os
import subprocess
import sys

import pytest

import effc
from effc.codegen.triton.aot import sm90_refuses_backward

SCRIPT = r"""
import contextlib, json, sys
import effc
from effc.codegen.triton.aot import compile_sm90, linear_dot_operands, ptx_only, sm90_refuses_backward
from effc.runtime.launch import SERIAL_STAGES

SERIAL = ("walk", "summary", "bwd_scan")  # the launcher runs the chunk loops at SERIAL_STAGES



# the kernels sm_90 runs: the gradient kernels of the default partition (or every one), none where sm_90
# refuses the backward (policy.triton_faults)
def compiled_kernels(op, every_partition):
    plan = op.comp.plan
    default = set(plan.gradient_kernels())
    refused = sm90_refuses_backward(op)
    return [k for k in plan.kernels if not (refused and k.backward)
            and (every_partition or k.role != "bwd_chunks" or k in default)]


ANCHORED, FINE, EVERY_PARTITION, ASSEMBLED = %r


def compile_spec(spec, results):
    op = effc.load(spec)
    op, name = getattr(op, "linear", op), getattr(op, "linear", op).name  # a hybrid's state branch
    for kp in compiled_kernels(op, spec in EVERY_PARTITION):
        # wgmma needs 64 rows per warp group: a product over chunk rows at C=32 cannot use it
        wide = any(o.kind == "matmul" and (str(o.type.shape[0]) != "C" or op.spec.chunk >= 64) for o in kp.ops)
        # a walk that can defer merge compiles both ways (fused, updating the state only); a segmented
        # reverse scan both passes (segment summaries, walk)
        variants = [({}, "")]
        if kp.name == "walk" and op.comp.plan.deferrable:
            variants.append(({"fuse_merge": False}, "[deferred]"))
        if kp.name == "walk" and spec in FINE:  # as a coarse walk's fine walk (walk_chunk)
            variants.append(({"from_coarse": True}, "[fine]"))
        if kp.name == "bwd_scan" and op.comp.plan.segmentable:
            variants.append(({"summary": True}, "[summary]"))
        if "DECAY_MODE" in kp.arg_names and spec in ANCHORED:  # the anchored second launch (passes.decay_dot)
            variants.append(({"decay_mode": 2}, "[anchored]"))
        for flags, tag in variants:
            # at the launcher's pipeline depth (policy.tiling.choose: 1 stage, the serial loops SERIAL_STAGES);
            # deeper ones are the tuner's candidates, which its shared-memory model prunes or which fail as such
            k = compile_sm90(op, kp, num_stages=SERIAL_STAGES if kp.role in SERIAL else 1, **flags)
            ptx, shared = k.asm["ptx"], k.metadata.shared
            results[f"{name}.{kp.name}{tag}"] = {
                "wgmma": "wgmma" in ptx, "mma": "mma.sync" in ptx or "wgmma" in ptx, "shared": shared,
                "matmuls": any(o.kind == "matmul" for o in kp.ops), "wide": wide,
                "solves": any(o.kind == "unit_lower_inv" for o in kp.ops),
                "linear_dots": len(linear_dot_operands(k.asm["ttgir"])),
                "fp_fusion": k.metadata.enable_fp_fusion}


results = {}
for spec in sys.argv[1:]:
    # ptxas for ASSEMBLED only: the checks read the PTX and the shared memory Triton counts before it
    with contextlib.nullcontext() if spec in ASSEMBLED else ptx_only():
        compile_spec(spec, results)
print("AOT " + json.dumps(results))
"""


# the anchored launch of the decay contractions compiles for one spec with per-channel decays, both kinds
# (decay_dot in the forward, decay_mm / decay_mm_t in the backward): the helpers are the same in every spec
ANCHORED = ("gla",)
# the fine walk of a coarse one (FROM_COARSE) differs from the walk by how a segment starts, the same lines in
# every spec: a segmentable walk with factored decays, general ones with and without prep, a diagonal one
FINE = ("gla", "delta_net", "mlstm", "mlstm_sig")
# every gradient partition's kernels compile for a general transition and a segmentable walk; the other specs'
# default partition only (the generator of a partition's kernels is one for all specs; hdla's every partition
# took 215 s of CI's 2 cores, its default 1/3 of that; the interpreter runs every partition of every spec)
EVERY_PARTITION = ("delta_net", "gla", "mlstm_sig")
# the specs whose kernels ptxas assembles too (the same three: a general transition, per-channel decays, a
# vector state); the others stop at PTX (codegen.triton.aot.ptx_only), which holds what the tests check, and
# ptxas was 40% of their compile time (CI's 2 cores: mesanet 16 of 38 s). scripts/ptxas_report.py assembles any.
ASSEMBLED = EVERY_PARTITION

# the softmax specs whose kernels ptxas assembles too: dense, and a select stage with its head rows
SOFTMAX_ASSEMBLED = ("softmax_attn", "infllm_v2")
SOFTMAX_SCRIPT = r"""
import contextlib, json, sys
import effc
from effc.codegen.triton.aot import SOFTMAX_KERNELS, compile_softmax_fitting, ptx_only

ASSEMBLED = %r
results = {}
for spec in sys.argv[1:]:
    op = effc.load(spec)
    op = getattr(op, "softmax", op)  # a hybrid's softmax branch
    # the head-rows walks of a choice of key blocks too (passes.softmax_plan.HEAD_ROWS_KERNELS)
    # and the prefix kernel and its backward where the plan has them (passes.softmax_plan.prefix_lowered)
    kernels = SOFTMAX_KERNELS + tuple(k.name for k in op.comp.plan.kernels if k.name.endswith("_rows")
                                      or k.role in ("prefix", "bwd_prefix"))
    with contextlib.nullcontext() if spec in ASSEMBLED else ptx_only():
        for kernel in kernels:
            # the model's tiles, with the stages the launch steps down to where they do not fit (launch_fitting)
            k = compile_softmax_fitting(op, kernel)
            ptx = k.asm["ptx"]
            results[f"{op.name}.{kernel}"] = {"mma": "mma.sync" in ptx or "wgmma" in ptx or kernel in ("bwd_pre", "prefix", "bwd_prefix"),
                                              "shared": k.metadata.shared, "stages": k.metadata.num_stages}
print("AOT " + json.dumps(results))
""" % (SOFTMAX_ASSEMBLED,)


def _compile_in_subprocesses(script: str, names: list[str], tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EFFC_CACHE_DIR"] = str(tmp_path)
    # the specs split over the CPUs, one compiling process each (ptxas for every kernel of 12+ specs is minutes)
    workers = max(1, min(len(names), os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, "-c", script, *names[i::workers]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(workers)]
    results = {}
    for p in procs:
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err[-3000:]
        results.update(json.loads(out.split("AOT ", 1)[1]))
    return results


@pytest.mark.slow  # the full tier only (README: test tiers)
@pytest.mark.parametrize("name", effc.library_names("softmax") + effc.library_names("hybrid"))
def test_softmax_family_kernels_compile_for_sm90(name, tmp_path):
    names = [name]
    results = _compile_in_subprocesses(SOFTMAX_SCRIPT, names, tmp_path)
    op = effc.load(name)
    rows = tuple(k.name for k in getattr(op, "softmax", op).comp.plan.kernels
                 if k.name.endswith("_rows") or k.role in ("prefix", "bwd_prefix"))
    assert set(results) == {f"{n}.{k}" for n in names for k in ("fwd", "bwd_pre", "bwd_dq", "bwd_dkv") + rows}
    for kernel, r in results.items():
        assert r["mma"], f"{kernel}: no tensor-core instruction in the PTX"
        assert r["shared"] <= 232448, (f"{kernel}: {r['shared']} bytes of shared memory at {r['stages']} stage(s) "
                                       "exceed the H100's")


DECODE_SCRIPT = r"""
import json, sys
import effc
from effc.codegen.triton.aot import compile_softmax_decode_sm90

results = {}
for name in sys.argv[1:]:
    op = effc.load(name)
    group = 1 if name == "forgetting_transformer" else 4  # FoX caches a gate per query head: no group
    for kernel in ("decode", "decode_combine"):
        # a padded feature dim; softmax_attn's rows: 4 new tokens x the 4 query heads of a key head
        k = compile_softmax_decode_sm90(op, kernel, n_queries=4, dims={"K": 96}, group=group)
        results[f"{name}.{kernel}"] = {"mma": "mma.sync" in k.asm["ptx"] or "wgmma" in k.asm["ptx"],
                                       "shared": k.metadata.shared}
print("AOT " + json.dumps(results))
"""


@pytest.mark.slow  # the full tier only (README: test tiers)
def test_softmax_decode_kernels_compile_for_sm90(tmp_path):
    """The decode kernels of a spec with a prefix value cached on the key side (FoX), and of softmax_attn with
    grouped rows (new tokens x the query heads of a key head): the split kernel's walk uses tensor cores like
    the forward's."""
    names = ["forgetting_transformer", "softmax_attn"]
    results = _compile_in_subprocesses(DECODE_SCRIPT, names, tmp_path)
    assert set(results) == {f"{n}.{k}" for n in names for k in ("decode", "decode_combine")}
    for n in names:
        assert results[f"{n}.decode"]["mma"], f"{n}.decode: no tensor-core instruction in the PTX"
    assert all(r["shared"] <= 232448 for r in results.values())


SELECT_DECODE_SCRIPT = r"""
import json, sys
from dataclasses import replace
import effc
from effc.codegen.triton.aot import compile_softmax_sm90
from effc.passes.softmax import choose_softmax_tiles
from effc.runtime.softmax_decode import _DECODE_SELECT_ROWS

results = {}
for name in sys.argv[1:]:
    op = effc.load(name)
    tiles = choose_softmax_tiles(op.spec, {d: 128 for d in op.spec.dims}, interpreting=False)
    rows = replace(tiles, fwd=(_DECODE_SELECT_ROWS, tiles.fwd[1], 4, tiles.fwd[3]))
    for label, t in (("train", tiles), ("decode", rows)):
        k = compile_softmax_sm90(op, "select", t, decode=label == "decode")
        results[f"{name}.select[{label}]"] = {"shared": k.metadata.shared}
print("AOT " + json.dumps(results))
"""


@pytest.mark.slow  # the full tier only (README: test tiers)
def test_select_kernels_fit_sm90_shared_memory(tmp_path):
    """The select kernel of each library spec choosing key blocks, at the model's query block and at decoding's
    16-row block with head rows: its int64 keys' layouts fit sm_90's shared memory (a 512-block chunk at 16
    rows took 561 KB and never launched: passes.softmax.select_chunk)."""
    names = [n for n in ("moba", "infllm_v2", "topp") if n in effc.library_names("softmax")]
    results = _compile_in_subprocesses(SELECT_DECODE_SCRIPT, names, tmp_path)
    assert len(results) == 2 * len(names)
    for kernel, r in results.items():
        assert r["shared"] <= 232448, f"{kernel}: {r['shared']} bytes of shared memory exceed the H100's"


# log_linear_attn's 16 level states unroll into kernels too long to compile on CI's CPUs (its forward alone took
# 196 s on 2 cores; a level axis in codegen would loop instead): compiled on the GPU, not here
AOT_LINEAR = [n for n in effc.library_names("linear") + effc.library_names("hybrid") if n != "log_linear_attn"]


@pytest.mark.slow  # the full tier only (README: test tiers)
@pytest.mark.parametrize("name", AOT_LINEAR)  # one spec a test, so pytest-xdist spreads them over the cores
def test_library_kernels_compile_for_sm90(name, tmp_path):
    names = [name]
    results = _compile_in_subprocesses(SCRIPT % ((ANCHORED, FINE, EVERY_PARTITION, ASSEMBLED),), names, tmp_path)
    ops = [getattr(effc.load(n), "linear", None) or effc.load(n) for n in names]
    refused = {op.name for op in ops if sm90_refuses_backward(op)}
    expected = {f"{op.name}.{k.name}" for op in ops for k in op.comp.plan.kernels
                if not (op.name in refused and k.backward)
                and (op.name in EVERY_PARTITION or k.role != "bwd_chunks" or k in op.comp.plan.gradient_kernels())}
    expected |= {f"{op.name}.walk[deferred]" for op in ops if op.comp.plan.deferrable}
    expected |= {f"{op.name}.walk[fine]" for op in ops if op.name in FINE}
    expected |= {f"{op.name}.bwd_scan[summary]" for op in ops if op.comp.plan.segmentable and op.name not in refused}
    expected |= {f"{op.name}.{k.name}[anchored]" for op in ops if op.name in ANCHORED
                 for k in op.comp.plan.kernels if "DECAY_MODE" in k.arg_names}
    assert set(results) == expected and any(".walk" in k for k in expected)
    for kernel, r in results.items():
        assert r["fp_fusion"], f"{kernel}: compiled without FMA contraction (codegen.FP_FUSION: Triton 3.10's default)"
        if not r["matmuls"]:  # e.g. a gradient that is the output's cotangent itself (swax's softmax branch)
            continue
        assert r["mma"], f"{kernel}: no tensor-core instruction in the PTX"
        assert r["wgmma"] or ".bwd_" in kernel or not r["wide"], f"{kernel}: no wgmma in the PTX (Hopper tensor cores unused)"
        assert r["shared"] <= 232448, f"{kernel}: {r['shared']} bytes of shared memory exceed the H100's"
        # the solve's blocks reach its dots by address (codegen/triton/solve.py.j2): a dot operand converted from
        # a linear layout is the shape of Triton 3.4-3.7.0's Hopper miscompile (policy/triton_faults.py)
        assert not (r["solves"] and r["linear_dots"]), f"{kernel}: {r['linear_dots']} dot operand(s) from a linear layout"


def test_ptxas_report_reads_registers_and_spills():
    """scripts/ptxas_report.py, the CPU-side check of a backward kernel's register pressure (README)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "ptxas_report.py")
    out = subprocess.run([sys.executable, script, "retention", "--kernels", "bwd_chunks_v", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["retention"]
    assert set(rows) == {"bwd_chunks_v", "bwd_chunks_v_loop"}  # passes.partition: per block and looped
    for r in rows.values():
        assert r["warps"] == 8 and 32 <= r["registers"] <= 255, r
        assert r["spill_stores"] >= 0 and r["spill_loads"] >= 0
    # a walk with an out kernel: as the runtime runs it with merge deferred, and with merge fused
    out = subprocess.run([sys.executable, script, "retention", "--kernels", "walk", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["retention"]
    assert set(rows) == {"walk", "walk+merge"}
    assert rows["walk"]["registers"] <= rows["walk+merge"]["registers"], rows  # merge adds the output's work
    # the softmax family: its kernels at the model's tiles
    out = subprocess.run([sys.executable, script, "softmax_attn", "--kernels", "bwd_dkv", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["softmax_attn"]
    assert set(rows) == {"bwd_dkv"} and rows["bwd_dkv"]["warps"] == 4 and 32 <= rows["bwd_dkv"]["registers"] <= 255
