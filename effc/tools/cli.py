"""`effc compile | check | show | library | bench | memory | tune | cache`."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import typer

from ..compiler import PIPELINE
from ..errors import ArgumentError, CodegenError, SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compile declarative attention specs (.attn) into fused Triton kernels.")

# the compiler's own pass list (compiler.PIPELINE) between the AST and the source; `tiled` is the
# call-time tiling choice (effc.policy) for one shape
STAGES = ("ast", *(p.name for p in PIPELINE), "tiled", "source")
SPEC_HELP = "a library spec name (see `effc library`), a path to a .attn file, or PATH:SPEC"


def _fail(e: Exception) -> None:
    typer.echo(str(e) if isinstance(e, (SpecError, CodegenError)) else f"error: {e}", err=True)
    raise typer.Exit(1)


def _parse_dims(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if not value.isdigit():
            raise typer.BadParameter(f"'{part}': expected NAME=INT, e.g. K=64,V=64")
        out[name.strip()] = int(value)
    return out


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise typer.BadParameter(f"'{text}': expected B,T,H as three integers, e.g. 2,100,2", param_hint="--shape")
    return tuple(int(p) for p in parts)


_DTYPES = ("float32", "bfloat16", "float16")


def _use_interpreter_without_gpu() -> bool:
    """Without a GPU, generated kernels run under Triton's interpreter (set before triton loads)."""
    import torch
    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    # the interpreter evaluates masked-off lanes too (exp of padding, 0/0), whose NumPy warnings say nothing
    # about the kernel's result, which the command checks
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    return True


def _compilation(spec: str):
    from ..compiler import compile_file
    return compile_file(spec)


@app.command()
def library():
    """List the library specs by family, with the paper each implements."""
    from ..dsl import parse_file
    from ..library import library_files
    by_family: dict[str, list] = {}
    for p in library_files():
        by_family.setdefault(parse_file(p).family(), []).append(p)
    for family in ("linear", "softmax", "hybrid", "branched"):
        typer.echo(f"{family}:")
        for p in by_family.get(family, []):
            lines = [ln[1:].strip() for ln in p.read_text().splitlines() if ln.startswith("#")]
            typer.echo(f"  {p.stem:22s} {lines[0] if lines else ''}")
    typer.echo("every documented mechanism, and what the ones without a spec need: docs/library-index.md")


@app.command()
def show(spec: str = typer.Argument(..., help=SPEC_HELP),
         stage: str = typer.Option("plan", help="one of: " + ", ".join(STAGES) + " (the compiler's passes, in order: "
                                                  + "; ".join(f"{p.name}: {p.what}" for p in PIPELINE) + ")"),
         shape: str = typer.Option("2,8192,16", help="B,T,H used by --stage tiled"),
         dims: str = typer.Option("", help="feature dims, e.g. K=96,V=96: --stage tiled's sizes (default 128 each); a "
                                           "dim that runs in power-of-two parts there shows the split spec's stages"),
         backend: str = typer.Option("triton", help="the code generator for --stage source: triton or tilelang")):
    """Print one stage of the pipeline: text -> AST -> IR -> passes -> plan -> source."""
    try:
        comp = _compilation(spec)
        if stage not in STAGES:
            raise typer.BadParameter(f"unknown stage '{stage}'; expected one of {', '.join(STAGES)}")
        comp, dims, header = _in_parts(comp, stage, dims)
        typer.echo(header + _stage_text(comp, stage, shape, dims, backend))
    except (SpecError, CodegenError, NotImplementedError) as e:
        _fail(e)


