"""The TileLang backend without a GPU: every chunked-state library spec's forward kernels lower to CUDA for sm_90a
(wgmma, no spills checked by nvcc on one spec per distinct op mix), the plan -> program translation
keeps the plan's structure, and what TileLang cannot take is refused by name.
Running the kernels is scripts/tilelang_check.py's job, on the GPU."""
import atexit
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

if "TILELANG_CACHE_DIR" not in os.environ:  # tilelang writes its cache on import: keep it out of ~
    os.environ["TILELANG_CACHE_DIR"] = tempfile.mkdtemp(prefix="effc-tilelang-")
    atexit.register(shutil.rmtree, os.environ["TILELANG_CACHE_DIR"], True)
tilelang = pytest.importorskip("tilelang", reason="the TileLang backend needs the tilelang package")

import effc  # noqa: E402
from effc.codegen.tilelang import FORWARD, emit_module  # noqa: E402
from effc.codegen.tilelang.printer import UNSUPPORTED, TileLangPrinter  # noqa: E402
from effc.ir.nodes import Op, TileType  # noqa: E402

from test_new_specs import GLA_FEATURE_MAP, NORMALIZED  # noqa: E402
from test_tilelang_emulated import SCALAR_GATE  # noqa: E402

NAMES = effc.library_names("linear")  # chunked-state specs: the plan this backend prints
# one per distinct op mix; lightning is retention's mix, hgrn2 is gla's
# nvcc on a scalar decay and a per-channel one (linear_attn and simple_gla lower to subsets of their code;
# every library kernel lowers to CUDA in test_library_kernels_lower_to_cuda)
NVCC_SUBSET = ("retention", "gla")
_SOURCES: dict[str, str] = {}


def _module(op, tmp: Path, masked=frozenset()):
    src = emit_module(op.comp.plan, masked)
    path = tmp / f"tl_{op.name}{''.join(sorted(masked))}.py"  # T.prim_func reads its function's source from a real file
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"effc_tl_test_{op.name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lower(op, kernel: str, tmp: Path, D: int = 128, masked=frozenset(), **flags) -> str:
    from tvm.target import Target

    sizes = dict(H=16, **{d: D for d in op.spec.dims}, C=op.spec.chunk, BLOCK=64, dtype="bfloat16",
                 has_init=True, store_final=True, store_history=True, **flags)
    func = _module(op, tmp, masked).FACTORIES[kernel](**sizes)
    target = Target({"kind": "cuda", "arch": "sm_90a"})
    with target:
        return tilelang.lower(func, target=target).kernel_source


def _refused(op) -> str | None:
    """The first op of the forward kernels that this backend refuses, if any."""
    kinds = {o.kind for k in op.comp.plan.kernels if not k.name.startswith("bwd") for o in k.ops}
    return next((k for k in UNSUPPORTED if k in kinds), None)


@pytest.mark.parametrize("kernel", FORWARD)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_library_kernels_lower_to_cuda(name, kernel, tmp_path):
    op = effc.load(name)
    if kernel not in [k.name for k in op.comp.plan.kernels]:
        pytest.skip(f"{name} has no {kernel} kernel (its state update is not diagonal-affine)")
    if op.spec.reverse_states:  # the right-to-left walk is Triton-only: refused with the states named
        with pytest.raises(NotImplementedError, match="backend 'tilelang' does not implement reverse states"):
            emit_module(op.comp.plan)
        return
    refused = _refused(op)
    if refused:  # refused by name, with the reason, when the module is generated
        with pytest.raises(NotImplementedError, match=f"TileLang backend cannot emit tile op '{refused}'"):
            emit_module(op.comp.plan)
        return
    src = _lower(op, kernel, tmp_path, aligned=True, num_stages=1)
    assert "__global__" in src and "wgmma" in src, f"{name}.{kernel}: no wgmma (Hopper tensor cores unused)"
    _SOURCES[f"{name}.{kernel}"] = src


