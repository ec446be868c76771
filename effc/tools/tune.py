"""`effc tune`: time the pruned search space (passes.search) of a spec on the GPU and record the fastest
configuration per (spec, backend, GPU, shape bucket, dtype) in the tuning cache (runtime.tuning).

For each call shape, within its share of the budget:
1. the model's choice (`model_default`: `choose`, or `choose_softmax_tiles` for the softmax family) runs
   first: its output is what every candidate must reproduce;
2. worker processes compile candidates (one Triton compile is single-threaded, so processes are what
   parallelise it). In the workers a launch only compiles, into Triton's on-disk cache, so they never
   disturb the timings here, and this process finds each kernel compiled when it first runs it;
3. this process checks, then briefly times, one candidate per compiled variant (the one with the wave
   model's segment count), then the other segment counts of the best variants;
4. the best few and the default are re-timed with a full do_bench, interleaved. A candidate replaces the
   default only when faster by more than MARGIN: the tuned config is never slower than the model's.

Then, for a spec whose backward has several gradient partitions (passes.partition), each is timed forward+
backward at the winner's tiles and the fastest recorded (`partition`), its gradients checked first.

The softmax family tunes its forward kernel the same way: C and block are its query and key blocks, P is
always 1, so every candidate is a compiled variant of its own; its backward kernels keep the model's tiles.

The timing, checking and compiling live behind a runner (`GpuRunner` here; tests pass a fake one), so
the ranking, budget and cache logic run without a GPU.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass, field

from ..compiler.driver import resolve_spec_path
from ..policy.search import H100_SHARED_BYTES, Candidate, SearchSpace, search_space
from ..policy.tiling import Problem
from ..policy.tuning import TuningKey, dtype_name, known_faults, record_fault, store

MARGIN = 0.02  # a candidate must beat the default by more than timing noise (~1% between do_bench medians)
REFINE = 3  # variants whose other segment counts are timed
FINALISTS = 4  # re-timed with a full do_bench, beside the default
FINAL_ROUNDS = 2
FINAL_SHARE, FINAL_MIN_S = 0.15, 3.0  # of each shape's budget kept for the final timings
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# normwise distance to the default's output allowed; a wrong configuration is off by O(1)
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}


@dataclass
class Trial:
    candidate: Candidate
    ms: float | None = None  # short do_bench
    final_ms: float | None = None  # best of the full do_bench rounds
    error: str | None = None

    @property
    def best_ms(self) -> float | None:
        return self.final_ms if self.final_ms is not None else self.ms


@dataclass
class TuneResult:
    key: TuningKey
    space: SearchSpace
    winner: Candidate
    winner_ms: float
    default_ms: float
    trials: dict[Candidate, Trial] = field(default_factory=dict)
    elapsed: float = 0.0
    budget_hit: bool = False  # stopped before timing every candidate
    path: object = None
    # the backward's gradient partition (passes.partition): forward+backward ms of each, at the winner's tiles
    partition: str | None = None
    partition_ms: dict = field(default_factory=dict)

    @property
    def default(self) -> Candidate:
        return self.space.default

    @property
    def speedup(self) -> float:
        return self.default_ms / self.winner_ms


class Silent:
    """Progress reporting for callers without a terminal (tests, scripts)."""

    def start(self, label: str, total: int): pass

    def grow(self, n: int): pass

    def advance(self, best: str): pass

    def stop(self): pass


# CUDA errors after which the context is unusable: every later launch in the process fails
CONTEXT_LOST = ("illegal memory access", "unspecified launch failure", "misaligned address", "illegal instruction")


class CandidateFault(RuntimeError):
    """A candidate lost the process's CUDA context. `tune` adds the shapes left (`left`); `effc tune` goes on
    with them in a fresh process."""

    left: list = []


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def tune_problem(op, problem: Problem, dtype: str, runner, *, deadline: float, clock=time.monotonic,
                 reporter=None, label: str = "", save: bool = True) -> TuneResult:
    """Tune one call shape until `deadline` (a `clock()` value); record the winner unless `save` is false."""
    reporter = reporter or Silent()
    start = clock()
    space = search_space(op.spec, op.comp.legality, problem, dtype_bytes=DTYPE_BYTES[dtype],
                         smem_limit=runner.smem_limit, faulty=known_faults(op, runner.gpu),
                         merge_modes=(False,) if op.backend == "tilelang" else (False, True))  # TileLang: no out
    default = space.default
    screen_deadline = deadline - min(max(FINAL_MIN_S, FINAL_SHARE * (deadline - start)), 0.5 * (deadline - start))
    runner.prepare(op, problem, dtype, default)
    groups = space.groups()
    trials: dict[Candidate, Trial] = {}

    def evaluate(c: Candidate, compile_error: str | None) -> None:
        t = trials[c] = Trial(c, error=f"compile: {compile_error}" if compile_error else None)
        if t.error is None:
            t.error = runner.check(c)
        if t.error and any(f in t.error for f in CONTEXT_LOST):
            # every later launch of this process fails the same way: remember the culprit (a fresh process
            # prunes it) and stop, rather than blame the candidates after it
            if c == default:
                raise RuntimeError(f"{op.name} {problem.B}x{problem.T}: the model's default {c} faulted on the GPU "
                                   f"({t.error}): a code generation bug, please report it")
            record_fault(op, runner.gpu, c.variant, t.error)
            raise CandidateFault(f"{op.name} {problem.B}x{problem.T}: candidate {c} faulted on the GPU ({t.error}); "
                                 "recorded, so later tunes prune it")
        if t.error is None:
            try:
                t.ms = runner.time(c, final=False)
            except Exception as e:  # a launch that fails only when timed is a rejected candidate too
                t.error = _short(e)
        timed = [x.ms for x in trials.values() if x.ms is not None]
        d = trials.get(default)
        note = f"best {min(timed):.3f} ms" if timed else ""
        reporter.advance(note + (f", default {d.ms:.3f} ms" if d and d.ms is not None else ""))

    reporter.start(label or f"{op.name} {problem.B}x{problem.T}", len(groups))
    for g in groups:
        runner.submit(g[:1])
    refined = False
    while clock() < screen_deadline:
        if not runner.pending():
            if refined:
                break
            refined = True
            best = sorted((g for g in groups if trials.get(g[0]) and trials[g[0]].ms is not None),
                          key=lambda g: trials[g[0]].ms)[:REFINE]
            for g in best:
                if g[1:]:
                    runner.submit(g[1:])
                    reporter.grow(len(g) - 1)
            continue
        for unit, errors in runner.ready(timeout=max(0.0, min(0.25, screen_deadline - clock()))):
            for c in unit:
                if clock() >= screen_deadline:
                    break
                evaluate(c, None if c == default else errors.get(c))  # the default already ran here
    budget_hit = runner.pending() > 0 or not refined
    if default not in trials:  # a budget too short to reach it in the queue; it is compiled (it ran in prepare)
        evaluate(default, None)

    ranked = sorted((t for t in trials.values() if t.ms is not None), key=lambda t: t.ms)
    finalists = [default] + [t.candidate for t in ranked if t.candidate != default][:FINALISTS]
    finalists = [c for c in finalists if c in trials and trials[c].ms is not None]
    for _ in range(FINAL_ROUNDS):
        for c in finalists:
            if clock() >= deadline and (c != default or trials[c].final_ms is not None):
                continue  # past the deadline only the default's one full timing is still owed
            try:
                ms = runner.time(c, final=True)
            except Exception as e:
                trials[c].error, trials[c].ms = _short(e), None
                continue
            trials[c].final_ms = ms if trials[c].final_ms is None else min(ms, trials[c].final_ms)
    reporter.stop()
    if default not in trials or trials[default].best_ms is None:
        raise RuntimeError(f"{op.name} {problem.B}x{problem.T}: the model's default {default} did not run: "
                           f"{trials.get(default, Trial(default, error='not timed')).error}")
    default_ms = trials[default].best_ms
    timed = [t for t in trials.values() if t.final_ms is not None] or [trials[default]]
    faster = sorted((t for t in timed if t.best_ms < default_ms * (1 - MARGIN)), key=lambda t: t.best_ms)
    winner = next((t.candidate for t in faster if _gradients_agree(runner, t, default)), default)
    winner_ms = trials[winner].best_ms
    partition, partition_ms = tune_partition(op, winner, runner)
    key = TuningKey.of(op, problem, runner.gpu, dtype)
    path = None
    if save:
        shape = {"B": problem.B, "T": problem.T, "H": problem.H, "dims": dict(problem.dims)}
        path = store(key, winner.overrides(), winner_ms, default.overrides(), default_ms, shape,
                     tried=sum(t.ms is not None for t in trials.values()), partition=partition)
    return TuneResult(key, space, winner, winner_ms, default_ms, trials, clock() - start, budget_hit, path,
                      partition, partition_ms)


def _gradients_agree(runner, trial: Trial, default: Candidate) -> bool:
    """Does a candidate about to win give the default tiling's gradients (runner.check_gradients)? The
    screening checks outputs only; a tiling whose backward alone is wrong (a miscompile) must not be
    recorded. A runner that cannot run the backward agrees."""
    if not hasattr(runner, "check_gradients"):
        return True
    error = runner.check_gradients(trial.candidate, default)
    if error:
        trial.error = f"gradients: {error}"
    return error is None


def tune_partition(op, winner: Candidate, runner) -> tuple[str | None, dict]:
    """The backward's gradient partition (passes.partition) at the winner's tiles: each one's forward+backward
    timed, its gradients checked against the plan's default partition; a partition replaces the default only
    when faster by more than MARGIN. (None, {}) for a spec with one partition or a runner that cannot time
    the backward. A plan whose model picks per call (the softmax family's row partitions: `plan.partition`
    None) records the fastest, its gradients checked against the first partition's."""
    plan = op.comp.plan
    names = [c.name for c in getattr(plan, "partitions", ())]
    if len(names) < 2 or not hasattr(runner, "time_backward"):
        return None, {}
    reference = plan.partition or names[0]
    times = {}
    for name in names:
        try:
            times[name] = runner.time_backward(winner, name, reference=reference)
        except Exception:  # a partition that fails its check or its launch is not a candidate
            continue
    if reference not in times:
        return None, times
    best = min(times, key=times.get)
    if plan.partition is None:
        return best, times
    return (best if times[best] < times[plan.partition] * (1 - MARGIN) else None), times


