"""The kernel plan of the softmax family (its four kernels, their roles) and of a hybrid (a plan per branch)."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import ops as O
from ..ir.nodes import CK, C, Spec, TensorDecl, names_read
from ..ir.printer import print_op
from .blocksparse import NEG, POS
from .fusion import live_ops
from .hybrid import HybridSplit
from .kernel_plan import Kernel, kernel_args, unique_args
from .prefix_bwd import PrefixBackward, differentiate_prefix
from ..errors import ArgumentError
from .softmax import ROW_PARTITIONS, SoftmaxSchedule, gathers_tokens, row_partitions
from .softmax_bwd import SoftmaxBackward


@dataclass(frozen=True)
class SoftmaxKernel(Kernel):
    """A kernel of the online-softmax walk: one program per query block (outer q) or key block (outer k)
    walks the other side's blocks. `loads` are the leaves it reads (inputs and prefix values), each loaded per
    query block (`query_loads`), per key block (`key_loads`) or both."""

    stages: tuple[str, ...] = ()
    what: str = ""
    outer: str = "q"
    walk: bool = True  # walks the other side's blocks (bwd_pre does not: one pass per query block)
    query_loads: tuple[str, ...] = ()
    key_loads: tuple[str, ...] = ()
    ops: tuple = ()  # the linear family's per-chunk op list; FLOPs of this family: SoftmaxOp.flops


@dataclass(frozen=True)
class RowPartition:
    """How the query-side walks' rows are partitioned among programs (passes.softmax.ROW_PARTITIONS): the
    `partition=` knob of a call and `effc tune`'s alternatives, as the linear family's gradient partitions."""
    name: str
    kernels: tuple[str, ...]  # the query-side walks it launches
    what: str


@dataclass(frozen=True)
class SoftmaxPlan:
    spec: Spec
    kernels: tuple[SoftmaxKernel, ...]
    schedule: SoftmaxSchedule
    backward: SoftmaxBackward
    prefix_backward: PrefixBackward | None = None  # the prefix kernel's (kernel `bwd_prefix`)

    @property
    def partitions(self) -> tuple[RowPartition, ...]:
        return plan_partitions(self.spec)

    # no default per plan: the model picks per call, from its head group and length
    # (passes.softmax.default_partition); `effc tune` records the faster for a shape
    partition = None

    def check_partition(self, partition: str | None) -> None:
        names = [c.name for c in self.partitions]
        if partition is not None and partition not in names:
            raise ArgumentError(f"partition={partition!r}: spec '{self.spec.name}' has "
                                + (f"the row partitions {', '.join(map(repr, names))}" if names else
                                   "one partition of its walks (no select stage choosing key blocks; pass "
                                   "partition=None)"))

    def kernel(self, name: str) -> SoftmaxKernel:
        name = {"walk": "fwd"}.get(name, name)  # the forward kernel under the linear family's name
        return next(k for k in self.kernels if k.name == name)

    @property
    def key_leaves(self) -> tuple[str, ...]:
        """The leaves some kernel reads on the key side: what a KV cache holds when the forward's kernels
        decode (runtime.softmax_decode); their query-side rows are the cache's then too."""
        keyed = {x for k in self.kernels if k.role in ("walk", "pool", "select") for x in k.key_loads}
        return tuple(x for x in self.schedule.leaves if x in keyed)

    def __str__(self) -> str:
        lines = [f"plan {self.spec.name}: online softmax, {len(self.kernels)} kernels"]
        side = {"q": "query", "k": "key"}
        for k in self.kernels:
            loads = {"q": k.query_loads, "k": k.key_loads}
            per = [f"per {side[s]} block: load {', '.join(loads[s]) or '-'}"
                   for s in (k.outer, _OTHER[k.outer])[:2 if k.walk or loads[_OTHER[k.outer]] else 1]]
            lines += [f"  kernel {k.name} [{' + '.join(k.stages)}]: grid {k.grid}: {k.what}",
                      f"    {'; '.join(per)}; store {', '.join(d.name for d in k.stores) or '-'}"]
        lines += [f"  partition {c.name}: {', '.join(c.kernels)}: {c.what}" for c in self.partitions]
        if self.partitions:
            lines.append("    the model picks per call: the fewer block steps a query row for uncorrelated choices "
                         "(passes.softmax.default_partition, from the call's head group and length)")
        lowered = any(k.role == "prefix" for k in self.kernels)
        lines += [("  prefix (kernel `prefix` per token; backward: kernel `bwd_prefix`):" if lowered
                   else "  prefix (PyTorch pre-pass over whole sequences, differentiated by autograd):")
                  if self.spec.prefix.ops else "  prefix: none"]
        lines += [f"    {print_op(op)}" for op in self.spec.prefix.ops]
        lines.append(str(self.backward))
        if self.prefix_backward is not None:
            lines.append(str(self.prefix_backward))
        return "\n".join(lines)


