"""The user-facing op: `op(q, k, v, *gates, scale=None, initial_state=None,
output_final_state=False)` -> `(o, final_state)`, inputs (B, T, H, D)."""
from __future__ import annotations

import math

import sympy
import torch

from ..errors import ArgumentError
from ..ir.nodes import Spec, dim
from ..passes.tiling import Problem, TileConfig, choose
from .cache import load_module
from .checks import check_inputs, check_state, interpreting
from .compiler import Compilation
from .oracle import evaluate

_DOT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # model an H100 when interpreting


class AttentionOp:
    def __init__(self, comp: Compilation, backend: str = "triton"):
        self.comp, self.backend = comp, backend
        self.spec: Spec = comp.typed
        self.name = self.spec.name
        self._module = None
        self.last_config: TileConfig | None = None
        # sympy is slow: tiling choices and param defaults are memoised per call shape
        self._configs: dict[tuple, TileConfig] = {}
        self._defaults: dict[tuple, dict[str, float]] = {}

    def __repr__(self) -> str:
        args = ", ".join(d.name for d in self.spec.inputs)
        return f"<effc op {self.name}({args}) backend={self.backend}>"

    @property
    def module(self):
        if self._module is None:
            self._module, self.source_path = load_module(self.name, self.comp.source(self.backend))
        return self._module

    # -- parameters ---------------------------------------------------------------------------
    def param_values(self, dims: dict[str, int], given: dict) -> dict[str, float]:
        known = {p.name for p in self.spec.params}
        unknown = set(given) - known
        if unknown:
            raise ArgumentError(f"{self.name} has no parameter(s) {sorted(unknown)}; its params: {sorted(known)}")
        key = tuple(sorted(dims.items()))
        if key not in self._defaults:
            subs = {dim(n): v for n, v in dims.items()}
            self._defaults[key] = {p.name: float(p.default.subs(subs)) for p in self.spec.params}
        return {**self._defaults[key], **{k: float(v) for k, v in given.items()}}

    def _split(self, *tensors, params, for_kernels=True):
        B, T, H, dims = check_inputs(self.spec, tensors, for_kernels)
        return B, T, H, dims, self.param_values(dims, {k: v for k, v in params.items() if v is not None})

    def config(self, B: int, T: int, H: int, dims: dict[str, int], device, **overrides) -> TileConfig:
        key = (B, T, H, tuple(sorted(dims.items())), str(device), tuple(sorted(overrides.items())))
        if key not in self._configs:
            problem = Problem(B, T, H, key[3], _sm_count(device))
            self._configs[key] = choose(self.spec, self.comp.legality, problem, **overrides)
        return self._configs[key]

    # -- the kernels ----------------------------------------------------------------------------
    def __call__(self, *tensors, initial_state=None, output_final_state: bool = False, chunk: int | None = None,
                 block: int | None = None, segments: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, **params):
        B, T, H, dims, pvals = self._split(*tensors, params=params)
        device = tensors[0].device
        init = check_state(self.spec, initial_state, B, H, dims, device)
        cfg = self.config(B, T, H, dims, device, chunk=chunk, block=block, segments=segments, num_warps=num_warps,
                          num_stages=num_stages)
        self.last_config = cfg
        if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
            return _NoBackward.apply(self, cfg, pvals, init, output_final_state, *tensors)
        return self._forward(cfg, pvals, init, output_final_state, tensors)

    def _forward(self, cfg: TileConfig, pvals, init, output_final_state, tensors):
        import triton.language as tl

        spec, plan = self.spec, self.comp.plan
        B, T, H = tensors[0].shape[:3]
        dims = {n: s for d, x in zip(spec.inputs, tensors) for n, s in zip(d.dims[3:], x.shape[3:])}
        xs = {d.name: x.contiguous() for d, x in zip(spec.inputs, tensors)}
        dtype, device = tensors[0].dtype, tensors[0].device
        outs = {o.name: torch.empty((B, T, H) + tuple(dims[n] for n in o.feature_dims), dtype=dtype, device=device)
                for o in spec.outputs}
        n_chunks = max(1, math.ceil(T / cfg.chunk))
        P = cfg.segments
        per_seg = math.ceil(n_chunks / P)
        P = math.ceil(n_chunks / per_seg)
        state_shape = {s.name: tuple(dims[n] for n in s.dims) for s in spec.states}
        finals = {s: torch.empty((B, H) + shp, dtype=torch.float32, device=device) for s, shp in state_shape.items()}
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        segw = {s: torch.empty((B * H, P) + shp, dtype=torch.float32, device=device) if P > 1 else dummy
                for s, shp in state_shape.items()}
        segd = {s: torch.empty_like(w) if P > 1 else dummy for s, w in segw.items()}
        split = plan.split_dim
        n_split = dims[split] // cfg.block if split else 1
        interp = interpreting()
        meta = dict(H=H, **dims, C=cfg.chunk, BLOCK=cfg.block if split else 1,
                    HAS_INIT=bool(init), STORE_FINAL=bool(output_final_state),
                    DOT_DTYPE=getattr(tl, "float32" if interp else _DOT_DTYPES[dtype]),
                    PRECISION="ieee" if (interp or dtype == torch.float32) else "tf32")
        runtime = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages) if not interp else {}
        for kp in plan.kernels:
            if kp.name == "summary" and P == 1:
                continue
            fn = getattr(self.module, f"{spec.name}_{kp.name}_kernel")
            args = [xs[d.name] for d in kp.loads] + [outs[o.name] for o in kp.stores]
            for s in kp.states:
                if kp.name == "walk":
                    args += [init.get(s.name, dummy), finals[s.name]]
                args += [segw[s.name], segd[s.name]]
            args += [pvals[p] for p in kp.params]
            args += [T, n_chunks, per_seg, P]
            grid = (n_split, B * H, P if kp.name == "walk" else P - 1)
            fn[grid](*args, **meta, **runtime)
        o = outs[spec.outputs[0].name] if len(spec.outputs) == 1 else tuple(outs.values())
        final = None
        if output_final_state:
            final = finals[spec.states[0].name] if len(spec.states) == 1 else tuple(finals.values())
        return o, final

    # -- the oracle ---------------------------------------------------------------------------
    def reference(self, *tensors, initial_state=None, output_final_state: bool = False, chunk: int | None = None,
                  dtype=torch.float64, matmul_dtype=None, **params):
        """The spec evaluated with PyTorch ops (chunk=1 gives the token-by-token recurrence)."""
        B, T, H, dims, pvals = self._split(*tensors, params=params, for_kernels=False)
        init = check_state(self.spec, initial_state, B, H, dims, tensors[0].device)
        outs, states = evaluate(self.spec, {d.name: x for d, x in zip(self.spec.inputs, tensors)}, pvals,
                                chunk or self.spec.chunk, init, dtype, matmul_dtype)
        o = outs[self.spec.outputs[0].name] if len(outs) == 1 else tuple(outs.values())
        if not output_final_state:
            return o, None
        return o, (states[self.spec.states[0].name] if len(states) == 1 else tuple(states.values()))

    def recurrent_reference(self, *tensors, **kw):
        return self.reference(*tensors, chunk=1, **kw)


class _NoBackward(torch.autograd.Function):
    """Forward through the kernels; the derived backward is not generated yet."""

    @staticmethod
    def forward(ctx, op, cfg, pvals, init, output_final_state, *tensors):
        ctx.op_name = op.name
        o, final = op._forward(cfg, pvals, init, output_final_state, tensors)
        return o, final

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(f"backward of '{ctx.op_name}': the autodiff pass (derived backward kernels) "
                                  "is not implemented yet; use op.reference(...) to differentiate the oracle")
