"""Kernel plan -> a Triton module (source text). Index arithmetic is derived from each
tensor's declared dims; the body is one printed line per IR op."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from ... import __version__
from ...ir.nodes import TensorDecl
from ...passes.plan import KernelPlan, Plan
from ...passes.shapes import value_types
from .printer import TritonPrinter


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return env.get_template("kernels.py.j2")


def _axes(n: int, i: int) -> str:
    """Index suffix that puts axis i of an n-axis tile in place: [:, None] / [None, :]."""
    return "" if n == 1 else "[" + ", ".join(":" if j == i else "None" for j in range(n)) + "]"


def _row_major(base: str, dims: tuple[str, ...]) -> str:
    """Offsets of a tile over `dims` (innermost last) inside a block that starts at `base`."""
    expr = base
    for i, d in enumerate(dims):
        expr = f"({expr}) * {d} + r_{d}{_axes(len(dims), i)}"
    return expr


def _token_offsets(d: TensorDecl) -> tuple[str, str]:
    feats = d.feature_dims
    tok = "tok" + ("[:, None]" if feats else "")
    base = f"(i_b * T + {tok}) * H + i_h"
    expr = base
    for f in feats:
        expr = f"({expr}) * {f} + r_{f}[None, :]"
    return expr, "tv" + ("[:, None]" if feats else "")


@dataclass
class _KernelView:
    fn: str
    plan: KernelPlan
    body: list[str]
    tok_offs: dict[str, str]
    tok_mask: dict[str, str]
    state_offs: dict[str, str]
    seg_offs: dict[str, str]
    state_block: dict[str, str]
    decay: dict[str, str]  # the expression of each state's diagonal decay (summary kernel)


def kernel_name(spec_name: str, kernel: str) -> str:
    return f"{spec_name}_{kernel}_kernel"


def emit_module(plan: Plan) -> str:
    spec = plan.spec
    printer = TritonPrinter(spec, value_types(spec))
    views = []
    for kp in plan.kernels:
        toks = {d.name: _token_offsets(d) for d in kp.loads + kp.stores}
        views.append(_KernelView(
            fn=kernel_name(spec.name, kp.name), plan=kp,
            body=[f"v_{op.out} = {printer.expr(op)}" for op in kp.ops],
            tok_offs={n: t[0] for n, t in toks.items()}, tok_mask={n: t[1] for n, t in toks.items()},
            state_offs={s.name: _row_major("i_bh", s.dims) for s in kp.states},
            seg_offs={s.name: _row_major("i_bh * n_segments + seg", s.dims) for s in kp.states},
            state_block={s.name: "[" + ", ".join("BLOCK" if d == plan.split_dim else d for d in s.dims) + "]"
                         for s in kp.states},
            decay={s.name: printer.ref(s.decay) for s in kp.states if s.decay is not None}))
    summary = (f"kernels: {', '.join(k.name for k in plan.kernels)}; split dim: {plan.split_dim or '-'}")
    return _template().render(version=__version__, spec=spec, kernels=views, dims=spec.dims,
                              split=plan.split_dim, summary=summary)