def plan_partitions(spec: Spec) -> tuple[RowPartition, ...]:
    """The row partitions of a choice of key blocks or of a bounded number of shared key tokens ('heads',
    'tokens'; passes.softmax.row_partitions), with the kernels each launches; none for other specs."""
    # a choice of key tokens keeps the token rows' dK/dV (its bits per query block)
    dkv = "bwd_dkv" if gathers_tokens(spec) else "bwd_dkv_rows"
    names = {"heads": ("fwd_rows", "bwd_dq_rows", dkv), "tokens": ("fwd", "bwd_dq", "bwd_dkv")}
    return tuple(RowPartition(n, names[n], ROW_PARTITIONS[n]) for n in row_partitions(spec))


_OTHER = {"q": "k", "k": "q"}
# name, role, stages, the program's side, what it does
SOFTMAX_KERNELS = (
    ("fwd", "walk", ("score", "merge"), "q", "walk the visible key blocks with a running (max, sum, acc); the "
     "epilogue (normalise, merge ops) fused; saves the log-sum-exp"),
    ("bwd_pre", "bwd_pre", ("merge",), "q", "the epilogue's VJP: dR, D = rowsum(dR * R) - dlse"),
    ("bwd_dq", "bwd_walk", ("score", "merge"), "q", "walk the visible key blocks, recompute P from the "
     "log-sum-exp, accumulate the query-side adjoints"),
    ("bwd_dkv", "bwd_walk", ("score", "merge"), "k", "walk the query blocks that see the key block, accumulate "
     "the key-side adjoints and P^T dR"),
)
# the query-side walks over a choice of key blocks with head rows (passes.select, `head_rows`): a program per
# (a few query tokens, the G query heads sharing their key heads), its rows (token, head) pairs, walking each
# token's chosen blocks once (NSA's kernel order); runtime.softmax_op picks them per call (SoftmaxTiles.head_rows)
HEAD_ROWS_KERNELS = (
    ("fwd_rows", "walk", ("score", "merge"), "q", "the forward with rows (query token, query head of a group): walk "
     "each token's chosen key blocks, a block once; the epilogue fused; saves the log-sum-exp"),
    ("bwd_dq_rows", "bwd_walk", ("score", "merge"), "q", "dQ with rows (query token, query head of a group): walk "
     "each token's chosen key blocks, a block once, recompute P from the log-sum-exp"),
    ("bwd_dkv_rows", "bwd_walk", ("score", "merge"), "k", "dK/dV of a key block over the query tokens that took it, "
     "gathered from the query blocks listing it, with their group's heads as rows: the group's key-side adjoints "
     "summed in the program"),
)
# the select stage's kernels (passes.select), launched before the forward: name, role, the program's side, what
SELECT_KERNELS = (
    ("select_pool", "pool", "k", "pool each key block's tokens of the values the select stage pools"),
    ("select", "select", "q", "score the key blocks per query, keep the top k (ties: the lower block index); "
     "store the per-token choice, the query block's union as an ordered list and its row of the block map"),
    ("select_t", "select_t", "k", "compact the block map's column: the query blocks that walk the key block"),
)
# decoding against a KV cache (runtime.softmax_decode): name, role, stages, grid, what
DECODE_KERNELS = (
    ("decode", "decode", ("score", "merge"), "(splits, B*H/G)", "the new queries of each request (rows: new "
     "token x the G query heads sharing a key head) against one split of its cached keys: the forward's walk over "
     "that split's visible key blocks; store the partial (max, sum, acc) of each softmax, unnormalised"),
    ("decode_combine", "decode_combine", ("merge",), "(1, B*H/G)", "merge the splits' partials by a log-sum-exp "
     "rescale, then the forward's epilogue (normalise, merge ops); store the outputs"),
)
# the signature's fixed part (codegen/triton/softmax.py.j2 reads these names)
_LAYOUT = ("T", "Q_LO", "Q_HI", "cu_ptr")
_TILES = ("BM", "BN")
_OPTIONS = ("IS_VARLEN", "DOT_DTYPE", "PRECISION")
_FLAGS = ("SAVE",)
_KEYSEQ_LAYOUT = ("TK",)  # a key sequence of its own (spec.keyseq): its length


