"""Context parallel for the softmax family (and the softmax branch of a hybrid): all-gather of the keys.

Each rank holds a contiguous shard [s, e) of the time axis. Its queries need the keys (and values, and
every other input read per key block or by the prefix stage) of the tokens before them: one all-gather
(Llama 3 / LASP-2 style) of those inputs, each rank's shard flattened per token into one tensor, gives
every rank the whole sequence. The rank then runs the op itself on the sequence cut at the last key its
masks can reach (its shard's end for a causal mask: the keys after the shard are never read), with the
op's `queries=(s, e)` knob: only its own query rows are computed, at their absolute positions, so masks
and position modifiers (causal, sliding window, alibi) and prefix values (a cumsum over the sequence)
are those of the single-process op. Inputs read only per query block are zero-padded, not gathered.

The all-gather is autograd-aware: its backward sums every rank's gradient of a shard's keys onto the
rank that holds it (a reduce-scatter; an all-to-all on gloo), so dK and dV come back where K and V live.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch
import torch.distributed as dist

from ..errors import ArgumentError
from ..passes.blocksparse import POS
from ..runtime.checks import check_cu_seqlens, check_inputs
from .collectives import anchor, gather_stacked
from .layout import check_layout, rank_pieces, shard_lengths, virtual_ids


@dataclass(frozen=True)
class SoftmaxCPPlan:
    """What a call communicates: one all-gather of each rank's key-side inputs."""

    spec: str
    world: int
    gathered: tuple[str, ...]  # inputs all-gathered (read per key block or by the prefix stage)
    padded: tuple[str, ...]  # inputs read per query block only: never sent
    key_reach: str  # how far past a shard's last query its keys reach
    bytes_per_rank: int  # this rank's shard of the gathered inputs, sent once

    def __str__(self) -> str:
        return "\n".join([
            f"context parallel plan: {self.spec} over {self.world} ranks, one all-gather of the key-side inputs",
            f"  gathered: {', '.join(self.gathered)}; not sent (query side only): {', '.join(self.padded) or '-'}",
            f"  keys read by a shard: {self.key_reach}",
            f"  communicated per rank per call: {self.bytes_per_rank} bytes "
            f"(each rank receives every other rank's shard)"])


def _key_shift(op):
    """c in 'a query at position i reads keys j <= i + c' from the masks' key range (a sympy expr in the
    params and the head), or None when the masks bound no key from above (every key is read)."""
    hi = op.sched.sparsity.keys.hi
    if hi == POS:
        return None
    shift = sympy.simplify(hi - sympy.Symbol("i1", integer=True))
    if any(s.name in ("i0", "i1") for s in shift.free_symbols):
        return None  # not a fixed reach: read every key
    return shift


