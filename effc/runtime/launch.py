"""Launching the generated Triton kernels of a plan: buffers, grids and arguments.

A call is described by a `Layout`: padded batches (B sequences of T tokens) and packed
variable-length batches (`cu_seqlens`, B = 1) differ only in where each sequence starts,
which the kernels read from `cu_ptr` / `chunk_off_ptr`."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..codegen import FP_FUSION
from ..codegen.triton.emit import SERIAL_ROLES
from ..errors import BackwardRefused, ResourceError
from ..ir.nodes import Spec
from ..passes.plan import Plan
from ..policy.tiling import TileConfig, padded, split_blocks
from ..policy.triton_faults import backward_fault, backward_warps
from .backward_buffers import GradientBuffers, last_readers, release_after
from .checks import chunk_tile_row, history_dtype, interpreting, kernel_cu_seqlens, on_meta

_DOT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class Layout:
    n_seq: int  # sequences: B, or len(cu_seqlens) - 1
    T: int  # tokens per sequence (padded layout) or the packed total
    H: int  # heads of the output (the first input's)
    heads: dict  # heads of each input (fewer than H: grouped, GQA)
    dims: dict  # feature dim sizes
    cu: torch.Tensor | None = None
    chunk_off: torch.Tensor | None = None  # first chunk of each sequence, for the state history
    pos0: int = 0  # the position (`pos`) of each sequence's first token

    @property
    def tokens(self) -> int:
        return self.T if self.cu is not None else self.n_seq * self.T

    def chunks(self, chunk: int) -> tuple[int, int]:
        """(total chunks over all sequences, chunks of the longest sequence)."""
        if self.cu is None:
            n = max(1, math.ceil(self.T / chunk))
            return self.n_seq * n, n
        lengths = (self.cu[1:] - self.cu[:-1]).tolist()
        per = [max(1, math.ceil(n / chunk)) for n in lengths]
        return sum(per), max(per)

    def rechunked(self, chunk: int) -> "Layout":
        """The layout of the same call walked in chunks of `chunk` (a coarse walk's history: TileConfig.walk_chunk)."""
        return self if self.cu is None else replace(self, chunk_off=_chunk_offsets(self.cu, chunk))


def _chunk_offsets(cu: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each packed sequence's first chunk in the history (an empty sequence holds one chunk too)."""
    per = ((cu[1:] - cu[:-1]).clamp_min(1) + chunk - 1) // chunk
    return torch.cat([per.new_zeros(1), per.cumsum(0)]).to(torch.int32)


def make_layout(spec: Spec, tensors, H: int, dims: dict, cu_seqlens, chunk: int, pos0: int = 0) -> Layout:
    heads = {d.name: x.shape[2] for d, x in zip(spec.inputs, tensors)}
    B, T = tensors[0].shape[:2]
    if cu_seqlens is None:
        return Layout(B, T, H, heads, dims, pos0=pos0)
    cu = kernel_cu_seqlens(cu_seqlens, tensors[0].device)
    return Layout(len(cu) - 1, T, H, heads, dims, cu, _chunk_offsets(cu, chunk), pos0)


def direct_grads(plan: Plan, lay: Layout, n_split: int, partition: str | None = None) -> set[str]:
    """Inputs whose gradient one kernel writes whole (Plan.whole_grads) and whose heads are not grouped (no
    sum over a group after the kernels): stored in the input's dtype, with no fp32 buffer and no conversion."""
    return {x for x in plan.whole_grads(n_split, partition) if lay.heads[x] == lay.H}


# (kernel, options, constexprs, dtypes) -> the stages that fitted: later launches start there. Keys are made
# only for the kernels that ever needed fewer stages (_REFITTED), so other launches pay one set lookup.
_FITTED: dict = {}
_REFITTED: set = set()


def _fit_key(fn, args: dict, options: dict) -> tuple:
    """What decides a compiled kernel's shared memory: its constexprs, options and pointer dtypes (not the
    runtime ints, which vary per call)."""
    names = getattr(fn, "arg_names", ())
    const = {names[i] for i in getattr(fn, "constexprs", ()) if i < len(names)}
    return (id(fn), tuple(sorted(options.items())),
            tuple(sorted((k, v if k in const else str(v.dtype)) for k, v in args.items()
                         if k in const or hasattr(v, "dtype"))))


def launch_fitting(fn, grid: tuple, args: dict, options: dict) -> None:
    """Launch the Triton kernel `fn`; when its compiled form needs more shared memory than the GPU has
    (Triton's OutOfResources at launch: the pipeliner's stages of wide tiles, e.g. a score over two 128-wide
    parts in fp32), launch it again with one stage fewer, down to one, and remember the stages that fitted
    for the next launch of the same compiled form. The tiling models count the tiles' elements, not
    Triton's staging buffers: the GPU's own limit is the last word. Only that case retries; a kernel that
    needs more than one stage fits raises effc's error naming it."""
    from triton.runtime.errors import OutOfResources

    key = _fit_key(fn, args, options) if id(fn) in _REFITTED else None
    stages = _FITTED.get(key, options.get("num_stages"))
    while True:
        try:
            fn[grid](**args, **{**options, **({"num_stages": stages} if stages else {})})
            if stages != options.get("num_stages"):
                _REFITTED.add(id(fn))
                _FITTED[key or _fit_key(fn, args, options)] = stages
            return
        except OutOfResources as e:
            if e.name != "shared memory" or not stages or stages <= 1:
                raise ResourceError(f"kernel {fn.__name__}: {e.name} {e.required} > {e.limit} (the GPU's limit) "
                                    f"at {options}; pass smaller chunk= / block= or num_stages=1") from e
            stages -= 1


def spill_free(fn, late, grid: tuple, args: dict, options: dict):
    """`fn`, or its twin in the module with loads at their first reader (`late()`, codegen.at_first_use) where
    `fn`'s compiled form spills registers. A load at the top of a chunk's work is in flight while the work
    before its reader runs, but holds its tile in registers all that time; where that pushes a program past
    255 registers a thread, the spills cost more than the later load waits (H100, gated_delta_net at 2x8192:
    bwd_sums 1.144 -> 1.084 ms with late loads, spilling 784 -> 140 B a thread; every kernel that did not
    spill was slower with late loads, e.g. bwd_chunks_g_after 0.509 -> 0.596, mlstm_sig's bwd_chunks_i_after
    0.175 -> 0.254). Decided once per compiled form from what ptxas reported (Triton's `n_spills`); a form
    that does not fit the GPU, or fails to compile, is left to the launch (launch_fitting)."""
    if interpreting():
        return fn
    key = _compiled_form(fn, args, options)
    if key not in _SPILL_FREE:
        try:
            compiled = fn.warmup(grid=grid, **args, **options)
            compiled = compiled.result() if hasattr(compiled, "result") else compiled  # Triton's async compile
            if compiled is not None:  # None: a JIT cache hook took the compile
                compiled._init_handles()
            spills = getattr(compiled, "n_spills", 0)
        except Exception:  # noqa: BLE001 - OutOfResources or a compile error: the launch meets it again
            spills = 0
        _SPILL_FREE[key] = getattr(late(), fn.__name__) if spills else fn
    return _SPILL_FREE[key]


_SPILL_FREE: dict = {}
_CONSTEXPRS: dict = {}  # id(fn) -> its constexpr arguments' names


def _compiled_form(fn, args: dict, options: dict) -> tuple:
    """A cheap key of the compiled form a launch of `fn` gets, for a choice made once per form: its options and
    constexprs (DOT_DTYPE among them, so the inputs' dtype too). It runs at every launch of a chunk-parallel
    kernel: a few microseconds, against _fit_key's twelve."""
    names = _CONSTEXPRS.get(id(fn))
    if names is None:
        arg_names = getattr(fn, "arg_names", ())
        names = _CONSTEXPRS[id(fn)] = tuple(arg_names[i] for i in getattr(fn, "constexprs", ()) if i < len(arg_names))
    return (id(fn), *options.values(), *(args.get(n) for n in names))


FACTORED, ANCHORED = 0, 2  # DECAY_MODE of the two launches of a kernel with factored decays
SERIAL_STAGES = 2  # Launcher._serial_options


class Launcher:
    def __init__(self, spec: Spec, plan: Plan, module, parts=None, late_module=None):
        """`parts` (runtime.dim_parts.PartMap): `spec` is a split spec whose token tensors are slices of the
        caller's; outputs and gradients are then allocated as the caller's tensors and returned by its names.
        `late_module()`: the module with loads at their first reader, for kernels that spill (spill_free)."""
        self.spec, self.plan, self.module, self.parts = spec, plan, module, parts
        self.late_module = late_module

    def _caller_tensors(self, decls, lay: Layout, make) -> tuple[dict, dict]:
        """(per declaration of `decls`, its tensor; per caller tensor, the whole): `make(feature sizes)` allocates
        one tensor per caller's tensor, whose parts are column slices (without parts: one per declaration)."""
        if self.parts is None:
            made = {d.name: make(tuple(lay.dims[n] for n in d.feature_dims)) for d in decls}
            return made, made
        wholes, views = {}, {}
        for caller, members in self.parts.members(decls).items():
            decl = self.parts.caller.decl(caller)
            wholes[caller] = make(tuple(lay.dims[n] for n in decl.feature_dims))
            views.update({m.decl.name: self.parts.view(wholes[caller], m, lay.dims) for m in members})
        return views, wholes

    def _fn(self, kernel: str):
        return getattr(self.module, f"{self.spec.name}_{kernel}_kernel")

    def _launch(self, kp, grid: tuple, values: dict, options: dict) -> None:
        """Launch kernel `kp` with its plan's arguments (KernelPlan.args), each picked from `values` by name.
        A kernel with factored decays runs twice (codegen/triton/decay.py.j2): factored, flagging each program
        with a chunk past the dot dtype's range, then anchored, where only the flagged programs run. No host
        sync; for ordinary gates the second launch's programs return at once."""
        if "solve_ptr" in kp.arg_names:  # an fp32 [C, C] tile per program (codegen/triton/solve.py.j2); made
            # before the meta check so that `effc memory` counts it
            first = next(v for v in values.values() if torch.is_tensor(v))
            values = {**values, "solve_ptr": first.new_empty(math.prod(grid) * values["C"] ** 2, dtype=torch.float32)}
        if on_meta(values):
            return
        fn = self._fn(kp.name)
        late = self.late_module is not None and kp.role not in SERIAL_ROLES

        def run(args: dict) -> None:
            launch_fitting(spill_free(fn, self.late_module, grid, args, options) if late else fn, grid, args, options)

        if "DECAY_MODE" not in kp.arg_names:
            run(kp.call(values))
            return
        device = next(v for v in values.values() if torch.is_tensor(v)).device
        flags = torch.zeros(math.prod(grid), dtype=torch.int32, device=device)
        for mode in (FACTORED, ANCHORED):
            run(kp.call({**values, "decay_flag_ptr": flags, "DECAY_MODE": mode}))

    @staticmethod
    def _options(cfg: TileConfig) -> dict:
        return {} if interpreting() else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION)

    @staticmethod
    def _serial_options(cfg: TileConfig) -> dict:
        """A kernel looping over chunks (a walk, a summary, the adjoint scan) loads each chunk's tiles at
        addresses no carried state decides: at least SERIAL_STAGES stages, so the next chunk's loads overlap
        this chunk's dots (gated_delta_net at 2x8192 on the H100: walk 0.59 -> 0.46 ms, scan 0.78 -> 0.65)."""
        options = Launcher._options(cfg)
        return {**options, "num_stages": max(SERIAL_STAGES, cfg.num_stages)} if options else options

    def _values(self, cfg: TileConfig, lay: Layout, dtype, pvals: dict, per_seg: int, P: int, dummy) -> dict:
        """What every kernel of a call may take besides its tensors: the spec's parameters, the call's layout and
        the constexprs (each kernel's plan names the ones it takes)."""
        import triton.language as tl

        interp = interpreting()
        return {**{f"p_{p}": v for p, v in pvals.items()},
                "T": lay.T, "chunks_per_seg": per_seg, "n_segments": P, "T_total": lay.tokens,
                "n_bh": lay.n_seq * lay.H, "cu_ptr": lay.cu if lay.cu is not None else dummy,
                "chunk_off_ptr": lay.chunk_off if lay.chunk_off is not None else dummy, "POS0": lay.pos0,
                # each feature dim's real size and its padded tile size (codegen masks the columns past the real one)
                "H": lay.H, **{f"HX_{x}": h for x, h in lay.heads.items()},
                **{f"HX_{o.name}": lay.H for o in self.spec.outputs}, **lay.dims,  # the backward may load outputs
                **{f"{n}_P": padded(v) for n, v in lay.dims.items()},
                "C": cfg.chunk, "BLOCK": cfg.block if self.plan.split_dim else 1, "IS_VARLEN": lay.cu is not None,
                "DOT_DTYPE": getattr(tl, "float32" if interp else _DOT_DTYPES[dtype]),
                "PRECISION": "ieee" if (interp or dtype == torch.float32) else "tf32"}

    @staticmethod
    def _buffers(kind: str, per_state: dict) -> dict:
        """Each state's buffer of one kind under its argument name (`S_hist_ptr`, ...)."""
        return {f"{s}_{kind}_ptr": t for s, t in per_state.items()}

    def _n_split(self, cfg: TileConfig, lay: Layout) -> int:
        return split_blocks(lay.dims[self.plan.split_dim], cfg.block) if self.plan.split_dim else 1

    @staticmethod
    def _serial(cfg: TileConfig) -> TileConfig:
        """`cfg` for the serial kernels (walk, summary, bwd_inject, bwd_scan): their own block of the split dim
        (TileConfig.walk_block). What they exchange with the chunk-parallel kernels is whole states (the
        history), except the per-block adjoints of states without the split dim (`_regroup`)."""
        return replace(cfg, block=cfg.serial_block)

    @staticmethod
    def _regroup(dhist: dict, blocks: dict, n_scan: int, n_split: int, per: int) -> dict:
        """The scan's per-block adjoints of each state without the split dim, one per serial block, summed into
        one per block of the chunk-parallel kernels (serial blocks nest in theirs; the adjoint is a sum over
        the blocks' columns). Missing trailing serial blocks are empty: zero."""
        if n_scan == n_split:
            return dhist
        out = {}
        for name, h in dhist.items():
            if not blocks[name]:
                out[name] = h
                continue
            pad = h.new_zeros(h.shape[:2] + (n_split * per - n_scan,) + h.shape[3:], dtype=torch.float32)
            full = torch.cat([h.float(), pad], 2)
            out[name] = full.view(h.shape[:2] + (n_split, per) + h.shape[3:]).sum(3).to(h.dtype)
        return out

    @staticmethod
    def _segments(cfg: TileConfig, max_chunks: int) -> tuple[int, int]:
        """(segments, chunks per segment): no empty segment."""
        per_seg = math.ceil(max_chunks / max(1, min(cfg.segments, max_chunks)))
        return math.ceil(max_chunks / per_seg), per_seg

    @staticmethod
    def _loads(kp, xs: dict, hoisted: dict) -> dict:
        return {**{f"{d.name}_ptr": xs[d.name] for d in kp.loads},
                **{f"{d.name}_ptr": hoisted[d.name] for d in kp.hoisted_loads}}

    def _state_shape(self, lay: Layout, s) -> tuple:
        return tuple(lay.dims[n] for n in s.dims)

    @staticmethod
    def _chunk_tiles(d, cfg: TileConfig, lay: Layout, first: torch.Tensor) -> torch.Tensor:
        """A per-token buffer of tiles `d` (prep's hoisted values, the cut's sums), chunk-padded: (chunks * C, H,
        checks.chunk_tile_row)."""
        total_chunks, _ = lay.chunks(cfg.chunk)
        row, dtype = chunk_tile_row(d, cfg.chunk, lay.dims, first.dtype)
        return torch.empty((total_chunks * cfg.chunk, lay.H) + row, dtype=dtype, device=first.device)

    def prep(self, cfg: TileConfig, lay: Layout, xs: dict, pvals: dict) -> dict:
        """Run the prep kernel, if the plan has one (passes.hoist): the hoisted values of every chunk, each in
        its per-token buffer (`_chunk_tiles`)."""
        if not self.plan.hoisted:
            return {}
        first = xs[self.spec.inputs[0].name]
        _, max_chunks = lay.chunks(cfg.chunk)
        bufs = {d.name: self._chunk_tiles(d, cfg, lay, first) for d in self.plan.hoisted}
        kp = self.plan.kernel("prep")
        dummy = torch.empty(1, dtype=torch.float32, device=first.device)
        values = {**self._values(cfg, lay, first.dtype, pvals, 1, 1, dummy), **self._loads(kp, xs, {}),
                  **{f"{d.name}_ptr": bufs[d.name] for d in kp.stores}}
        if self.plan.split_dim:
            values["BLOCK"] = padded(lay.dims[self.plan.split_dim])  # whole tiles: prep is not split
        self._launch(kp, (1, lay.n_seq * lay.H, max_chunks), values, self._options(cfg))
        return bufs

    def forward(self, cfg: TileConfig, lay: Layout, xs: dict, pvals: dict, init: dict, store_final: bool,
                store_history: bool, outputs: bool = True, keep_prep: bool = False):
        """Returns (outputs, final states, state history). Outputs are (B, T, H, ...) in the first input's dtype;
        `outputs=False` with merge deferred skips the out kernel (the backward recomputing the history). With a
        coarse walk (TileConfig.walk_chunk) the history is the coarse walk's. `keep_prep`: the history also
        holds prep's values by their names, for the backward to read instead of running prep again."""
        if cfg.serial_chunk != cfg.chunk:
            coarse_cfg = replace(cfg, chunk=cfg.walk_chunk, walk_chunk=0, defer_merge=True)
            coarse_lay = lay.rechunked(cfg.walk_chunk)
            outs, finals, coarse = self.forward(coarse_cfg, coarse_lay, xs, pvals, init, store_final, True,
                                                outputs=False)
            if outputs:
                outs, _ = self.refine(cfg, lay, xs, pvals, coarse, fuse_merge=True, store_history=False,
                                      coarse_lay=coarse_lay)
            return outs, finals, (coarse if store_history else {})
        spec = self.spec
        first = xs[spec.inputs[0].name]
        dtype, device = first.dtype, first.device
        total_chunks, max_chunks = lay.chunks(cfg.chunk)
        P, per_seg = self._segments(cfg, max_chunks)
        f32 = dict(dtype=torch.float32, device=device)
        dummy = torch.empty(1, **f32)
        outs, whole_outs = self._outputs(lay, first)
        n_bh = lay.n_seq * lay.H
        finals = {s.name: torch.empty((lay.n_seq, lay.H) + self._state_shape(lay, s), **f32) for s in spec.states}
        out_kernel = self.plan.kernel("out") if cfg.defer_merge and outputs else None
        write_history = store_history or cfg.defer_merge  # the out kernel reads each chunk's state
        hist = self._history(lay, total_chunks, first, write_history, dummy)
        segw = {s.name: torch.empty((n_bh, P) + self._state_shape(lay, s), **f32) if P > 1 else dummy
                for s in spec.states}
        segd = {n: torch.empty_like(w) if P > 1 else dummy for n, w in segw.items()}
        n_split = self._n_split(cfg, lay)
        walk_cfg = self._serial(cfg)
        hoisted = self.prep(cfg, lay, xs, pvals)
        # what the walk hands on to the out kernel (passes.hand_on), written only where that runs
        handed = {d.name: self._chunk_tiles(d, cfg, lay, first) for kp in self.plan.kernels if kp.role == "walk"
                  for d in kp.hands} if out_kernel is not None else {}
        for kp in self.plan.kernels:
            if kp.backward or kp.role in ("prep", "out") or (kp.role == "summary" and P == 1):
                continue
            values = {**self._values(walk_cfg, lay, dtype, pvals, per_seg, P, dummy), **self._loads(kp, xs, hoisted),
                      **{f"{o.name}_ptr": outs[o.name] for o in kp.stores},
                      **self._buffers("init", {s.name: init.get(s.name, dummy) for s in kp.states}),
                      **self._buffers("final", finals), **self._buffers("hist", hist),
                      **self._buffers("segw", segw), **self._buffers("segd", segd),
                      "HAS_INIT": bool(init), "STORE_FINAL": store_final, "STORE_HISTORY": write_history,
                      "FUSE_MERGE": not cfg.defer_merge, **self._not_coarse(dummy),
                      **{f"{d.name}_ptr": handed.get(d.name, dummy) for d in kp.hands}, "HAND_ON": bool(handed)}
            grid = (self._n_split(walk_cfg, lay), n_bh, P if kp.role == "walk" else P - 1)
            self._launch(kp, grid, values, self._serial_options(cfg))
        if out_kernel is not None:
            values = {**self._values(cfg, lay, dtype, pvals, 1, 1, dummy),
                      **self._loads(out_kernel, xs, {**hoisted, **handed}),
                      **{f"{o.name}_ptr": outs[o.name] for o in out_kernel.stores}, **self._buffers("hist", hist)}
            self._launch(out_kernel, (n_split, n_bh, max_chunks), values, self._options(cfg))
        kept = ({**hist, **hoisted} if keep_prep else hist) if store_history else {}
        return whole_outs, (finals if store_final else {}), kept

    def _outputs(self, lay: Layout, first: torch.Tensor) -> tuple[dict, dict]:
        """The outputs a walk or out kernel writes, (B, T, H, ...) in the first input's dtype (`_caller_tensors`)."""
        return self._caller_tensors(self.spec.outputs, lay, lambda feats: torch.empty(
            first.shape[:2] + (lay.H,) + feats, dtype=first.dtype, device=first.device))

    def _history(self, lay: Layout, total_chunks: int, first: torch.Tensor, write: bool, dummy) -> dict:
        """Each state's per-chunk history (the state entering each chunk) as stored, or `dummy` unless `write`."""
        return {s.name: torch.empty((total_chunks, lay.H) + self._state_shape(lay, s),
                                    dtype=history_dtype(s, first.dtype), device=first.device) if write else dummy
                for s in self.spec.states}

    def _not_coarse(self, dummy) -> dict:
        """The walk's coarse-walk arguments where it walks from the initial state (FROM_COARSE off)."""
        return {**self._buffers("coarse", {s.name: dummy for s in self.spec.states}), "coarse_off_ptr": dummy,
                "FROM_COARSE": False}

    def refine(self, cfg: TileConfig, lay: Layout, xs: dict, pvals: dict, coarse: dict, fuse_merge: bool,
               store_history: bool, hoisted: dict | None = None,
               coarse_lay: Layout | None = None) -> tuple[dict, dict]:
        """The fine walk of a coarse one (TileConfig.walk_chunk): every coarse chunk walked again in chunks of
        `cfg.chunk`, all in parallel, each from the coarse walk's state entering it (`coarse`, its history).
        `hoisted`: prep's values at `cfg.chunk`, `coarse_lay` the coarse walk's layout, where the caller has
        them. Returns (outputs, written when `fuse_merge`; the fine history, when `store_history`)."""
        spec = self.spec
        first = xs[spec.inputs[0].name]
        dtype, device = first.dtype, first.device
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        total_chunks, max_chunks = lay.chunks(cfg.chunk)
        per_seg = cfg.walk_chunk // cfg.chunk
        P = math.ceil(max_chunks / per_seg)
        outs, whole_outs = self._outputs(lay, first) if fuse_merge else ({}, {})
        hist = self._history(lay, total_chunks, first, store_history, dummy)
        coarse_off = (coarse_lay or lay.rechunked(cfg.walk_chunk)).chunk_off
        kp = self.plan.kernel("walk")
        values = {**self._values(cfg, lay, dtype, pvals, per_seg, P, dummy),
                  **self._loads(kp, xs, self.prep(cfg, lay, xs, pvals) if hoisted is None else hoisted),
                  **{f"{o.name}_ptr": outs.get(o.name, dummy) for o in kp.stores},
                  **{f"{s.name}_{b}_ptr": dummy for s in spec.states for b in ("init", "final", "segw", "segd")},
                  **self._buffers("hist", hist), **self._buffers("coarse", coarse),
                  "coarse_off_ptr": coarse_off if coarse_off is not None else dummy, "FROM_COARSE": True,
                  "HAS_INIT": False, "STORE_FINAL": False, "STORE_HISTORY": store_history, "FUSE_MERGE": fuse_merge,
                  **{f"{d.name}_ptr": dummy for d in kp.hands}, "HAND_ON": False}
        self._launch(kp, (self._n_split(cfg, lay), lay.n_seq * lay.H, P), values, self._serial_options(cfg))
        return whole_outs, (hist if store_history else {})

    def _reverse_scan(self, cfg: TileConfig, lay: Layout, xs: dict, pvals: dict, hoisted: dict, hist: dict,
                      dhist: dict, d_o: dict, d_finals: dict, dinit: dict, blocks: dict, bwd_warps,
                      inject_block: int) -> None:
        """Fills `dhist` (each chunk's leaving-state adjoints) and `dinit`. Its scratch (the injected terms,
        the segment summaries) is freed on return."""
        for scan in self.plan.kernels:  # one per direction of the states (reverse states: passes.fusion)
            if scan.role == "bwd_scan":
                self._scan(scan, cfg, lay, xs, pvals, hoisted, hist, dhist, d_o, d_finals, dinit, blocks, bwd_warps,
                           inject_block)

    def _scan(self, scan, cfg: TileConfig, lay: Layout, xs: dict, pvals: dict, hoisted: dict, hist: dict,
              dhist: dict, d_o: dict, d_finals: dict, dinit: dict, blocks: dict, bwd_warps, inject_block: int) -> None:
        """One adjoint scan (`scan`, a bwd_scan kernel) over its states' chunks."""
        first = xs[self.spec.inputs[0].name]
        f32 = dict(dtype=torch.float32, device=first.device)
        dummy = torch.empty(1, **f32)
        n_split, n_bh = self._n_split(cfg, lay), lay.n_seq * lay.H
        _, max_chunks = lay.chunks(cfg.chunk)
        # the carried-free terms of the state adjoints, every chunk in parallel (passes.reverse_scan), stored
        # like the adjoint history (matrix states in the operand dtype: the largest buffer of the backward);
        # the scan adds them into the fp32 adjoint it carries
        inj = {s: torch.empty_like(dhist[s]) for s, _ in scan.injected}
        kp = next((k for k in self.plan.kernels if k.role == "bwd_inject"), None)
        # what it writes per token instead (a per-token value's free part), and what the scan hands on
        per_token = {d.name: self._chunk_tiles(d, cfg, lay, first) for d in kp.stores} if kp else {}
        handed = {d.name: self._chunk_tiles(d, cfg, lay, first) for d in scan.hands}
        if kp is not None:
            # every chunk in parallel, in the chunk-parallel kernels' block (the scan's narrow one would
            # recompute the chunk's [C, C] products once per narrow block: 0.84 ms of gated_delta_net's step at
            # 2x8192 on the H100, against 0.25 for the out kernel of the same grid), unless a state without the
            # split dim takes per-block terms, laid out by the scan's blocks
            split = self.plan.split_dim
            whole = all(split in self.spec.decl(s).feature_dims for s in inj)
            icfg = replace(cfg, block=inject_block) if split and whole else cfg
            values = {**self._values(icfg, lay, first.dtype, pvals, 1, 1, dummy), **self._loads(kp, xs, hoisted),
                      **d_o, **self._buffers("hist", hist), **self._buffers("inj", inj),
                      **{f"{n}_ptr": x for n, x in per_token.items()}}
            self._launch(kp, (self._n_split(icfg, lay), n_bh, max_chunks), values,
                         {**self._options(icfg), **bwd_warps(kp)})
        # a diagonal transition's reverse scan runs in the forward's segments: the summaries of segments 1..P-1
        # first (each from a zero adjoint), then every segment folds the later ones' and walks its chunks
        P, per_seg = self._segments(cfg, max_chunks) if self.plan.segmentable else (1, max_chunks)
        segw = {s.name: torch.empty((n_bh, P) + blocks[s.name] + self._state_shape(lay, s), **f32) if P > 1 else dummy
                for s in scan.states}
        values = {**self._values(cfg, lay, first.dtype, pvals, per_seg, P, dummy),
                  **self._loads(scan, xs, {**hoisted, **per_token}), **{f"{n}_ptr": x for n, x in handed.items()},
                  **d_o, **self._buffers("hist", hist), **self._buffers("dhist", dhist),
                  **self._buffers("dfinal", {s.name: d_finals.get(s.name, dummy) for s in scan.states}),
                  **self._buffers("dinit", dinit), **self._buffers("segw", segw),
                  **self._buffers("segd", {s: torch.empty_like(w) if P > 1 else dummy for s, w in segw.items()}),
                  **self._buffers("inj", inj), "HAS_DFINAL": bool(d_finals)}
        options = {**self._serial_options(cfg), **bwd_warps(scan)}
        if P > 1:
            self._launch(scan, (n_split, n_bh, P - 1), {**values, "SUMMARY": True}, options)
        self._launch(scan, (n_split, n_bh, P), {**values, "SUMMARY": False}, options)
        hoisted.update(handed)  # read by the gradient kernels, each freed after its last reader

    def _gradient_buffers(self, lay: Layout, xs: dict, lead: tuple, has_grad: set, direct: set, slots: dict,
                          seeded: dict) -> GradientBuffers:
        """The buffers the gradient kernels write, made as the first writer of each runs. The parts of one caller
        input share one buffer: their kernels write its column slices, with one slot layout, dtype and
        initialisation for all (the widest where they differ)."""
        inputs = tuple(d for d in self.spec.inputs if d.name not in seeded)
        if self.parts is None:
            groups = {d.name: (d, [d]) for d in inputs}
        else:
            groups = {c: (self.parts.caller.decl(c), [m.decl for m in ms])
                      for c, ms in self.parts.members(inputs).items()}

        def allocate(decl, members) -> tuple[dict, tuple]:
            names = [m.name for m in members]
            first = max(names, key=lambda n: len(slots[n]))
            alloc = torch.empty if len({slots[n] for n in names}) == 1 and set(names) <= has_grad else torch.zeros
            buf = alloc(slots[first] + lead + (lay.H,) + tuple(lay.dims[n] for n in decl.feature_dims),
                        dtype=xs[first].dtype if set(names) <= direct else torch.float32, device=xs[first].device)
            views = {m.name: buf if self.parts is None else
                     self.parts.view(buf, self.parts.parts[m.name], lay.dims, lead=len(slots[first]))
                     for m in members}
            return views, (buf, self.spec.decl(first))

        return GradientBuffers(groups, allocate)

    def backward(self, cfg: TileConfig, lay: Layout, xs: dict, pvals: dict, hist: dict, d_outs: dict,
                 d_finals: dict, hoisted: dict | None = None):
        """The reverse scan of the state adjoints, then every chunk's input gradients in parallel.
        `hoisted`: prep's values the forward kept (else prep runs again). Returns (gradients of the inputs,
        gradients of the initial states), fp32."""
        spec, split = self.spec, self.plan.split_dim
        first = xs[spec.inputs[0].name]
        device = first.device
        fault = backward_fault(spec.states, lay.dims, split, cfg.block, device)
        if fault:
            raise BackwardRefused(f"{spec.name}: {fault}")
        f32 = dict(dtype=torch.float32, device=device)
        dummy = torch.empty(1, **f32)
        n_split, n_bh = self._n_split(cfg, lay), lay.n_seq * lay.H
        scan_cfg = self._serial(cfg)
        n_scan = self._n_split(scan_cfg, lay)  # the scan's blocks (TileConfig.walk_block)
        _, max_chunks = lay.chunks(cfg.chunk)
        if hoisted is None:  # recomputed: nothing more is held from the forward
            hoisted = self.prep(cfg, lay, xs, pvals)
        if cfg.serial_chunk != cfg.chunk:  # the forward kept a coarse walk's history: the fine one, re-walked
            _, hist = self.refine(cfg, lay, xs, pvals, hist, fuse_merge=False, store_history=True, hoisted=hoisted)
        dinit = {s.name: torch.empty(((n_scan,) if split not in s.dims else ()) + (n_bh,) + self._state_shape(lay, s),
                                     **f32) for s in spec.states}
        # a state without the split dim: one adjoint per split block, the block index innermost but the state's
        blocks = {s.name: (n_scan,) if split and split not in s.dims else () for s in spec.states}
        dhist = {n: h.new_empty(h.shape[:2] + blocks[n] + h.shape[2:]) for n, h in hist.items()}
        part = cfg.partition
        kernels = self.plan.gradient_kernels(part)
        bwd_warps = lambda kernel: ({} if interpreting() else
                                    {"num_warps": backward_warps(cfg.num_warps, kernel, device)})
        # contiguous (runtime.torch_op); a part's cotangent is a slice of the caller's, read at the caller's width
        d_o = {f"{o.name}_grad_ptr": d_outs[o.name] for o in spec.outputs}
        self._reverse_scan(scan_cfg, lay, xs, pvals, hoisted, hist, dhist, d_o, d_finals, dinit, blocks, bwd_warps,
                           cfg.block)
        # in the gradient kernels' blocks
        dhist = self._regroup(dhist, blocks, n_scan, n_split, cfg.block // scan_cfg.block)
        # the gradient buffers are allocated after the scan has released its scratch (a lower peak)
        has_grad = {d.name for kp in kernels for d, _ in kp.grads}
        # Triton's interpreter truncates fp32 to bf16 where a GPU rounds to nearest: under it the gradients are
        # rounded by PyTorch after the kernels, as a GPU's kernel would store them
        direct = set() if interpreting() else direct_grads(self.plan, lay, n_split, part)
        # slots (Plan.grad_slot): per writer of an input's gradient, one fp32 partial per split block (kernels
        # with one program per block, inputs without the split dim) or one; summed below
        slots = {}
        for d in spec.inputs:
            a, b = self.plan.grad_slot(d.name, None, part)
            slots[d.name] = (a * n_split + b,) if self.plan.slotted(d.name, part) else ()
        seeded = dict(self.plan.seed_grads)
        buffers = self._gradient_buffers(lay, xs, first.shape[:2], has_grad, direct, slots, seeded)
        # per-token sums one gradient kernel writes for the next ones (passes.partition's cut), laid out as prep's
        # hoisted values, each made before its first writer
        tiles = hoisted  # prep's values, then the cut's sums: one dict, so that a release frees the buffer
        last_tile = last_readers(kernels, lambda kp: [d.name for d in kp.hoisted_loads])
        last_dhist = last_readers(kernels, lambda kp: [s.name for s in kp.states])
        for i, chunks in enumerate(kernels):
            for d in chunks.stores:
                tiles[d.name] = self._chunk_tiles(d, cfg, lay, first)
            slot = {}
            for d, _ in chunks.grads:
                a, b = self.plan.grad_slot(d.name, chunks.name, part)
                slot[f"{d.name}_slot"] = a * n_split + b
            values = {**self._values(cfg, lay, first.dtype, pvals, 1, 1, dummy),
                      **self._loads(chunks, xs, tiles), **slot,
                      **{f"{d.name}_ptr": tiles[d.name] for d in chunks.stores},
                      **d_o, **buffers.for_kernel(chunks),
                      **self._buffers("hist", hist), **self._buffers("dhist", dhist)}
            blocks = 1 if chunks.block_loop else n_split  # passes.block_loop: one program per chunk loops over them
            self._launch(chunks, (blocks, n_bh, max_chunks), values, {**self._options(cfg), **bwd_warps(chunks)})
            del values
            release_after(i, last_tile, tiles)
            release_after(i, last_dhist, dhist)
        dx, whole_dx = buffers.all()
        for x, o in seeded.items():  # passes.fusion.seed_gradients: no kernel, the cotangent itself
            # a copy (an op output must not alias its input), final in the input's dtype unless it is summed
            # over slots or a group of heads below
            final = not slots[x] and lay.heads[x] == lay.H
            dx[x] = d_outs[o].to(xs[x].dtype if final else torch.float32, copy=True)
            whole_dx[x] = (dx[x], spec.decl(x))
        grads = {}
        for name, (g, d) in whole_dx.items():
            if slots[d.name]:
                g = g[0] if slots[d.name] == (1,) else g.sum(0)
            hx = lay.heads[d.name]
            if hx != lay.H:  # a grouped input's gradient is the sum over its group of heads
                g = g.reshape(g.shape[:2] + (hx, lay.H // hx) + g.shape[3:]).sum(3)
            grads[name] = g
        states = {}
        for s in spec.states:
            g = dinit[s.name].sum(0) if split not in s.dims else dinit[s.name]
            states[s.name] = g.reshape((lay.n_seq, lay.H) + g.shape[1:])
        return grads, states