@pytest.mark.parametrize("flags", [dict(is_varlen=True), dict(aligned=False, HX_k=4)], ids=["varlen", "ragged-gqa"])
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_masked_load_variants_lower(flags, tmp_path):
    src = _lower(effc.load("gla"), "walk", tmp_path, **flags)
    assert "T_seq" in src or "cu[" in src


@pytest.mark.parametrize("text", [NORMALIZED, GLA_FEATURE_MAP, SCALAR_GATE],
                         ids=["two-states-rowsum-colsum-matvec", "softplus", "decay-per-token"])
def test_specs_outside_the_library_lower(text, tmp_path):
    # chunk 16 and D=32: the 16x16 score gemm fits only 2 warps, so the factory halves the threads
    op = effc.loads(text)
    for kernel in FORWARD:
        assert "__global__" in _lower(op, kernel, tmp_path, D=32)


# K = V = 96: tiles of 128 columns masked past 96, V in blocks of 64 (the second one half masked)
PADDED = dict(D=96, masked=frozenset({"K", "V"}))


def test_padded_dims_lower_to_wgmma(tmp_path):
    """A dim that is not a power of two: the program for masked dims lowers, its gemms still on the tensor cores,
    its loads element by element (no bulk copy past the tensor's last column)."""
    op = effc.load("gla")
    src = emit_module(op.comp.plan, PADDED["masked"])
    assert "K_P = max(16, 1 << max(0, K - 1).bit_length())" in src and "(V + BLOCK - 1) // BLOCK" in src
    assert "0:K]" not in src and "T.if_then_else((i1 < K)" in src
    cuda = _lower(op, "walk", tmp_path, aligned=True, num_stages=1, **PADDED)
    assert "__global__" in cuda and "wgmma" in cuda, "gla.walk at K = V = 96: no wgmma"
    with pytest.raises(ValueError, match=r"masked dims \['Z'\] are not dims of spec 'gla'"):
        emit_module(op.comp.plan, frozenset({"Z"}))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("name", NVCC_SUBSET + ("gla-96",))
