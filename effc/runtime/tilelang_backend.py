"""Running a plan's forward kernels through TileLang (codegen/tilelang).

`TileLangLauncher(spec, plan).forward(...)` has the contract of `launch.Launcher.forward` (padded and
packed batches, grouped heads, segments, initial/final states, the per-chunk state history), so a
caller can pick either launcher; `forward(plan, cfg, tensors, pvals, init, output_final_state)` is the
same for plain (B, T, H, D) inputs. The backward kernel is Triton's: it reads the history this
forward stores. Compiled kernels are cached per (source hash, kernel, compile-time sizes).

Feature dims take any size >= 1: a call whose dims are not all powers of two >= 16 (or whose split dim
BLOCK does not divide) runs the module emitted for those masked dims (codegen.tilelang.emit_module), whose
tiles are padded and masked; every other call runs the plain module, which has no mask at all."""
from __future__ import annotations

import hashlib
import math

import torch

from ..codegen.tilelang import FORWARD, emit_module, kernel_params
from ..compiler import checked_source
from ..errors import ArgumentError
from ..ir.nodes import Spec
from ..passes.plan import Plan
from ..policy.tiling import TileConfig, padded
from .cache import load_module
from .checks import history_dtype, operand_dtype
from .launch import Layout, make_layout

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_COMPILED: dict[tuple, object] = {}


