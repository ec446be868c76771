"""Runs the TileLang programs effc emits on the CPU, statement by statement, so their arithmetic can be
checked where no GPU is: the module's source is executed with a stand-in for `tilelang.language` whose
T.Parallel / T.serial / T.Pipelined are Python loops, buffers NumPy arrays, T.gemm a float64 matmul of
the staged operands, and the grid a loop over program ids. It checks what the program computes (the
printer's statements and indices, masks, staging dtypes), not how TileLang compiles it (layouts, warps,
pipelining): tests/test_tilelang.py lowers the same source to CUDA, and scripts/tilelang_check.py runs
it on a GPU. float32 and float16 only (NumPy has no bfloat16); slow, so tiny shapes."""
from __future__ import annotations

import ast
import contextlib
import itertools
from types import SimpleNamespace

import numpy as np
import torch

from effc.codegen.tilelang import emit_module
from effc.runtime.launch import make_layout
from effc.runtime.tilelang_backend import TileLangLauncher

_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "float64": np.float64}


def _np_dtype(dt):
    return _NP[str(dt).strip('"')]


class _FakeT:
    """The part of `tilelang.language` the emitted programs use."""

    def __init__(self):
        self.program = (0, 0, 0)

    # declarations: annotations and sizes, no values
    @staticmethod
    def prim_func(fn):
        return fn

    Tensor = staticmethod(lambda shape, dtype: None)
    int32 = int

    @staticmethod
    def float32(x=0.0):
        return np.float32(x)

    @staticmethod
    def dynamic(names):
        n = len(names.split(","))
        return (None,) * n if n > 1 else None

    # buffers
    @staticmethod
    def alloc_shared(shape, dtype):
        return np.zeros(shape, dtype=_np_dtype(dtype))

    alloc_fragment = alloc_shared

    @staticmethod
    def copy(src, dst):
        dst[...] = np.asarray(src).reshape(dst.shape)

    @staticmethod
    def clear(buf):
        buf[...] = 0

    @staticmethod
    def fill(buf, value):
        buf[...] = value

    # loops and the grid
    @contextlib.contextmanager
    def Kernel(self, *grid, threads=None):
        yield self.program

    @staticmethod
    def Parallel(*extents):
        ranges = [range(int(e)) for e in extents]
        return ranges[0] if len(ranges) == 1 else itertools.product(*ranges)

    @staticmethod
    def serial(n):
        return range(int(n))

    @staticmethod
    def Pipelined(lo, hi, num_stages=1):
        return range(int(lo), int(hi))

    # scalar math (NumPy scalars: inf on overflow, as on the GPU)
    Cast = staticmethod(lambda dt, x: _np_dtype(dt)(x))
    exp, exp2, log, log2, sqrt, abs = (staticmethod(f) for f in (np.exp, np.exp2, np.log, np.log2, np.sqrt, np.abs))
    rsqrt = staticmethod(lambda x: 1.0 / np.sqrt(x))
    max, min = staticmethod(np.maximum), staticmethod(np.minimum)
    infinity = staticmethod(lambda dt: np.inf)
    ceildiv = staticmethod(lambda a, b: -(-int(a) // int(b)))

    # tile operations
    @staticmethod
    def gemm(a, b, c, transpose_A=False, transpose_B=False, clear_accum=False):
        a = a.astype(np.float64).T if transpose_A else a.astype(np.float64)
        b = b.astype(np.float64).T if transpose_B else b.astype(np.float64)
        c[...] = a @ b + (0.0 if clear_accum else c)

    @staticmethod
    def cumsum(src, dst, dim=0, reverse=False):
        x = np.flip(src, dim) if reverse else src
        y = np.cumsum(x.astype(np.float64), axis=dim)
        dst[...] = np.flip(y, dim) if reverse else y

    @staticmethod
    def _reduce(how, src, out, dim, clear):
        r = getattr(np, how)(src.astype(np.float64), axis=dim).reshape(out.shape)
        if not clear:
            r = {"sum": np.add, "max": np.maximum, "min": np.minimum}[how](r, out)
        out[...] = r

    def reduce_sum(self, src, out, dim=0, clear=True):
        self._reduce("sum", src, out, dim, clear)

    def reduce_max(self, src, out, dim=0, clear=True):
        self._reduce("max", src, out, dim, clear)

    def reduce_min(self, src, out, dim=0, clear=True):
        self._reduce("min", src, out, dim, clear)


class _LazySelect(ast.NodeTransformer):
    """T.if_then_else(c, a, b) -> (a if c else b): TIR evaluates only the chosen branch (a guarded load past
    the sequence's end reads nothing), a Python call would evaluate both."""

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "if_then_else" and isinstance(f.value, ast.Name) \
                and f.value.id == "T":
            c, a, b = node.args
            return ast.copy_location(ast.IfExp(test=c, body=a, orelse=b), node)
        return node


def load_emulated(source: str):
    """The emitted module, run against the stand-in T."""
    fake = _FakeT()
    scope = {"T": fake, "__name__": "effc_tilelang_emulated"}
    tree = ast.parse(source.replace("import tilelang.language as T", ""))
    tree = ast.fix_missing_locations(_LazySelect().visit(tree))
    exec(compile(tree, "<tilelang-emulated>", "exec"), scope)
    return SimpleNamespace(**scope)


class EmulatedLauncher(TileLangLauncher):
    """TileLangLauncher.forward (layouts, segments, grouped heads, packed sequences) with each kernel run by
    the emulator over its grid instead of compiled."""

    def __init__(self, spec, plan):
        super().__init__(spec, plan)
        self.emulated = load_emulated(emit_module(plan))
        self.sources = {frozenset(): emit_module(plan)}  # masked dims -> the source the kernels ran
        self._emulated = {frozenset(): self.emulated}

    def kernel(self, name: str, sizes: dict, device, masked=frozenset()):
        if masked not in self._emulated:
            self.sources[masked] = emit_module(self.plan, masked)
            self._emulated[masked] = load_emulated(self.sources[masked])
        mod = self._emulated[masked]
        fn = mod.FACTORIES[name](**sizes)
        split = self.plan.split_dim

        def run(*args):
            arrays = [a.numpy() if torch.is_tensor(a) else a for a in args]  # views: writes reach the tensors
            n_bh = args[-3]
            n_seg = args[-4]
            programs = n_seg if name == "walk" else n_seg - 1
            n_split = -(-sizes[split] // sizes["BLOCK"]) if split else 1  # the last block masked where BLOCK does not divide
            with np.errstate(over="ignore", invalid="ignore", under="ignore"):
                for pid in itertools.product(range(n_split), range(n_bh), range(programs)):
                    mod.T.program = pid
                    fn(*arrays)
        return run


def emulated_forward(op, xs, *, chunk_dtype=None, segments: int = 1, block: int = 16, initial_state=None,
                     cu_seqlens=None, launcher=None):
    """(o, final state) of op's TileLang forward kernels, emulated, for (B, T, H, D) CPU inputs. `launcher`: an
    EmulatedLauncher of op's plan to run them (its `sources` then show which programs ran)."""
    spec, plan = op.spec, op.comp.plan
    dims = {n: s for d, x in zip(spec.inputs, xs) for n, s in zip(d.dims[3:], x.shape[3:])}
    B, T, H = xs[0].shape[:3]
    cfg = op.config(B, T, H, dims, "cpu", dtype=xs[0].dtype, segments=segments, block=block)
    lay = make_layout(spec, list(xs), H, dims, cu_seqlens, cfg.chunk)
    init = {} if initial_state is None else {spec.states[0].name: initial_state.float().contiguous()}
    launcher = launcher or EmulatedLauncher(spec, plan)
    outs, finals, _ = launcher.forward(cfg, lay, {d.name: x.contiguous() for d, x in zip(spec.inputs, xs)},
                                       op.param_values(dims, {}), init, True, False)
    return outs[spec.outputs[0].name], finals[spec.states[0].name]