# -- the GPU runner -------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(spec_ref: str, name: str | None, backend: str) -> None:
    import triton.runtime.jit as jit

    import effc

    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    # this process only ever compiles: every launch becomes Triton's warm-up (compile, cache, no kernel run)
    jit.JITFunction.run = compile_only
    _WORKER["op"] = effc.load(spec_ref, name, backend)


def _worker_compile(shape: tuple, unit: list[Candidate]) -> tuple[tuple, dict, float]:
    import torch

    op = _WORKER["op"]
    if _WORKER.get("shape") != shape:
        _WORKER["xs"] = None
        B, T, H, dims, dtype = shape
        sizes = dict(dims)
        # contents do not matter to a compile; same shapes, dtypes and alignment as the timed inputs do
        _WORKER["xs"] = [torch.empty((B, T, H) + tuple(sizes[n] for n in d.feature_dims),
                                     dtype=getattr(torch, dtype), device="cuda") for d in op.spec.inputs]
        _WORKER["shape"] = shape
    errors, t0 = {}, time.monotonic()
    for c in unit:
        try:
            op(*_WORKER["xs"], **c.overrides())
        except Exception as e:
            errors[c] = _short(e)
    return shape, errors, time.monotonic() - t0


class GpuRunner:
    """Compiles in a pool of worker processes, checks and times in this process on the current GPU."""

    compile_task = staticmethod(_worker_compile)  # what a worker runs for a unit (module-level: it is pickled)

    def __init__(self, spec_ref: str, name: str | None = None, backend: str = "triton", workers: int | None = None):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("effc tune needs a CUDA GPU: it times candidates on the device")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.gpu = props.name
        self.sm_count = props.multi_processor_count
        self.smem_limit = getattr(props, "shared_memory_per_block_optin", 0) or H100_SHARED_BYTES
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self._pool = None
        if self.workers > 0:
            ctx = multiprocessing.get_context("spawn")  # CUDA does not survive fork
            self._pool = ctx.Pool(self.workers, _worker_init, (spec_ref, name, backend))
        self._queue: deque = deque()
        self._inflight: list = []
        self._shape = None

    def prepare(self, op, problem: Problem, dtype: str, default: Candidate) -> None:
        import torch

        from ..runtime.verify import random_inputs

        self.op, self.dtype = op, dtype
        self._queue.clear()  # units of an earlier shape still in flight finish, and are ignored
        self._shape = (problem.B, problem.T, problem.H, tuple(problem.dims), dtype)
        self.xs = self.strong = None
        torch.cuda.empty_cache()
        shape = (op.spec, problem.B, problem.T, problem.H, dict(problem.dims), getattr(torch, dtype), "cuda")
        self.xs = random_inputs(*shape)
        self.ref = self._run(default).float()
        # a candidate is also checked on strong gates, where a chunk's decay leaves the dtype's range; only specs
        # with a log-decay input have them (the timing uses the ordinary inputs)
        if any("logdecay" in d.annotations for d in op.spec.inputs):
            self.strong = random_inputs(*shape, strong_gates=True)
            self.strong_ref = self._run(default, self.strong).float()

    def _run(self, c: Candidate, xs=None):
        import torch

        out = self.op(*(self.xs if xs is None else xs), **c.overrides())[0]
        torch.cuda.synchronize()
        return out[0] if isinstance(out, tuple) else out  # a spec with several outputs: the first

    def submit(self, unit: list[Candidate]) -> None:
        self._queue.append(list(unit))

    def pending(self) -> int:
        return len(self._queue) + sum(shape == self._shape for shape, _, _ in self._inflight)

    def ready(self, timeout: float) -> list[tuple[list[Candidate], dict]]:
        if self._pool is None:  # compile here, one unit per call
            if not self._queue:
                return []
            unit = self._queue.popleft()
            errors = {}
            for c in unit:
                try:
                    self._run(c)
                except Exception as e:
                    errors[c] = _short(e)
            return [(unit, errors)]
        end = time.monotonic() + timeout
        while True:
            while self._queue and len(self._inflight) < self.workers:
                unit = self._queue.popleft()
                task = self._pool.apply_async(self.compile_task, (self._shape, unit))
                self._inflight.append((self._shape, unit, task))
            done = [x for x in self._inflight if x[2].ready()]
            if done or time.monotonic() >= end:
                break
            time.sleep(0.01)
        out = []
        for x in done:
            self._inflight.remove(x)
            shape, unit, res = x
            if shape != self._shape:
                continue
            try:
                errors = res.get()[1]
            except Exception as e:  # the worker itself failed (e.g. could not load the spec)
                errors = {c: f"worker: {_short(e)}" for c in unit}
            out.append((unit, errors))
        return out

    def check(self, c: Candidate) -> str | None:
        from ..runtime.verify import rel_err

        tol = TOLERANCE[self.dtype]
        cases = [("", self.xs, self.ref)] + ([(" on strong gates", self.strong, self.strong_ref)] if self.strong else [])
        for what, xs, ref in cases:
            try:
                out = self._run(c, xs)
            except Exception as e:
                return _short(e)
            err = rel_err(out.float(), ref)
            if not err <= tol:
                return f"wrong output{what}: normwise distance {err:.2e} to the default's (allowed {tol:g})"
        return None

    def time(self, c: Candidate, final: bool) -> float:
        from triton.testing import do_bench

        kw = c.overrides()
        warmup, rep = (25, 100) if final else (5, 20)
        return do_bench(lambda: self.op(*self.xs, **kw), warmup=warmup, rep=rep, return_mode="median")

    def check_gradients(self, c: Candidate, reference: Candidate) -> str | None:
        """None when candidate `c`'s gradients match `reference`'s (the default tiling's), else how far off."""
        grads = self._gradients()
        try:
            off = self._off(grads(**c.overrides()), grads(**reference.overrides()))
        except Exception as e:  # a backward that fails is no winner either
            return _short(e)
        return None if off is None else f"off the default tiling's by {off:.2e}"

    def time_backward(self, c: Candidate, partition: str, reference: str) -> float:
        """Forward+backward ms with gradient partition `partition`, after checking its gradients against
        `reference`'s (the plan's default); a wrong one raises."""
        from triton.testing import do_bench

        grads = self._gradients()
        off = self._off(grads(**c.overrides(), partition=partition), grads(**c.overrides(), partition=reference))
        if off is not None:
            raise RuntimeError(f"partition {partition}: gradients off the default partition's by {off:.2e}")
        return do_bench(lambda: grads(**c.overrides(), partition=partition), warmup=5, rep=40, return_mode="median")

    def _gradients(self):
        """A function of call knobs: the gradients of every floating input (fresh leaves) under the cotangent."""
        import torch

        xs = [x.detach().requires_grad_() if x.is_floating_point() else x for x in self.xs]
        leaves = [x for x in xs if x.requires_grad]

        def grads(**kw):
            out = self.op(*xs, **kw)[0]
            out = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(out, leaves, self._cotangent(out))
        return grads

    def _off(self, got, want) -> float | None:
        """The first gradient's normwise distance past the dtype's tolerance (nan counts), or None."""
        from ..runtime.verify import rel_err

        errors = (rel_err(g.float(), r.float()) for g, r in zip(got, want))
        return next((e for e in errors if not e <= TOLERANCE[self.dtype]), None)

    def _cotangent(self, out):
        import torch
        if getattr(self, "_do", None) is None or self._do.shape != out.shape:
            self._do = torch.randn_like(out)
        return self._do

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()  # compiles still running are abandoned (Triton's cache writes are atomic)
            self._pool.join()
            self._pool = None


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, text.split(",")):
        b, _, t = part.strip().partition("x")
        if not (b.isdigit() and t.isdigit()) or int(b) < 1 or int(t) < 1:
            raise ValueError(f"--shapes: '{part}' is not BxT with positive integers, e.g. 2x8192")
        out.append((int(b), int(t)))
    if not out:
        raise ValueError("--shapes: give at least one BxT, e.g. 2x8192,1x32768")
    return out