def tilelang_target(device: torch.device) -> dict:
    """The device's arch; Hopper needs the `a` variant for wgmma and TMA."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"kind": "cuda", "arch": f"sm_{major}{minor}{'a' if major == 9 else ''}"}


def _import_tilelang():
    try:
        import tilelang
    except ImportError as e:
        raise ImportError("the TileLang backend needs the `tilelang` package: pip install 'effc[tilelang]'") from e
    return tilelang


def masked_dims(plan: Plan, dims: dict, block: int) -> frozenset:
    """The feature dims whose tiles pass their real size: a dim that is not a power of two >= 16 (its tile is
    padded(size) columns), the split dim when `block` does not divide it (its last block is masked)."""
    out = set()
    for n, v in dims.items():
        if n not in plan.spec.dims:  # a call in dim parts also names the caller's dim (runtime.dim_parts)
            continue
        if v < 1:
            raise ArgumentError(f"the TileLang backend takes feature dims >= 1, got {n}={v}")
        if (v % block != 0) if n == plan.split_dim else (padded(v) != v):
            out.add(n)
    return frozenset(out)


class TileLangLauncher:
    def __init__(self, spec: Spec, plan: Plan):
        self.spec, self.plan = spec, plan
        self.source = checked_source(emit_module(plan), spec.name, "tilelang")
        self.digest = hashlib.sha256(self.source.encode()).hexdigest()[:16]
        self._module = None
        self._masked: dict[frozenset, tuple[str, object]] = {}  # masked dims -> (digest, module)
        self._dummies: dict[tuple, torch.Tensor] = {}
        # software-pipeline depth of the chunk loop; None: 1. Measured on an H100 (2x8192, bf16): 2 stages
        # overlap the next chunk's loads with this chunk's math and are 2-12% faster where TileLang warp-
        # specialises (kernels without a scan), 15-45% slower where it does not. Checked for accuracy at 1
        # only: `scripts/tilelang_check.py --stages 2` checks 2.
        self.num_stages: int | None = None

    @property
    def module(self):
        if self._module is None:
            self._module, self.source_path = load_module(f"{self.spec.name}_tilelang", self.source)
        return self._module

    def module_for(self, masked: frozenset) -> tuple[str, object]:
        """(digest, module) of the program for these masked dims (none: the plain module)."""
        if not masked:
            return self.digest, self.module
        if masked not in self._masked:
            source = checked_source(emit_module(self.plan, masked), self.spec.name, "tilelang")
            tag = "_".join(sorted(masked))
            module, _ = load_module(f"{self.spec.name}_tilelang_pad_{tag}", source)
            self._masked[masked] = (hashlib.sha256(source.encode()).hexdigest()[:16], module)
        return self._masked[masked]

    def kernel(self, name: str, sizes: dict, device: torch.device, masked: frozenset = frozenset()):
        """The compiled kernel `name` (walk | summary) for these compile-time sizes and masked dims."""
        digest, module = self.module_for(masked)
        key = (digest, name, tuple(sorted(sizes.items())), str(device))
        if key not in _COMPILED:
            tilelang = _import_tilelang()
            func = module.FACTORIES[name](**sizes)
            _COMPILED[key] = tilelang.compile(func, target=tilelang_target(device),
                                              pass_configs=module.PASS_CONFIGS[name])
        return _COMPILED[key]

    def _dummy(self, shape: tuple, dtype, device) -> torch.Tensor:
        """A stand-in for a tensor the kernel does not touch (its sizes are symbols of its own)."""
        key = (shape, dtype, str(device))
        if key not in self._dummies:
            self._dummies[key] = torch.zeros(shape, dtype=dtype, device=device)
        return self._dummies[key]

    def forward(self, cfg: TileConfig, lay: Layout, xs: dict, pvals: dict, init: dict, store_final: bool,
                store_history: bool, outputs: bool = True):  # outputs: always computed (merge stays fused)
        """Returns (outputs, final states, state history), as launch.Launcher.forward does."""
        spec, plan = self.spec, self.plan
        if cfg.defer_merge:
            raise NotImplementedError("the TileLang backend has no 'out' kernel (merge evaluated per chunk from the "
                                      "walk's states): merge stays fused in its walk; call with defer_merge=False "
                                      "or use the Triton backend")
        if cfg.serial_chunk != cfg.chunk:
            raise NotImplementedError(f"the TileLang backend walks in chunks of one length: walk_chunk="
                                      f"{cfg.walk_chunk} (a coarse walk refined in chunks of {cfg.chunk}) runs on the "
                                      "Triton backend")
        masked = masked_dims(plan, lay.dims, cfg.block)
        first = xs[spec.inputs[0].name]
        dtype, device = first.dtype, first.device
        if dtype not in _DTYPES:
            raise ArgumentError(f"the TileLang backend takes float32, bfloat16 or float16 inputs, got {dtype}")
        # one dtype per kernel: inputs of another dtype are converted to the first input's
        xs = {n: (x if x.dtype == dtype else x.to(dtype)) for n, x in xs.items()}
        total_chunks, max_chunks = lay.chunks(cfg.chunk)
        P = max(1, min(cfg.segments, max_chunks))
        per_seg = math.ceil(max_chunks / P)
        P = math.ceil(max_chunks / per_seg)
        f32 = dict(dtype=torch.float32, device=device)
        n_bh = lay.n_seq * lay.H
        shape = {s.name: tuple(lay.dims[n] for n in s.dims) for s in spec.states}
        outs = {o.name: torch.empty(first.shape[:2] + (lay.H,) + tuple(lay.dims[n] for n in o.feature_dims),
                                    dtype=dtype, device=device) for o in spec.outputs}
        finals = {n: torch.empty((lay.n_seq, lay.H) + shp, **f32) for n, shp in shape.items()}
        hist_dtypes = {s.name: history_dtype(s, dtype) for s in spec.states}
        hist = ({n: torch.empty((total_chunks, lay.H) + shp, dtype=hist_dtypes[n], device=device)
                 for n, shp in shape.items()} if store_history else {})
        segw = {n: torch.empty((n_bh, P) + shp, **f32) for n, shp in shape.items()} if P > 1 else {}
        segd = {n: torch.empty_like(w) for n, w in segw.items()}
        i32 = self._dummy((1,), torch.int32, device)
        cu = lay.cu if lay.cu is not None else i32
        chunk_off = lay.chunk_off if lay.chunk_off is not None else i32

        def state(table, n, dt=torch.float32):
            t = table.get(n)
            return t if t is not None else self._dummy((1, 1) + shape[n], dt, device)

        tensors = {f"{d.name}_in": x.flatten(0, 1) for d, x in ((d, xs[d.name]) for d in spec.inputs)}
        tensors.update({f"{n}_out": o.flatten(0, 1) for n, o in outs.items()})
        for n in shape:
            tensors.update({f"{n}_init": state(init, n), f"{n}_final": finals[n], f"{n}_hist": state(hist, n, hist_dtypes[n]),
                            f"{n}_segw": state(segw, n), f"{n}_segd": state(segd, n)})
        tensors.update({f"p_{p}": float(v) for p, v in pvals.items()})
        tensors.update(T_pad=lay.T, chunks_per_seg=per_seg, n_segments=P, n_bh=n_bh, cu=cu, chunk_off=chunk_off)
        base = dict(H=lay.H, **lay.dims, C=cfg.chunk, BLOCK=cfg.block if plan.split_dim else 1,
                    dtype=_DTYPES[dtype], threads=32 * cfg.num_warps, num_stages=self.num_stages or 1,
                    is_varlen=lay.cu is not None, aligned=lay.cu is None and lay.T % cfg.chunk == 0)
        for kp in plan.kernels:
            if kp.role not in FORWARD or (kp.role == "summary" and P == 1):
                continue
            sizes = dict(base, **{f"HX_{d.name}": lay.heads[d.name] for d in kp.loads})
            if kp.role == "walk":
                sizes.update(has_init=bool(init), store_final=store_final, store_history=store_history,
                             hist_dtype=_DTYPES[operand_dtype(dtype)])  # the matrix states' (history_dtype)
            self.kernel(kp.name, sizes, device, masked)(*(tensors[n] for n in kernel_params(spec, kp)))
        return outs, (finals if store_final else {}), hist

    def backward(self, *args, **kwargs):
        raise NotImplementedError("the TileLang backend emits the forward kernels only; the backward runs on "
                                  "Triton (launch.Launcher.backward), from the history this forward stores")


_LAUNCHERS: dict[int, tuple[Plan, TileLangLauncher]] = {}


def launcher(plan: Plan) -> TileLangLauncher:
    """One launcher per plan object (a Compilation keeps its plan), so its module is generated once."""
    hit = _LAUNCHERS.get(id(plan))
    if hit is None or hit[0] is not plan:
        hit = _LAUNCHERS[id(plan)] = (plan, TileLangLauncher(plan.spec, plan))
    return hit[1]


def forward(plan: Plan, cfg: TileConfig, tensors, pvals: dict, init: dict, output_final_state: bool):
    """(o, final) for (B, T, H, D) inputs, as the Triton path returns them: o one tensor per output (a
    tuple when several), final the fp32 state(s) (a tuple when several) or None."""
    spec = plan.spec
    xs = {d.name: x.contiguous() for d, x in zip(spec.inputs, tensors)}
    dims = {n: s for d, x in zip(spec.inputs, tensors) for n, s in zip(d.dims[3:], x.shape[3:])}
    lay = make_layout(spec, list(tensors), tensors[0].shape[2], dims, None, cfg.chunk)
    init = {n: x.float().contiguous() for n, x in (init or {}).items()}
    outs, finals, _ = launcher(plan).forward(cfg, lay, xs, pvals, init, bool(output_final_state), False)
    o = outs[spec.outputs[0].name] if len(spec.outputs) == 1 else tuple(outs[d.name] for d in spec.outputs)
    if not output_final_state:
        return o, None
    return o, (finals[spec.states[0].name] if len(spec.states) == 1 else tuple(finals[s.name] for s in spec.states))