class SoftmaxContextParallel:
    """`op` (a SoftmaxOp) over the sequence shards of `group`; call it as the op."""

    def __init__(self, op, group=None, layout: str = "contiguous"):
        self.op, self.group, self.layout = op, group, check_layout(layout)
        self.spec = op.spec
        self.shift = _key_shift(op)
        keys = set(op.comp.plan.kernel("fwd").key_loads)
        prefix_reads = {a for p in self.spec.prefix.ops for a in p.args if isinstance(a, str)}
        prefix_outs = {p.out for p in self.spec.prefix.ops}
        if keys & prefix_outs:  # a prefix value read per key: the inputs it is computed from
            keys |= prefix_reads
        # the prefix stage runs over the whole sequence: whatever it reads is needed at every token
        self.gathered = tuple(d.name for d in self.spec.inputs if d.name in keys or d.name in prefix_reads)
        self.padded = tuple(d.name for d in self.spec.inputs if d.name not in self.gathered)

    def __repr__(self) -> str:
        return f"<effc context parallel {self.op.name}>"

    # -- how far the keys reach ---------------------------------------------------------------------------
    def _key_end(self, end: int, total: int, H: int, dims: dict, params: dict) -> int:
        """One past the last key the queries before `end` can read (>= end: the queries' rows are rows of
        the same cut sequence)."""
        if self.shift is None:
            return total
        pvals = self.op.param_values(dims, params)
        subs = {sympy.Symbol(f"p_{k}", real=True): v for k, v in pvals.items()}
        shifts = [self.shift.subs(subs).subs(sympy.Symbol("head", integer=True, nonnegative=True), h)
                  for h in range(H)]
        if any(x.free_symbols for x in shifts):  # a bound we cannot evaluate here: read every key
            return total
        reach = max(float(x) for x in shifts)
        return min(total, max(end, end + math.floor(reach)))

    def _reach_text(self) -> str:
        if self.shift is None:
            return "every key (the masks bound no key from above)"
        return f"up to the shard's end {'+ ' + str(self.shift) if self.shift != 0 else ''}(keys after it: never)"

    # -- the plan -----------------------------------------------------------------------------------------
    def plan(self, *tensors) -> SoftmaxCPPlan:
        """The communication of a call with these (local shard) inputs; `print` it."""
        check_inputs(self.spec, tuple(tensors), for_kernels=False)
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        named = {d.name: x for d, x in zip(self.spec.inputs, tensors)}
        nbytes = sum(named[x].numel() * named[x].element_size() for x in self.gathered)
        return SoftmaxCPPlan(self.op.name, world, self.gathered, self.padded, self._reach_text(), nbytes)

    # -- the call -----------------------------------------------------------------------------------------
    def __call__(self, *tensors, cu_seqlens=None, initial_state=None, output_final_state: bool = False, **kw):
        """The op's outputs for this rank's shard (B, T_r, H, D) of inputs sharded along T in rank order;
        `(o, None)` as the op returns. With `cu_seqlens`: the global boundaries of one packed (1, total_T)
        stream; documents may cross ranks. With layout="zigzag" the shard is two pieces: one op call each,
        over the sequence cut where that piece's keys stop."""
        if "queries" in kw:
            raise ArgumentError("queries: context parallel sets the query rows itself (this rank's shard)")
        full, pieces, ends = self.gather(tensors, cu_seqlens, kw)
        rows = []
        for (start, end), k_end in zip(pieces, ends):
            cu = None if cu_seqlens is None else cu_seqlens.clamp(max=k_end)
            outs, _ = self.op(*[x[:, :k_end] for x in full.inputs], cu_seqlens=cu, queries=(start, end),
                              initial_state=initial_state, output_final_state=output_final_state, **kw)
            rows.append((outs,) if torch.is_tensor(outs) else tuple(outs))
        one = len(rows[0]) == 1
        outs = [torch.cat([r[i][:, s:e] for r, (s, e) in zip(rows, pieces)], 1) for i in range(len(rows[0]))]
        outs[0] = anchor(outs[0], full.anchor)  # every rank joins the gather's backward (a collective)
        return (outs[0] if one else tuple(outs)), None

    def gather(self, tensors, cu_seqlens, kw):
        """The whole sequence as this rank's calls read it: (GatheredInputs over [0, max key end), this shard's
        pieces [start, end) in it, and per piece one past the last key its queries read)."""
        if not dist.is_initialized():
            raise RuntimeError("context parallel needs torch.distributed initialised (init_process_group)")
        B, T_r, H, dims = check_inputs(self.spec, tuple(tensors), for_kernels=False)
        if cu_seqlens is not None and B != 1:
            raise ArgumentError(f"with cu_seqlens the shards are packed as (1, T_r, H, D); got B={B}")
        x0 = tensors[0]
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        lengths = shard_lengths(x0, self.group)
        placed = rank_pieces(self.layout, lengths)  # every rank's pieces (checks a zigzag cut)
        total = sum(lengths)
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, 1, total, x0.device)  # the global boundaries of the whole stream
        params = {k: v for k, v in kw.items() if k in {p.name for p in self.spec.params}}
        mine = placed[rank]
        ends = [self._key_end(e, total, H, dims, params) for _, e in mine]
        full = gather_inputs(self.spec, tensors, self.gathered, placed, rank, max(ends), self.group)
        return full, mine, ends


@dataclass
class GatheredInputs:
    inputs: list  # every input over tokens [0, k_end): gathered, or this shard zero-padded
    anchor: torch.Tensor  # the all-gather's result, for tying an output to its backward


def gather_inputs(spec, tensors, gathered, placed, rank, k_end, group) -> GatheredInputs:
    """Every input over [0, k_end): those in `gathered` from every rank (one all-gather of the per-token
    flattened shards, padded to the longest shard, put back in sequence order from every rank's pieces
    `placed`), the others this shard's pieces zero-padded."""
    B = tensors[0].shape[0]
    names = [d.name for d in spec.inputs]
    pick = [i for i, n in enumerate(names) if n in gathered]
    dtype = tensors[pick[0]].dtype
    for i in pick[1:]:  # one tensor for the gather, wide enough for each input (cast back after)
        dtype = torch.promote_types(dtype, tensors[i].dtype)
    widths = [math.prod(tensors[i].shape[2:]) for i in pick]
    lengths = [sum(e - s for s, e in ps) for ps in placed]
    longest = max(lengths)
    flat = torch.cat([tensors[i].to(dtype).reshape(B, tensors[i].shape[1], w) for i, w in zip(pick, widths)], -1)
    flat = torch.nn.functional.pad(flat, (0, 0, 0, longest - flat.shape[1]))
    stacked = gather_stacked(flat, group)  # (world, B, longest, sum of widths)
    seq = torch.cat(_in_order(placed, lambda r, off, n: stacked[r, :, off:off + n]), 1)[:, :k_end]
    out, offset = list(tensors), 0
    for i, w in zip(pick, widths):
        x = tensors[i]
        out[i] = seq[..., offset:offset + w].reshape((B, k_end) + x.shape[2:]).to(x.dtype)
        offset += w
    for i, n in enumerate(names):
        if n not in gathered:  # query side only: its rows outside this rank's pieces are never read
            x = tensors[i]
            pieces = _in_order(placed, lambda r, off, m, x=x: x[:, off:off + m] if r == rank
                               else x.new_zeros((B, m) + x.shape[2:]))
            out[i] = torch.cat(pieces, 1)[:, :k_end]
    return GatheredInputs(out, stacked)


def _in_order(placed, take) -> list:
    """`take(rank, offset in its shard, length)` for every piece of every rank, in sequence order."""
    spots = []
    for r, ps in enumerate(placed):
        off = 0
        for s, e in ps:
            spots.append((s, r, off, e - s))
            off += e - s
    return [take(r, off, n) for _, r, off, n in sorted(spots)]