def tune(spec_ref: str, shapes: list[tuple[int, int]], *, heads: int = 16, dims: dict[str, int] | None = None,
         dtype: str = "bfloat16", budget: float = 300.0, workers: int | None = None, reporter_factory=None,
         on_result=None, started: float | None = None, backend: str = "triton") -> list[TuneResult]:
    """Tune `spec_ref` for each (B, T) in `shapes` on the current GPU, all within `budget` seconds from
    `started` (a time.monotonic() value; default now). A shape that fails does not stop the others."""
    import effc

    start = time.monotonic() if started is None else started
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPE_BYTES)}")
    if budget <= 0:
        raise ValueError(f"--budget: must be a positive number of seconds, got {budget}")
    deadline = start + budget
    op = effc.load(spec_ref, backend=backend)
    if getattr(op, "parts", None):  # a spec with branches: each branch's walk tuned as its own spec, in turn
        path, _ = resolve_spec_path(str(spec_ref))
        results = []
        for i, part in enumerate(op.parts):
            share = (deadline - time.monotonic()) / (len(op.parts) - i)
            own = {d: v for d, v in (dims or {}).items() if d in part.spec.dims}
            results += tune(f"{path}:{part.name}", shapes, heads=heads, dims=own, dtype=dtype, budget=share,
                            workers=workers, reporter_factory=reporter_factory, on_result=on_result,
                            backend=backend)
        return results
    sizes = {d: 128 for d in op.spec.dims} | dict(dims or {})
    unknown = set(sizes) - set(op.spec.dims)
    if unknown:
        raise ValueError(f"--dims: {op.name} has no dim(s) {sorted(unknown)}; its dims: {', '.join(op.spec.dims)}")
    runner = GpuRunner(spec_ref, backend=backend, workers=workers)
    results, failed = [], []
    try:
        for i, (B, T) in enumerate(shapes):
            share = (deadline - time.monotonic()) / (len(shapes) - i)
            problem = Problem(B, T, heads, tuple(sorted(sizes.items())), runner.sm_count)
            reporter = reporter_factory() if reporter_factory else None
            try:
                r = tune_problem(op, problem, dtype_name(dtype), runner, deadline=time.monotonic() + share,
                                 reporter=reporter, label=f"{op.name} {B}x{T}")
            except CandidateFault as e:  # nothing more runs in this process
                if reporter:
                    reporter.stop()
                e.left = list(shapes[i:])
                raise
            except Exception as e:
                if reporter:
                    reporter.stop()
                failed.append(f"{B}x{T}: {_short(e)}")
                continue
            results.append(r)
            if on_result:
                on_result(r)
    finally:
        runner.close()
    if failed:
        stored = f" (tuned and stored: {', '.join(r.key.bucket for r in results)})" if results else ""
        raise RuntimeError(f"tuning {op.name} failed for " + "; ".join(failed) + stored)
    return results


