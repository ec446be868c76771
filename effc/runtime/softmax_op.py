"""The user-facing op of the softmax family: `op(q, k, v, *more, cu_seqlens=None, **params)` -> `(o, None)`
(a tuple of outputs when the spec declares several, e.g. (o, lse)); inputs (B, T, H, D), keys and values
may have fewer heads (grouped-query attention). Differentiable through the generated backward kernels.

A call: prefix values (PyTorch, over whole sequences, differentiated by autograd) -> forward kernel
-> (backward) preprocess, dQ and dK/dV kernels; the kernels run behind the torch.library custom ops every
family shares (torch_op.register, softmax_torch_op), so calls trace under torch.compile(fullgraph=True).
`cu_seqlens` packs sequences as (1, total_T, H, D); attention never crosses a sequence boundary
(document masking), and positions restart per sequence."""
from __future__ import annotations

import math

import torch

from ..codegen import FP_FUSION
from ..compiler import Compilation
from ..errors import ArgumentError
from ..ir.nodes import Spec, dim
from ..passes.softmax import (SoftmaxTiles, choose_softmax_tiles, copies_heads, head_rows_tile, key_group,
                              key_split, visible_blocks)
from ..passes.softmax_plan import dkv_groups_heads, split_slot
from ..policy.tiling import PREFIX_TILE, Problem, padded, stored_width
from ..policy.triton_faults import warn_untested_triton
from ..policy.tuning import Tuned
from . import softmax_decode, softmax_oracle
from .cache import op_module
from .checks import (
    check_inputs,
    check_knobs,
    decode_inputs,
    describe,
    interpreting,
    kernel_cu_seqlens,
    on_meta,
    operand_dtype,
    param_values,
    rebuild,
)
from .branched_op import BranchedOp
from .launch import launch_fitting
from .select_op import kernel_choice, selection_buffers
from .select_oracle import head_group
from .softmax_oracle import evaluate_softmax
from .softmax_torch_op import encode_call, prefix_params, prefix_stage, softmax_torch_ops
from .torch_op import call_lengths, host_plan, live

def check_queries(queries, T: int) -> tuple[int, int]:
    """The `queries=(lo, hi)` knob as ints with 0 <= lo <= hi <= T; None: (0, T)."""
    if queries is None:
        return 0, T
    ok = (isinstance(queries, (tuple, list)) and len(queries) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in queries))
    if not ok or not 0 <= queries[0] <= queries[1] <= T:
        raise ArgumentError(f"queries must be a pair of ints (lo, hi) with 0 <= lo <= hi <= T = {T} (the rows "
                            f"computed), got {queries!r}")
    return int(queries[0]), int(queries[1])


def _grad_dtype(x: str, t: torch.Tensor, whole) -> torch.dtype:
    """The dtype of a gradient buffer for leaf `x` (the tensor `t`): a gradient one kernel writes is stored in
    the input's dtype, final for its input's heads (no fp32 buffer, no conversion pass) or per-query-head copies
    summed after, as FlashAttention-2 keeps them; sums of several kernels' parts (`x` not in `whole`) are fp32."""
    return t.dtype if x in whole else torch.float32


def _query_blocks(longest: int, queries: tuple[int, int], bm: int) -> int:
    """Programs of a kernel with one per query block: the computed rows of the longest sequence, in blocks
    (at least 1: a program with no rows returns at once)."""
    return max(1, math.ceil(min(longest, queries[1] - queries[0]) / bm))


_DOT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages") + tuple(FP_FUSION)
# visible_pairs: every query row counted up to this many, evenly spaced rows beyond; this many mask
# elements evaluated at a time
EXACT_PAIR_ROWS = 4096
PAIR_CHUNK_ELEMENTS = 1 << 22


def make_op(comp, backend: str = "triton"):
    """The op for a compilation: SoftmaxOp for the softmax family, HybridOp for a spec with a state and a
    score stage, BranchedOp for a spec with branches, AttentionOp otherwise."""
    warn_untested_triton()  # every backend launches Triton kernels (TileLang's ops their backward)
    family = comp.ir.family
    if family == "branched":
        backend = "triton" if backend == "auto" else backend
        return BranchedOp(comp, [SoftmaxOp(p, backend) for p in comp.parts], backend)
    if family != "linear":
        backend = "triton" if backend == "auto" else backend  # the softmax family has one backend
        return HybridOp(comp, backend) if family == "hybrid" else SoftmaxOp(comp, backend)
    from .op import AttentionOp, AutoBackendOp
    return AutoBackendOp(comp) if backend == "auto" else AttentionOp(comp, backend)


