"""passes.scale_placement: a per-row scale of a matmul operand moves to the smaller tile."""
from __future__ import annotations

import sympy

from effc.ir.nodes import C, Op, TileType
from effc.ir.printer import print_op
from effc.passes.scale_placement import place_scalings

K, V = sympy.Symbol("K"), sympy.Symbol("V")
SIZES = {C: 64, K: 128, V: 64}  # the typical sizes: V the split dim's block
TYPES = {"k": TileType((C, K)), "v": TileType((C, V)), "S": TileType((K, V)), "e": TileType((C,))}


def _run(ops, sizes=SIZES):
    types = {**TYPES, **{op.out: op.type for op in ops}}
    return "\n".join(print_op(op) for op in place_scalings(tuple(ops), types, sizes))


SCALE = Op("s", "expand", ("e", 0.0, 1.0), TileType((C, 1)))


def test_a_scale_along_the_contraction_moves_to_the_smaller_operand():
    """(k * s).T @ v with k: [C, K], v: [C, V]: the [C, V] tile takes the scale, k goes to the matmul as loaded."""
    ops = [SCALE, Op("ks", "mul", ("k", "s"), TileType((C, K))), Op("kt", "transpose", ("ks",), TileType((K, C))),
           Op("u", "matmul", ("kt", "v"), TileType((K, V)))]
    assert _run(ops) == "\n".join([
        "s : [C, 1] = expand(e, [:, None])",
        "u_a : [K, C] = transpose(k)",
        "u_q : [C, V] = mul(v, s)",
        "u : [K, V] = matmul(u_a, u_q)"])


def test_a_row_scale_moves_to_the_smaller_result_through_cancelling_transposes():
    """((k * s).T).T @ S with the result [C, V] smaller than k: (k @ S) * s; the transposes go with the scale."""
    ops = [SCALE, Op("ks", "mul", ("s", "k"), TileType((C, K))), Op("a", "transpose", ("ks",), TileType((K, C))),
           Op("b", "transpose", ("a",), TileType((C, K))), Op("o", "matmul", ("b", "S"), TileType((C, V)))]
    assert _run(ops) == "\n".join([
        "s : [C, 1] = expand(e, [:, None])",
        "o_m : [C, V] = matmul(k, S)",
        "o : [C, V] = mul(o_m, s)"])


def test_nothing_moves_to_a_larger_tile_or_off_a_tile_another_op_reads():
    """At V as wide as K the scale stays (no smaller tile); a scaled tile that another op reads stays formed."""
    ops = [SCALE, Op("ks", "mul", ("k", "s"), TileType((C, K))), Op("kt", "transpose", ("ks",), TileType((K, C))),
           Op("u", "matmul", ("kt", "v"), TileType((K, V)))]
    unchanged = "\n".join(print_op(op) for op in ops)
    assert _run(ops, {**SIZES, V: 128}) == unchanged
    read_twice = ops + [Op("r", "rowsum", ("ks",), TileType((C,)))]
    assert _run(read_twice) == "\n".join(print_op(op) for op in read_twice)
