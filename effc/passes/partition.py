"""Partitioning the backward's gradient kernels: per split block, looping over the blocks, or cut at the loop.

passes.fusion gives each input gradient a kernel (`bwd_chunks_<x>`) that recomputes what its gradient
needs of the chunk. Over the split dim (V) such a kernel can run three ways (passes.block_loop):

- **block**: one program per (V block, chunk); the K-side values are computed in every block's program
  and each gradient without V is an fp32 partial per block, summed after the kernels.
- **loop**: one program per chunk (where the model expects it faster than per block): the K-side values once, a loop over V's blocks accumulating the sums
  over V, then the K-side adjoints after the loop, while the loop's carried tiles are still live.
- **cut**: the loop's kernel stops at the sums: one kernel (`bwd_sums`) computes every cut kernel's
  sums over V at once and writes them through memory (in the matmul operand dtype, per token), and each
  gradient's `bwd_chunks_<x>_after` kernel reads them and finishes the K-side adjoints with nothing else
  live. Sums that several gradients read (the delta rule's `dw`, `dv_new`) are computed once, not per kernel.
- **cut_each**: as cut, but each cut kernel's sums in a kernel of its own (`bwd_sums_<x>`, before its
  after part), holding only the tiles those sums need; a sum an earlier one stored is read, not recomputed.
- **cut_common**: as cut, and what several after parts compute with matmul work (the delta rule's adjoint of
  its in-chunk inverse, `t^T dA t^T`, in each of k's, g's and beta's) is computed once, by a `bwd_common` kernel
  between the sums and the after parts that writes it per token; each after part reads it back.

Each schedule is a partition of the gradient kernels; the plan keeps every partition that differs
(`Plan.partitions`), the generated module holds all their kernels, and the call picks one (the knob
`partition=`, which `effc tune` searches). The default is the one passes.kernel_cost estimates fastest
at a typical shape (C from the spec, feature dims 128 in blocks of 64, 2x8192 tokens, 16 heads), or, among
those estimated within the model's error of it, the one launching the fewest kernels (`_default`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from ..ir import ops as O
from ..ir.nodes import C, Op, Spec, TileType, dim, names_read
from .block_loop import BlockLoop, loop_over_blocks
from .fusion import Fused, FusedKernel, needed, topological
from .kernel_cost import FEATURE, RELATIVE_ERROR, SPLIT_BLOCK, Cost, kernel_cost, size, typical_sizes
from .transpose_sink import sink_transposes

PARTITIONS = ("block", "loop", "cut", "cut_each", "cut_common")
REFINES = {"cut_common": "cut"}  # the partitions that are another with its kernels' repeated work done once
# the shape the default partition is chosen at (the bench's standard 2x8192, H=16, D=128)
TOKENS, HEADS = 2 * 8192, 16


@dataclass(frozen=True)
class PartitionChoice:
    name: str
    kernels: tuple[str, ...]  # the gradient kernels it launches, in order
    costs: tuple[tuple[str, Cost], ...]  # per kernel, the model's estimate
    refines: str | None = None  # the partition it is, but for work repeated by its kernels done once

    @property
    def us(self) -> float:
        return sum(c.us for _, c in self.costs)

    def __str__(self) -> str:
        return f"{self.name} ~{self.us:.0f} us: " + "; ".join(f"{k} {c}" for k, c in self.costs)


def _has(t: TileType, d: str) -> bool:
    return any(str(x) == d for x in t.shape)


def _stored_form(name: str, t: TileType) -> tuple[str, TileType, Op | None, Op | None] | None:
    """How a sum crosses kernels as a per-token tile (rows = the chunk's tokens): itself if its first axis is
    C, its transpose if its second is, a scalar or a vector without C at the chunk's last token (`unlast`,
    read back by `last`: gated_delta_net's dg reads the total of dS' * S, gla's dg a [K] column sum); (scratch
    name, scratch type, op making it, op reading it back). A tile with a literal axis (mesanet's [C, 1]
    columns) has no per-token layout: None."""
    if any(str(d).isdigit() for d in t.shape):
        return None
    if t.shape and str(t.shape[0]) == str(C):
        return name, t, None, None
    if t.rank <= 1:
        s, st = f"{name}_st", TileType((C,) + tuple(t.shape))
        return s, st, Op(s, "unlast", (name,), st), Op(name, "last", (s,), t)
    if t.rank == 2 and str(t.shape[1]) == str(C):
        s, st = f"{name}_st", TileType((t.shape[1], t.shape[0]))
        return s, st, Op(s, "transpose", (name,), st), Op(name, "transpose", (s,), t)
    return None


@dataclass(frozen=True)
class _Cut:
    kernel: FusedKernel
    loop: BlockLoop
    stored: tuple[str, ...]  # sums the after-part reads (or gradients that are sums)


def _cut(k: FusedKernel, loop: BlockLoop | None, types: dict, split: str) -> _Cut | None:
    """The kernel's loop part and after part, if the after part reads a sum and every sum it reads can cross
    kernels as a per-token tile."""
    if loop is None:
        return None
    after_reads = {a for op in loop.after for a in op.args if isinstance(a, str)} | {g for _, g in k.grads}
    stored = tuple(s for s in loop.sums if s in after_reads)
    if not stored or any(_stored_form(s, types[s]) is None for s in stored):
        return None
    return _Cut(k, loop, stored)


def _worth_cutting(cuts: list[_Cut], us) -> list[_Cut]:
    """The kernels a cut partition cuts: each whose after part does matmul work, then each other one where the
    model (`us`: a list of cuts -> the partition's estimate) expects cutting it too to be faster: mlstm_sig's
    gate gradients do only elementwise work after the loop, but their loop kernels hold ~350 live values a
    thread."""
    chosen = [c for c in cuts if any(op.kind == "matmul" for op in c.loop.after)]
    for c in cuts:
        if c not in chosen:
            more = [x for x in cuts if x in chosen or x is c]
            if us(more) < us(chosen):  # no chosen kernels: the loop partition
                chosen = more
    return chosen


def partition_gradients(spec: Spec, fused: Fused, backward, split: str | None, hoisted_types: dict) -> Fused:
    """Fused kernels -> the same with every partition of the gradient kernels that differs from the others;
    each gradient kernel lists the partitions that launch it, and `Fused.partitions` the model's costs."""
    grads = [k for k in fused.kernels if k.name.startswith("bwd_chunks_")]
    if not grads or backward is None or split is None:
        return fused
    others = [k for k in fused.kernels if k not in grads]
    types = {**backward.types(spec), **hoisted_types}
    sunk = [replace(k, ops=sink_transposes(k.ops, types)) for k in grads]
    alltypes = {**types, **{op.out: op.type for k in sunk for op in k.ops}}
    loops = {k.name: loop_over_blocks(k.ops, alltypes, split) for k in sunk}
    per_block = [replace(k, loop=False) for k in sunk]
    looped = [replace(k, name=f"{k.name}_loop", loop=True) if loops[k.name] else b for k, b in zip(sunk, per_block)]
    cost = lambda k: _costs(spec, [k], alltypes, split, hoisted_types)[0][1].us
    variants: dict[str, list[FusedKernel]] = {
        "block": per_block,
        # each kernel loops where the model expects it to be faster than one program per block
        "loop": [min((b, l), key=cost) for b, l in zip(per_block, looped)]}
    cuts = [c for k in sunk if (c := _cut(k, loops[k.name], alltypes, split))]
    for name, shared in (("cut", True), ("cut_each", False)):
        made = lambda chosen: _cut_kernels(sunk, chosen, variants["loop"], alltypes, split, shared=shared)
        chosen = _worth_cutting(cuts, lambda chosen: sum(c.us for _, c in _costs(spec, made(chosen), alltypes,
                                                                                 split, hoisted_types)))
        if chosen and (shared or len(chosen) > 1):  # with one cut kernel, its own sums kernel is the shared one
            variants[name] = made(chosen)
    if "cut" in variants and (common := _with_common(variants["cut"], alltypes)):
        variants["cut_common"] = common
    costs = {name: _costs(spec, ks, alltypes, split, hoisted_types) for name, ks in variants.items()}
    # keep each distinct partition once (a spec whose kernels cannot loop has one)
    choices, seen = [], set()
    for name in PARTITIONS:
        if name in variants and (key := tuple(k.name for k in variants[name])) not in seen:
            seen.add(key)
            choices.append(PartitionChoice(name, key, costs[name], REFINES.get(name)))
    best = _default(choices)
    kernels, names = list(others), set()
    for choice in choices:
        for k in variants[choice.name]:
            if k.name not in names:
                names.add(k.name)
                kernels.append(k)
    kernels = [replace(k, partitions=tuple(c.name for c in choices if k.name in c.kernels)) if k.name in names else k
               for k in kernels]
    return replace(fused, kernels=tuple(kernels), partitions=tuple(choices), partition=best.name)


def _sums_kernel(name: str, cuts: list[_Cut], forms: dict, done: set, types: dict, split: str) -> FusedKernel | None:
    """A kernel computing the loop parts of `cuts`: the sums their after parts read that no earlier sums kernel
    stored (`done`, updated), written per token, and their gradients with the split dim."""
    by_name = {op.out: op for c in cuts for op in c.kernel.ops}
    stored = list(dict.fromkeys(s for c in cuts for s in c.stored if s not in done))
    for s in stored:
        if (make := forms[s][2]) is not None:
            by_name[make.out] = make
    done.update(stored)
    v_grads = tuple((x, g) for c in cuts for x, g in c.kernel.grads if _has(types[g], split))
    scratch = tuple((forms[s][0], forms[s][1]) for s in stored)
    roots = tuple(name for name, _ in scratch) + tuple(g for _, g in v_grads)
    if not roots:
        return None
    return FusedKernel(name, ("inter", "merge", "intra"), topological(by_name, roots), roots, v_grads, loop=True,
                       scratch_stores=scratch)


def _after_kernel(k: FusedKernel, c: _Cut, forms: dict, types: dict, split: str) -> FusedKernel | None:
    """Kernel `k`'s part after its loop: its gradients without the split dim, from the stored sums."""
    mine = [(x, g) for x, g in k.grads if not _has(types[g], split)]
    if not mine:
        return None
    made_here = {op.out: op for op in k.ops if op.out not in c.stored}
    reads = {}
    for s in c.stored:
        name, t, _, back = forms[s]
        reads[name] = t
        if back is not None:
            made_here[s] = back
    groots = tuple(g for _, g in mine)
    ops = needed(topological(made_here, groots), groots)
    used = {a for op in ops for a in op.args if isinstance(a, str)} | set(groots)
    return FusedKernel(f"{k.name}_after", k.stages, ops, groots, tuple(mine), loop=True,
                       scratch_loads=tuple((n, t) for n, t in reads.items() if n in used))


def _common_values(afters: list[FusedKernel]) -> tuple[dict[str, Op], tuple[str, ...]]:
    """The values two or more after parts compute with heavy work among the ops making them, at the frontier
    where an op computed once reads them (or an after part's gradient is one): (ops by name, frontier). A
    frontier value that is a cheap op of other frontier values and of cheap ones is recomputed from them where
    read, not written too (the delta rule's `-strict(...) * d` beside `-strict(...)`)."""
    made: dict[str, Op] = {}
    count: Counter = Counter()
    for k in afters:
        for op in k.ops:
            made.setdefault(op.out, op)
            count[op.out] += 1
    heavy: dict[str, bool] = {}

    def is_heavy(n: str) -> bool:
        if n not in heavy:
            op = made[n]
            heavy[n] = op.kind in O.HEAVY or any(is_heavy(a) for a in op.args if isinstance(a, str) and a in made)
        return heavy[n]

    common = {n for n in made if count[n] > 1 and is_heavy(n)}
    read_outside = {a for k in afters for op in k.ops if op.out not in common for a in op.args} | {
        g for k in afters for g in k.roots}
    frontier = [n for n in made if n in common and n in read_outside]
    for n in list(frontier):
        op = made[n]
        if op.kind not in O.HEAVY and all(a in frontier or a not in common for a in op.args if isinstance(a, str)):
            frontier.remove(n)
    return made, tuple(frontier)


def _with_common(cut: list[FusedKernel], types: dict) -> list[FusedKernel] | None:
    """The cut partition with the after parts' common values (`_common_values`) computed once, in a
    `bwd_common` kernel after the sums, and read back by the after parts; None where they share none, or one
    cannot cross kernels as a per-token tile."""
    afters = [k for k in cut if k.name.endswith("_after")]
    made, frontier = _common_values(afters)
    forms = {n: _stored_form(n, types[n]) for n in frontier}
    if not frontier or any(f is None for f in forms.values()):
        return None
    ops = topological(made, frontier)
    read = names_read(ops) - {op.out for op in ops}
    loads = {n: t for k in afters for n, t in k.scratch_loads if n in read}
    for n in frontier:
        if (make := forms[n][2]) is not None:
            made[make.out] = make
    stores = tuple((forms[n][0], forms[n][1]) for n in frontier)
    common = FusedKernel("bwd_common", afters[0].stages, topological(made, [s for s, _ in stores]),
                         tuple(s for s, _ in stores), loop=True, scratch_stores=stores,
                         scratch_loads=tuple(loads.items()))
    out = []
    for k in cut:
        if k in afters:
            mine = {op.out: op for op in k.ops if op.out not in frontier}
            for n in frontier:
                if (back := forms[n][3]) is not None:
                    mine[n] = back
            kops = needed(topological(mine, k.roots), k.roots)
            if kops != k.ops:  # a kernel of its own: the cut partition launches the one computing it all
                used = names_read(kops) | set(k.roots)
                k = replace(k, name=f"{k.name}_common", ops=kops,
                            scratch_loads=tuple((n, t) for n, t in k.scratch_loads + stores if n in used))
        out.append(k)
        if k.name == "bwd_sums":
            out.append(common)
    return out


def _default(choices: list[PartitionChoice]) -> PartitionChoice:
    """The model's fastest partition, unless another is estimated within the model's error of it
    (kernel_cost.RELATIVE_ERROR) and launches fewer kernels: then the fewest kernels (the fewest launches
    and the least scratch through memory; gated_delta_net_l2's cut was estimated 4% faster than its loop
    and ran 16% slower). Then a partition refining that one (`refines`: the same kernels, but for what
    several of them repeated, done once by one more) is taken where estimated faster: the model's error
    is in how kernels of different shapes run, and the two differ only by the work moved (H100, 2x8192,
    cut -> cut_common: gated_delta_net 3.71 -> 3.52 ms, mlstm_sig 3.95 -> 3.50, delta_net 2.74 -> 2.68,
    each estimated 4-9% faster; rwkv7's is estimated slower and is not taken)."""
    fastest = min(c.us for c in choices)
    close = [c for c in choices if c.us <= fastest * (1 + RELATIVE_ERROR)]
    best = min(close, key=lambda c: (len(c.kernels), c.us))
    while finer := [c for c in choices if c.refines == best.name and c.us < best.us]:
        best = min(finer, key=lambda c: c.us)
    return best


def _cut_kernels(sunk, cuts: list[_Cut], loop_variant, types: dict, split: str, shared: bool) -> list[FusedKernel]:
    """A cut partition: the cut kernels' loop parts compute their sums over the split dim and write them, then
    per cut kernel its after part; the others as in `loop`. `shared`: one `bwd_sums` kernel for every cut
    kernel's loop part (a sum that several read is computed once); else one `bwd_sums_<x>` before each cut
    kernel's after part, holding only what that part reads (fewer live tiles: gated_delta_net_l2's shared
    `bwd_sums` spilled 3.8 KB a thread), a sum an earlier one stored being read back, not recomputed."""
    forms = {s: _stored_form(s, types[s]) for c in cuts for s in c.stored}
    cut_of = {c.kernel.name: c for c in cuts}
    out, done, placed = [], set(), False
    for k, looped in zip(sunk, loop_variant):
        c = cut_of.get(k.name)
        if c is None:
            out.append(looped)
            continue
        if not (shared and placed):
            name = "bwd_sums" if shared else f"bwd_sums_{k.name[len('bwd_chunks_'):]}"
            sums = _sums_kernel(name, cuts if shared else [c], forms, done, types, split)
            out += [sums] if sums else []
            placed = True
        after = _after_kernel(k, c, forms, types, split)
        out += [after] if after else []
    return out


def _costs(spec: Spec, kernels, types: dict, split: str, hoisted_types: dict) -> tuple[tuple[str, Cost], ...]:
    sizes = typical_sizes(spec, split)
    full = {**sizes, dim(split): FEATURE}
    n_blocks = FEATURE // SPLIT_BLOCK
    chunks = TOKENS // spec.chunk * HEADS
    inputs = {d.name: d for d in spec.inputs}
    out = []
    for k in kernels:
        types = {**types, **dict(k.scratch_loads), **{op.out: op.type for op in k.ops}}
        loaded, stored = {}, {}
        leaves = names_read(k.ops) - {op.out for op in k.ops}
        for a in leaves:
            t = types.get(a)
            if t is None:
                continue
            whole = size(t, full if k.loop else sizes)
            fp32 = a in dict(k.scratch_loads) or a in {s.name for s in spec.states} or "seed__next" in a
            loaded[a] = whole * (4 if fp32 else 2)
        for name, t in k.scratch_stores:
            stored[name] = size(t, full) * 4
        for x, g in k.grads:
            stored[x] = size(types[g], full if k.loop else sizes) * (2 if k.loop else 4)
        repeat = {}
        if k.loop:
            loop = loop_over_blocks(k.ops, types, split)
            repeat = {op.out: n_blocks for op in loop.body} if loop else {}
        programs = chunks * (1 if k.loop else n_blocks)
        out.append((k.name, kernel_cost(programs, k.ops, k.roots, types, sizes, loaded, stored, repeat)))
    return tuple(out)