def _in_parts(comp, stage: str, dims: str):
    """With --dims whose sizes run in power-of-two parts (passes.dim_parts), the stages from `typed` on are the
    split spec's: (compilation, dims, a header line saying so)."""
    from ..passes.dim_parts import NotSplittable, split_dims
    from ..runtime.dim_parts import PartMap, describe_parts, parts_of
    given = _parse_dims(dims)
    parts = parts_of(comp, given) if given and stage not in ("ast", "ir") else {}
    if not parts:
        return comp, dims, ""
    try:
        split = type(comp).of_ir(split_dims(comp.typed, tuple(parts)))
    except NotSplittable as e:
        return comp, dims, f"# {describe_parts(parts)} would pad less, but the tiles stay padded: {e}\n"
    run = PartMap(comp.typed, split.typed).dims(given)
    sizes = ",".join(f"{n}={s}" for n, s in run.items() if n in split.typed.dims)
    return split, sizes, f"# in parts (passes.dim_parts): {describe_parts(parts)}\n"


def _stage_text(comp, stage: str, shape: str, dims: str, backend: str) -> str:
    """`effc show`'s text of one stage; a spec with branches: each branch's spec in turn (passes.branches)."""
    from ..ir import print_spec
    from ..policy.tiling import tiling_space
    if stage == "ast":
        return "\n".join(repr(s) for s in comp.module.specs)
    if stage == "source":
        return comp.source(backend)
    if comp.ir.family == "branched" and stage != "split":
        return "\n\n".join(f"# branch spec {p.name}\n" + _stage_text(p, stage, shape, dims, backend) for p in comp.parts)
    if stage in ("ir", "typed"):
        return print_spec(getattr(comp, stage))
    if stage == "tiled":
        B, T, H = _parse_shape(shape)
        sizes, cfg = _tiles(comp, B, T, H, _parse_dims(dims))
        if comp.typed.score.ops:  # the softmax family: the model's blocks need no shape
            return f"for {sizes}: {cfg}"
        return f"{tiling_space(comp.typed, comp.legality)}\nfor B={B} T={T} H={H} {sizes}: {cfg}"
    value = getattr(comp, stage)
    return f"{stage}: none for a {comp.ir.family} spec" if value is None else str(value)