def _layout(sched: SoftmaxSchedule) -> tuple[str, ...]:
    return _LAYOUT + (_KEYSEQ_LAYOUT if sched.spec.keyseq is not None else ())


def base_kernel(name: str) -> str:
    """The kernel a head-rows variant walks for (`fwd_rows` -> `fwd`): the same ops, buffers and leaves."""
    return name.removesuffix("_rows")


def _kernel_ops(sched: SoftmaxSchedule, bwd: SoftmaxBackward, name: str) -> tuple:
    """Every op a kernel prints (codegen/triton/softmax_emit.py)."""
    name = base_kernel(name)
    if name == "fwd":
        return sched.c_ops + sched.q_ops + sched.k_ops + sched.p_ops + sched.post_ops
    kp = {"bwd_pre": bwd.pre, "bwd_dq": bwd.dq, "bwd_dkv": bwd.dkv}[name]
    return kp.outer_ops + kp.loop_fwd + kp.loop_vjp + kp.post_vjp


def _leaf_sides(sched: SoftmaxSchedule, ops) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The leaves the ops read per query block and per key block: query(x) and key(x) say which; a leaf
    read directly (the epilogue's per-token values) is read per query block."""
    leaves = set(sched.leaves)
    q, k = set(), set()
    for op in ops:
        if op.kind in ("query", "key"):
            (q if op.kind == "query" else k).add(op.args[0])
            continue
        n_args = 1 if op.kind == "expand" else len(op.args)
        q |= {a for a in op.args[:n_args] if isinstance(a, str) and a in leaves}
    return tuple(x for x in sched.leaves if x in q), tuple(x for x in sched.leaves if x in k)


def _params_read(sched: SoftmaxSchedule, ops, walk: bool, outer: str) -> tuple[str, ...]:
    """The spec parameters a kernel reads: in its ops, the score's folded scale (walks), the walk's block
    bounds (the masks' ranges) and the key sequence's positions (kpos, when the kernel reads it)."""
    names = {a for op in ops for a in op.args if isinstance(a, str)}
    ks = sched.spec.keyseq
    if ks is not None and ks.pos is not None and (walk or "kpos" in names):
        names |= {x.name[2:] for e in ks.pos for x in e.free_symbols if x.name.startswith("p_")}
    if walk:
        names |= {g.fold[1] for g in sched.groups if g.fold is not None and isinstance(g.fold[1], str)}
        r = sched.sparsity.keys if outer == "q" else sched.sparsity.queries
        bounds = [x for x, unbounded in ((r.lo, NEG), (r.hi, POS)) if x != unbounded]
        if r.has_full:
            bounds += [x for x, unbounded in ((r.flo, NEG), (r.fhi, POS)) if x != unbounded]
        names |= {s.name[2:] for x in bounds for s in x.free_symbols if s.name.startswith("p_")}
    return tuple(p.name for p in sched.spec.params if p.name in names)


def _buffers(sched: SoftmaxSchedule, bwd: SoftmaxBackward, name: str) -> tuple[str, ...]:
    """The pointer arguments after the leaves: outputs, saved statistics, cotangents and gradients."""
    spec = sched.spec
    name = base_kernel(name)
    outputs = [o.name for o in spec.outputs]
    saved = lambda g: [f"{r.out}_save_ptr" for r in g.reductions if r.out not in outputs]
    if name == "fwd":
        return tuple([f"{o}_ptr" for o in outputs]
                     + [p for gi, g in enumerate(sched.groups) for p in [f"lse{gi}_ptr"] + saved(g)])
    if name == "bwd_pre":
        return tuple([f"{o}_grad_ptr" for o in outputs]
                     + [p for gi, g in enumerate(sched.groups) for p in [f"lse{gi}_ptr"] + saved(g)]
                     + [f"{o}_ptr" for o in outputs] + [f"{r}_dr_ptr" for r, _ in bwd.d_reduction]
                     + [f"D{gi}_ptr" for gi in range(len(bwd.d_group))] + [f"{x}_dpre_ptr" for x, _ in bwd.pre.leaf_grads])
    kp, outer = (bwd.dq, "q") if name == "bwd_dq" else (bwd.dkv, "k")
    return tuple([p for gi, g in enumerate(sched.groups)
                   for p in [f"lse{gi}_ptr", f"D{gi}_ptr"] + [f"{r.out}_dr_ptr" for r in g.reductions]]
                  + [f"{x}_d{outer}_ptr" for x, _ in kp.leaf_grads])


# decoding through the select stage's kernels and the forward walk (runtime.softmax_decode): the keys are each
# request's cache rows, the queries its TQ new tokens after the lens_ptr[b] cached ones (a DECODE launch)
_DECODE_LAYOUT = ("lens_ptr", "TQ")
_DECODES = ("fwd", "fwd_rows", "select_pool", "select")


def decodes_through_select(sched: SoftmaxSchedule) -> bool:
    """Does the spec decode through its select stage's kernels and forward walk? (A key sequence of its own
    decodes through the forward per request: runtime.softmax_decode.)"""
    return sched.select is not None and sched.spec.keyseq is None


# dK/dV over the select stage's transposed lists, a long list split over programs (KEY_SPLIT): the segments'
# fp32 sums (`ksplit` [B*H, EXTRA, SLOT]), the extra programs, a segment's least units, the launch
_SPLIT_TENSORS = ["ksplit_ptr"]
_SPLIT_LAYOUT = ["EXTRA", "SPLIT", "PHASE"]
_SPLIT_TILES = ["NBP", "SLOT"]
KEY_SPLIT = ("a key block's list longer than L units (query blocks; head rows: the tokens that took it) is walked "
             "in segments of L, one a program past the key blocks' own (EXTRA more a row of B*H), each storing its "
             "fp32 sums; a second launch (PHASE 1, a program per key block) adds a split list's segments in order "
             "and stores its gradients: the key blocks every query takes (sinks, the local window) no longer walk "
             "every query block in one program; deterministic, no atomics")


GROUPED_KEYS = ("grouped key heads (GQA): a program per key block of one key head walks the GQ query heads "
                "sharing it in turn, summing their dK/dV in registers, and stores the key head's gradients once, in "
                "the input's dtype where no other kernel adds to them; with GQ below the group, per-query-head "
                "copies (the input's dtype) are summed after, and GQ keeps them within the query's size; "
                "GQ = 1 where a key-side value reads the head index or the key-side inputs' heads differ")


def dkv_groups_heads(bwd: SoftmaxBackward) -> bool:
    """May one dK/dV program walk several query heads (GROUPED_KEYS)? Not where a key-side value (computed
    once a program, before the walk) reads the head index."""
    return not any("head" in op.args for op in bwd.dkv.outer_ops)


def split_slot(sched: SoftmaxSchedule, bwd: SoftmaxBackward, sizes: dict) -> int:
    """The fp32 elements of one segment's sums (`ksplit`'s SLOT): dK/dV's accumulators' tiles, their dims
    the kernel's (C: BM, CK: BN, a feature dim its padded tile `{d}_P`), read from `sizes`."""
    total = 0
    for x, _ in bwd.dkv.accumulators:
        n = 1
        for d in bwd.dkv.types[x].shape:
            n *= sizes["BM"] if d == C else sizes["BN"] if d == CK else int(d) if d.is_Integer else sizes[f"{d}_P"]
        total += n
    return total


def _select_args(sched: SoftmaxSchedule, name: str) -> tuple[list, list, list, list]:
    """(tensors, layout, tiles, flags) a kernel takes for the select stage's lists; empty without one."""
    if sched.select is None or name == "bwd_pre":
        return [], [], [], []
    decode = decodes_through_select(sched) and name in _DECODES
    layout, flags = (list(_DECODE_LAYOUT), ["DECODE"]) if decode else ([], [])
    if sched.select.per_token:  # a choice of key tokens: each (query, key block)'s bits, `tmask`
        if name.endswith("_rows"):  # head rows gather each query's chosen keys (`tidx`, `tcnt`: the select's)
            return ["tidx_ptr", "tcnt_ptr"], layout, ["KTOP", "G"], flags
        lists = {"fwd": ["tmask_ptr", "qlist_ptr", "qcnt_ptr"], "bwd_dq": ["tmask_ptr", "qlist_ptr", "qcnt_ptr"],
                 "bwd_dkv": ["tmask_ptr", "klist_ptr", "kcnt_ptr"] + _SPLIT_TENSORS,
                 "select": ["tmask_ptr", "qmap_ptr", "qlist_ptr", "qcnt_ptr", "tidx_ptr", "tcnt_ptr"],
                 "select_t": ["qmap_ptr", "klist_ptr", "kcnt_ptr", "ktok_ptr"]}[name]
        tiles = {"select": ["KTOP", "NW", "GROUP", "SB", "PG"], "select_t": ["NQBP", "GROUP"],
                 "bwd_dkv": ["NW", "GROUP", "BQ"] + _SPLIT_TILES}.get(name, ["NW", "GROUP"])
        layout = ["NQB", "NKB"] + layout + (_SPLIT_LAYOUT if name == "bwd_dkv" else [])
        return lists, layout, tiles, (["INDICES"] if name == "select" else []) + flags
    if name == "bwd_dkv_rows":  # the query blocks listing the key block, and how many of their tokens took it
        return (["sel_ptr", "klist_ptr", "qmap_ptr", "ktok_ptr"] + _SPLIT_TENSORS,
                ["NQB", "NKB"] + _SPLIT_LAYOUT, ["KP", "G", "BQ", "NQBP", "GROUP"] + _SPLIT_TILES, [])
    if name.endswith("_rows"):  # each row's chosen blocks, read from the per-token choice
        return ["sel_ptr"], layout, ["KP", "KTOP", "G", "GROUP"], flags
    pools = [f"{p.out}_pool_ptr" for p in sched.select.pools]
    lists = {"bwd_dkv": ["sel_ptr", "klist_ptr", "kcnt_ptr"] + _SPLIT_TENSORS,
             "fwd": ["sel_ptr", "qlist_ptr", "qcnt_ptr"],
             "bwd_dq": ["sel_ptr", "qlist_ptr", "qcnt_ptr"], "select_pool": pools,
             "select": pools + ["sel_ptr", "qmap_ptr", "qlist_ptr", "qcnt_ptr"],
             "select_t": ["qmap_ptr", "klist_ptr", "kcnt_ptr", "ktok_ptr"]}[name]
    width = "CB" if sched.select.streamed else "NBP"  # a chunk of key blocks, or every one (passes.select)
    # GROUP: the heads sharing a choice (1 unless shared), whose lists are stored once (a row per group)
    tiles = {"select_pool": [], "select": [width, "KTOP", "KP", "GROUP"], "select_t": ["NQBP", "GROUP"],
             "bwd_dkv": ["KP", "BQ", "GROUP"] + _SPLIT_TILES}.get(name, ["KP", "GROUP"])
    return lists, ["NQB", "NKB"] + layout + (_SPLIT_LAYOUT if name == "bwd_dkv" else []), tiles, flags


def _select_kernels(sched: SoftmaxSchedule, leaf_dims) -> list[SoftmaxKernel]:
    sel = sched.select
    kernels = []
    for name, role, outer, what in SELECT_KERNELS:
        if name == "select_pool" and not sel.pools:  # nothing pooled (a choice of key tokens pools nothing)
            continue
        if name == "select_pool":
            q, k = (), tuple(x for x in sched.leaves if x in {p.leaf for p in sel.pools})
        elif name == "select":
            q, k = sel.query_leaves, sel.key_leaves
        else:
            q, k = (), ()
        read = tuple(x for x in sched.leaves if x in q or x in k)
        # the pooled tiles are one row per head of their leaf: the select kernel reads a query head's key head's
        pooled = tuple(x for x in sched.leaves if x in {p.leaf for p in sel.pools} and x not in read)
        names = (names_read(sel.ops) | set(sel.params)
                 if name == "select" else set())
        params = tuple(p.name for p in sched.spec.params if p.name in names)
        tensors, layout, tiles, flags = _select_args(sched, name)
        if sel.per_token and name == "select":
            what = (f"score the key tokens per query, find each query's cut-off of {sel.selection.describe_rule()} "
                    "(a 16-way search on the score's bits; ties: the lower position); store each (query, key block)'s "
                    "chosen tokens as bits, the query block's union of blocks as an ordered list and its row of the "
                    "block map")
        elif sel.kind != "topk":
            what = what.replace("keep the top k", f"keep the blocks {sel.selection.describe_rule()} chooses")
        if sel.selection.shared and name == "select":
            what = what.replace("per query,", f"per query head group ({sel.selection.shared} over its heads),")
        options = _OPTIONS if name == "select" else ("IS_VARLEN",)
        args = unique_args(kernel_args("tensor", [f"{x}_ptr" for x in read] + tensors)
                           + kernel_args("param", [f"p_{p}" for p in params])) \
            + kernel_args("layout", _LAYOUT + tuple(layout)) \
            + _shape_args(read, leaf_dims) + (kernel_args("shape", [f"HX_{x}" for x in pooled]) if name == "select"
                                              else ()) \
            + kernel_args("tile", _TILES + tuple(tiles)) + kernel_args("option", options) + kernel_args("flag", flags)
        kernels.append(SoftmaxKernel(
            name=name, role=role, loads=tuple(leaf_decl(sched, x) for x in read), stores=(),
            grid="(query blocks, B*H)" if outer == "q" else "(key blocks, B*H)", args=args, stages=("select",),
            what=what, outer=outer, walk=False, query_loads=q, key_loads=k))
    return kernels


def decode_combine_ops(sched: SoftmaxSchedule) -> tuple:
    """The ops the combine kernel prints after the merge of the partials: the epilogue and the constant and
    query-side values it reads (recomputed from the new queries' tiles: the split kernels keep none)."""
    return live_ops(sched.c_ops + sched.q_ops + sched.post_ops, tuple(o.name for o in sched.spec.outputs))


def decode_partials(sched: SoftmaxSchedule) -> tuple[str, ...]:
    """The split kernels' partial results, per softmax group: running max and sum (log2 units), and each
    reduction's unnormalised accumulator."""
    return tuple(p for gi, g in enumerate(sched.groups)
                 for p in [f"m{gi}_part_ptr", f"l{gi}_part_ptr"] + [f"{r.out}_part_ptr" for r in g.reductions])


def _decode_kernels(sched: SoftmaxSchedule, leaf_dims) -> list[SoftmaxKernel]:
    kernels = []
    for name, role, stages, grid, what in DECODE_KERNELS:
        split = role == "decode"
        ops = (sched.c_ops + sched.q_ops + sched.k_ops + sched.p_ops) if split else decode_combine_ops(sched)
        q, k = _leaf_sides(sched, ops)
        read = tuple(x for x in sched.leaves if x in q or x in k)
        params = _params_read(sched, ops, split, "q")
        tensors = ([f"{x}_ptr" for x in q] + [f"{x}_cache_ptr" for x in k] + list(decode_partials(sched))
                   + ["lens_ptr"] if split else
                   [f"{x}_ptr" for x in q] + [f"{o.name}_ptr" for o in sched.spec.outputs]
                   + list(decode_partials(sched)) + ["lens_ptr"])
        args = unique_args(kernel_args("tensor", tensors) + kernel_args("param", [f"p_{p}" for p in params])) \
            + kernel_args("layout", ("TQ", "TMAX") if split else ("TQ",)) \
            + _shape_args(read, leaf_dims, stored=False) \
            + kernel_args("tile", ("BM", "BN", "NSPLIT", "G") if split else ("BM", "NSPLIT", "G")) \
            + kernel_args("option", ("DOT_DTYPE", "PRECISION"))
        kernels.append(SoftmaxKernel(
            name=name, role=role, loads=tuple(leaf_decl(sched, x) for x in read),
            stores=() if split else tuple(sched.spec.outputs), grid=grid, args=args, stages=stages, what=what,
            outer="q", walk=split, query_loads=q, key_loads=k))
    return kernels


def _shape_args(read, leaf_dims, stored: bool = True) -> tuple:
    """The shapes a kernel takes: heads, each read leaf's head count, and per feature dim its size, its
    tile's padded size and (`stored`: the runtime lays the leaves out) the width of its stored rows."""
    per_dim = ("", "_P", "_S") if stored else ("", "_P")
    return kernel_args("shape", ["H"] + [f"HX_{x}" for x in read] + [d + s for d in leaf_dims for s in per_dim])


def leaf_decl(sched: SoftmaxSchedule, x: str) -> TensorDecl:
    """An input's declaration, or a prefix value's: per token, its feature dims from its tile type."""
    decl = next((d for d in sched.spec.inputs if d.name == x), None)
    return decl or TensorDecl(x, "prefix", ("B", "T", "H") + tuple(str(d) for d in sched.types[x].shape[1:]))


PREFIX_KERNEL = ("prefix", "prefix", "q", "the prefix stage per token, every value the walks read computed once "
                 "and stored (those read only as products in the inputs' 16-bit dtype)")
PREFIX_BWD_KERNEL = ("bwd_prefix", "bwd_prefix", "q", "the prefix stage's backward per token: the stored values' "
                     "cotangents back through the prefix ops to the inputs it reads (passes.prefix_bwd)")


def prefix_lowered(sched: SoftmaxSchedule) -> bool:
    """Does a kernel compute the prefix stage (`prefix`, a program per block of one head's tokens)? Where every
    prefix op is per token: no scan or reduction over tokens (a cumsum: FoX's gate), which stay in the
    PyTorch pre-pass, differentiated by autograd; a lowered prefix has a generated backward too (bwd_prefix)."""
    from .shapes import reduces_tokens
    ops = sched.spec.prefix.ops
    return bool(ops) and not any(op.kind in O.SCANS or reduces_tokens(op, sched.types) for op in ops)


def _prefix_kernels(sched: SoftmaxSchedule, leaf_dims) -> tuple[list[SoftmaxKernel], PrefixBackward]:
    """The prefix kernel (prefix_lowered): reads the inputs the prefix stage reads, stores its values the
    other stages read (sched.leaves past the inputs); and its backward, `bwd_prefix`: reads those inputs and
    the stored values' cotangents (`{x}_grad_ptr`), stores the inputs' gradients (`{x}_grad_ptr`, per query
    head: a grouped input's are summed over its group after the kernel)."""
    spec = sched.spec
    read_names = spec.prefix.reads
    read = tuple(d.name for d in spec.inputs if d.name in read_names)
    stores = tuple(x for x in sched.leaves[len(spec.inputs):])
    backward = differentiate_prefix(sched, stores)
    params = tuple(p.name for p in spec.params if p.name in read_names)
    dims = sorted(set(leaf_dims) | {n for d in spec.inputs if d.name in read for n in d.dims[3:]})
    # the backward reads only the inputs and params its ops read (RoPE's adjoints are linear: no input)
    used = names_read(backward.recompute + backward.vjp)
    read_back = tuple(x for x in read if x in used)
    kernels = []
    for (name, role, outer, what), loaded, tensors, written, taken in (
            (PREFIX_KERNEL, read, read + stores, stores, params),
            (PREFIX_BWD_KERNEL, read_back, read_back + tuple(f"{x}_grad" for x in backward.seeds)
             + tuple(f"{x}_grad" for x, _ in backward.grads), tuple(x for x, _ in backward.grads),
             tuple(p for p in params if p in used))):
        args = unique_args(kernel_args("tensor", [f"{x}_ptr" for x in tensors])
                           + kernel_args("param", [f"p_{p}" for p in taken])) \
            + kernel_args("layout", _LAYOUT) + _shape_args(loaded, dims) \
            + kernel_args("tile", _TILES) + kernel_args("option", ("IS_VARLEN",))
        kernels.append(SoftmaxKernel(name=name, role=role, loads=tuple(leaf_decl(sched, x) for x in loaded),
                                     stores=tuple(leaf_decl(sched, x) for x in written), grid="(query blocks, B*H)",
                                     args=args, stages=("prefix",), what=what, outer=outer, walk=False,
                                     query_loads=loaded))
    return kernels, backward


def softmax_plan(spec: Spec, sched: SoftmaxSchedule, bwd: SoftmaxBackward) -> SoftmaxPlan:
    leaf_dims = sorted({str(d) for x in sched.leaves for d in sched.types[x].shape[1:]})
    kernels, prefix_backward = _prefix_kernels(sched, leaf_dims) if prefix_lowered(sched) else ([], None)
    kernels += _select_kernels(sched, leaf_dims) if sched.select is not None else []
    rows = tuple(k for k in HEAD_ROWS_KERNELS if k[0] in {c for p in plan_partitions(spec) for c in p.kernels})
    for name, role, stages, outer, what in SOFTMAX_KERNELS + rows:
        ops = _kernel_ops(sched, bwd, name)
        q, k = _leaf_sides(sched, ops)
        read = tuple(x for x in sched.leaves if x in q or x in k)
        params = _params_read(sched, ops, name != "bwd_pre", outer)
        tensors, layout, tiles, flags = _select_args(sched, name)
        if name == "bwd_dkv":  # a program per key head's key block, its GQ query heads in turn (GROUPED_KEYS)
            tiles = [*tiles, "GQ"]
        args = unique_args(kernel_args("tensor", [f"{x}_ptr" for x in read] + list(_buffers(sched, bwd, name))
                                       + tensors) + kernel_args("param", [f"p_{p}" for p in params])) \
            + kernel_args("layout", _layout(sched) + tuple(layout)) \
            + _shape_args(read, leaf_dims) \
            + kernel_args("tile", _TILES + tuple(tiles)) + kernel_args("option", _OPTIONS) \
            + kernel_args("flag", _FLAGS + tuple(flags))
        if sched.select is not None and role != "bwd_pre" and not name.endswith("_rows"):
            what += " (the selected blocks only: the select stage's lists)"
        if sched.select is not None and base_kernel(name) == "bwd_dkv":
            what += "; " + KEY_SPLIT
        if name == "bwd_dkv":
            what += "; " + GROUPED_KEYS
        grid = "(query blocks, B*H)" if outer == "q" else "(key blocks, B*H/GQ)" if name == "bwd_dkv" else "(key blocks, B*H)"
        kernels.append(SoftmaxKernel(
            name=name, role=role, loads=tuple(leaf_decl(sched, x) for x in read),
            stores=tuple(spec.outputs) if base_kernel(name) == "fwd" else (),
            grid=({"q": "(query tokens / (BM / G), B*H/G)", "k": "(key blocks, B*H/G)"}[outer]
                  if name.endswith("_rows") else grid), args=args,
            stages=stages, what=what, outer=outer, walk=role != "bwd_pre", query_loads=q, key_loads=k))
    if sched.select is None and spec.keyseq is None:  # decoding with a select stage or a key sequence of its own
        # is not lowered (runtime.softmax_decode says so)
        kernels += _decode_kernels(sched, leaf_dims)
    return SoftmaxPlan(spec, tuple(kernels), sched, bwd, prefix_backward)


@dataclass(frozen=True)
class HybridSchedule:
    """A state and a softmax branch (passes.hybrid): each with its own schedule."""

    split: HybridSplit
    softmax: SoftmaxSchedule
    linear: object  # passes.legality.Legality

    def __str__(self) -> str:
        return "\n".join([str(self.split), "softmax branch:", str(self.softmax), "state branch:", str(self.linear)])


@dataclass(frozen=True)
class HybridPlan:
    softmax: SoftmaxPlan
    linear: object  # passes.plan.Plan

    @property
    def kernels(self):
        return tuple(self.softmax.kernels) + tuple(self.linear.kernels)

    def kernel(self, name: str):
        return self.softmax.kernel(name)

    def __str__(self) -> str:
        return "\n".join(["softmax branch:", str(self.softmax), "state branch:", str(self.linear)])
