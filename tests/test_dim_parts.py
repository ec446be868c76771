"""Feature dims run in power-of-two parts (passes.dim_parts, runtime.dim_parts): the pass's golden IR, which
dims split, the constructs that keep the padded tile, and the parted kernels (interpreter, fp32) against the
oracle, a naive recurrence written here and the padded kernels, with packed sequences, an empty one, and a
decoding step."""
import textwrap

import pytest
import torch

import effc
from effc.compiler.driver import compile_text
from effc.ir.printer import print_spec
from effc.passes.dim_parts import NotSplittable, part_sizes, split_dims
from effc.runtime.verify import judge_fp32

# a spec not in library/: a sum over K (rowsum), a matmul contracting K against a vector state, one
# producing K (k.T @ v), and a column sum, so every rule of the pass runs
NORMED = """
spec normed {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  state z: [K]
  chunk 16
  intra {
    qn = q * rsqrt(rowsum(q * q) + 1e-6)[:, None]
    a = causal(qn @ k.T)
  }
  merge {
    o = (a @ v + qn @ S) / (1 + abs(rowsum(a)[:, None] + qn @ z[:, None]))
  }
  inter {
    S = S + k.T @ v
    z = z + colsum(k)
  }
}
"""


def test_part_sizes_split_only_where_two_parts_pad_less():
    assert {n: part_sizes(n) for n in (16, 20, 48, 60, 64, 80, 96, 100, 128, 160, 192, 320)} == {
        16: None, 20: None, 48: (32, 16), 60: None, 64: None, 80: (64, 16), 96: (64, 32), 100: None,
        128: None, 160: (128, 32), 192: (128, 64), 320: (256, 64)}


def test_split_rewrites_by_op_kind():
    text = print_spec(split_dims(compile_text(NORMED).typed, ("K",)))
    assert text == textwrap.dedent("""
        spec normed (chunk 16)
          input q__0[B, T, H, K__0] tile [C, K__0]
          input q__1[B, T, H, K__1] tile [C, K__1]
          input k__0[B, T, H, K__0] tile [C, K__0]
          input k__1[B, T, H, K__1] tile [C, K__1]
          input v[B, T, H, V] tile [C, V]
          output o[B, T, H, V] tile [C, V]
          state S__0[K__0, V] tile [K__0, V]
          state S__1[K__1, V] tile [K__1, V]
          state z__0[K__0] tile [K__0]
          state z__1[K__1] tile [K__1]
          dim K in parts K__0 + K__1
          intra:
            _1__0 = mul(q__0, q__0)
            _1__1 = mul(q__1, q__1)
            _2__t0 = rowsum(_1__0)
            _2__t1 = rowsum(_1__1)
            _2 = add(_2__t0, _2__t1)
            _3 : [C] = add(_2, 1e-06)
            _4 : [C] = rsqrt(_3)
            _5 : [C, 1] = expand(_4, [:, None])
            qn__0 = mul(q__0, _5)
            qn__1 = mul(q__1, _5)
            _7__0 = transpose(k__0)
            _7__1 = transpose(k__1)
            _8__t0 = matmul(qn__0, _7__0)
            _8__t1 = matmul(qn__1, _7__1)
            _8 = add(_8__t0, _8__t1)
            a : [C, C] = causal(_8)
          merge:
            _10 : [C, V] = matmul(a, v)
            _11__t0 = matmul(qn__0, S__0)
            _11__t1 = matmul(qn__1, S__1)
            _11 = add(_11__t0, _11__t1)
            _12 : [C, V] = add(_10, _11)
            _13 : [C] = rowsum(a)
            _14 : [C, 1] = expand(_13, [:, None])
            _15__0 = expand(z__0, [:, None])
            _15__1 = expand(z__1, [:, None])
            _16__t0 = matmul(qn__0, _15__0)
            _16__t1 = matmul(qn__1, _15__1)
            _16 = add(_16__t0, _16__t1)
            _17 : [C, 1] = add(_14, _16)
            _18 : [C, 1] = abs(_17)
            _19 : [C, 1] = add(1.0, _18)
            o : [C, V] = div(_12, _19)
          inter:
            _21__0 = transpose(k__0)
            _21__1 = transpose(k__1)
            _22__0 = matmul(_21__0, v)
            _22__1 = matmul(_21__1, v)
            _next_S__0 = add(S__0, _22__0)
            _next_S__1 = add(S__1, _22__1)
            _24__0 = colsum(k__0)
            _24__1 = colsum(k__1)
            _next_z__0 = add(z__0, _24__0)
            _next_z__1 = add(z__1, _24__1)
        """).strip("\n")