@pytest.mark.slow  # the full tier only (README: test tiers)
def test_nvcc_compiles_for_sm90a(name, tmp_path):
    root = Path(tilelang.__file__).parent
    procs = {}
    padded = name.endswith("-96")
    name = name.removesuffix("-96")
    for kernel in FORWARD:  # the two kernels compile side by side (3-8 s each)
        src = (_lower(effc.load(name), kernel, tmp_path, aligned=True, num_stages=1, **PADDED) if padded else
               _SOURCES.get(f"{name}.{kernel}") or _lower(effc.load(name), kernel, tmp_path, aligned=True, num_stages=1))
        cu = tmp_path / f"{name}_{kernel}.cu"
        cu.write_text(src)
        procs[kernel] = subprocess.Popen(
            ["nvcc", "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++20", "-w", "-Xptxas", "-v",
             f"-I{root / 'src'}", f"-I{root / '3rdparty' / 'cutlass' / 'include'}", "-c", str(cu),
             "-o", str(cu.with_suffix(".o"))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for kernel, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}.{kernel}: nvcc failed\n{err[-3000:]}"
        assert " 0 bytes spill stores" in err, f"{name}.{kernel} spills registers:\n{err[-1500:]}"


def test_gla_program_keeps_the_plan_structure():
    """Golden structure: what each part of the plan became in the program text."""
    op = effc.load("gla")
    src = emit_module(op.comp.plan)
    walk = src[src.index("def gla_walk("):]
    summary = src[src.index("def gla_summary("):src.index("def gla_walk(")]
    for kernel, text in (("walk", walk), ("summary", summary)):
        kp = op.comp.plan.kernel(kernel)
        n_matmul = sum(o.kind in ("matmul", "decay_dot") for o in kp.ops)
        assert text.count("T.gemm(") == n_matmul, f"{kernel}: one T.gemm per matmul and decay_dot op"
        assert "for i_c in T.Pipelined(c_lo, c_hi" in text  # the chunk loop
        assert "c_hi = T.min(c_lo + chunks_per_seg, n_chunks_seq)" in text  # a segment's chunks
        # b = cumsum(g): staged into fp32, scanned into a buffer of its own (in place fails pipeline planning)
        scan = re.search(r"T\.cumsum\((\w+), (\w+), dim=0, reverse=False\)", text)
        assert scan and scan.group(1) != scan.group(2)
        assert "n_valid - 1" in text  # bl = last(b): the last real row
        # padded tokens: loads read 0 past the sequence's end, the k.T @ v gemm drops them
        assert "T.if_then_else((i_c * C + i0 < T_seq)" in text
        # S = S * exp(bl)[:, None] + (...).T @ v: the gemm accumulates into the state's own fragment
        assert re.search(r"T\.gemm\(\w+, x_v, st_S, transpose_A=True, transpose_B=False, clear_accum=False\)", text)
    # decay_dot: per column, the range of the exponents over the real rows; the columns that fit go through
    # one gemm centred on it, the others pair by pair, then the causal mask
    assert re.search(r"for i_row in T\.serial\(C\):\n\s+if \(i_c \* C \+ i_row < T_seq\):", walk)
    assert re.search(r"T\.exp\(s_b\[i0, i1\] - \(0\.5 \* \(dd__9_hi\[i1\] \+ dd__9_lo\[i1\]\)\)\)", walk)
    assert "T.gemm(g_dd__dd1, g_dd_k, f__9, transpose_A=False, transpose_B=True, clear_accum=True)" in walk
    assert "if not (dd__9_hi[i_ch] - dd__9_lo[i_ch] <= decay_span):" in walk
    assert "T.exp(T.min(s_b[i0, i_ch] + (-(s_b[i1, i_ch])), 0.0))" in walk
    assert 'decay_span = 14.0 if dtype == "float16" else 80.0' in walk
    assert "for seg in T.serial(pid_p):  # fold the summaries of earlier segments" in walk
    assert "S_final[i_b, i_h, i0, pid_s * BLOCK + i1] = st_S[i0, i1]" in walk  # final state
    assert "S_hist[c_base + i_c, i_h, i0, pid_s * BLOCK + i1] = T.Cast(hist_dtype, st_S[i0, i1])" in walk  # for the backward
    assert "S_segd[i_bh, pid_p, i0, pid_s * BLOCK + i1] = d_S[i0, i1]" in summary  # product of decays
    assert "st_S = T.alloc_fragment((K, BLOCK,)" in walk  # the split dim in blocks


def test_ops_tilelang_cannot_print_are_refused_by_name():
    op = effc.load("gla")
    printer = TileLangPrinter(op.spec, op.comp.plan.kernel("walk").types(op.spec))
    bad = Op("x", "unlast", ("b",), TileType(()))
    with pytest.raises(NotImplementedError, match="TileLang backend cannot emit tile op 'unlast'"):
        printer.expr(bad, (), lambda a, i: a)
    with pytest.raises(NotImplementedError, match="TileLang backend cannot emit tile op 'unlast'"):
        printer.emit(bad, None)


def test_backward_stays_on_triton():
    from effc.runtime.tilelang_backend import TileLangLauncher

    op = effc.load("linear_attn")
    launcher = TileLangLauncher(op.spec, op.comp.plan)
    assert [k for k in launcher.module.FACTORIES] == ["summary", "walk"]
    with pytest.raises(NotImplementedError, match="backward runs on Triton"):
        launcher.backward()


def test_deferred_merge_is_refused_by_name():
    """The TileLang walk keeps merge fused (no out kernel here): a config that defers it is refused before
    anything is launched, naming the missing kernel."""
    from effc.policy.tiling import TileConfig
    from effc.runtime.tilelang_backend import launcher
    op = effc.load("gla")
    with pytest.raises(NotImplementedError, match="TileLang backend has no 'out' kernel"):
        launcher(op.comp.plan).forward(TileConfig(32, 64, 1, 4, 1, True), None, {}, {}, {}, False, False)
