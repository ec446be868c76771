"""Context parallel for the linear family: one sequence sharded over the ranks of a process group
(effc.distributed.wrap.context_parallel picks this path, the softmax one or the hybrid one).

Each rank holds a contiguous shard of the time axis. Over its shard, every state's update is affine in
the state entering it, S_out = A_r(S_in) + W_r (effc.distributed.affine says which form, from the
spec). A rank r > 0 summarises its shard by running the op itself on probe initial states batched
together (zero gives W_r; ones, or identity columns for a matrix map, give A_r), one all-gather
exchanges the summaries (rank 0 sends its true final state instead: it alone reads `initial_state`),
every rank folds the earlier ranks' summaries into its entering state, and runs its local op from
there. The all-gather is autograd-aware, so the backward is the op's own backward through the same
graph: gradients reach every input and the initial state exactly as in the single-process op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ArgumentError
from ..runtime.checks import check_cu_seqlens, check_inputs
from .affine import StateMap, output_form, output_states, state_maps
from .collectives import anchor, gather_stacked, start_gather
from .layout import check_layout, rank_pieces, shard, shard_lengths, split_pieces, virtual_ids
from .ring import ring_pass
from .varlen import shard_layout

__all__ = ["SCHEDULES", "ContextParallelOp", "ContextParallelPlan", "check_schedule", "shard"]  # shard: from .layout

# how the states cross the ranks: one all-gather of shard summaries, or a ring pass of the states themselves
SCHEDULES = ("allgather", "ring")


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ArgumentError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    return schedule


@dataclass(frozen=True)
class ContextParallelPlan:
    """What a call communicates: one all-gather of `bytes_per_rank` from each rank, or (schedule="ring") one
    message of `bytes_per_rank` from rank r to r+1 in the forward and the same back in the backward."""

    spec: str
    world: int
    maps: tuple[StateMap, ...]
    probes: int
    summary_shapes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # per state: (W shape, A shape)
    bytes_per_rank: int
    schedule: str = "allgather"
    overlap: str = ""  # what runs while the all-gather is in flight on a dense call, or why nothing does

    def __str__(self) -> str:
        if self.schedule == "ring":
            lines = [f"context parallel plan: {self.spec} over {self.world} ranks, ring pass of the states"]
            for m, (w, _) in zip(self.maps, self.summary_shapes):
                lines.append(f"  state {m.state}: sends the state {list(w)} itself (no summary, no probe run)")
            lines.append(f"  communicated per rank per call: {self.bytes_per_rank} bytes to the next rank (forward; "
                         f"rank {self.world - 1} sends none) and as many back to the previous one (backward; "
                         f"rank 0 sends none); {self.world - 1} serial hop(s), each after a rank's whole walk")
            return "\n".join(lines)
        lines = [f"context parallel plan: {self.spec} over {self.world} ranks, one all-gather"]
        for m, (w, a) in zip(self.maps, self.summary_shapes):
            lines.append(f"  state {m.state}: {m.kind} ({m.why}); sends W {list(w)} and A {list(a)}")
        who = "every piece but the first" if self.overlap.startswith("on") else "ranks 1..N-2"
        lines.append(f"  summary runs: the op once on {self.probes + 1} batched initial states ({who})")
        lines.append(f"  communicated per rank per call: {self.bytes_per_rank} bytes "
                     f"({self.bytes_per_rank * self.world} gathered by each rank)")
        if self.overlap:
            lines.append(f"  overlap: {self.overlap}")
        return "\n".join(lines)


def _states(x) -> list[torch.Tensor]:
    """The op's state argument or result (a tensor, or a tuple with one per state) as a list."""
    return [x] if torch.is_tensor(x) else list(x)


def _cat_time(pieces):
    """Outputs (a tensor or a tuple of them per piece) joined along the time axis."""
    if torch.is_tensor(pieces[0]):
        return torch.cat(pieces, 1)
    return tuple(torch.cat(group, 1) for group in zip(*pieces))