def test_param_defaults_read_the_whole_dim():
    spec = split_dims(effc.load("gla").spec, ("K",))
    assert str(next(p for p in spec.params if p.name == "scale").default) == "1/sqrt(K__0 + K__1)"


@pytest.mark.parametrize("name, why", [("retention_rope", "'fidx' pairs features"),
                                       ("mesanet", "split dims on two axes")])
def test_constructs_that_pair_columns_keep_the_padded_tile(name, why):
    op = effc.load(name)
    with pytest.raises(NotSplittable, match=why):
        split_dims(op.spec, ("K",))
    # the call says so and runs the padded kernels (shapes only: meta tensors)
    from effc.runtime.dim_parts import choose_parts
    shapes = [(1, 8, 1) + tuple(96 if n == "K" else 32 for n in d.dims[3:]) for d in op.spec.inputs]
    cache = {}
    assert cache[choose_parts(op, shapes, cache)][0] is None and why in op.last_dim_parts


def _naive_normed(q, k, v, S, z):
    """The recurrence token by token, from the spec's definition (float64)."""
    B, T, H, _ = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    S, z = S.clone(), z.clone()
    for t in range(T):
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + k[:, t]
        qn = q[:, t] / torch.sqrt((q[:, t] ** 2).sum(-1, keepdim=True) + 1e-6)
        num = torch.einsum("bhk,bhkv->bhv", qn, S)
        o[:, t] = num / (1 + (qn * z).sum(-1, keepdim=True).abs())
    return o, S, z


def _leaves(B, T, H, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, H, n, generator=g, dtype=torch.float64) for n in (K, K, V)]
    s0 = [torch.randn(B, H, K, V, generator=g, dtype=torch.float64) * 0.1,
          torch.randn(B, H, K, generator=g, dtype=torch.float64) * 0.1]
    return xs, s0


def _run(fn, leaves, seed=3):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    outs = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(list(outs), cot)
    return [o.detach() for o in outs], [x.grad for x in leaves]


def test_parted_kernels_match_the_naive_recurrence_and_the_padded_kernels():
    op = effc.loads(NORMED)
    xs, s0 = _leaves(2, 37, 2, 48, 24)
    naive = _run(lambda q, k, v, S, z: _naive_normed(q, k, v, S, z), xs + s0)

    def kernels(parts):
        def call(q, k, v, S, z):
            o, (S1, z1) = op(q.float(), k.float(), v.float(), initial_state=(S.float(), z.float()),
                             output_final_state=True, dim_parts=parts)
            return o, S1, z1
        return call

    parted = _run(kernels(True), xs + s0)
    assert op.last_dim_parts == "parts: K=48 as 32 + 16"
    padded = _run(kernels(False), xs + s0)
    assert op.last_dim_parts == "parts: K=48 as 32 + 16"  # dim_parts=False does not consult it
    for got, ref in ((parted, naive), (padded, naive)):
        for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
            assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_parted_packed_sequences_with_an_empty_one_and_a_step():
    op = effc.load("gla")
    cu = torch.tensor([0, 20, 20, 53], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 53, 2, 48, generator=g) for _ in range(2))
    v = torch.randn(1, 53, 2, 32, generator=g)
    gate = torch.nn.functional.logsigmoid(torch.randn(1, 53, 2, 48, generator=g)) * 4  # strong gates
    s0 = torch.randn(3, 2, 48, 32, generator=g)
    o, f = op(q, k, v, gate, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    assert op.last_dim_parts.startswith("parts: K=48")
    ro, rf = op.reference(q.double(), k.double(), v.double(), gate.double(), initial_state=s0.double(),
                          output_final_state=True, cu_seqlens=cu)
    assert judge_fp32(o, ro).ok and judge_fp32(f, rf).ok
    assert torch.equal(f[1], s0[1])  # the empty sequence keeps its initial state
    # one decoding step from the first sequence's final state equals the op on its tokens plus one
    o1, s1 = op.step(q[:, 20], k[:, 20], v[:, 20], gate[:, 20], state=f[:1])
    ro1, rs1 = op.reference(*(x[:, :21].double() for x in (q, k, v, gate)), initial_state=s0[:1].double(),
                            output_final_state=True)
    assert judge_fp32(o1, ro1[:, -1]).ok and judge_fp32(s1, rs1).ok


def test_dim_parts_knob_is_checked():
    with pytest.raises(effc.ArgumentError, match="dim_parts must be True or False"):
        effc.load("gla")(*(torch.zeros(1, 4, 1, 96) for _ in range(4)), dim_parts="yes")


def test_tilelang_forward_runs_the_parts():
    """The TileLang programs of the split spec, emulated on the CPU (tests/tilelang_emulator.py)."""
    from tilelang_emulator import emulated_forward

    from effc.runtime.dim_parts import split_op
    op = effc.load("gla", backend="tilelang")
    inner = split_op(op, {"K": (32, 16)})
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 40, 2, 48, generator=g) for _ in range(2))
    v = torch.randn(1, 40, 2, 32, generator=g)
    gate = torch.nn.functional.logsigmoid(torch.randn(1, 40, 2, 48, generator=g))
    cut = lambda x: list(torch.split(x, [32, 16], dim=-1))
    o, s_first = emulated_forward(inner, tuple(cut(q) + cut(k) + [v] + cut(gate)))
    ro, rs = op.reference(*(x.double() for x in (q, k, v, gate)), output_final_state=True)
    assert judge_fp32(o, ro).ok and judge_fp32(s_first, rs[:, :, :32]).ok


