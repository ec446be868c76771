"""passes.transpose_sink: no kernel transposes a matmul's result that feeds another matmul (Triton < 3.7.1
miscompiles it on Hopper); the rewrite computes the transposed value instead, without changing it."""
import sympy

import effc
from effc.ir.nodes import C, Op, TileType, dim
from effc.ir.printer import print_op
from effc.passes.transpose_sink import sink_transposes

K = dim("K")
CC, CK, KC = TileType((C, C)), TileType((C, K)), TileType((K, C))


def test_golden_a_masked_score_transposed_into_a_matmul():
    types = {"q": CK, "k": CK, "v": CK}
    ops = (Op("kt", "transpose", ("k",), KC), Op("s", "matmul", ("q", "kt"), CC), Op("m", "causal", ("s",), CC),
           Op("mt", "transpose", ("m",), CC), Op("dv", "matmul", ("mt", "v"), CK))
    assert [print_op(op) for op in sink_transposes(ops, types)] == [
        "q_T : [K, C] = transpose(q)",
        "s_T : [C, C] = matmul(k, q_T)",          # (q k^T)^T = k q^T: the transpose of kt is k
        "m_T : [C, C] = anticausal(s_T)",         # the mask mirrored
        "mt : [C, C] = copy(m_T)",
        "dv : [C, K] = matmul(mt, v)"]            # kt, s and m have no reader left: dropped


def test_a_transpose_that_reaches_no_matmul_stays():
    types = {"q": CK, "k": CK}
    ops = (Op("s", "matmul", ("q", "k_t"), CC), Op("st", "transpose", ("s",), CC), Op("o", "exp", ("st",), CC))
    assert sink_transposes(ops, {**types, "k_t": KC}) == ops


def _matmul_derived(ops):
    out = set()
    for op in ops:
        if op.kind == "matmul" or (op.kind != "transpose" and any(a in out for a in op.args)):
            out.add(op.out)
    return out


def _feeds_matmul(ops):
    feeds = set()
    for op in reversed(ops):
        if op.kind == "matmul" or op.out in feeds:
            feeds.update(a for a in op.args if isinstance(a, str))
    return feeds


def test_no_library_kernel_transposes_a_matmul_result_into_a_matmul():
    for name in effc.library_names():
        op = effc.load(name)
        op = getattr(op, "linear", op)  # a hybrid's state branch
        if not hasattr(op.comp, "plan") or op.comp.ir.family == "branched":
            continue  # the softmax family's kernels (a branched spec's too) transpose loaded tiles only
        for kp in op.comp.plan.kernels:
            derived, feeds = _matmul_derived(kp.ops), _feeds_matmul(kp.ops)
            bad = [print_op(o) for o in kp.ops if o.kind == "transpose" and o.args[0] in derived and o.out in feeds]
            assert not bad, f"{name}.{kp.name}: {bad}"