def summary(r: TuneResult) -> str:
    timed = sum(t.ms is not None for t in r.trials.values())
    failed = sum(t.error is not None for t in r.trials.values())
    unreached = sum(g[0] not in r.trials for g in r.space.groups())
    verdict = ("the model's default is fastest" if r.winner == r.default
               else f"{r.speedup:.2f}x over the model's default {r.default} ({r.default_ms:.3f} ms)")
    return (f"{r.key.spec} {r.key.bucket} {r.key.dtype} on {r.key.gpu}: {r.winner} {r.winner_ms:.3f} ms, {verdict}; "
            f"{timed} timed, {failed} rejected, {len(r.space.pruned)} pruned by the model before compiling"
            + (f", {unreached} compiled variants not reached within the budget" if unreached else "")
            + f"; {r.elapsed:.0f} s"
            + (f"; partition {r.partition or 'the model default'} ("
               + ", ".join(f"{n} {ms:.3f}" for n, ms in r.partition_ms.items()) + " ms forward+backward)"
               if r.partition_ms else ""))


def ranking(r: TuneResult, top: int = 8) -> list[tuple[str, str, str, str, str]]:
    """Rows (config, short ms, final ms, vs default, note) of the best candidates and the default."""
    ok = sorted((t for t in r.trials.values() if t.best_ms is not None), key=lambda t: t.best_ms)
    rows = ok[:top] + ([r.trials[r.default]] if r.trials[r.default] not in ok[:top] else [])
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    out = []
    for t in rows:
        note = ", ".join(n for n, on in (("winner", t.candidate == r.winner), ("default", t.candidate == r.default))
                         if on)
        out.append((str(t.candidate), fmt(t.ms), fmt(t.final_ms), f"{r.default_ms / t.best_ms:.2f}x", note))
    return out


def rejections(r: TuneResult, top: int = 5) -> list[str]:
    bad = [t for t in r.trials.values() if t.error is not None]
    return [f"{t.candidate}: {t.error}" for t in bad[:top]] + ([f"... and {len(bad) - top} more"]
                                                              if len(bad) > top else [])