@app.command("compile")
def compile_(spec: str = typer.Argument(..., help=SPEC_HELP),
             output: Path = typer.Option(None, "-o", "--output", help="directory for the generated module"),
             backend: str = typer.Option("triton", help="code generator: triton or tilelang"),
             shape: str = typer.Option("2,8192,16", help="B,T,H to explain the tiling choice for"),
             dims: str = typer.Option("", help="feature dims, e.g. K=128,V=128 (default 128 each)")):
    """Compile a spec; write the generated module and say what the compiler chose and why."""
    try:
        comp = _compilation(spec)
        source = comp.source(backend)
        B, T, H = _parse_shape(shape)
        sizes = _parse_dims(dims)
        walks = comp.parts if comp.ir.family == "branched" else [comp]  # a spec with branches: each branch's
        explained = [_explain(p, B, T, H, sizes) for p in walks]
    except (SpecError, CodegenError, NotImplementedError) as e:
        _fail(e)
    out_dir = output or Path("effc_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{comp.typed.name}_{backend}.py"
    path.write_text(source)
    if comp.ir.family == "branched":
        typer.echo(f"spec {comp.typed.name}: schedule {comp.schedule_name}; {comp.branch_split}")
    typer.echo("\n".join(explained))
    typer.echo(_memory_line(comp, B, T, H, {d: 128 for p in walks for d in p.typed.dims} | sizes))
    typer.echo(f"wrote {path}")


def _tiles(comp, B: int, T: int, H: int, given: dict):
    """(feature dim sizes, the tiling model's choice) for one spec at a shape: the softmax family's key-block
    walk or the chunked scan's tiles; feature dims default to 128."""
    from ..policy.tiling import Problem, choose
    sizes = {d: 128 for d in comp.typed.dims} | given
    if comp.typed.score.ops:
        from ..passes.softmax import choose_softmax_tiles, visible_blocks
        sched = getattr(comp.legality, "softmax", comp.legality)  # a hybrid's: its softmax branch's
        return sizes, choose_softmax_tiles(comp.typed, sizes, interpreting=False, visible=visible_blocks(sched, T, {}))
    return sizes, choose(comp.typed, comp.legality, Problem(B, T, H, tuple(sorted(sizes.items()))))


def _explain(comp, B: int, T: int, H: int, given: dict) -> str:
    """What the compiler chose for one spec (a branch's, for a spec with branches), and why."""
    sizes, cfg = _tiles(comp, B, T, H, given)
    lines = [f"spec {comp.typed.name}: schedule {getattr(comp, 'schedule_name', 'chunked-state scan')}",
             str(comp.legality)]
    fused = comp.fused
    default = getattr(fused, "partition", None)
    lines.append("fused stages: " + "; ".join(f"{k.name} = {' + '.join(k.stages)}" for k in fused.kernels
                                              if not getattr(k, "partitions", ()) or default in k.partitions))
    from ..passes.softmax_plan import SoftmaxPlan
    if isinstance(fused, SoftmaxPlan):  # the query-side walks' row partitions: the model picks per call
        lines += [f"row partition {c.name}: {', '.join(c.kernels)}: {c.what}" for c in fused.partitions]
    else:
        for c in getattr(fused, "partitions", ()):
            lines.append(f"gradient partition {c.name}: {', '.join(c.kernels)} (model: ~{c.us:.0f} us at 2x8192, "
                         f"H=16, d=128)" + (", the default" if c.name == default else ""))
    if getattr(comp.fused, "hoisted", ()):
        lines.append(f"hoisted: {', '.join(n for n, _ in comp.fused.hoisted)} (state-free, from an in-chunk solve): "
                     "the prep kernel computes them for every chunk in parallel; the walk and the backward load them")
    if getattr(comp.fused, "handed", ()):
        writers = {n: k.name for k in comp.fused.kernels for n, _ in getattr(k, "scratch_stores", ())}
        lines.append("handed on: " + ", ".join(f"{n} by {writers.get(n, '?')}" for n, _ in comp.fused.handed)
                     + " (per token, read by the kernels after it instead of computed again)")
    lines.append(f"tiling for B={B} T={T} H={H} {sizes}: {cfg}")
    return "\n".join(lines)


def _memory_line(comp, B: int, T: int, H: int, sizes: dict) -> str:
    """A training step's memory at the shape (tools.memory), the default partition's, from the op of the
    compilation `compile` made (not compiled again)."""
    import torch

    from ..runtime.softmax_op import make_op
    from .memory import training_memory
    try:
        return ("training memory at that shape in bf16: "
                f"{training_memory(make_op(comp, 'triton'), B, T, H, sizes, torch.bfloat16)}")
    except (SpecError, ArgumentError, NotImplementedError) as e:
        return f"training memory: not estimated ({e})"


@app.command()
def check(spec: str = typer.Argument(..., help=SPEC_HELP),
          shape: str = typer.Option("2,100,2", help="B,T,H"),
          dims: str = typer.Option("", help="feature dims, e.g. K=32,V=32 (default 32 each)"),
          chunk: int = typer.Option(None, help="chunk size (default: the spec's)"),
          segments: int = typer.Option(None, help="segments of the walk (default: the model's)"),
          walk_chunk: int = typer.Option(None, help="chunk of a coarse walk, refined in chunks of --chunk "
                                                    "(linear family; default: none)"),
          defer_merge: bool = typer.Option(None, "--defer-merge/--fuse-merge",
                                           help="merge in the chunk-parallel out kernel, or "
                                                "fused in the walk (default: the model's)"),
          dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (low precision needs a GPU)"),
          seed: int = typer.Option(0),
          backend: str = typer.Option("triton", help="triton, tilelang (forward; needs a GPU) or auto")):
    """Parse, validate, and run the kernel against the oracle on random inputs, forward and backward; print
    each output's, final state's and gradient's error and bound."""
    interp = _use_interpreter_without_gpu()
    import torch

    from ..runtime.softmax_op import make_op
    from ..runtime.verify import check_op
    try:
        comp = _compilation(spec)
        op = make_op(comp, backend)  # AttentionOp, SoftmaxOp, or a hybrid's op (a state and a softmax branch)
        if interp and backend != "triton":
            raise ArgumentError(f"the {backend} backend needs a GPU; without one, `effc show --stage source "
                                f"--backend {backend}` prints its program")
        B, T, H = _parse_shape(shape)
        sizes = {d: 32 for d in op.spec.dims} | _parse_dims(dims)
        if dtype not in _DTYPES:
            raise typer.BadParameter(f"'{dtype}': expected one of {', '.join(_DTYPES)}", param_hint="--dtype")
        dt = getattr(torch, dtype)
        if interp and dt != torch.float32:
            raise ArgumentError("low-precision checks need a GPU: Triton's interpreter computes bf16 dots wrongly")
        verdicts = check_op(op, B, T, H, sizes, dt, "cpu" if interp else "cuda", seed, chunk=chunk,
                            segments=segments, defer_merge=defer_merge,
                            **({"walk_chunk": walk_chunk} if walk_chunk is not None else {}))
    except (SpecError, CodegenError, ArgumentError, NotImplementedError) as e:
        _fail(e)
    where = "Triton interpreter (CPU)" if interp else torch.cuda.get_device_name()
    typer.echo(f"{op.name}: B={B} T={T} H={H} {sizes} {dtype} on {where}; {op.last_config}".rstrip())
    if getattr(op, "last_dim_parts", "") not in ("", "no parts"):  # passes.dim_parts: what the kernels ran
        typer.echo(f"  feature dims: {op.last_dim_parts}")
    for what, v in verdicts:
        typer.echo(f"  {what}: {v}")
    if not all(v.ok for _, v in verdicts):
        raise typer.Exit(1)


def _head_dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise typer.BadParameter(f"'{text}': one or more head dims >= 1, comma-separated (e.g. 64,96,128)",
                                 param_hint="--head-dim")
    return dims


@app.command()
def bench(specs: str = typer.Option("retention,simple_gla,gla", help="comma-separated specs"),
          shapes: str = typer.Option("8x2048,2x8192,1x32768", help="BxT list"),
          heads: int = typer.Option(16, "--heads"),
          head_dim: str = typer.Option("128", "--head-dim", help="every feature dim's size; several (60,64,96,128,192) "
                                       "add a table of time per FLOP against the nearest power-of-two head dim"),
          peers: bool = typer.Option(True, help="time the installed peers (flash-linear-attention) beside effc"),
          peer_timeout: float = typer.Option(240.0, help="seconds a peer may take (its first call autotunes)"),
          json_out: Path = typer.Option(None, "--json", help="also write the rows as JSON"),
          plot: Path = typer.Option(None, "--plot", help="also plot time vs sequence length to this PNG (matplotlib)"),
          backward: bool = typer.Option(False, "--backward", help="also time forward+backward, with peak memory"),
          backend: str = typer.Option("triton", help="comma-separated code generators to time: triton,tilelang"),
          from_json: str = typer.Option(None, "--from-json",
                                        help="time nothing: print (and --plot) the rows earlier --json calls wrote "
                                             "(F or F1,F2)"),
          markdown: bool = typer.Option(False, "--markdown", help="--from-json: the README's speed table "
                                        "(peer / effc ratios, peak memory) in markdown"),
          decode: bool = typer.Option(False, "--decode", help="time decoding steps (op.decode) against a KV cache of "
                                      "T tokens per request (shapes BxT), beside torch SDPA over the same cache"),
          kv_heads: int = typer.Option(0, "--kv-heads", help="heads of the key/value inputs (grouped-query "
                                       "attention; default: --heads), effc's and the peers'"),
          new_tokens: int = typer.Option(1, "--new-tokens", help="--decode: new tokens per request and step")):
    """Time effc's kernels and the peers on identical bf16 inputs, one GPU, one run; print ratios."""
    from .bench import run_bench, show_saved
    try:
        if from_json:
            show_saved([p for p in str(from_json).split(",") if p], plot, markdown)
            return
        if decode:
            from .bench_decode import run_decode_bench
            dims = _head_dims(head_dim)  # the first (one decode row per spec and shape)
            run_decode_bench([s for s in specs.split(",") if s], [tuple(int(v) for v in s.split("x"))
                                                                    for s in shapes.split(",")],
                             heads, kv_heads or heads, dims[0], new_tokens, json_out, peers)
            return
        run_bench([s for s in specs.split(",") if s], [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")],
                  heads, _head_dims(head_dim), peers, peer_timeout, json_out, plot=plot, backward=backward,
                  backends=tuple(b for b in backend.split(",") if b), kv_heads=kv_heads or None)
    except (SpecError, ArgumentError, RuntimeError) as e:
        _fail(e)


@app.command()
def memory(spec: str = typer.Argument(..., help=SPEC_HELP),
           shape: str = typer.Option("2,8192,16", help="B,T,H"),
           dims: str = typer.Option("", help="feature dims, e.g. K=128,V=128 (default 128 each)"),
           dtype: str = typer.Option("bfloat16", help="the inputs' dtype: bfloat16, float16 or float32"),
           chunk: int = typer.Option(None, help="chunk size (default: the model's)"),
           walk_chunk: int = typer.Option(None, help="chunk of a coarse walk, refined in chunks of --chunk "
                                                     "(linear family; default: none)"),
           kv_heads: int = typer.Option(None, help="heads of the key inputs (grouped-query attention; default H)"),
           top: int = typer.Option(0, help="list the N largest buffers live at the peak, with the line that made each")):
    """The memory of one training step (forward + backward) on a GPU at a shape, without one: the peak beyond
    the inputs (the bench's measure) and what the forward keeps, per gradient partition."""
    import torch

    from .memory import training_memory
    if dtype not in _DTYPES:
        raise typer.BadParameter(f"'{dtype}': expected one of {', '.join(_DTYPES)}", param_hint="--dtype")
    try:
        import effc
        op = effc.load(spec)
        B, T, H = _parse_shape(shape)
        sizes = {d: 128 for d in op.spec.dims} | _parse_dims(dims)
        plan = op.comp.plan
        choices = [c.name for c in getattr(plan, "partitions", ())] or [None]
        if kv_heads is not None and (kv_heads < 1 or H % kv_heads):
            raise typer.BadParameter(f"{kv_heads}: expected a divisor of H={H}", param_hint="--kv-heads")
        grouped = f" ({kv_heads} key head{'s' if kv_heads > 1 else ''})" if kv_heads else ""
        typer.echo(f"{op.name}: a training step at B={B} T={T} H={H}{grouped} {sizes} {dtype}")
        knobs = {k: v for k, v in (("chunk", chunk), ("walk_chunk", walk_chunk)) if v is not None}
        for p in choices:
            tag = f"partition {p}{' (default)' if p == getattr(plan, 'partition', None) else ''}: " if p else ""
            try:
                m = training_memory(op, B, T, H, sizes, getattr(torch, dtype), kv_heads=kv_heads, top=max(0, top),
                                    **({"partition": p} if p else {}), **knobs)
            except ArgumentError as e:  # a partition this call cannot take (e.g. too few heads a group)
                if p is None or len(choices) == 1:
                    raise
                typer.echo(f"  {tag}not for this call: {str(e).splitlines()[0]}")
                continue
            typer.echo(f"  {tag}{m}")
            for b in m.at_peak:
                typer.echo(f"    {b}")
    except (SpecError, CodegenError, ArgumentError, NotImplementedError) as e:
        _fail(e)


from .cli_tune import register  # noqa: E402

register(app, _fail, _parse_dims)  # `tune` and `cache`


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
