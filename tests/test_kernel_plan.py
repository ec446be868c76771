"""One kernel plan for both families: every generated Triton kernel's parameters are the plan's argument
list, name for name and in order (the launchers call the kernels by those names), and a plan lists its
loads and stores."""
import ast
from pathlib import Path

import pytest

import effc
from effc.compiler.driver import compile_file
from effc.passes.kernel_plan import Kernel, KernelArg

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.attn"))
REFS = list(effc.library_names()) + [str(p) for p in EXAMPLES]


def jit_signatures(source: str) -> dict[str, list[str]]:
    """The parameter names of every @triton.jit function of a generated module, read with `ast`."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "triton.jit" for d in node.decorator_list):
            out[node.name] = [a.arg for a in node.args.args]
    return out


def plan_kernels(comp) -> dict[str, Kernel]:
    """Every kernel of the spec's plan (a hybrid's: both branches'; a spec with branches: each branch's), by
    generated function name."""
    if comp.ir.family == "branched":
        return {n: k for p in comp.parts for n, k in plan_kernels(p).items()}
    if comp.ir.family == "hybrid":
        return {**plan_kernels(comp.branch("softmax")), **plan_kernels(comp.branch("linear"))}
    return {f"{comp.typed.name}_{k.name}_kernel": k for k in comp.plan.kernels}


def mismatches(source: str, kernels: dict[str, Kernel]) -> list[str]:
    found = {n: p for n, p in jit_signatures(source).items() if n.endswith("_kernel")}
    bad = [f"{n}: generated {found.get(n)} != plan {list(k.arg_names)}" for n, k in kernels.items()
           if found.get(n) != list(k.arg_names)]
    return bad + [f"{n}: not in the plan" for n in found if n not in kernels]


@pytest.mark.parametrize("ref", REFS, ids=[Path(r).stem for r in REFS])
def test_generated_signatures_are_the_plans_arguments(ref):
    comp = compile_file(ref)
    kernels = plan_kernels(comp)
    assert kernels
    assert mismatches(comp.source("triton"), kernels) == []


def test_a_signature_that_drifts_from_the_plan_is_caught():
    comp = compile_file("gla")
    kernels = plan_kernels(comp)
    source = comp.source("triton")
    swapped = source.replace("def gla_walk_kernel(q_ptr, k_ptr,", "def gla_walk_kernel(k_ptr, q_ptr,")
    assert swapped != source
    assert [m.split(":")[0] for m in mismatches(swapped, kernels)] == ["gla_walk_kernel"]
    extra = source.replace("def gla_out_kernel(q_ptr,", "def gla_out_kernel(extra_ptr, q_ptr,")
    assert [m.split(":")[0] for m in mismatches(extra, kernels)] == ["gla_out_kernel"]


def test_softmax_plan_loads_by_side():
    """softmax_attn: the forward and dQ walk load q per query block and k, v per key block; dK/dV the
    reverse; the preprocess reads no leaf; the decode split kernel loads like the forward (k, v from the
    cache), its combine reads no leaf; the forward and the combine store the output."""
    plan = compile_file("softmax_attn").plan
    sides = {k.name: (k.query_loads, k.key_loads, tuple(d.name for d in k.stores)) for k in plan.kernels}
    assert sides == {"fwd": (("q",), ("k", "v"), ("o",)), "bwd_pre": ((), (), ()),
                     "bwd_dq": (("q",), ("k", "v"), ()), "bwd_dkv": (("q",), ("k", "v"), ()),
                     "decode": (("q",), ("k", "v"), ()), "decode_combine": ((), (), ("o",))}
    assert [d.name for d in plan.kernel("fwd").loads] == ["q", "k", "v"]
    assert plan.kernel("bwd_dkv").outer == "k" and plan.kernel("bwd_dkv").grid == "(key blocks, B*H/GQ)"


def test_softmax_plan_parameters():
    """sliding_window: the walks read the scale (folded into exp2) and the window (masks, block bounds); the
    preprocess (the epilogue's VJP) reads neither, so its signature has no parameter."""
    plan = compile_file("sliding_window").plan
    params = {k.name: [a.name for a in k.args if a.role == "param"] for k in plan.kernels}
    assert params == {"fwd": ["p_scale", "p_window"], "bwd_pre": [], "bwd_dq": ["p_scale", "p_window"],
                      "bwd_dkv": ["p_scale", "p_window"], "decode": ["p_scale", "p_window"], "decode_combine": []}


def test_call_names_a_missing_argument():
    k = Kernel("walk", "walk", (), (), "(1,)", (KernelArg("q_ptr", "tensor"), KernelArg("T", "layout"),
                                                 KernelArg("C", "tile")))
    assert list(k.call({"C": 16, "T": 7, "q_ptr": "Q", "unused": 1})) == ["q_ptr", "T", "C"]
    with pytest.raises(RuntimeError, match="T of kernel walk"):
        k.call({"q_ptr": "Q", "C": 16})
    with pytest.raises(ValueError, match="unknown role"):
        KernelArg("x", "pointer")