def test_show_prints_the_split_spec_for_dims_in_parts():
    from typer.testing import CliRunner

    from effc.tools.cli import app
    run = lambda *a: CliRunner().invoke(app, ["show", *a])
    r = run("gla", "--dims", "K=96,V=96", "--stage", "tiled")
    assert r.exit_code == 0 and r.output.startswith("# in parts (passes.dim_parts): K=96 as 64 + 32\n")
    assert "{'K__0': 64, 'K__1': 32, 'V': 96}" in r.output
    r = run("retention_rope", "--dims", "K=96", "--stage", "typed")
    assert r.exit_code == 0 and "the tiles stay padded: 'fidx' pairs features" in r.output.splitlines()[0]
    assert run("gla", "--dims", "K=128", "--stage", "typed").output.startswith("spec gla")  # no parts


@pytest.mark.parametrize("name", ["gla", "delta_net_l2"])
def test_an_inputs_parts_share_its_gradient_kernel(name):
    """The parts of an input share every value over the other dims: one kernel writes both gradients, and the
    kernels (and the model's partition) are the caller's spec's."""
    from effc.compiler.driver import Compilation
    op = effc.load(name)
    split = Compilation.of_ir(split_dims(op.spec, ("K",)))
    whole = [(k.name, sorted(x.name for x, _ in k.grads)) for k in op.comp.plan.gradient_kernels()]
    parted = [(k.name, sorted({x.name.split("__")[0] for x, _ in k.grads})) for k in split.plan.gradient_kernels()]
    assert parted == whole


def test_parts_under_torch_compile():
    """The choice of parts is a constant of the call's shapes: the split op's custom ops are what gets traced."""
    op = effc.load("gla")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 24, 2, n, generator=g).requires_grad_() for n in (48, 48, 16))
    gate = (torch.nn.functional.logsigmoid(torch.randn(1, 24, 2, 48, generator=g))).requires_grad_()
    xs = [q, k, v, gate]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(*xs):
        o, s = op(*xs, output_final_state=True, chunk=16)
        return (o * 2).sum() + s.sum()

    f(*xs).backward()
    assert op.last_dim_parts == "parts: K=48 as 32 + 16"
    got = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    o, s = op.reference(*xs, output_final_state=True)
    ((o * 2).sum() + s.sum()).backward()
    for a, x in zip(got, xs):
        assert judge_fp32(a, x.grad).ok


def test_tile_widths_count_parts_as_unpadded():
    """What `effc bench` divides by for 'padding alone': a dim in parts has no padding; the split dim's blocks
    and the softmax family's dims are padded to a power of two."""
    from effc.runtime.dim_parts import tile_widths
    assert tile_widths(effc.load("gla").comp, {"K": 96, "V": 96}) == {"K": 96, "V": 128}
    assert tile_widths(effc.load("gla").comp, {"K": 192, "V": 60}) == {"K": 192, "V": 64}
    assert tile_widths(effc.load("softmax_attn").comp, {"K": 96, "V": 96}) == {"K": 128, "V": 128}


def _split_all(text: str, where) -> str | None:
    """None when a spec's feature dims split cleanly or are refused with NotSplittable (or the spec itself is
    refused by effc); else what went wrong."""
    import ast

    from effc.compiler.driver import Compilation
    from effc.errors import ArgumentError, SpecError
    try:
        comp = compile_text(text, file=str(where))
        if comp.ir.family != "linear":
            return None
        spec = comp.typed
        split = comp.legality.split_dims[:1]
        dims = tuple(d for d in spec.dims if d not in split)
        if not dims:
            return None
        try:
            ast.parse(Compilation.of_ir(split_dims(spec, dims)).source("triton"))
        except NotSplittable:
            pass
    except (SpecError, ArgumentError, NotImplementedError):
        return None
    except SyntaxError as e:
        return f"split source does not parse: {e}"
    except Exception as e:  # noqa: BLE001 - the point of the test
        return f"{type(e).__name__} from inside effc: {e}"
    return None


