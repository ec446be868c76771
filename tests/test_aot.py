"""Compile every library spec's kernels for sm_90 with Triton's AOT path (no GPU needed):
catches what the interpreter does not (dot shapes, layouts, register and shared-memory limits).
Runs in a subprocess because the interpreter (set for the other tests) replaces @triton.jit."""
import json
import os
import subprocess
import sys

import effc

SCRIPT = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
import effc
results = {}
for name in sys.argv[1:]:
    op = effc.load(name)
    for kp in op.comp.plan.kernels:
        fn = getattr(op.module, f"{name}_{kp.name}_kernel")
        inputs = {f"{d.name}_ptr" for d in kp.loads + kp.stores} | {f"{o.name}_grad_ptr" for o in op.spec.outputs}
        sig = {n: ("*bf16" if n in inputs else "*i32" if n in ("cu_ptr", "chunk_off_ptr") else "*fp32"
                   if n.endswith("_ptr") else "fp32" if n.startswith("p_") else "i32") for n in fn.arg_names}
        const = dict(H=16, C=op.spec.chunk, BLOCK=64, HAS_INIT=True, STORE_FINAL=True, STORE_HISTORY=True,
                     HAS_DFINAL=True, IS_VARLEN=False, DOT_DTYPE=tl.bfloat16, PRECISION="tf32",
                     **{d: 128 for d in op.spec.dims}, **{f"HX_{d.name}": 16 for d in op.spec.inputs})
        const = {c: v for c, v in const.items() if c in fn.arg_names}
        sig.update({c: "constexpr" for c in const})
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        ptx = k.asm["ptx"]
        results[f"{name}.{kp.name}"] = {"wgmma": "wgmma" in ptx, "mma": "mma.sync" in ptx or "wgmma" in ptx,
                                        "shared": k.metadata.shared}
print("AOT " + json.dumps(results))
"""


def test_library_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EFFC_CACHE_DIR"] = str(tmp_path)
    names = effc.library_names("linear")
    # the specs split over the CPUs, one compiling process each (ptxas for every kernel of 12+ specs is minutes)
    workers = max(1, min(len(names), os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, *names[i::workers]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(workers)]
    results = {}
    for p in procs:
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err[-3000:]
        results.update(json.loads(out.split("AOT ", 1)[1]))
    expected = {f"{n}.{k.name}" for n in names for k in effc.load(n).comp.plan.kernels}
    assert set(results) == expected and any(".bwd_chunks_" in k for k in expected)
    for kernel, r in results.items():
        assert r["mma"], f"{kernel}: no tensor-core instruction in the PTX"
        assert r["wgmma"] or ".bwd_" in kernel, f"{kernel}: no wgmma in the PTX (Hopper tensor cores unused)"
        assert r["shared"] <= 232448, f"{kernel}: {r['shared']} bytes of shared memory exceed the H100's"