class ContextParallelOp:
    """`op` over the sequence shards of `group`; call it as the op (see context_parallel)."""

    def __init__(self, op, group=None, layout: str = "contiguous", schedule: str = "allgather",
                 overlap: bool = True):
        family = op.comp.ir.family
        if family != "linear":
            raise ArgumentError(f"ContextParallelOp is the linear family's path; {op.name} is of the {family} "
                                "family: use effc.distributed.context_parallel")
        self.op, self.group, self.layout = op, group, check_layout(layout)
        self.schedule = check_schedule(schedule)
        self.spec = op.spec
        if self.schedule == "ring" and (layout != "contiguous" or op.spec.reverse_states):
            what = f"layout={layout!r}" if layout != "contiguous" else "reverse states (" + ", ".join(
                s.name for s in op.spec.reverse_states) + ")"
            raise NotImplementedError(f"context parallel for {op.name}: schedule='ring' with {what}; the ring passes "
                                      "forward states over contiguous shards (use schedule='allgather')")
        try:
            self.maps = state_maps(op.spec, op.comp.legality)
        except NotImplementedError as why:
            if self.schedule != "ring" or not op.spec.states:
                raise
            # the ring passes the states themselves: any update, affine in the state or not (mlstm)
            self.maps = tuple(StateMap(s.name, "passed", s.feature_dims, (), f"not summarised ({why})")
                              for s in op.spec.states)
        self.reads_pos = op.spec.reads("pos")  # each call then gets its piece's first position (pos_offset)
        # overlap (dense all-gather calls): every piece but the first runs from a zero state with probe columns,
        # giving o(0), u (o = o(0) + u @ S_in), W and A; the last piece's run needs nothing from the collective
        # and runs while it is in flight, and no piece runs a second time after it (docs/context-parallel.md)
        if self.schedule != "allgather":
            self.no_overlap = f"schedule={self.schedule!r}"
        elif not overlap:
            self.no_overlap = "turned off (overlap=False)"
        else:
            self.no_overlap = output_form(op.spec, self.maps)
        self._read_state = output_states(op.spec)[0] if self.no_overlap is None else None
        self.schedule_taken: tuple[str, ...] = ()  # the last dense call's steps in order, for tests and logs

    def __repr__(self) -> str:
        return f"<effc context parallel {self.op.name}>"

    # -- shapes ------------------------------------------------------------------------------------
    def _sizes(self, tensors) -> tuple[int, int, dict[str, int]]:
        B, _, H, sizes = check_inputs(self.spec, tuple(tensors), for_kernels=False)
        return B, H, sizes

    def plan(self, *tensors) -> ContextParallelPlan:
        """The communication of a call with these (local shard) inputs; `print` it."""
        B, H, sizes = self._sizes(tensors)
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        shapes = tuple(((B, H) + tuple(sizes[d] for d in m.dims), (B, H) + m.summary_shape(sizes))
                       for m in self.maps)
        itemsize = torch.empty((), dtype=self._state_dtype(tensors[0])).element_size()
        if self.schedule == "ring":  # one state per hop, no summary
            nbytes = sum(math.prod(w) for w, _ in shapes) * itemsize
            return ContextParallelPlan(self.op.name, world, self.maps, 0, shapes, nbytes, "ring")
        pieces = 2 if self.layout == "zigzag" else 1  # a summary per piece
        nbytes = pieces * sum(math.prod(w) + math.prod(a) for w, a in shapes) * itemsize
        if self.spec.reverse_states:  # and the initial states (zeros but on rank 0)
            nbytes += sum(math.prod(w) for w, _ in shapes) * itemsize
        probes = max(m.probes(sizes) for m in self.maps)
        dtype = tensors[0].dtype
        why = self._why_not_overlapped(dtype)
        if why is None:
            probes = self._column_probes(sizes)
            text = (f"on (dense shards): the last piece runs from a zero state while the all-gather is in flight; "
                    f"every piece but the first runs once, on {probes + 1} batched initial states, giving W, A, o(0) "
                    f"and u; after the fold o = o(0) + u @ S_in (no second walk)")
        else:
            text = f"off ({why}): the local run waits for the all-gather and the fold"
        return ContextParallelPlan(self.op.name, world, self.maps, probes, shapes, nbytes, overlap=text)

    def _why_not_overlapped(self, dtype) -> str | None:
        """None when a dense all-gather call overlaps (see __init__); else why not."""
        if self.no_overlap is not None:
            return self.no_overlap
        if dtype not in (torch.float32, torch.float64):
            # u is a difference of two outputs: in half precision it would lose the intra-chunk part's digits
            return f"{dtype} outputs: u = o(probe) - o(0) needs fp32 or fp64"
        return None

    def _column_probes(self, sizes) -> int:
        """Probes of identity columns that give both A and u: ceil(R / rest) for every state."""
        return max(-(-m.split(sizes)[0] // m.split(sizes)[1]) for m in self.maps)

    @staticmethod
    def _state_dtype(x) -> torch.dtype:
        return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype

    # -- the summary of this rank's shard -------------------------------------------------------------
    def _probe_states(self, B, H, sizes, n, dtype, device, columns: bool = False) -> list[torch.Tensor]:
        """Per state, (1 + n) * B initial states: zeros, then the probes A is read from (identity columns for
        every map with `columns`, as for a matrix map)."""
        out = []
        for m in self.maps:
            shape = (B, H) + tuple(sizes[d] for d in m.dims)
            blocks = [torch.zeros(shape, dtype=dtype, device=device)]
            rows, rest = m.split(sizes)
            for j in range(n):
                p = torch.zeros((B, H, rows, rest), dtype=dtype, device=device)
                if m.kind == "diagonal" and j == 0 and not columns:
                    p.fill_(1.0)
                elif m.kind == "matrix" or columns:  # columns c of probe j are the basis vectors e_{j*rest + c}
                    for c in range(rest):
                        if j * rest + c < rows:
                            p[:, :, j * rest + c, c] = 1.0
                blocks.append(p.reshape(shape))
            out.append(torch.cat(blocks, 0))
        return out

    def _summary(self, tensors, kw, B, H, sizes) -> list[torch.Tensor]:
        """[W, A] per state for this shard (differentiable in the inputs), each flattened per (B, H)."""
        n = max(m.probes(sizes) for m in self.maps)
        dtype = self._state_dtype(tensors[0])
        init = self._probe_states(B, H, sizes, n, dtype, tensors[0].device)
        xs = [torch.cat([x] * (n + 1), 0) for x in tensors]
        finals = _states(self.op(*xs, initial_state=init, output_final_state=True, **kw)[1])
        out = []
        for m, f in zip(self.maps, finals):
            f = f.reshape((n + 1, B, H) + f.shape[2:])
            w = f[0]
            rows, rest = m.split(sizes)
            if m.kind == "diagonal":
                a = f[1] - w
                for axis, keep in enumerate(m.keep):  # only where the decay varies
                    if not keep:
                        a = a.narrow(2 + axis, 0, 1)
            else:  # column j*rest + c of A is column c of probe j's response
                cols = (f[1:] - w).reshape(n, B, H, rows, rest).permute(1, 2, 3, 0, 4).reshape(B, H, rows, n * rest)
                a = cols[..., :rows]
            out += [w.reshape(B, H, -1), a.reshape(B, H, -1)]
        return out

    def _probe_run(self, tensors, kw, B, H, sizes):
        """(summary [W, A] per state, o(0), u) for this piece: one op run on zero and identity-column initial
        states. The output is o(0) + u @ S_in (affine.output_form), so column c of the probe with e_i in it
        answers u[..., i] in output column c; the final states give W and A as for a matrix map (a diagonal
        map's A is that matrix's diagonal)."""
        n = self._column_probes(sizes)
        dtype = self._state_dtype(tensors[0])
        init = self._probe_states(B, H, sizes, n, dtype, tensors[0].device, columns=True)
        xs = [torch.cat([x] * (n + 1), 0) for x in tensors]
        o_all, fin = self.op(*xs, initial_state=init, output_final_state=True, **kw)
        parts, u = [], None
        for m, f in zip(self.maps, _states(fin)):
            f = f.reshape((n + 1, B, H) + f.shape[2:])
            w = f[0]
            rows, rest = m.split(sizes)
            cols = (f[1:] - w).reshape(n, B, H, rows, rest).permute(1, 2, 3, 0, 4).reshape(B, H, rows, n * rest)
            a = cols[..., :rows]
            if m.kind == "diagonal":  # A = diag(d) here (the decay is constant along the trailing dims)
                a = a.diagonal(dim1=-2, dim2=-1)
                if not m.keep[0]:
                    a = a[..., :1]
            parts += [w.reshape(B, H, -1), a.reshape(B, H, -1)]
            if m.state == self._read_state:
                o_all = o_all.reshape((n + 1, B) + o_all.shape[1:3] + (rest,))
                T = o_all.shape[2]
                u = (o_all[1:] - o_all[0]).permute(1, 2, 3, 0, 4).reshape(B, T, H, n * rest)[..., :rows]
                o0 = o_all[0]
        return parts, o0, u

    def _corrected(self, o0, u, entering, sizes, out_shape):
        """o(0) + u @ S_in for the read state."""
        i = next(k for k, m in enumerate(self.maps) if m.state == self._read_state)
        rows, rest = self.maps[i].split(sizes)
        B, H = entering[i].shape[:2]
        s = entering[i].reshape(B, H, rows, rest).to(u.dtype)
        return (o0 + torch.einsum("bthk,bhkr->bthr", u, s)).reshape(out_shape)

    def _zero_summary(self, shapes, sizes, dtype, device) -> list[torch.Tensor]:
        """[W, A] per state, all zeros: what a rank sends when no rank reads its summary."""
        parts = []
        for m, shape in zip(self.maps, shapes):
            parts += [torch.zeros(shape[:2] + (math.prod(shape[2:]),), dtype=dtype, device=device),
                      torch.zeros(shape[:2] + (math.prod(m.summary_shape(sizes)),), dtype=dtype, device=device)]
        return parts

    def _apply(self, m: StateMap, a, w, s, sizes):
        """A(s) + w for one state (all (B, H, ...) shaped)."""
        B, H = s.shape[:2]
        if m.kind == "diagonal":
            return s * a.reshape((B, H) + m.summary_shape(sizes)) + w
        rows, rest = m.split(sizes)
        out = a.reshape(B, H, rows, rows) @ s.reshape(B, H, rows, rest)
        return out.reshape(s.shape) + w

    # -- the call -----------------------------------------------------------------------------------
    def __call__(self, *tensors, initial_state=None, output_final_state: bool = False, cu_seqlens=None, **kw):
        """(o, final_state) for this rank's shard (B, T_r, H, D) of inputs sharded along T in rank order.
        `initial_state` is read on rank 0 only; the final state is returned on the last rank (None on the
        others). Gradients: every rank calls backward on its own loss (a sum over ranks is the loss).
        `cu_seqlens`: see context_parallel."""
        if cu_seqlens is not None and self.layout != "contiguous":
            raise NotImplementedError(
                f"context parallel for {self.op.name}: cu_seqlens with layout={self.layout!r}; the state path's "
                "packed documents use the contiguous layout (balance them by choosing the shard bounds: uneven "
                "shards are accepted)")
        if cu_seqlens is not None and self.schedule == "ring":
            raise NotImplementedError(f"context parallel for {self.op.name}: cu_seqlens with schedule='ring'; packed "
                                      "streams use schedule='allgather'")
        if cu_seqlens is not None and self.spec.reverse_states:  # before any collective: every rank refuses
            raise NotImplementedError(f"context parallel for {self.op.name}: cu_seqlens with reverse states "
                                      f"({', '.join(s.name for s in self.spec.reverse_states)}); dense sequences only")
        if "pos_offset" in kw:
            raise ArgumentError("pos_offset: context parallel sets each shard's first position itself")
        if not dist.is_initialized():
            raise RuntimeError("context parallel needs torch.distributed initialised (init_process_group)")
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if world == 1:
            return self.op(*tensors, initial_state=initial_state, output_final_state=output_final_state,
                           cu_seqlens=cu_seqlens, **kw)
        if cu_seqlens is not None:
            return self._varlen(tensors, cu_seqlens, initial_state, output_final_state, kw, world, rank)
        if self.spec.reverse_states:
            return self._both_ways(tensors, initial_state, output_final_state, kw, world, rank)
        B, H, sizes = self._sizes(tensors)
        dtype = self._state_dtype(tensors[0])
        shapes = [(B, H) + tuple(sizes[d] for d in m.dims) for m in self.maps]
        if self.schedule == "ring":
            if self.reads_pos:  # this shard's first position: one small all-gather of the shard lengths
                kw = {**kw, "pos_offset": rank_pieces("contiguous", shard_lengths(tensors[0], self.group))[rank][0][0]}
            return ring_pass(self.op, tensors, initial_state, output_final_state, kw, shapes, dtype, self.group,
                             world, rank)
        # the sequence is cut into pieces (one per rank, or two with zigzag); piece v's state entering it is
        # the fold of pieces 0..v-1's summaries, whichever ranks hold them
        vids = virtual_ids(self.layout, world, rank)
        n_pieces = world * len(vids)
        if len(vids) == 1 and not self.reads_pos:
            local, kws = [tensors], [kw]
        else:  # the pieces' global positions: one small all-gather of the shard lengths
            here = rank_pieces(self.layout, shard_lengths(tensors[0], self.group))[rank]
            local = list(zip(*[split_pieces(x, here) for x in tensors]))
            kws = [{**kw, "pos_offset": s} if self.reads_pos else kw for s, _ in here]
        overlap = self._why_not_overlapped(tensors[0].dtype) is None
        steps = []  # what this call did, in order (schedule_taken)
        parts, first, probed, later = [], None, {}, []
        for v, xs, kw in zip(vids, local, kws):
            if v == 0:  # reads initial_state: its final state is the summary, its A never read (zeros)
                first = self.op(*xs, initial_state=initial_state, output_final_state=True, **kw)
                steps.append("run 0 from initial_state")
                for m, f in zip(self.maps, _states(first[1])):
                    parts += [f.reshape(B, H, -1), f.new_zeros((B, H, math.prod(m.summary_shape(sizes))))]
            elif v < n_pieces - 1:
                if overlap:  # o(0) and u with the summary, in one run
                    summary, o0, u = self._probe_run(xs, kw, B, H, sizes)
                    probed[v] = (summary, o0, u)
                    parts += summary
                    steps.append(f"probe {v}")
                else:
                    parts += self._summary(xs, kw, B, H, sizes)
                    steps.append(f"summary {v}")
            else:  # nobody reads the last piece's summary: its run can wait for (overlap: overlap) the gather
                parts += self._zero_summary(shapes, sizes, dtype, tensors[0].device)
                if overlap:
                    later.append((v, xs, kw))
        mine = torch.cat([p.to(dtype).reshape(B, H, -1) for p in parts], -1)
        if overlap:
            pending = start_gather(mine, self.group)
            steps.append("all-gather issued")
            for v, xs, kw_v in later:  # needs nothing from the collective: runs while it is in flight
                probed[v] = self._probe_run(xs, kw_v, B, H, sizes)
                steps.append(f"probe {v} (overlapped)")
            gathered = pending.wait()
            steps.append("all-gather waited")
        else:
            gathered = self._gather(mine)  # (world, B, H, pieces per rank * L)
            steps.append("all-gather")
        if len(vids) > 1:  # in sequence order: piece v is rank v's first (v < N) or rank 2N-1-v's second
            half = gathered.shape[-1] // 2
            seq = torch.stack([gathered[v, ..., :half] if v < world else gathered[n_pieces - 1 - v, ..., half:]
                               for v in range(n_pieces)])
        else:
            seq = gathered
        outs, final = [], None
        for v, xs, kw in zip(vids, local, kws):
            if v == 0:
                o, fin = first
            elif overlap:  # no second walk: the output is affine in the entering state, u its factor
                entering = self._fold(seq, v, shapes, sizes)
                summary, o0, u = probed[v]
                o = self._corrected(o0, u, entering, sizes, (B, xs[0].shape[1], H) + o0.shape[3:])
                fin = None
                if output_final_state and v == n_pieces - 1:  # A(S_in) + W from this piece's own summary
                    fin = [self._apply(m, summary[2 * i + 1], summary[2 * i].reshape(shape), s, sizes)
                           for i, (m, shape, s) in enumerate(zip(self.maps, shapes, entering))]
                    fin = fin[0] if len(fin) == 1 else tuple(fin)
                steps.append(f"correct {v}: o(0) + u @ S_in")
            else:
                entering = self._fold(seq, v, shapes, sizes)
                o, fin = self.op(*xs, initial_state=entering, output_final_state=output_final_state, **kw)
                steps.append(f"run {v} from the folded state")
            outs.append(o)
            if v == n_pieces - 1:
                final = fin
        self.schedule_taken = tuple(steps)
        o = anchor(_cat_time(outs), gathered)
        if not output_final_state or final is None:  # the last piece's rank: the last rank, or 0 with zigzag
            return o, None
        return o, final

    # -- reverse states (scanned right to left: lion) ----------------------------------------------------
    def _both_ways(self, tensors, initial_state, output_final_state, kw, world, rank):
        """Forward states enter a piece from the pieces before it, reverse states from the pieces after it
        (their initial value enters at the sequence's end). Every piece sends its probe summary of every state
        (A, W from its own tokens alone) and rank 0 the initial states; each rank folds the earlier pieces'
        forward summaries from the initial forward states, and the later pieces' reverse summaries, last piece
        first, from the initial reverse states, then runs its pieces. The last piece's rank folds all pieces'
        reverse summaries for the reverse final states (the value at the sequence's start)."""
        B, H, sizes = self._sizes(tensors)
        dtype, device = self._state_dtype(tensors[0]), tensors[0].device
        shapes = [(B, H) + tuple(sizes[d] for d in m.dims) for m in self.maps]
        vids = virtual_ids(self.layout, world, rank)
        n_pieces = world * len(vids)
        here = rank_pieces(self.layout, shard_lengths(tensors[0], self.group))[rank]
        local = list(zip(*[split_pieces(x, here) for x in tensors]))
        kws = [{**kw, "pos_offset": s} if self.reads_pos else kw for s, _ in here]
        parts = []
        for xs, kw_v in zip(local, kws):
            parts += self._summary(xs, kw_v, B, H, sizes)
        inits = None if initial_state is None or rank != 0 else _states(initial_state)
        starts = [torch.zeros(shape, dtype=dtype, device=device) if inits is None else inits[i].to(dtype)
                  for i, shape in enumerate(shapes)]
        mine = torch.cat([p.to(dtype).reshape(B, H, -1) for p in parts + starts], -1)
        gathered = self._gather(mine)  # (world, B, H, pieces per rank * L + the initial states)
        size = sum(math.prod(shape[2:]) for shape in shapes)
        L = (gathered.shape[-1] - size) // len(vids)
        if len(vids) > 1:
            seq = torch.stack([gathered[v, ..., :L] if v < world else gathered[n_pieces - 1 - v, ..., L:2 * L]
                               for v in range(n_pieces)])
        else:
            seq = gathered[..., :L]
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + math.prod(shape[2:]))
        s0 = [gathered[0, ..., len(vids) * L + a:len(vids) * L + b].reshape(shape)
              for a, b, shape in zip(offsets, offsets[1:], shapes)]
        reverse = [s.reverse for s in self.spec.states]

        def entering(v):
            states = list(s0)
            for i, rev in enumerate(reverse):
                for j in (range(n_pieces - 1, v, -1) if rev else range(v)):
                    states[i] = self._apply_one(seq[j], i, states[i], shapes, sizes)
            return states

        outs, final = [], None
        for v, xs, kw_v in zip(vids, local, kws):
            last = v == n_pieces - 1
            o, fin = self.op(*xs, initial_state=tuple(entering(v)), output_final_state=last, **kw_v)
            outs.append(o)
            if last and output_final_state:
                back = entering(-1)  # every piece's reverse summary folded in: the value at the start
                final = tuple(b if rev else f for b, f, rev in zip(back, _states(fin), reverse))
        o = anchor(_cat_time(outs), gathered)
        return o, (None if final is None else final[0] if len(final) == 1 else final)

    def _apply_one(self, summary, i, state, shapes, sizes):
        """A_j(state) + W_j for state i, from one piece's summary (B, H, L)."""
        offset = 0
        for k, (m, shape) in enumerate(zip(self.maps, shapes)):
            nw, na = math.prod(shape[2:]), math.prod(m.summary_shape(sizes))
            if k == i:
                w = summary[..., offset:offset + nw].reshape(shape)
                return self._apply(m, summary[..., offset + nw:offset + nw + na], w, state, sizes)
            offset += nw + na
        raise IndexError(i)

    # -- packed varlen streams (docs/context-parallel.md, "Packed sequences") ---------------------------
    def _varlen(self, tensors, cu_seqlens, initial_state, output_final_state, kw, world, rank):
        """The varlen call: this rank's continuation (if a document runs in from the previous rank), run
        from the composed entering state after the all-gather, then the documents starting here, run as
        one varlen call before it (they read `initial_state`, not the earlier ranks)."""
        B, H, sizes = self._sizes(tensors)
        if B != 1:
            raise ArgumentError(f"with cu_seqlens the shards are packed as (1, T_r, H, D); got B={B}")
        x0 = tensors[0]
        dtype, device = self._state_dtype(x0), x0.device
        lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(lengths, torch.tensor([x0.shape[1]], dtype=torch.int64, device=device), group=self.group)
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + int(n.item()))
        check_cu_seqlens(cu_seqlens, 1, starts[-1], device)  # the global boundaries of the whole stream
        cu = [int(c) for c in cu_seqlens.tolist()]
        n_seq = len(cu) - 1
        lay = shard_layout(cu, list(zip(starts, starts[1:])), rank)
        # positions restart per document: the documents starting here from 0, the continuation from its place
        cont_kw = {**kw, "pos_offset": lay.start - cu[lay.cont]} if self.reads_pos and lay.cont is not None else kw
        inits = None if initial_state is None else _states(initial_state)
        if inits is not None:
            for m, st in zip(self.maps, inits):
                want = (n_seq, H) + tuple(sizes[d] for d in m.dims)
                if tuple(st.shape) != want:
                    raise ArgumentError(f"initial_state for state {m.state} with cu_seqlens: expected one state per "
                                        f"sequence of the whole stream, shape {list(want)}; got {list(st.shape)}")
        shapes = [(1, H) + tuple(sizes[d] for d in m.dims) for m in self.maps]

        # The state leaving the shard depends on the documents starting here only through the last one, when it
        # runs on: that one runs first (alone), the all-gather is issued, and the documents ending here run
        # while it is in flight (they read neither the collective nor the entering state).
        runs_on = lay.continues_out and len(lay.owned) > 0
        ending = list(lay.owned)[:-1] if runs_on else list(lay.owned)
        base = lay.cont_len  # the owned documents' first token on the shard
        fin_own, o_last = {}, None
        # overlap (as for dense shards): the continuation runs from zeros and probe columns, o = o(0) + u @ S_in
        overlap = lay.cont_len > 0 and self._why_not_overlapped(x0.dtype) is None
        cont_probe, steps = None, []
        cont_xs = [x[:, :lay.cont_len] for x in tensors]
        if runs_on:  # a document starts here and runs on: the leaving state ignores the entering one (A = 0)
            d = lay.owned[-1]
            init = None if inits is None else [st[d:d + 1] for st in inits]
            o_last, fin = self.op(*[x[:, base + lay.owned_cu[-2]:] for x in tensors], initial_state=init,
                                  output_final_state=True, **kw)
            parts = []
            for m, f in zip(self.maps, _states(fin)):
                parts += [f.reshape(1, H, -1), f.new_zeros((1, H, math.prod(m.summary_shape(sizes))))]
            steps.append("run the document running on")
        elif lay.continues_out and overlap:  # the whole shard inside one document: its summary, o(0) and u
            cont_probe = self._probe_run(cont_xs, cont_kw, 1, H, sizes)
            parts = cont_probe[0]
            steps.append("probe continuation")
        elif lay.continues_out:  # the whole shard is inside one document: A and W as for a dense shard
            parts = self._summary(tensors, cont_kw, 1, H, sizes)
            steps.append("summary continuation")
        else:  # nobody reads the state leaving this shard
            parts = self._zero_summary(shapes, sizes, dtype, device)
        pending = start_gather(torch.cat([p.to(dtype).reshape(1, H, -1) for p in parts], -1), self.group)
        steps.append("all-gather issued")

        o_own = o_last
        if ending:  # overlapped with the all-gather
            stop = base + lay.owned_cu[len(ending)]
            init = None if inits is None else [st[ending[0]:ending[-1] + 1] for st in inits]
            local_cu = torch.tensor(lay.owned_cu[:len(ending) + 1], dtype=cu_seqlens.dtype, device=device)
            o_end, fin = self.op(*[x[:, base:stop] for x in tensors], initial_state=init, output_final_state=True,
                                 cu_seqlens=local_cu, **kw)
            fin_own = {d: [f[j] for f in _states(fin)] for j, d in enumerate(ending)}
            o_own = o_end if o_last is None else _cat_time([o_end, o_last])
            steps.append("documents ending here (overlapped)")
        if overlap and cont_probe is None and lay.cont is not None:  # needs the collective only for u @ S_in
            cont_probe = self._probe_run(cont_xs, cont_kw, 1, H, sizes)
            steps.append("probe continuation (overlapped)")
        gathered = pending.wait()
        steps.append("all-gather waited")

        o_cont = fin_cont = None
        if lay.cont is not None:
            entering = self._fold(gathered, rank, shapes, sizes)
            if cont_probe is not None:
                summary, o0, u = cont_probe
                o_cont = self._corrected(o0, u, entering, sizes, (1, lay.cont_len, H) + o0.shape[3:])
                fin_cont = [self._apply(m, summary[2 * i + 1], summary[2 * i].reshape(shape), st, sizes)
                            for i, (m, shape, st) in enumerate(zip(self.maps, shapes, entering))]
                steps.append("correct continuation: o(0) + u @ S_in")
            elif lay.cont_len:
                steps.append("run continuation from the folded state")
                o_cont, fin_cont = self.op(*cont_xs, initial_state=entering, output_final_state=True, **cont_kw)
                fin_cont = _states(fin_cont)
            else:  # an empty shard inside a document: the state passes through
                fin_cont = entering
        self.schedule_taken = tuple(steps)
        pieces = [p for p in (o_cont, o_own) if p is not None]
        if not pieces:  # no token here: the op's own empty output
            pieces = [self.op(*tensors, **kw)[0]]
        o = _cat_time(pieces)
        o = anchor(o, gathered)
        if not output_final_state:
            return o, None

        # every document's final state, from the rank holding its last token, summed over the ranks
        rows = []
        for i, (m, shape) in enumerate(zip(self.maps, shapes)):
            mine = [None] * n_seq
            if lay.cont_ends_here:
                mine[lay.cont] = fin_cont[i].reshape(shape[1:])
            for d in lay.ends_here:
                if d in fin_own:
                    mine[d] = fin_own[d][i]
            zero = torch.zeros(shape[1:], dtype=dtype, device=device)
            rows.append(torch.stack([zero if r is None else r.to(dtype) for r in mine]).reshape(n_seq, H, -1))
        finals = self._gather(torch.cat(rows, -1)).sum(0)  # (n_seq, H, L)
        o = anchor(o, finals)
        if rank != world - 1:
            return o, None
        out, offset = [], 0
        for shape in shapes:
            size = math.prod(shape[2:])
            out.append(finals[..., offset:offset + size].reshape((n_seq,) + shape[1:]))
            offset += size
        return o, (out[0] if len(out) == 1 else tuple(out))

    def _gather(self, mine):
        """All ranks' `mine`, stacked in rank order (autograd-aware)."""
        return gather_stacked(mine, self.group)

    def _fold(self, gathered, rank, shapes, sizes) -> list[torch.Tensor]:
        """The states entering rank `rank`: rank 0's final state, then each later rank's A(.) + W."""
        B, H = shapes[0][:2]
        states = None
        for r in range(rank):
            offset, cur = 0, []
            for i, (m, shape) in enumerate(zip(self.maps, shapes)):
                nw, na = math.prod(shape[2:]), math.prod(m.summary_shape(sizes))
                w = gathered[r, :, :, offset:offset + nw].reshape(shape)
                a = gathered[r, :, :, offset + nw:offset + nw + na]
                offset += nw + na
                cur.append(w if states is None else self._apply(m, a, w, states[i], sizes))
            states = cur
        return states
