"""Tiles that only tl.dot reads load in their storage dtype in the walk (codegen.triton.emit._narrow_loads)."""
from __future__ import annotations

import re

from effc.codegen.triton.emit import emit_module
from effc.codegen.triton.printer import TritonPrinter
from effc.compiler import compile_text
from effc.ir.nodes import C, Op, TileType

SPEC = """
spec narrow_probe {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input g: [B, T, H]
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16

  intra {
    b = cumsum(g)
    o_intra = ((q @ k.T) * exp(b[:, None] - b[None, :])) @ v
  }
  merge {
    o = o_intra + (q * exp(b)[:, None]) @ S
  }
  inter {
    bl = last(b)
    S = S * exp(bl) + k.T @ (v * exp(bl - b)[:, None])
  }
}
"""


def _types():
    t = lambda *s: TileType(s)
    return {"a": t(C, "K"), "b": t(C, "K"), "s": t(C, 1), "x": t("K", "V"), "one": t(C, 1), "row": t(1, "K")}


def test_dot_operands_follows_copies_and_transposes_and_stops_at_elementwise_readers():
    ops = (Op("a2", "copy", ("a",), TileType((C, "K"))), Op("at", "transpose", ("a2",), TileType(("K", C))),
           Op("m", "matmul", ("at", "b"), TileType(("K", "K"))),       # a: only through copy, transpose, dot
           Op("bs", "mul", ("b", "s"), TileType((C, "K"))),            # b: also read elementwise
           Op("o", "matmul", ("one", "row"), TileType((C, "K"))))      # an outer product prints as a multiply
    found = _printer().dot_operands(ops)
    assert "a" in found and "a2" in found and "at" in found
    assert "b" not in found and "one" not in found and "row" not in found


def _printer():
    p = TritonPrinter.__new__(TritonPrinter)
    p.types = _types() | {"a2": TileType((C, "K")), "at": TileType(("K", C)), "bs": TileType((C, "K")),
                          "m": TileType(("K", "K")), "o": TileType((C, "K"))}
    return p


def _loads(src: str, kernel: str) -> dict[str, bool]:
    """Each tile the kernel loads: True where it is widened to fp32."""
    body = src.split(f"def narrow_probe_{kernel}_kernel")[1].split("@triton.jit")[0]
    return {m.group(1): m.group(2) is not None for m in
            re.finditer(r"^\s*(?:if FUSE_MERGE: )?v_(\w+) = tl\.load\(.*?\)(\.to\(tl\.float32\))?(?:  #.*)?$", body, re.M)}


def test_walk_keeps_dot_only_tiles_narrow_and_other_kernels_widen():
    src = emit_module(compile_text(SPEC).plan)
    walk = _loads(src, "walk")
    # q and k feed only dots (q k^T and (q S) * exp(b) under merge, after passes.scale_placement; k^T (v * d)
    # in the update); v is scaled per row first, and the state's initial load is carried: both widened
    assert walk == {"S": True, "q": False, "k": False, "v": True}, walk
    for name, widened in _loads(src, "out").items():  # not a walk: every tile widened as before
        assert widened, name
