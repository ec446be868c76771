"""Compile a generated chunked-scan kernel for sm_90 without a GPU, through Triton's AOT path (used by
tests/test_aot.py and scripts/ptxas_report.py). Call it with TRITON_INTERPRET unset: the interpreter
replaces @triton.jit. Pointers to inputs, outputs, hoisted scratch and output cotangents are bf16, to
cu_seqlens i32; the rest (states, histories, gradients) fp32. Shapes: H=16, every feature dim 128,
the split dim's block 64 (prep: whole 128-wide tiles)."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


def compile_sm90(op, kp, *, chunk: int | None = None, num_warps: int = 4, num_stages: int = 2,
                 fuse_merge: bool = True):
    """The compiled kernel (`.asm["ptx"]`, `.metadata.shared`) of kernel plan `kp` of the AttentionOp `op`."""
    fn = getattr(op.module, f"{op.name}_{kp.name}_kernel")
    bf16 = ({f"{d.name}_ptr" for d in kp.loads + kp.stores + kp.hoisted_loads}
            | {f"{o.name}_grad_ptr" for o in op.spec.outputs})
    sig = {n: ("*bf16" if n in bf16 else "*i32" if n in ("cu_ptr", "chunk_off_ptr") else "*fp32"
               if n.endswith("_ptr") else "fp32" if n.startswith("p_") else "i32") for n in fn.arg_names}
    const = dict(H=16, C=chunk or op.spec.chunk, BLOCK=128 if kp.name == "prep" else 64, HAS_INIT=True,
                 STORE_FINAL=True, STORE_HISTORY=True, HAS_DFINAL=True, IS_VARLEN=False, DOT_DTYPE=tl.bfloat16,
                 PRECISION="tf32", FUSE_MERGE=fuse_merge, **{d: 128 for d in op.spec.dims},
                 **{f"HX_{d.name}": 16 for d in op.spec.inputs})
    const = {c: v for c, v in const.items() if c in fn.arg_names}
    sig.update({c: "constexpr" for c in const})
    return triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