class SoftmaxOp(Tuned):
    def __init__(self, comp: Compilation, backend: str = "triton"):
        self.comp, self.backend = comp, backend
        self.spec: Spec = comp.typed
        self.sched = comp.legality
        self.name = self.spec.name
        self._modules: dict = {}  # per Triton mode (runtime.cache.op_module)
        self.last_config: SoftmaxTiles | None = None
        self._configs: dict[tuple, SoftmaxTiles] = {}  # per call shape (Tuned.config)
        self._defaults: dict[tuple, dict[str, float]] = {}
        live(self)
        self._torch_ops = softmax_torch_ops(self)
        self._kernel_names = {k.name for k in comp.plan.kernels}
        kernel = PrefixKernel(self) if "prefix" in self._kernel_names else None
        self._prefix = prefix_stage(self.spec, kernel, self.sched.operand_prefix)

    def __repr__(self) -> str:
        return f"<effc softmax op {self.name}({', '.join(d.name for d in self.spec.inputs)}) backend={self.backend}>"

    @property
    def module(self):
        module, self.source_path = op_module(self._modules, self.name, lambda: self.comp.source(self.backend))
        return module

    def param_values(self, dims: dict[str, int], given: dict) -> dict[str, float]:
        return param_values(self.spec, self._defaults, dims, given)

    def _check(self, tensors, params, for_kernels, initial_state=None, output_final_state=False):
        if initial_state is not None or output_final_state:
            raise ArgumentError(f"{self.name} is a softmax spec: it carries no state (initial_state / "
                                "output_final_state are for specs with a state)")
        B, T, H, dims = check_inputs(self.spec, tensors, for_kernels)
        if tensors[0].shape[2] != H:
            raise ArgumentError(f"argument '{self.spec.inputs[0].name}' sets the heads of the output; the other "
                                f"inputs may have fewer (grouped-query attention)")
        return B, T, H, dims, self.param_values(dims, params)

    def tiles(self, problem: Problem, tuned: dict | None = None, **given) -> SoftmaxTiles:
        """The kernels' tiles for `problem`: the forward's from the tuned knobs (None: the model's), the
        backward's from the model; explicit arguments win for every kernel. A choice of key blocks: its
        partition's model reads the call's `group` and `visible` key blocks (given by `_plan_call`)."""
        return choose_softmax_tiles(self.spec, dict(problem.dims), interpreting(), tuned=tuned, **given)

    # -- the kernels ------------------------------------------------------------------------------------
    def __call__(self, *tensors, cu_seqlens=None, chunk: int | None = None, block: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, segments: int | None = None,
                 defer_merge: bool | None = None, initial_state=None, output_final_state: bool = False,
                 queries: tuple[int, int] | None = None, partition: str | None = None, **params):
        """`chunk` (query block) and `block` (key block), `num_warps` and `num_stages` pin every kernel's
        tiles; otherwise the forward's come from `effc tune`'s entry for the call shape, or the model.
        `segments` and `defer_merge` are accepted for the linear family's knobs, and must be 1 and false.
        `queries=(lo, hi)`: compute the outputs of the query rows lo <= t < hi only (tokens of the packed
        stream with cu_seqlens), each against every key its masks keep; the other rows of the outputs are
        zero and pass no gradient, and the query-side inputs' rows there are not read. Every input keeps the
        full length T, at the same positions: the queries of a later piece of a sequence against all of it
        (context parallel, docs/context-parallel.md). None: every row. `partition` (a select stage with row
        partitions, SoftmaxPlan.partitions): 'heads' runs the walks with rows (query token, query head of a key
        head's group), 'tokens' with a block of one head's query tokens (SoftmaxTiles.head_rows); None:
        `effc tune`'s entry, else the model's for the call (passes.softmax.default_partition)."""
        self._check_keyseq_call(cu_seqlens)
        longest = call_lengths(cu_seqlens, tensors[0])
        n_seq = None if cu_seqlens is None else cu_seqlens.shape[0] - 1
        grad = torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in tensors)
        knobs = (("chunk", chunk), ("block", block), ("segments", segments), ("num_warps", num_warps),
                 ("num_stages", num_stages), ("defer_merge", defer_merge),
                 ("partition", partition))
        ints, pvals = host_plan(id(self), tuple(describe(t) for t in tensors), initial_state is not None,
                                output_final_state, n_seq, longest, grad, knobs, tuple(sorted(params.items())),
                                None if queries is None else tuple(queries))
        named = {d.name: x for d, x in zip(self.spec.inputs, tensors)}
        pre = self._prefix(named, dict(zip((p.name for p in self.spec.params), pvals)), tensors[0].shape[2],
                           cu_seqlens)
        narrow = operand_dtype(tensors[0].dtype)  # prefix values read only as matmul operands (sched.operand_prefix)
        leaves = [named[x] if x in named else pre[x].to(narrow) if x in self.sched.operand_prefix else pre[x]
                  for x in self.sched.leaves]
        outs = self._torch_ops.call(leaves, [], cu_seqlens, list(ints), list(pvals))[:len(self.spec.outputs)]
        return (outs[0] if len(outs) == 1 else tuple(outs)), None

    def _check_keyseq_call(self, cu_seqlens, what: str = "cu_seqlens") -> None:
        """A key sequence of its own (spec.keyseq) runs on padded batches only: packed sequences would need the
        key sequence's own offsets (flash-attn's cu_seqlens_k), which are not implemented."""
        ks = self.spec.keyseq
        if ks is not None and cu_seqlens is not None:
            raise NotImplementedError(f"{self.name}: {what} with keys over a key sequence of their own ({ks.dim}): "
                                      f"packed key sequences (a cu_seqlens_k for {ks.dim}) are not implemented; "
                                      f"call with padded batches, (B, T, H, D) queries and (B, {ks.dim}, H, D) keys")

    def _keyseq_len(self, leaves) -> int:
        """The key sequence's length TK: of the key inputs over it (0 when the keys are the query's tokens:
        the kernels then take none)."""
        ks = self.spec.keyseq
        if ks is None:
            return 0
        return next(t.shape[1] for d, t in zip(self.spec.inputs, leaves) if d.seq == ks.dim)

    def _plan_call(self, descs, has_init, output_final_state, n_seq, longest, grad, knobs, params, queries=None):
        """Checks and tiles of one call, from its argument descriptions: under torch.compile this runs once
        per shape, as a constant, outside the traced graph. Returns the custom ops' ints and params."""
        knobs = dict(knobs)
        self.comp.plan.check_partition(knobs["partition"])
        check_knobs(output_final_state=output_final_state, **{k: v for k, v in knobs.items() if k != "partition"})
        if knobs["segments"] not in (None, 1):
            raise ArgumentError(f"segments={knobs['segments']}: {self.name} is a softmax spec, its forward walks "
                                "the key blocks in one program per query block (segments=1)")
        if knobs.pop("defer_merge"):
            raise ArgumentError(f"defer_merge=True: {self.name} is a softmax spec, its merge is the walk's epilogue "
                                "(no state history to defer it to)")
        tensors = [rebuild(d) for d in descs]
        B, T, H, dims, pvals = self._check(tensors, dict(params), True, True if has_init else None,
                                           output_final_state)
        first = tensors[0]
        if self.comp.plan.partitions:  # the row partition's model: the head group (a shared choice), the length
            shared = self.spec.selection.shared
            knobs["group"] = head_group(self.spec, {d.name: t for d, t in zip(self.spec.inputs, tensors)}, H) \
                if shared else 1
            knobs["visible"] = visible_blocks(self.sched, longest or T, pvals)
        cfg = self.config(B if n_seq is None else n_seq, longest or T, H, dims, first.device, dtype=first.dtype,
                          **knobs)
        self.last_config = cfg
        return (encode_call(self.spec, cfg, grad, dims, check_queries(queries, T)),
                tuple(pvals[p.name] for p in self.spec.params))

    def _layout(self, leaves, n_seq, cu):
        first = leaves[0]
        B, T, H = first.shape[:3]
        longest = T if cu is None else int((cu[1:] - cu[:-1]).max())
        return B, T, H, longest, {x: t.shape[2] for x, t in zip(self.sched.leaves, leaves)}

    def stored_leaves(self, leaves, dims, dtype) -> dict:
        """The kernels' leaf arguments: each contiguous, its feature rows zero-padded to their stored width
        (policy.tiling.stored_width: the kernels read rows {d}_S wide)."""
        return {f"{x}_ptr": _stored_rows(t, self.sched.types[x].shape[1:], dims, dtype)
                for x, t in zip(self.sched.leaves, leaves)}

    def _meta(self, cfg_k, H, heads, dims, cu, dtype, save=False) -> dict:
        import triton.language as tl
        interp = interpreting()
        meta = dict(H=H, **{f"HX_{x}": h for x, h in heads.items()}, **dims,
                    **{f"{d}_P": padded(v) for d, v in dims.items()},
                    **{f"{d}_S": stored_width(v, dtype.itemsize) for d, v in dims.items()}, BM=cfg_k[0], BN=cfg_k[1],
                    IS_VARLEN=cu is not None, DOT_DTYPE=getattr(tl, "float32" if interp else _DOT_DTYPES[dtype]),
                    PRECISION="ieee" if (interp or dtype == torch.float32) else "tf32", SAVE=save, DECODE=False)
        if not interp:
            meta.update(num_warps=cfg_k[2], num_stages=cfg_k[3], **FP_FUSION)
        return meta

    def _launch(self, kernel: str, cfg_k, grid0: int, n_bh: int, named: dict, meta: dict):
        # the kernel's arguments are its plan's (passes.softmax_plan), by name: the generated signature is
        # printed from the same list; `named` and `meta` may hold values other kernels take
        if on_meta(named):
            return
        kp = self.comp.plan.kernel(kernel)
        fn = getattr(self.module, f"{self.name}_{kernel}_kernel")
        options = {k: v for k, v in meta.items() if k in _LAUNCH_OPTIONS}
        launch_fitting(fn, (grid0, n_bh), kp.call({**named, **meta}), options)

    def _launch_rows(self, kernel: str, cfg_k, longest: int, queries, n_seq: int, H: int, named: dict, meta: dict):
        """The head-rows variant of a walk (SoftmaxTiles.head_rows): a program per (BM / G query tokens, or a key
        block for dK/dV, G query heads sharing their key heads), its BM rows at least a tl.dot's 16."""
        G = named["GROUP"] if "GROUP" in named else 1
        bm, warps = head_rows_tile(G)
        meta = {**meta, "BM": bm, "G": G} | ({"num_warps": warps} if "num_warps" in meta else {})
        if kernel == "bwd_dkv":  # a program per key block, and the segments of long lists
            self._launch_split(f"{kernel}_rows", cfg_k, n_seq * H // G, named, meta)
            return
        self._launch(f"{kernel}_rows", cfg_k, _query_blocks(longest, queries, bm // G), n_seq * H // G, named, meta)

    def _launch_split(self, kernel: str, cfg_k, n_bh: int, named: dict, meta: dict):
        """dK/dV over the select stage's transposed lists (passes.softmax_plan.KEY_SPLIT): the key blocks' programs
        and the segments of long lists, then the sums of the split lists' segments (PHASE 1)."""
        extra, least = key_split(named["NKB"], n_bh, interpreting())
        slot = split_slot(self.sched, self.comp.backward, meta)
        device = named["kcnt_ptr"].device
        # a list splits when its units pass L >= 2 * (all units) / EXTRA: never with two extra programs or fewer
        splits = extra > 2
        named = {**named, "EXTRA": extra, "SPLIT": least,
                 "ksplit_ptr": torch.empty((n_bh, extra, slot) if splits else (1,), dtype=torch.float32,
                                           device=device)}
        meta = {**meta, "SLOT": slot}
        self._launch(kernel, cfg_k, named["NKB"] + (extra if splits else 0), n_bh, {**named, "PHASE": 0}, meta)
        if splits:
            self._launch(kernel, cfg_k, named["NKB"], n_bh, {**named, "PHASE": 1}, meta)

    def _forward(self, cfg: SoftmaxTiles, pvals, cu, n_seq, dims, leaves, save: bool, queries=None):
        spec, sched = self.spec, self.sched
        B, T, H, longest, heads = self._layout(leaves, n_seq, cu)
        first = leaves[0]
        dtype, device = first.dtype, first.device
        f32 = dict(dtype=torch.float32, device=device)
        named = self.stored_leaves(leaves, dims, dtype)
        queries = queries or (0, T)
        part = tuple(queries) != (0, T)  # rows the kernel does not write are zeros
        alloc = torch.zeros if part else torch.empty
        outs = {o.name: alloc((B, T, H) + tuple(dims[n] for n in o.feature_dims), dtype=dtype, device=device)
                for o in spec.outputs}
        named.update({f"{o}_ptr": t for o, t in outs.items()})
        # a distinct dummy each when nothing is saved: custom-op outputs must not alias
        shapes = self.saved_shapes(B, T, H, dims)
        saved = {k: torch.empty(shape if save else (1,), dtype=self.saved_dtype(k, dtype), device=device)
                 for k, shape in shapes.items()}
        dummy = torch.empty(1, **f32)
        named.update({f"{k}_ptr": v for k, v in saved.items()})
        named.update({f"p_{k}": v for k, v in pvals.items()})
        named.update(T=T, Q_LO=queries[0], Q_HI=queries[1], TK=self._keyseq_len(leaves),
                     cu_ptr=kernel_cu_seqlens(cu, device) if cu is not None else dummy)
        c = cfg.fwd
        if sched.select is not None:  # the blocks each query walks (passes.select)
            named.update(selection_buffers(self, cfg, named, self._meta(c, H, heads, dims, cu, dtype), n_seq,
                                           longest, H, leaves, transpose=False))
        if cfg.head_rows:
            self._launch_rows("fwd", c, longest, queries, n_seq, H, named, self._meta(c, H, heads, dims, cu, dtype, save))
        else:
            self._launch("fwd", c, _query_blocks(longest, queries, c[0]), n_seq * H, named,
                         self._meta(c, H, heads, dims, cu, dtype, save))
        return [outs[o.name] for o in spec.outputs], saved

    @staticmethod
    def saved_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
        """A saved log-sum-exp is fp32; a saved reduction (`softmax(s) @ v` under merge's ops) is kept in the
        operand dtype, as FlashAttention keeps O: in fp32 it was two thirds of sink_window's forward memory
        (docs/benchmarks.md), and the backward reads it only for rowsum(dO * O)-like terms."""
        return torch.float32 if name.startswith("lse") else operand_dtype(dtype)

    def saved_shapes(self, B: int, T: int, H: int, dims: dict) -> dict[str, tuple]:
        """What the forward saves for the backward (`saved_dtype`): each group's log-sum-exp and each reduction
        that is not an output."""
        sched, shapes = self.sched, {}
        out_names = {o.name for o in self.spec.outputs}
        for gi, g in enumerate(sched.groups):
            shapes[f"lse{gi}"] = (B, T, H)
            for r in g.reductions:
                if r.out not in out_names:
                    shapes[f"{r.out}_save"] = (B, T, H) + tuple(int(dims[str(d)]) for d in sched.types[r.out].shape[1:])
        return shapes

    def _backward(self, cfg: SoftmaxTiles, pvals, cu, n_seq, dims, leaves, outs, saved, d_outs, queries=None):
        spec, sched, bwd = self.spec, self.sched, self.comp.backward
        B, T, H, longest, heads = self._layout(leaves, n_seq, cu)
        first = leaves[0]
        dtype, device = first.dtype, first.device
        f32 = dict(dtype=torch.float32, device=device)
        named = self.stored_leaves(leaves, dims, dtype)
        named.update({f"{o.name}_ptr": t for o, t in zip(spec.outputs, outs)})
        named.update({f"{o.name}_grad_ptr": (g if g is not None else torch.zeros_like(t)).contiguous()
                      for o, t, g in zip(spec.outputs, outs, d_outs)})
        named.update({f"{k}_ptr": v for k, v in saved.items()})
        named.update({f"p_{k}": v for k, v in pvals.items()})
        queries = queries or (0, T)
        alloc = torch.zeros if tuple(queries) != (0, T) else torch.empty  # rows outside: no gradient
        TK = self._keyseq_len(leaves)
        named.update(T=T, Q_LO=queries[0], Q_HI=queries[1], TK=TK,
                     cu_ptr=kernel_cu_seqlens(cu, device) if cu is not None else torch.empty(1, **f32))
        feats = {x: tuple(int(dims[str(d)]) for d in sched.types[x].shape[1:]) for x in sched.leaves}
        dr_dtype = operand_dtype(dtype)  # the reductions' cotangents are matmul operands of both walks
        for gi, g in enumerate(sched.groups):
            named[f"D{gi}_ptr"] = torch.empty((B, T, H), **f32)
            for r in g.reductions:
                # rows stored wide (the walks read them so); the columns past the real ones stay zero
                rf = tuple(stored_width(dims[str(d)], dtype.itemsize) for d in sched.types[r.out].shape[1:])
                if r.out in bwd.seeded_reductions():  # a copy only for another dtype or width
                    g = named[f"{r.out}_grad_ptr"].to(dr_dtype)
                    extra = rf[-1] - g.shape[-1] if rf else 0
                    named[f"{r.out}_dr_ptr"] = torch.nn.functional.pad(g, (0, extra)) if extra else g
                else:
                    wide = rf and rf[-1] != dims[str(sched.types[r.out].shape[-1])]
                    named[f"{r.out}_dr_ptr"] = (torch.zeros if wide else torch.empty)(
                        (B, T, H) + rf, dtype=dr_dtype, device=device)
        if sched.select is not None:  # the forward's choice again (deterministic), and its transposed lists
            named.update(selection_buffers(self, cfg, named, self._meta(cfg.fwd, H, heads, dims, cu, dtype), n_seq,
                                           longest, H, leaves, transpose=True))
        parts: dict[str, list[torch.Tensor]] = {x: [] for x in sched.leaves}
        kernels = ((bwd.pre, "dpre"), (bwd.dq, "dq"), (bwd.dkv, "dk"))
        rows_dkv = cfg.head_rows and "bwd_dkv_rows" in self._kernel_names
        # dK/dV per key head (passes.softmax_plan.GROUPED_KEYS; head rows sum their G query heads on chip)
        gq = (named.get("GROUP", 1) if rows_dkv
              else self._key_group(leaves, H, math.ceil((TK or longest) / cfg.dkv[1]) * n_seq))
        whole = bwd.whole_grads()
        for kernel, tag in kernels:
            for x, _ in kernel.leaf_grads:
                t = leaves[sched.leaves.index(x)]
                n_heads = H // gq if tag == "dk" else H
                # a key sequence of its own has its own length (t.shape[1]); the others are over T
                buf = alloc((B, t.shape[1], n_heads) + feats[x], dtype=_grad_dtype(x, t, whole), device=device)
                named[f"{x}_{tag}_ptr"] = buf
                parts[x].append(buf)
        for kernel, c, grid0 in (("bwd_pre", cfg.pre, _query_blocks(longest, queries, cfg.pre[0])),
                                 ("bwd_dq", cfg.dq, _query_blocks(longest, queries, cfg.dq[0])),
                                 ("bwd_dkv", cfg.dkv, math.ceil((TK or longest) / cfg.dkv[1]))):
            # a choice of key tokens keeps the token rows' dK/dV (passes.softmax_plan.plan_partitions)
            if kernel != "bwd_pre" and cfg.head_rows and f"{kernel}_rows" in self._kernel_names:
                self._launch_rows(kernel, c, longest, queries, n_seq, H, named,
                                  {**self._meta(c, H, heads, dims, cu, dtype), "BQ": cfg.fwd[0]})
                continue
            meta = self._meta(c, H, heads, dims, cu, dtype)
            if kernel == "bwd_dkv" and sched.select is not None:  # BQ: the lists' query block, walked BM rows a step
                self._launch_split(kernel, c, n_seq * H // gq, named, {**meta, "BQ": cfg.fwd[0], "GQ": gq})
                continue
            if kernel == "bwd_dkv":
                self._launch(kernel, c, grid0, n_seq * H // gq, named, {**meta, "GQ": gq})
                continue
            self._launch(kernel, c, grid0, n_seq * H, named, meta)
        grads = []
        for x, t in zip(sched.leaves, leaves):
            # a grouped input's gradient: each part summed over the heads sharing it (none for dK/dV's per key head)
            hx = t.shape[2]
            per_head = [g if g.shape[2] == hx else g.reshape(g.shape[:2] + (hx, -1) + g.shape[3:]).sum(3)
                        for g in parts[x]]
            grads.append(sum(per_head[1:], per_head[0]).to(t.dtype) if per_head else None)
        return grads

    def _key_group(self, leaves, H: int, key_blocks: int) -> int:
        """GQ of the dK/dV kernel (passes.softmax_plan.GROUPED_KEYS) over `key_blocks` (of every sequence):
        query heads that share the heads of every leaf it loads per key block and of every gradient it writes
        (one head count), as many as passes.softmax.key_group keeps enough programs for, and enough that the
        per-query-head copies fit the query's size (passes.softmax.copies_heads); else 1."""
        sched, bwd = self.sched, self.comp.backward
        heads = {leaves[sched.leaves.index(x)].shape[2] for x, _ in bwd.dkv.leaf_grads}
        if len(heads) != 1 or not dkv_groups_heads(bwd):
            return 1
        group = H // heads.pop()
        for x in self.comp.plan.kernel("bwd_dkv").key_loads:
            group = math.gcd(group, H // leaves[sched.leaves.index(x)].shape[2])
        whole = bwd.whole_grads()
        copies = 0
        for x, _ in bwd.dkv.leaf_grads:
            t = leaves[sched.leaves.index(x)]
            copies += t.numel() * (H // t.shape[2]) * _grad_dtype(x, t, whole).itemsize
        budget = max(t.numel() * t.element_size() for t in leaves if t.shape[2] == H)
        return key_group(group, key_blocks, H, interpreting(), copies_heads(copies, budget))

    # -- the oracle -----------------------------------------------------------------------------------
    def reference(self, *tensors, cu_seqlens=None, dtype=torch.float64, matmul_dtype=None, initial_state=None,
                  output_final_state: bool = False, chunk=None, last_query: bool = False, queries=None, **params):
        """The spec evaluated with PyTorch ops on whole [T, T] score matrices (differentiable; float64
        inputs are accepted, for gradient checks). `last_query`: the last token's outputs only, (B, 1, H, D).
        `queries=(lo, hi)`: as for the call, the other rows zero."""
        self._check_keyseq_call(cu_seqlens)
        B, T, H, dims, pvals = self._check(tensors, params, False, initial_state, output_final_state)
        outs = evaluate_softmax(self.spec, {d.name: x for d, x in zip(self.spec.inputs, tensors)}, pvals, dims,
                                dtype, matmul_dtype, cu_seqlens, last_query=last_query)
        o = [outs[o.name] for o in self.spec.outputs]
        if queries is not None:
            lo, hi = check_queries(queries, T)
            rows = torch.zeros(T, dtype=torch.bool, device=tensors[0].device)
            rows[lo:hi] = True
            o = [x * rows.reshape((1, T) + (1,) * (x.dim() - 2)).to(x.dtype) for x in o]
        return (o[0] if len(o) == 1 else tuple(o)), None

    def select_blocks(self, *tensors, cu_seqlens=None, chunk: int | None = None, **params) -> torch.Tensor:
        """A spec with a select stage: the key blocks its generated kernel chooses per query token,
        (B, T, H, nb) bool (packed sequences: (1, total_T, H, nb), blocks counted per sequence); a choice of
        key tokens: the keys, (B, T, H, nb * block)."""
        return kernel_choice(self, tensors, cu_seqlens, chunk, **params)

    # -- decoding -------------------------------------------------------------------------------------
    def step(self, *tokens, context=None, **params):
        """One decoding step: `tokens` are (B, H, D) (or (B, H)), `context` every input's earlier tokens
        ((B, t, H, D) tensors as op(...) takes them, e.g. a prompt; None: none). Returns (o_t, context with
        the token appended). The token's query runs in the decode kernels against a cache built from the
        context (the prefix stage recomputed over it): O(t) a step; `decode` keeps a cache across steps.
        CPU tensors without the interpreter run the oracle in PyTorch (fp32): no kernel runs there."""
        self._no_keyseq_decoding()
        softmax_decode.cache_names(self)  # what cannot be decoded raises here, naming it
        xs = decode_inputs(self.spec, tokens, context)
        if tokens[0].device.type == "cpu" and not interpreting():
            o, _ = self.reference(*xs, dtype=torch.float32, last_query=True, **params)
            o = [x[:, 0].to(tokens[0].dtype) for x in (o if isinstance(o, tuple) else (o,))]
            return (o[0] if len(o) == 1 else tuple(o)), tuple(xs)
        B, t = xs[0].shape[0], xs[0].shape[1] - 1
        new = [x[:, t:] for x in xs]
        cache = self.new_cache(*new, max_len=t + 1)
        if t:
            named = {d.name: x[:, :t] for d, x in zip(self.spec.inputs, xs)}
            dims = check_inputs(self.spec, tuple(named.values()), for_kernels=False)[3]
            pre = self._prefix(named, self.param_values(dims, params), xs[0].shape[2], None)
            for x, c in cache.items():
                c[:, :t] = (named[x] if x in named else pre[x]).to(c.dtype)
        o = self.decode(*new, cache=cache, cache_seqlens=torch.full((B,), t, dtype=torch.int32,
                                                                     device=xs[0].device), **params)
        o = [x[:, 0] for x in (o if isinstance(o, tuple) else (o,))]
        return (o[0] if len(o) == 1 else tuple(o)), tuple(xs)

    def _no_keyseq_decoding(self) -> None:
        if self.spec.keyseq is not None:
            raise NotImplementedError(f"{self.name}.step: one token per input, but keys over a key sequence of "
                                      f"their own ({self.spec.keyseq.dim}) are not tokens; decode(...) takes "
                                      "them whole with the new tokens")

    @property
    def cache_names(self) -> tuple[str, ...]:
        """The tensors a KV cache for `decode` holds, in order: key inputs and prefix values read on the key
        side (e.g. k, v and FoX's F)."""
        return softmax_decode.cache_names(self)

    def new_cache(self, *tokens, max_len: int) -> dict[str, torch.Tensor]:
        """Zero caches {name: (B, max_len, Hx, ...)} for requests shaped like `tokens` (every input, (B, Tq,
        H, D) as `decode` takes them): inputs' caches in their dtype, prefix values' fp32."""
        return softmax_decode.new_cache(self, *tokens, max_len=max_len)

    def decode(self, *tokens, cache, cache_seqlens, splits: int | None = None, **params):
        """Decoding against a KV cache, as flash-attn's flash_attn_with_kvcache: `tokens` are every input's
        new tokens, (B, Tq, H, D) with 1 <= Tq <= 64, following the `cache_seqlens[b]` (int32, (B,)) tokens
        request b has in `cache` (a dict by `cache_names`, or a sequence in that order; `new_cache` makes
        it). Writes the new tokens' key-side values into the cache at [len, len + Tq) (the caller advances
        cache_seqlens), and returns the new tokens' outputs (B, Tq, H, ...) (a tuple when the spec has
        several): each query against every cached key its masks keep, at its position in the sequence.
        Generated kernels: split-KV partials and their log-sum-exp combine; `splits` pins the number of
        splits of each request's keys (None: policy.decode's occupancy rule). Inputs over a key sequence of
        their own (spec.keyseq: NSA's compressed keys) are passed whole, (B, S, H, D), not cached: the
        forward's kernels run per request then, as with a select stage (`op.last_decode` says which)."""
        return softmax_decode.decode(self, tokens, cache, cache_seqlens, splits, **params)

    def recurrent_reference(self, *tensors, **kw):
        """The softmax family has no recurrent form with a fixed state: the same as `reference`."""
        return self.reference(*tensors, **kw)

    # -- accounting ------------------------------------------------------------------------------------
    def visible_pairs(self, T: int, **params) -> int:
        """(query, key) pairs the masks keep in one sequence of T tokens, counted on the masks themselves
        (every pair when a mask reads per-token inputs); a key sequence of its own has as many keys as
        verify.random_inputs draws for T queries. A select stage with a bounded choice (topk's k, a cap)
        keeps at most that many blocks' (tokens') keys a query: the bound is counted. The masks are evaluated
        a few query rows at a time (a T x T mask at T = 131072 is 137 GB in float64); past EXACT_PAIR_ROWS
        queries, on evenly spaced rows whose counts are scaled up (a FLOP count, not a result: a causal
        mask's estimate is off by about 1e-5 at T = 131072)."""
        from ..passes.fusion import live_ops
        from .softmax_oracle import base_env, eval_pair_op
        ops = live_ops(self.spec.score.ops, self.spec.masks)
        leaves = set(self.sched.leaves)
        if any(isinstance(a, str) and a in leaves for op in ops for a in op.args):
            return T * T
        dims = {d: 16 for d in self.spec.dims}
        pv = self.param_values(dims, params)
        env = base_env(self.spec, pv, 1, torch.float64, "cpu", T)
        nk = T
        if self.spec.keyseq is not None:  # as many keys as random_inputs draws for T queries
            from .softmax_oracle import key_positions
            from .verify import keyseq_length
            nk = keyseq_length(self.spec, T, {})
            env["kpos"] = key_positions(self.spec, pv, nk, torch.float64, "cpu")
        env.update({d: torch.full((1, 1), 16.0, dtype=torch.float64) for d in dims})
        sel = self.sched.select
        most = None
        if sel is not None and sel.selection.slots:  # a bounded choice: at most its slots' keys a query
            most = sel.selection.slots * (1 if sel.per_token else sel.block)
        step = -(-T // EXACT_PAIR_ROWS)
        rows = torch.arange(step // 2, T, step, dtype=torch.float64)  # each row the middle of its stretch
        kept = 0
        for chunk in rows.split(max(1, PAIR_CHUNK_ELEMENTS // max(nk, 1))):
            local = {**env, "qpos": chunk.reshape(1, 1, -1, 1)}
            for op in ops:
                args = [a if isinstance(a, float) else local[a]
                        for a in op.args[:1 if op.kind == "expand" else len(op.args)]]
                local[op.out] = eval_pair_op(op, args, T, None)
            keep = torch.ones(len(chunk), nk, dtype=torch.bool)
            for m in self.spec.masks:
                v = torch.as_tensor(local[m])
                keep &= (v.reshape(v.shape[-2:] if v.dim() >= 2 else ()) != 0)
            per_row = keep.sum(1)
            kept += int((per_row if most is None else per_row.clamp(max=most)).sum())
        return kept if len(rows) == T else round(kept * T / len(rows))

    def flops(self, B: int, T: int, H: int, dims: dict[str, int], backward: bool = False, **params) -> float:
        """Matmul FLOPs over the visible pairs: per pair 2*D for each score matmul and for each
        softmax(s) @ x; with the backward 3.5x the forward (FlashAttention's count: the backward does
        2.5x the forward's matmul work)."""
        subs = {dim(d): v for d, v in dims.items()}
        per_pair = 0
        for op in self.sched.p_ops:
            if op.kind == "matmul":
                per_pair += 2 * int(self.sched.types[op.args[0]].shape[1].subs(subs))
        for g in self.sched.groups:
            for r in g.reductions:
                per_pair += 2 * math.prod(int(d.subs(subs)) for d in self.sched.types[r.out].shape[1:])
        return float(self.visible_pairs(T, **params) * B * H * per_pair) * (3.5 if backward else 1.0)


class PrefixKernel:
    """The generated prefix kernels of a SoftmaxOp (passes.softmax_plan.prefix_lowered) as the prefix stage's
    forward, `(inputs, cu_seqlens, H, params) -> [value per name of .stores]`, each (B, T, H, ...), those read
    only as products in the inputs' 16-bit dtype (operand_dtype), the others fp32; and its backward
    (passes.prefix_bwd), `.backward(inputs, cotangents of .stores, cu_seqlens, H, params) -> {input: grad}`."""

    def __init__(self, op: SoftmaxOp):
        self.op = op
        self.plan = op.comp.plan.kernel("prefix")
        self.stores = tuple(d.name for d in self.plan.stores)
        self.derived = op.comp.plan.prefix_backward

    def _launch(self, kernel: str, xs, cu, H: int, params, tensors) -> None:
        """One launch of `kernel` (prefix or bwd_prefix) over every token of every head: the inputs it reads
        laid out as the walks read them, `tensors` its other buffers by argument name."""
        op, kp = self.op, self.op.comp.plan.kernel(kernel)
        named = {d.name: x for d, x in zip(op.spec.inputs, xs)}
        first = xs[0]
        B, T, dtype, device = first.shape[0], first.shape[1], first.dtype, first.device
        dims = self._dims(named)
        args = {f"{x}_ptr": _stored_rows(named[x], op.sched.types[x].shape[1:], dims, dtype) for x in kp.query_loads}
        args.update(tensors)
        args.update({f"p_{p}": float(v) for p, v in zip(prefix_params(op.spec), params)})
        n_seq = B if cu is None else cu.shape[0] - 1
        longest = T if cu is None else int((cu[1:] - cu[:-1]).max()) if n_seq else 0
        args.update(T=T, Q_LO=0, Q_HI=T, cu_ptr=kernel_cu_seqlens(cu, device) if cu is not None
                    else torch.empty(1, dtype=torch.float32, device=device))
        heads = {x: named[x].shape[2] for x in kp.query_loads}
        meta = op._meta(PREFIX_TILE, H, heads, dims, cu, dtype)
        if n_seq and H and longest:
            op._launch(kernel, PREFIX_TILE, -(-longest // PREFIX_TILE[0]), n_seq * H, args, meta)

    def _dims(self, named: dict) -> dict:
        return {n: size for d in self.op.spec.inputs for n, size in zip(d.dims[3:], named[d.name].shape[3:])}

    def __call__(self, xs, cu, H: int, params) -> list[torch.Tensor]:
        sched, first = self.op.sched, xs[0]
        dims = self._dims({d.name: x for d, x in zip(self.op.spec.inputs, xs)})
        low = operand_dtype(first.dtype)
        outs = {x: torch.empty(first.shape[:2] + (H,) + tuple(dims[str(d)] for d in sched.types[x].shape[1:]),
                               dtype=low if x in sched.operand_prefix else torch.float32, device=first.device)
                for x in self.stores}
        self._launch("prefix", xs, cu, H, params, {f"{x}_ptr": t for x, t in outs.items()})
        return [outs[x] for x in self.stores]

    def backward(self, xs, d_outs, cu, H: int, params) -> dict[str, torch.Tensor]:
        """The gradients of the inputs the prefix reads, each in its input's shape and dtype: written per query
        head by the kernel (fp32 where a grouped input's heads are summed after it)."""
        named = {d.name: x for d, x in zip(self.op.spec.inputs, xs)}
        cotangents = dict(zip(self.stores, d_outs))
        tensors = {f"{x}_grad_ptr": cotangents[x].contiguous() for x in self.derived.seeds}
        grads = {}
        for x, _ in self.derived.grads:
            t = named[x]
            grads[x] = torch.empty(t.shape[:2] + (H,) + t.shape[3:], device=t.device,
                                   dtype=t.dtype if t.shape[2] == H else torch.float32)
            tensors[f"{x}_grad_ptr"] = grads[x]
        self._launch("bwd_prefix", xs, cu, H, params, tensors)  # no token (T = 0): no launch, empty grads
        return {x: g if named[x].shape[2] == H else
                g.unflatten(2, (named[x].shape[2], -1)).sum(3).to(named[x].dtype) for x, g in grads.items()}


def _stored_rows(t: torch.Tensor, feats, dims: dict, dtype) -> torch.Tensor:
    """A leaf as the kernels read it: contiguous, its feature rows zero-padded to their stored width."""
    extra = stored_width(dims[str(feats[0])], dtype.itemsize) - t.shape[-1] if feats else 0
    return torch.nn.functional.pad(t, (0, extra)) if extra else t.contiguous()


class HybridOp:
    """A state and a softmax branch (passes.hybrid): the softmax branch's kernels write its reductions per
    token, the state branch's scan reads them in merge. Call like the linear family's ops:
    `op(*inputs, initial_state=None, output_final_state=False, cu_seqlens=None, **params)` -> (o, final)."""

    def __init__(self, comp: Compilation, backend: str = "triton"):
        from .op import AttentionOp
        self.comp, self.backend = comp, backend
        self.spec = comp.typed
        self.name = self.spec.name
        self.split = comp.split
        self.softmax = SoftmaxOp(comp.branch("softmax"), backend)
        self.linear = AttentionOp(comp.branch("linear"), backend)
        self.last_config = None
        live(self)
        self._prefix = prefix_stage(self.spec)

    def __repr__(self) -> str:
        return f"<effc hybrid op {self.name}({', '.join(d.name for d in self.spec.inputs)}) backend={self.backend}>"

    def _extras(self, tensors, params, cu_seqlens, reference: bool, dtype=torch.float64, matmul_dtype=None,
                **knobs):
        """The state branch's extra inputs: the softmax branch's reductions and the prefix values it reads,
        per token."""
        if reference:
            r, _ = self.softmax.reference(*tensors, cu_seqlens=cu_seqlens, dtype=dtype, matmul_dtype=matmul_dtype,
                                          **params)
        else:
            r, _ = self.softmax(*tensors, cu_seqlens=cu_seqlens, **knobs, **params)
        return (list(r) if isinstance(r, tuple) else [r]) + self._prefix_inputs(tensors, params, cu_seqlens,
                                                                                reference, dtype)

    def _prefix_inputs(self, tensors, params, cu_seqlens, reference: bool, dtype=torch.float64) -> list:
        """The prefix values the state branch reads (passes.hybrid's prefix_inputs), per token."""
        if not self.split.prefix_inputs:
            return []
        named = {d.name: x for d, x in zip(self.spec.inputs, tensors)}
        H = tensors[0].shape[2]
        if reference:
            dims = {n: s for d, x in zip(self.spec.inputs, tensors) for n, s in zip(d.dims[3:], x.shape[3:])}
            pre = softmax_oracle.prefix_values(self.spec, named, self.softmax.param_values(dims, params), H,
                                               dtype, cu_seqlens)
        else:  # the param values as a compile-time constant: sympy defaults are no code to trace
            pvals = host_plan(id(self), tuple(describe(t) for t in tensors), tuple(sorted(params.items())))
            pre = self._prefix(named, dict(pvals), H, cu_seqlens)
        return [pre[x] for x in self.split.prefix_inputs]

    def _plan_call(self, descs, params) -> tuple:
        """The softmax branch's param values for a call (the prefix stage's), as sorted (name, value) pairs."""
        dims = check_inputs(self.spec, [rebuild(d) for d in descs])[3]
        return tuple(sorted(self.softmax.param_values(dims, dict(params)).items()))

    def __call__(self, *tensors, initial_state=None, output_final_state: bool = False, cu_seqlens=None,
                 chunk: int | None = None, block: int | None = None, segments: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, save_states: bool | None = None,
                 defer_merge: bool | None = None, **params):
        """`chunk` is the state branch's chunk and the softmax branch's query block; `block` its key block;
        `num_warps` and `num_stages` pin both branches' kernels; the other knobs are the state branch's."""
        check_knobs(chunk=chunk, block=block, segments=segments, num_warps=num_warps, num_stages=num_stages,
                    save_states=save_states, defer_merge=defer_merge, output_final_state=output_final_state)
        launch = dict(num_warps=num_warps, num_stages=num_stages)
        extra = self._extras(tensors, params, cu_seqlens, False, chunk=chunk, block=block, **launch)
        dtype = tensors[0].dtype
        out = self.linear(*tensors, *[x.to(dtype) for x in extra], initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk=chunk,
                          segments=segments, save_states=save_states, defer_merge=defer_merge, **launch, **params)
        self.last_config = self.linear.last_config
        return out

    def step(self, *tokens, state=None, context=None, **params):
        """One decoding step: `tokens` are (B, H, D) (or (B, H)), `state` the carried state(s) (None: zeros),
        `context` every input's earlier tokens (as SoftmaxOp.step). Returns (o_t, next state, context with
        the token appended): the softmax branch's decode kernels (SoftmaxOp.step) against the context, then
        the state branch's generated walk on the single token."""
        xs = decode_inputs(self.spec, tokens, context)
        r, _ = self.softmax.step(*tokens, context=context, **params)
        extra = (list(r) if isinstance(r, tuple) else [r]) + [
            p[:, -1] for p in self._prefix_inputs(xs, params, None, reference=False)]  # at the token
        o, nxt = self.linear.step(*tokens, *[x.to(tokens[0].dtype) for x in extra], state=state, **params)
        return o, nxt, tuple(xs)

    def reference(self, *tensors, initial_state=None, output_final_state: bool = False, cu_seqlens=None,
                  chunk=None, dtype=torch.float64, matmul_dtype=None, **params):
        # the softmax branch's results as the kernels pass them to the state branch: in the inputs' dtype
        extra = [x.to(tensors[0].dtype) for x in self._extras(tensors, params, cu_seqlens, True, dtype, matmul_dtype)]
        return self.linear.reference(*tensors, *extra, initial_state=initial_state,
                                     output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk=chunk,
                                     dtype=dtype, matmul_dtype=matmul_dtype, **params)

    def recurrent_reference(self, *tensors, **kw):
        return self.reference(*tensors, chunk=1, **kw)