def test_every_linear_spec_and_mutants_split_or_refuse(tmp_path):
    """Nothing crashes inside the pass or downstream of it: every library linear spec, and seeded mutants of
    each (tests/test_spec_fuzz.py's edits), splits every dim no program split cuts into a spec that compiles,
    or is refused with NotSplittable."""
    import random

    from effc.library import library_files
    from test_spec_fuzz import mutate
    problems = []
    for path in library_files():
        text, rng = path.read_text(), random.Random(f"{path.stem}-parts")
        for i, t in enumerate([text] + [mutate(text, rng) for _ in range(2)]):
            problem = _split_all(t, tmp_path / path.name)
            if problem:
                problems.append(f"{path.stem} {'original' if i == 0 else f'mutant {i}'}: {problem}"[:400])
    assert not problems, "\n".join(problems)


def test_calls_with_other_part_sizes_share_the_split_op():
    """K=48 (32 + 16) and K=80 (64 + 16) split the same dim: one split spec, one module and one pair of custom
    ops serve both, each call's part sizes taken from its own dims."""
    op = effc.load("gla")
    for K in (48, 80, 48):
        g = torch.Generator().manual_seed(K)
        q, k = (torch.randn(1, 21, 2, K, generator=g) for _ in range(2))
        v = torch.randn(1, 21, 2, 16, generator=g)
        gate = torch.nn.functional.logsigmoid(torch.randn(1, 21, 2, K, generator=g))
        o, f = op(q, k, v, gate, output_final_state=True)
        assert op.last_dim_parts == f"parts: K={K} as {1 << (K.bit_length() - 1)} + {K - (1 << (K.bit_length() - 1))}"
        ro, rf = op.reference(q.double(), k.double(), v.double(), gate.double(), output_final_state=True)
        assert judge_fp32(o, ro).ok and judge_fp32(f, rf).ok, K
    assert list(op._parted) == [("K",)]


def test_tilelang_masks_only_the_split_specs_dims():
    """A call in parts names the caller's dim beside its parts; the TileLang program is chosen by the parts'."""
    from effc.runtime.dim_parts import split_op
    from effc.runtime.tilelang_backend import masked_dims
    inner = split_op(effc.load("gla", backend="tilelang"), {"K": (64, 32)})
    assert masked_dims(inner.comp.plan, inner.parts.dims({"K": 96, "V": 64}), 64) == frozenset()


def test_an_output_over_the_split_dim():
    """An output with the split dim (here [B, T, H, K]) is written in place, part by part, into one tensor; its
    cotangent is read the same way."""
    op = effc.loads(NORMED.replace("  output o: [B, T, H, V]", "  output o: [B, T, H, V]\n  output r: [B, T, H, K]")
                    .replace("  merge {\n", "  merge {\n    r = qn * rowsum(qn @ S)[:, None]\n"))
    xs, s0 = _leaves(2, 23, 2, 48, 16, seed=5)

    def kernels(q, k, v, S, z):
        (o, r), (S1, z1) = op(q.float(), k.float(), v.float(), initial_state=(S.float(), z.float()),
                              output_final_state=True)
        return o, r, S1, z1

    def oracle(q, k, v, S, z):
        (o, r), (S1, z1) = op.reference(q, k, v, initial_state=(S, z), output_final_state=True)
        return o, r, S1, z1

    got, want = _run(kernels, xs + s0), _run(oracle, xs + s0)
    assert op.last_dim_parts == "parts: K=48 as 32 + 16"
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert judge_fp32(a, b).ok, judge_fp32(a, b)


def test_a_gpu_call_keeps_a_vector_state_padded_until_its_fault_is_diagnosed():
    """policy.triton_faults.parts_fault: mlstm_sig's backward in parts was wrong on the H200; a GPU call of a
    spec whose vector state would split runs padded and says why; the CPU (interpreter) and a spec with
    matrix states only still run parts."""
    from effc.runtime.dim_parts import choose_parts
    for name, device, held in (("mlstm_sig", "cuda", True), ("mlstm_sig", "cpu", False), ("gla", "cuda", False)):
        op = effc.load(name)
        shapes = [(1, 8, 1) + tuple(96 for _ in d.dims[3:]) for d in op.spec.inputs]
        cache = {}
        key = choose_parts(op, tuple(shapes), cache, device)
        assert (cache[key][0] is None) == held, (name, device)
        assert ("vector state n: [K]" in op.last_dim_parts) == held, op.last_dim_parts
