"""`effc tune` and `effc cache ls | clear`, added to effc.cli's app by `register`."""
from __future__ import annotations

import os
import sys
import time

import typer

from ..errors import ArgumentError, SpecError

SPEC_HELP = "a library spec name (see `effc library`), a path to a .attn file, or PATH:SPEC"
cache_app = typer.Typer(no_args_is_help=True, help="The tuning cache that `effc tune` fills and ops read.")
_cli: dict = {}  # effc.cli's error and --dims helpers


def register(app, fail, parse_dims) -> None:
    """Add the commands to effc.cli's app. The app and helpers are passed in, not imported: under
    `python -m effc.cli` that module is __main__, and importing effc.cli here would build a second app."""
    _cli.update(fail=fail, parse_dims=parse_dims)
    app.command()(tune)
    app.add_typer(cache_app, name="cache")


def _space(spec: str, shapes, heads: int, sizes: dict, dtype: str, smem_limit: int | None):
    import effc

    from ..policy.search import H100_SHARED_BYTES, search_space
    from ..policy.tiling import Problem
    from .tune import DTYPE_BYTES

    op = effc.load(spec)
    parts = getattr(op, "parts", None)
    for one in parts or [op]:  # a spec with branches: each branch's walk, as tune times them
        if parts:
            yield f"branch spec {one.name} (tuned as {spec}:{one.name}):"
        own = {d: 128 for d in one.spec.dims} | {d: v for d, v in sizes.items() if d in one.spec.dims}
        for B, T in shapes:
            problem = Problem(B, T, heads, tuple(sorted(own.items())))
            yield search_space(one.spec, one.comp.legality, problem, dtype_bytes=DTYPE_BYTES[dtype],
                               smem_limit=smem_limit or H100_SHARED_BYTES)


def _print_result(console, r) -> None:
    from rich.table import Table

    from .tune import ranking, rejections, summary

    table = Table(title=f"{r.key.spec} {r.key.bucket} {r.key.dtype}")
    for col in ("config", "short ms", "full ms", "vs default", ""):
        table.add_column(col)
    for row in ranking(r):
        table.add_row(*row)
    console.print(table)
    for line in rejections(r):
        console.print(f"  rejected {line}", highlight=False)
    console.print(summary(r), highlight=False)
    console.print(f"  stored {r.path}", highlight=False)


def tune(spec: str = typer.Argument(..., help=SPEC_HELP),
         shapes: str = typer.Option("2x8192,1x32768", help="BxT list to tune for"),
         heads: int = typer.Option(16, "--heads"),
         dims: str = typer.Option("", help="feature dims, e.g. K=128,V=128 (default 128 each)"),
         dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
         budget: float = typer.Option(300.0, help="seconds for the whole run, all shapes; it stops there"),
         workers: int = typer.Option(None, help="compile processes (default: min(8, CPU count); 0: compile here)"),
         smem_limit: int = typer.Option(None, help="shared memory per block for --dry-run's model (default 232448, "
                                                  "the H100's; a GPU run reads the device's)"),
         dry_run: bool = typer.Option(False, "--dry-run", help="print the pruned search space; no GPU needed"),
         backend: str = typer.Option("triton", help="triton or tilelang; tune both for backend='auto' to choose")):
    """Time the pruned search space on this GPU and record the fastest config per shape bucket.

    Entries are keyed by spec, backend, GPU, dtype and shape bucket: B*H and T rounded up to a power of
    two, with the feature dims exact (2x8192 at 16 heads: BH32-T8192-K128-V128). Ops read them on their
    next call with a matching shape; explicit op arguments (chunk=..., num_warps=...) still win. A candidate
    that crashes the GPU (a compiler fault) is recorded and pruned; tuning goes on in a fresh process."""
    t0 = time.monotonic()  # the budget covers everything from here, imports and worker start-up included
    from .tune import DTYPE_BYTES, parse_shapes
    try:
        bt = parse_shapes(shapes)
        sizes = _cli["parse_dims"](dims)
        if dtype not in DTYPE_BYTES:
            raise typer.BadParameter(f"'{dtype}': expected one of {', '.join(DTYPE_BYTES)}", param_hint="--dtype")
        if workers is not None and workers < 0:
            raise typer.BadParameter(f"{workers}: expected 0 or more processes", param_hint="--workers")
        if dry_run:
            for space in _space(spec, bt, heads, sizes, dtype, smem_limit):
                typer.echo(str(space))
            return
        import torch
        if not torch.cuda.is_available():
            raise ArgumentError("effc tune needs a CUDA GPU: it compiles and times candidates on the device "
                                "(`effc tune SPEC --dry-run` prints the search space without one)")
        from rich.console import Console

        from .tune import CandidateFault
        from .tune import tune as run_tune
        console = Console()
        if backend not in ("triton", "tilelang"):
            raise typer.BadParameter(f"'{backend}': expected triton or tilelang", param_hint="--backend")
        try:
            run_tune(spec, bt, heads=heads, dims=sizes, dtype=dtype, budget=budget, workers=workers, started=t0,
                     backend=backend,
                     reporter_factory=lambda: RichReporter(console), on_result=lambda r: _print_result(console, r))
        except CandidateFault as e:
            left = budget - (time.monotonic() - t0)
            restarts = int(os.environ.get(RESTARTS_VAR, "0"))
            if restarts >= MAX_RESTARTS or left < 5:
                raise RuntimeError(f"{e} ({restarts} restarts, {left:.0f} s left: giving up)") from None
            console.print(f"{e}\ngoing on in a fresh process with {left:.0f} s left", highlight=False)
            os.environ[RESTARTS_VAR] = str(restarts + 1)
            argv = restart_argv(spec, e.left, heads, dims, dtype, left, workers, backend)
            os.execv(argv[0], argv)
        console.print(f"done in {time.monotonic() - t0:.0f} s of a {budget:.0f} s budget", highlight=False)
    except (SpecError, ArgumentError, NotImplementedError, ValueError, RuntimeError) as e:
        _cli["fail"](e)


