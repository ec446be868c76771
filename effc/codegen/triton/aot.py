"""Compile a generated chunked-scan kernel for sm_90 without a GPU, through Triton's AOT path (used by
tests/test_aot.py and scripts/ptxas_report.py). Call it with TRITON_INTERPRET unset: the interpreter
replaces @triton.jit. Pointers to inputs, outputs, hoisted scratch, output cotangents and the gradients
one kernel writes whole are bf16, to cu_seqlens i32; the rest (states, histories, partial gradients)
fp32. Shapes: H=16, every feature dim 128, the split dim's block 64 (prep: whole 128-wide tiles)."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from .. import FP_FUSION


def compile_sm90(op, kp, *, chunk: int | None = None, num_warps: int = 4, num_stages: int = 2,
                 fuse_merge: bool = True, summary: bool = False, dims: dict | None = None,
                 block: int | None = None, decay_mode: int = 0, from_coarse: bool = False):
    """The compiled kernel (`.asm["ptx"]`, `.metadata.shared`) of kernel plan `kp` of the AttentionOp `op`.
    `decay_mode`: a kernel with factored decays runs as 0 (factored) and 2 (anchored): runtime.launch.
    `from_coarse`: the walk as a coarse walk's fine walk (FROM_COARSE, TileConfig.walk_chunk).
    `dims`: feature dim sizes (default 128 each); any size, padded tiles as at run time (the split dim in
    blocks of 64, or of its padded size when smaller)."""
    from ...policy.tiling import padded
    dims, block = _sizes(op, dims, block)
    fn = getattr(op.module, f"{op.name}_{kp.name}_kernel")
    plan = op.comp.plan
    split_size = dims[plan.split_dim] if plan.split_dim else 0
    n_split = -(-split_size // block) if plan.split_dim else 1
    whole = plan.whole_grads(n_split=n_split)  # default: the split dim 128 wide in blocks of 64
    # per-token scratch as the launcher makes it (runtime.checks.chunk_tile_row): [C, d] tiles bf16, [C] rows fp32
    bf16 = ({f"{d.name}_ptr" for d in kp.loads} | {f"{d.name}_ptr" for d in kp.stores + kp.hoisted_loads if d.feature_dims}
            | {f"{o.name}_grad_ptr" for o in op.spec.outputs} | {f"{x}_dx_ptr" for x in whole}
            # a matrix state's history and its adjoint's are kept in the operand dtype (runtime.checks.history_dtype)
            | {f"{s.name}_{h}_ptr" for s in op.spec.states if len(s.dims) >= 2 for h in ("hist", "dhist", "coarse")})
    offsets = ("cu_ptr", "chunk_off_ptr", "coarse_off_ptr", "decay_flag_ptr")
    sig = {n: ("*bf16" if n in bf16 else "*i32" if n in offsets else "*fp32"
               if n.endswith("_ptr") else "fp32" if n.startswith("p_") else "i32") for n in fn.arg_names}
    const = dict(H=16, C=chunk or op.spec.chunk, BLOCK=padded(split_size) if kp.role == "prep" else block, HAS_INIT=True,
                 STORE_FINAL=True, STORE_HISTORY=True, HAS_DFINAL=True, IS_VARLEN=False, DOT_DTYPE=tl.bfloat16,
                 PRECISION="tf32", DECAY_MODE=decay_mode, FUSE_MERGE=fuse_merge, SUMMARY=summary,
                 FROM_COARSE=from_coarse, **dims,
                 **{f"{d}_P": padded(v) for d, v in dims.items()},
                 **{f"HX_{d.name}": 16 for d in op.spec.inputs})
    return _compile(fn, sig, const, num_warps, num_stages)


def _sizes(op, dims: dict | None, block: int | None) -> tuple[dict, int]:
    """compile_sm90's feature dim sizes (128 unless given) and split block (64, or the padded split dim)."""
    from ...policy.tiling import padded
    dims = {d: 128 for d in op.spec.dims} | (dims or {})
    split = op.comp.plan.split_dim
    return dims, block or (min(64, padded(dims[split])) if split else 1)


def sm90_refuses_backward(op, dims: dict | None = None, block: int | None = None) -> str | None:
    """Why sm_90 runs none of `op`'s gradient kernels at compile_sm90's sizes (policy.triton_faults), or None."""
    from ...policy.triton_faults import sm90_backward_fault
    dims, block = _sizes(op, dims, block)
    return sm90_backward_fault(op.spec.states, dims, op.comp.plan.split_dim, block)


@contextmanager
def ptx_only():
    """Compiles inside stop at PTX: ptxas, 40% of a long gradient kernel's compile on the CPU (mesanet: 16 of
    38 s), is skipped where a check reads only the PTX and Triton's shared-memory count (set before ptxas).
    The empty binaries go to a cache of their own, removed after, so that no full compile finds them."""
    from triton import knobs

    def stop_at_ptx(*args):
        if not args:  # Triton >= 3.8 first asks the hook for a cache key of its own: (key, hash)
            return "ptx_only", "ptx_only"
        stages = args[1]  # (backend, stages, options, language, capability)
        stages["cubin"] = lambda src, metadata: b""

    saved = knobs.runtime.add_stages_inspection_hook, knobs.cache.dir
    with tempfile.TemporaryDirectory() as cache_dir:
        knobs.runtime.add_stages_inspection_hook, knobs.cache.dir = stop_at_ptx, cache_dir
        try:
            yield
        finally:
            knobs.runtime.add_stages_inspection_hook, knobs.cache.dir = saved