RESTARTS_VAR, MAX_RESTARTS = "EFFC_TUNE_RESTARTS", 8


def restart_argv(spec: str, shapes: list[tuple[int, int]], heads: int, dims: str, dtype: str, budget: float,
                 workers: int | None, backend: str) -> list[str]:
    """The `effc tune` command that goes on after a fault: the shapes not yet tuned, the budget left."""
    argv = [sys.executable, "-m", "effc.tools.cli", "tune", spec, "--shapes", ",".join(f"{b}x{t}" for b, t in shapes),
            "--heads", str(heads), "--dtype", dtype, "--budget", f"{budget:.1f}", "--backend", backend]
    argv += ["--dims", dims] if dims else []
    return argv + (["--workers", str(workers)] if workers is not None else [])


class RichReporter:
    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[best]}"), console=console)

    def start(self, label: str, total: int):
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, best="")

    def grow(self, n: int):
        task = next(t for t in self.progress.tasks if t.id == self.task)
        self.progress.update(self.task, total=task.total + n)

    def advance(self, best: str):
        self.progress.update(self.task, advance=1, best=best)

    def stop(self):
        self.progress.stop()


@cache_app.command("ls")
def cache_ls():
    """List the tuned configurations (stale: recorded by another codegen version; ignored by ops)."""
    from ..policy.tuning import entries, is_current, tuning_dir
    rows = entries()
    if not rows:
        typer.echo(f"no tuning entries in {tuning_dir()}")
        return
    typer.echo(f"{'spec':12s} {'bucket':24s} {'dtype':9s} {'gpu':24s} {'config':36s} {'ms':>7s} {'default':>7s} "
               f"{'gain':>6s}  status")
    for path, e in rows:
        if e is None:
            typer.echo(f"{'?':12s} {'?':24s} {'?':9s} {'?':24s} {'?':36s} {'-':>7s} {'-':>7s} {'-':>6s}  "
                       f"corrupt: {path.name} (ignored; rebuilt by effc tune)")
            continue
        c = e.config
        cfg = (f"C={c['chunk']} block={c['block']} P={c['segments']} warps={c['num_warps']} stages={c['num_stages']}"
               + (" deferred" if c.get("defer_merge") else "")
               + (f" walk={c['walk_block']}" if c.get("walk_block", c["block"]) != c["block"] else "")
               + (f" walk_chunk={c['walk_chunk']}" if c.get("walk_chunk") else ""))
        status = "ok" if is_current(e) else f"stale (codegen {e.key.codegen})"
        typer.echo(f"{e.key.spec:12s} {e.key.bucket:24s} {e.key.dtype:9s} {e.key.gpu[:24]:24s} {cfg:36s} "
                   f"{e.ms:7.3f} {e.default_ms:7.3f} {e.default_ms / e.ms:5.2f}x  {status}")
    typer.echo(f"{len(rows)} entries in {tuning_dir()}")


@cache_app.command("clear")
def cache_clear(stale: bool = typer.Option(False, "--stale", help="only entries ops ignore (stale or corrupt)"),
                kernels: bool = typer.Option(False, "--kernels", help="also the generated kernel modules")):
    """Delete tuning entries (and with --kernels the generated modules; they are rebuilt on next use)."""
    from ..policy.tuning import clear_faults, entries, is_current, tuning_dir
    from ..runtime.cache import cache_dir
    removed = 0
    for path, e in entries():
        if stale and e is not None and is_current(e):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    for tmp in tuning_dir().glob("*.tmp") if tuning_dir().is_dir() else ():
        if time.time() - tmp.stat().st_mtime > 600:  # left by a writer that died; a live one renames within ms
            tmp.unlink(missing_ok=True)
    faults = 0 if stale else clear_faults()
    typer.echo(f"removed {removed} tuning entr{'y' if removed == 1 else 'ies'}"
               + (f" and {faults} fault record(s)" if faults else "") + f" from {tuning_dir()}")
    if kernels:
        mods = list((cache_dir() / "kernels").glob("*.py")) if (cache_dir() / "kernels").is_dir() else []
        for m in mods:
            m.unlink(missing_ok=True)
        typer.echo(f"removed {len(mods)} generated kernel module(s) from {cache_dir() / 'kernels'}")