def linear_dot_operands(ttgir: str) -> list[str]:
    """The TTGIR lines converting a tensor from Triton's linear layout (what a split, a join or a transpose of a
    register tile makes) into a dot operand: with a dot result as the source, the shape of Triton 3.4-3.7.0's
    Hopper miscompile (policy/triton_faults.py), which the in-chunk solve avoids (codegen/triton/solve.py.j2)."""
    return [line.strip() for line in ttgir.splitlines() if "ttg.convert_layout" in line
            and "#linear" in line.split("->")[0] and "dot_op" in line.split("->")[-1]]


def _compile(fn, sig: dict, const: dict, num_warps: int, num_stages: int):
    """`fn` for sm_90: `sig` types every argument, `const` the constexprs (those `fn` does not take dropped)."""
    const = {c: v for c, v in const.items() if c in fn.arg_names}
    sig = {**sig, **{c: "constexpr" for c in const}}
    # a launch specialises pointers to 16-byte-aligned buffers (torch allocates them so): the vector widths
    # of loads and stores then match the GPU's
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if str(sig[n]).startswith("*")}
    return triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages, **FP_FUSION))


SOFTMAX_KERNELS = ("fwd", "bwd_pre", "bwd_dq", "bwd_dkv")
PREFIX_KERNELS = ("prefix", "bwd_prefix")  # per token, at policy.tiling.PREFIX_TILE
# SoftmaxTiles' field per kernel (the select stage's kernels share the forward's query block)
_TILES_OF = {"fwd": "fwd", "bwd_pre": "pre", "bwd_dq": "dq", "bwd_dkv": "dkv", "select": "fwd", "select_t": "fwd",
             "fwd_rows": "fwd", "bwd_dq_rows": "dq", "bwd_dkv_rows": "dkv"}
HEAD_ROWS_GROUP = 16  # the head-rows kernels compile for 16 query heads a key head: one token's rows a program


def compile_softmax_sm90(op, kernel: str, tiles=None, dims: dict | None = None, decode: bool = False):
    """The compiled kernel `kernel` (one of SOFTMAX_KERNELS) of the SoftmaxOp `op`, at `tiles` (default:
    the model's for the H100, every feature dim 128; `.metadata.num_warps` says how many warps). Leaves,
    outputs, their cotangents, the reductions' cotangents (_dr) and the gradients one kernel writes whole
    (heads ungrouped: stored in the input's dtype) are bf16; lse, D, saves and gradient parts fp32.
    `dims`: feature dim sizes (default 128 each), any size (padded tiles). `decode`: the DECODE variant of a
    kernel that takes it (a select stage's, over KV caches: runtime.softmax_decode). A head-rows kernel
    (`fwd_rows`, `bwd_dq_rows`, `bwd_dkv_rows`) compiles for HEAD_ROWS_GROUP query heads a key head (BM = its rows)."""
    from ...passes.softmax import choose_softmax_tiles, head_rows_tile, pivot_group, select_chunk
    from ...passes.softmax_plan import split_slot
    from ...policy.tiling import PREFIX_TILE, padded, stored_width
    dims = {d: 128 for d in op.spec.dims} | (dims or {})
    tiles = tiles or choose_softmax_tiles(op.spec, dims, interpreting=False)
    bm, bn, warps, stages = PREFIX_TILE if kernel in PREFIX_KERNELS else getattr(tiles, _TILES_OF[kernel])
    fn = getattr(op.module, f"{op.name}_{kernel}_kernel")
    bf16 = ({f"{x}_ptr" for x in op.sched.leaves} | {f"{o.name}_{s}ptr" for o in op.spec.outputs for s in ("", "grad_")}
            | {f"{x}_{tag}_ptr" for x in op.comp.backward.whole_grads() for tag in ("dpre", "dq", "dk")})
    ints = {"cu_ptr", "lens_ptr", "sel_ptr", "qlist_ptr", "qcnt_ptr", "klist_ptr", "kcnt_ptr", "ktok_ptr",
            "tmask_ptr", "tidx_ptr", "tcnt_ptr"}  # lists
    sig = {n: ("*bf16" if n in bf16 or n.endswith("_dr_ptr") else "*i32" if n in ints else "*u8" if n == "qmap_ptr"
               else "*fp32" if n.endswith("_ptr") else "fp32" if n.startswith("p_") else "i32") for n in fn.arg_names}
    const = dict(H=16, BM=bm, BN=bn, IS_VARLEN=True, DOT_DTYPE=tl.bfloat16, PRECISION="tf32", SAVE=True,
                 **dims, **{f"{d}_P": padded(v) for d, v in dims.items()},
                 **{f"{d}_S": stored_width(v, 2) for d, v in dims.items()}, **{f"HX_{x}": 16 for x in op.sched.leaves})
    if "DECODE" in fn.arg_names:
        const["DECODE"] = decode
    if kernel.endswith("_rows"):
        keyed = set(op.comp.plan.key_leaves)
        rows, warps = head_rows_tile(HEAD_ROWS_GROUP)
        const.update(G=HEAD_ROWS_GROUP, BM=rows, BQ=tiles.fwd[0],
                     **{f"HX_{x}": 16 // HEAD_ROWS_GROUP for x in op.sched.leaves if x in keyed})
    if "GQ" in fn.arg_names:  # dK/dV walks the query heads of a key head's group in turn (GROUPED_KEYS)
        from ...passes.softmax_plan import dkv_groups_heads
        gq = HEAD_ROWS_GROUP if dkv_groups_heads(op.comp.backward) else 1
        keyed = set(op.comp.plan.kernel(kernel).key_loads)
        const.update(GQ=gq, **{f"HX_{x}": 16 // gq for x in op.sched.leaves if x in keyed})
    sel = op.sched.select
    if sel is not None:  # the walks' block lists: a slot per block chosen, a power of two
        slots = sel.selection.slots or 64  # unbounded (topp / threshold, no cap): 64 key blocks
        const["KP"] = max(2, 1 << (slots - 1).bit_length())  # (runtime.select_op)
        const.update(KTOP=slots, GROUP=1, NQBP=64, NBP=64, CB=select_chunk(bm, 1 << 20, False))
        if "BQ" in fn.arg_names and not kernel.endswith("_rows"):  # dK/dV walks the lists' blocks in sub-blocks
            const["BQ"] = tiles.fwd[0]
        if "SLOT" in fn.arg_names:  # dK/dV's segment sums (passes.softmax_plan.KEY_SPLIT)
            const["SLOT"] = split_slot(op.sched, op.comp.backward, const)
    if sel is not None and sel.per_token:  # a choice of key tokens: bits per (query, key block), the search chunk
        const.update(NW=-(-sel.block // 32), SB=sel.block, PG=pivot_group(bm, sel.block, False), INDICES=True)
    return _compile(fn, sig, const, warps, stages)


H100_SHARED = 232448  # bytes of shared memory a block may use on sm_90 (H100 and H200)


def compile_softmax_fitting(op, kernel: str, dims: dict | None = None):
    """compile_softmax_sm90 at the model's tiles, with fewer pipeliner stages while the kernel needs more
    shared memory than sm_90 has: what runtime.launch.launch_fitting does at launch."""
    from dataclasses import replace

    from ...passes.softmax import choose_softmax_tiles
    tiles = choose_softmax_tiles(op.spec, {d: 128 for d in op.spec.dims} | (dims or {}), interpreting=False)
    if kernel in PREFIX_KERNELS:  # one stage already (policy.tiling.PREFIX_TILE)
        return compile_softmax_sm90(op, kernel, tiles, dims)
    field = _TILES_OF[kernel]
    while True:
        k = compile_softmax_sm90(op, kernel, tiles, dims)
        bm, bn, warps, stages = getattr(tiles, field)
        if k.metadata.shared <= H100_SHARED or stages <= 1:
            return k
        tiles = replace(tiles, **{field: (bm, bn, warps, stages - 1)})


def compile_softmax_decode_sm90(op, kernel: str, n_queries: int = 1, splits: int = 8, dims: dict | None = None,
                                group: int = 1):
    """The compiled decode kernel `kernel` ("decode" or "decode_combine") of the SoftmaxOp `op` at the tiles
    policy.decode picks for the H100: the new tokens and the caches of inputs bf16, prefix values' caches and
    the partials fp32; every feature dim 128 unless `dims` says. `group`: query heads a program serves (their
    key-side heads: 16 / group)."""
    from ...policy.decode import decode_tiles
    from ...policy.tiling import padded
    dims = {d: 128 for d in op.spec.dims} | (dims or {})
    bm, bn, warps, stages = decode_tiles(n_queries * group, max(dims.values()), interpreting=False)
    fn = getattr(op.module, f"{op.name}_{kernel}_kernel")
    inputs = {d.name for d in op.spec.inputs}
    bf16 = ({f"{x}_ptr" for x in inputs} | {f"{x}_cache_ptr" for x in inputs}
            | {f"{o.name}_ptr" for o in op.spec.outputs})
    sig = {n: ("*bf16" if n in bf16 else "*i32" if n == "lens_ptr" else "*fp32" if n.endswith("_ptr")
               else "fp32" if n.startswith("p_") else "i32") for n in fn.arg_names}
    keyed = set(op.comp.plan.kernel("decode").key_loads)
    const = dict(H=16, BM=bm, BN=bn, NSPLIT=splits, G=group, DOT_DTYPE=tl.bfloat16, PRECISION="tf32", **dims,
                 **{f"{d}_P": padded(v) for d, v in dims.items()},
                 **{f"HX_{x}": 16 // group if x in keyed else 16 for x in op.sched.leaves})
    return _compile(fn, sig, const, warps, stages)
