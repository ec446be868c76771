"""One focused golden test per pass: a small spec written here goes in, the printed IR (or the
pass's result) comes out and is compared as text. Passes are functions IR -> IR."""
from __future__ import annotations

import re
import textwrap

import pytest
import torch

import effc
from effc.codegen.triton.emit import emit_module
from effc.errors import SpecError
from effc.ir import print_spec
from effc.ir.nodes import C, Op, TileType
from effc.ir.printer import print_op
from effc.passes.fusion import depends, fuse, live_ops, needed
from effc.passes.autodiff import Adjoints
from effc.passes.block_loop import loop_over_blocks
from effc.passes.grad_terms import place_gradient_terms, split_terms
from effc.passes.hand_on import hand_on
from effc.passes.hoist import hoist
from effc.passes.legality import analyze
from effc.passes.plan import plan
from effc.passes.reverse_scan import split_reverse_scan
from effc.policy.tiling import Problem, choose, tiling_space
from effc.compiler import compile_text
from effc.runtime.verify import max_err, random_inputs, random_state

# Linear attention with a scalar decay: the smallest spec with a state.
LA = """
spec la {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  param gamma = 0.9
  chunk 16
  merge { o = q @ S }
  inter { S = S * gamma + k.T @ v }
}
"""

# A per-token log decay g (one value per token and head): broadcasting [C] -> [C, 1] -> [C, K].
GATED = """
spec gated {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input g: [B, T, H] logdecay
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  intra { b = cumsum(g) }
  merge { o = (q * exp(b)[:, None]) @ S }
  inter {
    bl = last(b)
    S = S * exp(bl) + (k * exp(bl - b)[:, None]).T @ v
  }
}
"""

KV128 = (("K", 128), ("V", 128))


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def golden(actual: str, expected: str) -> None:
    assert actual == textwrap.dedent(expected).strip("\n")


def typed(text: str, name: str | None = None):
    return compile_text(text, name).typed


# ---- lower: AST -> untyped SSA IR -----------------------------------------------------------

def test_lower_inlines_defs_merges_extends_and_renames():
    src = """
    def sq(x) = x * x
    spec base {
      input k: [B, T, H, K]
      input v: [B, T, H, V]
      output o: [B, T, H, V]
      state S: [K, V]
      chunk 16
      merge { o = sq(k) @ S }
      inter { S = S + k.T @ v }
    }
    spec child extends base {
      param gamma = 0.9
      chunk 32
      inter {
        w = k * 0.5
        w = w + 1
        S = S * gamma + w.T @ v
      }
    }
    """
    # merge comes from base with sq inlined; chunk, param and inter from child; the second
    # `w` gets a fresh SSA name; the new state value is _next_S; temporaries are _N
    golden(print_spec(compile_text(src, "child").ir), """
        spec child (chunk 32)
          input k[B, T, H, K] tile [C, K]
          input v[B, T, H, V] tile [C, V]
          output o[B, T, H, V] tile [C, V]
          state S[K, V] tile [K, V]
          param gamma = 9/10
          intra:
          merge:
            _1 = mul(k, k)
            o = matmul(_1, S)
          inter:
            w = mul(k, 0.5)
            _w_5 = add(w, 1.0)
            _6 = mul(S, gamma)
            _7 = transpose(_w_5)
            _8 = matmul(_7, v)
            _next_S = add(_6, _8)
    """)


def test_lower_later_stages_read_the_latest_value_of_a_reassigned_local():
    reassigned = effc.loads(edit(LA, "merge { o = q @ S }", "intra {\n a = q * 2\n a = a + 1\n }\n merge { o = a @ S }"))
    inline = effc.loads(edit(LA, "merge { o = q @ S }", "intra { a = q * 2 + 1 }\n merge { o = a @ S }"))
    xs = random_inputs(inline.spec, 1, 32, 1, {"K": 16, "V": 16})
    assert max_err(reassigned.reference(*xs)[0], inline.reference(*xs)[0]) < 1e-12


@pytest.mark.parametrize("old, new", [
    ("merge { o = q @ S }", "intra { a = q * 2 }\n merge {\n a = a + 1\n o = a @ S }"),
    ("merge { o = q @ S }", "intra {\n a_4 = q * 3\n a = q * 2\n a = a + 1\n }\n merge { o = a_4 @ S }"),
    ("S = S * gamma + k.T @ v", "_next_S = k.T @ v\n S = S * gamma + _next_S"),
], ids=["merge-reassigns-intra-local", "user-a_4-vs-generated-a_4", "user-_next_S"])
def test_lower_defines_each_ssa_name_once(old, new):
    try:
        spec = compile_text(edit(LA, old, new)).ir
    except SpecError:
        return  # rejecting the spec is fine too
    outs = [op.out for st in spec.stages for op in st.ops]
    assert len(outs) == len(set(outs)), outs


# ---- infer_shapes: tile types -----------------------------------------------------------------

def test_infer_shapes_types_every_op_with_broadcasting():
    golden(print_spec(typed(GATED)), """
        spec gated (chunk 16)
          input q[B, T, H, K] tile [C, K]
          input k[B, T, H, K] tile [C, K]
          input v[B, T, H, V] tile [C, V]
          input g[B, T, H] logdecay tile [C]
          output o[B, T, H, V] tile [C, V]
          state S[K, V] tile [K, V]
          intra:
            b : [C] = cumsum(g)
          merge:
            _2 : [C] = exp(b)
            _3 : [C, 1] = expand(_2, [:, None])
            _4 : [C, K] = mul(q, _3)
            o : [C, V] = matmul(_4, S)
          inter:
            bl : [] = last(b)
            _7 : [] = exp(bl)
            _8 : [K, V] = mul(S, _7)
            _9 : [C] = sub(bl, b)
            _10 : [C] = exp(_9)
            _11 : [C, 1] = expand(_10, [:, None])
            _12 : [C, K] = mul(k, _11)
            _13 : [K, C] = transpose(_12)
            _14 : [K, V] = matmul(_13, v)
            _next_S : [K, V] = add(_8, _14)
    """)


# ---- legality ---------------------------------------------------------------------------------

def _legality(text: str) -> str:
    return str(analyze(typed(text)))


def test_legality_diagonal_affine_update_is_segmentable():
    golden(_legality(LA), """
        legality:
          state S: S' = S * gamma + _4 (decay times state plus a state-free write)
          schedules: walk + segmented walk
          split across programs: V
          - every state update is diagonal-affine, so segments of the walk compose
    """)


def test_legality_decay_only_update():
    golden(_legality(edit(LA, "S = S * gamma + k.T @ v", "S = gamma * S")), """
        legality:
          state S: S' = S * gamma + 0 (decay only)
          schedules: walk + segmented walk
          split across programs: V
          - every state update is diagonal-affine, so segments of the walk compose
    """)


def test_legality_general_transition_is_walked_by_one_program():
    # (k.T @ k) @ S mixes the rows of S: not S * D + W. Its columns stay independent, so V still splits.
    golden(_legality(edit(LA, "S = S * gamma + k.T @ v", "S = (k.T @ k) @ S + k.T @ v")), """
        legality:
          state S: general (update is not S * D + W with state-free D, W (depends on S))
          schedules: walk
          split across programs: V
          - state(s) S have a general transition: one program walks all chunks
    """)


def test_legality_reduced_output_dim_is_not_split():
    golden(_legality(edit(LA, "o = q @ S", "o = q @ S / rowsum(q @ S)[:, None]")), """
        legality:
          state S: S' = S * gamma + _8 (decay times state plus a state-free write)
          schedules: walk + segmented walk
          split across programs: none
          - every state update is diagonal-affine, so segments of the walk compose
          - dim V is contracted or reduced, so it cannot be split across programs
    """)


# ---- tiling -----------------------------------------------------------------------------------

def test_tiling_space_constraints():
    spec = typed(GATED)
    golden(str(tiling_space(spec, analyze(spec))), """
        tiling: chunk C, split dim V in blocks of BLOCK, P segments
          require C >= 16   # tl.dot needs tiles of at least 16
          require IsPow2(C)   # block shapes are powers of two
          require BLOCK >= 16   # BLOCK is a matmul dim
          require IsPow2(BLOCK)   # BLOCK is a power of two
          require BLOCK <= PadTo(V)   # BLOCK is at most V padded to a power of two
          live fp32 per program ~ BLOCK*C + BLOCK*K + C**2 + 2*C*K + C
          live fp32 per coarse walk program (walk_chunk: C = its chunk, merge skipped) ~ BLOCK*C + BLOCK*K + C*K + C
    """)


def test_choose_many_programs_one_walk():
    spec = typed(GATED)  # 2 V-blocks * 8 * 16 = 256 programs, 264 slots on 132 SMs
    golden(str(choose(spec, analyze(spec), Problem(8, 2048, 16, KV128))), """
        chunk=16 block=64 segments=1 warps=4 stages=1
          - block 64 of V: keeps the state tile at most 64 columns wide
          - one fused walk over all chunks: 256 programs for 264 slots; the state never leaves the chip
          - 4 warps, ~106 live fp32 values per thread (at most 255 fit)
    """)


def test_choose_few_programs_many_segments():
    spec = typed(GATED)  # 2 programs over 2048 chunks: segment the walk (at most 64 segments)
    golden(str(choose(spec, analyze(spec), Problem(1, 32768, 1, KV128))), """
        chunk=16 block=64 segments=64 warps=4 stages=1
          - block 64 of V: keeps the state tile at most 64 columns wide
          - 2 programs for 264 slots: 64 segments of 32 chunks run in parallel, stitched through per-segment summaries (wave model cost 64 vs 2048 unsegmented)
          - 4 warps, ~106 live fp32 values per thread (at most 255 fit)
    """)  # noqa: E501


def test_choose_more_warps_when_the_live_values_do_not_fit_four():
    """The register model decides the warps: a padded head dim (192 in 256-wide tiles) at chunk 64 holds
    ~448 live fp32 values per thread at 4 warps, past the 255 registers a thread has; 8 warps halve it."""
    spec = typed(GATED)
    golden(str(choose(spec, analyze(spec), Problem(8, 2048, 16, (("K", 192), ("V", 192))), chunk=64)), """
        chunk=64 block=64 segments=1 warps=8 stages=1
          - block 64 of V: keeps the state tile at most 64 columns wide
          - one fused walk over all chunks: 384 programs for 264 slots; the state never leaves the chip
          - 8 warps: ~448 live fp32 values per thread at 4 would spill, ~224 at 8
    """)


def test_choose_keeps_four_warps_just_past_the_register_file():
    """Within LATE_LOADS_MARGIN of 255 (the estimate counts every input tile live at once; a kernel that spills
    runs with its loads late) 4 warps stay: gated_delta_net at chunk 64, D=128, ~257 a thread."""
    from effc.policy.tiling import LIVE_PER_THREAD_LIMIT
    op = effc.load("gated_delta_net")
    cfg = choose(op.spec, op.comp.legality, Problem(2, 8192, 16, KV128), chunk=64)
    assert cfg.num_warps == 4 and 255 < 257 <= LIVE_PER_THREAD_LIMIT
    assert "4 warps, ~257 live fp32 values per thread: past 255, where a kernel that spills takes its loads at " \
           "their first reader" in cfg.reasons
    assert choose(op.spec, op.comp.legality, Problem(2, 8192, 16, KV128), chunk=128).num_warps == 8  # ~514


def test_choose_rejects_a_violated_constraint():
    spec = typed(GATED)
    with pytest.raises(SpecError, match=r"BLOCK <= PadTo\(V\) fails for C=16, K=48, V=40, BLOCK=128: BLOCK is at most V"):
        choose(spec, analyze(spec), Problem(1, 1024, 1, (("K", 48), ("V", 40))), block=128)


def test_choose_rejects_segments_of_a_general_transition():
    spec = typed(edit(LA, "S = S * gamma + k.T @ v", "S = (k.T @ k) @ S + k.T @ v"))
    legality = analyze(spec)
    assert choose(spec, legality, Problem(1, 4096, 1, KV128)).segments == 1
    with pytest.raises(SpecError, match=re.escape("spec 'la' cannot run in 2 segments: update is not S * D + W")):
        choose(spec, legality, Problem(1, 4096, 1, KV128), segments=2)


# ---- fusion -----------------------------------------------------------------------------------

def test_fuse_summary_drops_merge_and_dead_code():
    spec = typed(edit(GATED, "intra { b = cumsum(g) }", "intra {\n b = cumsum(g)\n unused = q * 2\n }"))
    # dead-code elimination drops `unused` from both kernels; the summary kernel keeps no merge op
    # and also returns the decay _8, whose product over a segment it accumulates
    golden(str(fuse(spec, analyze(spec))), """
        fused:
          kernel summary [intra + inter] -> _next_S, _8
            b : [C] = cumsum(g)
            bl : [] = last(b)
            _8 : [] = exp(bl)
            _9 : [K, V] = mul(S, _8)
            _10 : [C] = sub(bl, b)
            _11 : [C] = exp(_10)
            _12 : [C, 1] = expand(_11, [:, None])
            _13 : [C, K] = mul(k, _12)
            _14 : [K, C] = transpose(_13)
            _15 : [K, V] = matmul(_14, v)
            _next_S : [K, V] = add(_9, _15)
          kernel walk [intra + merge + inter] -> o, _next_S
            b : [C] = cumsum(g)
            _3 : [C] = exp(b)
            _4 : [C, 1] = expand(_3, [:, None])
            _5 : [C, K] = mul(q, _4)
            o : [C, V] = matmul(_5, S)
            bl : [] = last(b)
            _8 : [] = exp(bl)
            _9 : [K, V] = mul(S, _8)
            _10 : [C] = sub(bl, b)
            _11 : [C] = exp(_10)
            _12 : [C, 1] = expand(_11, [:, None])
            _13 : [C, K] = mul(k, _12)
            _14 : [K, C] = transpose(_13)
            _15 : [K, V] = matmul(_14, v)
            _next_S : [K, V] = add(_9, _15)
          kernel out [intra + merge] -> o
            b : [C] = cumsum(g)
            _3 : [C] = exp(b)
            _4 : [C, 1] = expand(_3, [:, None])
            _5 : [C, K] = mul(q, _4)
            o : [C, V] = matmul(_5, S)
    """)


def test_cse_merges_what_merge_and_inter_both_compute():
    """The delta rule's correction `u - k @ S` written in merge and in inter: one matmul, one sub; the
    transpose of k, taken twice, once. A root (the next state) keeps its name."""
    spec = typed(edit(LA, "merge { o = q @ S }\n  inter { S = S * gamma + k.T @ v }",
                      "merge { o = q @ S + (q @ k.T) @ (v - k @ S) }\n  inter { S = S + k.T @ (v - k @ S) }"))
    ops = live_ops(spec.intra.ops + spec.merge.ops + spec.inter.ops, ("o", "_next_S"))
    golden("\n".join(print_op(op) for op in ops), """
            _1 : [C, V] = matmul(q, S)
            _2 : [K, C] = transpose(k)
            _3 : [C, C] = matmul(q, _2)
            _4 : [C, V] = matmul(k, S)
            _5 : [C, V] = sub(v, _4)
            _6 : [C, V] = matmul(_3, _5)
            o : [C, V] = add(_1, _6)
            _11 : [K, V] = matmul(_2, _5)
            _next_S : [K, V] = add(S, _11)
    """)


def test_fuse_general_transition_adds_an_out_kernel():
    """No summary (a general transition cannot be segmented); `out` evaluates merge per chunk from the
    states the walk leaves behind, and the plan names what the walk skips when merge is deferred."""
    text = edit(LA, "S = S * gamma + k.T @ v", "S = (k.T @ k) @ S + k.T @ v")
    spec = typed(text)
    golden(str(fuse(spec, analyze(spec))), """
        fused:
          kernel walk [intra + merge + inter] -> o, _next_S
            o : [C, V] = matmul(q, S)
            _2 : [K, C] = transpose(k)
            _3 : [K, K] = matmul(_2, k)
            _4 : [K, V] = matmul(_3, S)
            _6 : [K, V] = matmul(_2, v)
            _next_S : [K, V] = add(_4, _6)
          kernel out [intra + merge] -> o
            o : [C, V] = matmul(q, S)
    """)
    assert compile_text(text).plan.merge_only() == ("o",)


def test_tiling_defers_merge_when_the_walk_leaves_the_gpu_idle():
    spec = typed(edit(LA, "S = S * gamma + k.T @ v", "S = (k.T @ k) @ S + k.T @ v"))
    legality = analyze(spec)
    dims = (("K", 128), ("V", 128))
    few = choose(spec, legality, Problem(2, 8192, 16, dims))  # 2 blocks x 32 programs for 264 slots
    many = choose(spec, legality, Problem(64, 8192, 16, dims))
    one_chunk = choose(spec, legality, Problem(2, 16, 16, dims))
    assert few.defer_merge and "merge deferred" in str(few)
    assert not many.defer_merge and "merge fused in the walk: 2048 programs" in str(many)
    assert not one_chunk.defer_merge and "one chunk" in str(one_chunk)
    assert not choose(spec, legality, Problem(2, 8192, 16, dims), defer_merge=False).defer_merge
    # a segmentable spec keeps merge fused unless asked: its segments fill the GPU without writing states
    la = typed(LA)
    assert not choose(la, analyze(la), Problem(2, 8192, 16, dims)).defer_merge
    assert choose(la, analyze(la), Problem(2, 8192, 16, dims), defer_merge=True).defer_merge


# ---- hoist --------------------------------------------------------------------------------------

# A delta-rule-like spec that is not in the library: an in-chunk solve feeding the state update.
SOLVED = edit(LA, "merge { o = q @ S }\n  inter { S = S * gamma + k.T @ v }",
              "intra {\n    t = unit_lower_inv(k @ k.T)\n    w = t @ k\n  }\n"
              "  merge { o = q @ S + causal(q @ k.T) @ (v - w @ S) }\n  inter { S = S + k.T @ (v - w @ S) }")


def test_hoist_moves_the_solve_and_its_products_to_prep():
    """w reads no state, is read by state-dependent ops and holds a solve: prep computes it; the walk
    and out keep k.T (cheap, and read by the state update too) and load w."""
    spec = typed(SOLVED)
    golden(str(hoist(spec, fuse(spec, analyze(spec)))).split("\n  kernel out")[0], """
        fused:
          hoisted: w[C, K]
          kernel prep [intra] -> w
            _1 : [K, C] = transpose(k)
            _2 : [C, C] = matmul(k, _1)
            t : [C, C] = unit_lower_inv(_2)
            w : [C, K] = matmul(t, k)
          kernel walk [intra + merge + inter] -> o, _next_S
            _1 : [K, C] = transpose(k)
            _5 : [C, V] = matmul(q, S)
            _7 : [C, C] = matmul(q, _1)
            _8 : [C, C] = causal(_7)
            _9 : [C, V] = matmul(w, S)
            _10 : [C, V] = sub(v, _9)
            _11 : [C, V] = matmul(_8, _10)
            o : [C, V] = add(_5, _11)
            _16 : [K, V] = matmul(_1, _10)
            _next_S : [K, V] = add(S, _16)
    """)
    # out reads w as the walk does: its ops are the walk's that the output needs
    fused = hoist(spec, fuse(spec, analyze(spec)))
    walk, out = fused.kernels[1], fused.kernels[2]
    assert out.name == "out" and out.ops == needed(walk.ops, ("o",))


def test_hoist_leaves_specs_without_a_solve_alone():
    spec = typed(GATED)
    fused = fuse(spec, analyze(spec))
    assert hoist(spec, fused) is fused


def test_hoisted_spec_runs_against_its_oracle():
    """The prep kernel's chunk-padded scratch: T not a multiple of C, packed sequences, gradients."""
    op = effc.loads(SOLVED)
    assert [k.name for k in op.comp.plan.kernels][:3] == ["prep", "walk", "out"]
    # with the backward, the solve moves too (the adjoint of t @ k reads t): only prep inverts
    assert [n for n, _ in op.comp.fused.hoisted] == ["t", "w"]
    assert [k.name for k in op.comp.plan.kernels if any(o.kind == "unit_lower_inv" for o in k.ops)] == ["prep"]
    _packed_matches_oracle(op, seed=1)


def _packed_matches_oracle(op, seed: int) -> None:
    """Two packed sequences (T not a multiple of C), K=16, V=32: the output and every gradient against the
    oracle. k scaled down: the solved specs have no normalisation, and a well-conditioned (I + strict(k k^T))
    keeps them fp32-testable."""
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, 45, 2, {"K": 16, "V": 32}, seed=seed)]
    with torch.no_grad():
        xs[1].mul_(0.25)
    cu = torch.tensor([0, 13, 45], dtype=torch.int32)
    out, _ = op(*xs, cu_seqlens=cu)
    ref, _ = op.reference(*xs, cu_seqlens=cu)
    assert max_err(out, ref) < 1e-4
    d_o = torch.randn_like(out)
    got = torch.autograd.grad(out, xs, d_o)
    want = torch.autograd.grad(ref, xs, d_o.double())
    for d, a, b in zip(op.spec.inputs, got, want):
        assert max_err(a, b) < 1e-4 * max(1.0, b.abs().max().item()), d.name


def _split_scan(text: str):
    """The fused kernels up to passes.reverse_scan (before hand_on and partition)."""
    c = compile_text(text)
    split = c.legality.split_dims[0]
    fused = place_gradient_terms(c.typed, fuse(c.typed, c.legality, c.backward), c.backward, split)
    return split_reverse_scan(c.typed, hoist(c.typed, fused), split)


def test_split_reverse_scan_leaves_the_scan_only_what_reads_the_carried_adjoint():
    """dS entering a chunk = dS - w^T dv + q^T dO with dv = k dS + causal(q k^T)^T dO: dv is a per-token sum whose
    free part is a matmul, so the cut is made there: bwd_inject writes causal(q k^T)^T dO per token for every
    chunk at once, the scan forms dv whole (w^T dv one matmul) and keeps q^T dO (one matmul of loaded tiles
    is not worth a state-sized write after the per-token one)."""
    fused = _split_scan(SOLVED)
    assert fused.injected == ()
    assert [n for n, _ in fused.handed] == ["_inj_d9"]
    golden(textwrap.dedent("\n".join(str(k) for k in fused.kernels if k.name in ("bwd_inject", "bwd_scan"))), """
          kernel bwd_inject [inter + merge] -> _inj_d9; writes _inj_d9
            _1 : [K, C] = transpose(k)
            _7 : [C, C] = matmul(q, _1)
            _8 : [C, C] = causal(_7)
            _d7 : [C, C] = transpose(_8)
            _d8 : [C, V] = matmul(_d7, _seed_o)
            _inj_d9 : [C, V] = copy(_d8)
          kernel bwd_scan [inter + merge] -> _d27
            _d13 : [K, C] = transpose(w)
            _1 : [K, C] = transpose(k)
            _d3 : [C, K] = transpose(_1)
            _d4 : [C, V] = matmul(_d3, _seed__next_S)
            _d9 : [C, V] = add(_d4, _inj_d9)
            _d10 : [C, V] = neg(_d9)
            _d14 : [K, V] = matmul(_d13, _d10)
            _d15 : [K, V] = add(_seed__next_S, _d14)
            _d19 : [K, C] = transpose(q)
            _d26 : [K, V] = matmul(_d19, _seed_o)
            _d27 : [K, V] = add(_d15, _d26)
    """)
    # a segmentable spec's scan runs each chunk twice (passes.reverse_scan): one matmul (q^T dO) stays in it,
    # mLSTM's output recomputed for the normaliser's adjoint goes out
    assert compile_text(GATED).fused.injected == ()
    assert [s for s, _ in effc.load("mlstm_sig").comp.plan.kernel("bwd_scan").injected] == ["C", "n"]


# ---- plan -------------------------------------------------------------------------------------

def test_split_terms_pushes_the_gradient_sum_out_through_linear_ops():
    """dg = revcumsum(-a + unlast(total(a) + total(dS' * S) * e) + c): the sum comes out through revcumsum and
    unlast as four terms; each ends at a value the adjoints already hold."""
    c = compile_text(GATED)
    bw = c.backward
    b = Adjoints(bw.types(c.typed), prefix="_t")
    terms = split_terms(bw.ops, dict(bw.input_grads)["g"], depends(bw.ops, {s for s, _ in bw.seeds}), b)
    assert terms == ["_t3", "_t4", "_t5", "_t6"]
    golden("\n".join(print_op(op) for op in b.ops), """
        _t1 : [C] = unlast(_d11)
        _t2 : [C] = unlast(_d17)
        _t3 : [C] = revcumsum(_d12)
        _t4 : [C] = revcumsum(_t1)
        _t5 : [C] = revcumsum(_t2)
        _t6 : [C] = revcumsum(_d30)
    """)


def test_place_gradient_terms_dissolves_kernels_another_kernel_already_computes():
    """GATED: dq and dk are terms of the g kernel's own adjoints (no new matmul, no new tile), so their kernels
    go; dv needs k^T dS' that only its own kernel computes."""
    c = compile_text(GATED)
    before = fuse(c.typed, c.legality, c.backward)
    assert [k.name for k in before.kernels if k.name.startswith("bwd_chunks")] == [
        "bwd_chunks_q", "bwd_chunks_k", "bwd_chunks_v", "bwd_chunks_g"]
    after = place_gradient_terms(c.typed, before, c.backward, "V")
    golden("\n".join(str(k).splitlines()[0].strip() for k in after.kernels if k.name.startswith("bwd_chunks")), """
          kernel bwd_chunks_v [inter + merge + intra] -> _d4; dv += _d4
          kernel bwd_chunks_g [inter + merge + intra] -> _d32, _d26, _d6; dg += _d32; dq += _d26; dk += _d6
    """)
    # gated_delta_net_l2 at its chunk 64: dg's terms would take the q, k and beta kernels past the live-value
    # limit (at chunk 32 they went to those three), and mLSTM's gate kernels likewise, so their kernels stay
    gdn = effc.load("gated_delta_net_l2").comp.plan
    assert gdn.grad_writers("g", "block") == ("bwd_chunks_g",)
    assert "g" in gdn.whole_grads(n_split=1)
    mlstm = effc.load("mlstm").comp.plan
    assert {k.name for k in mlstm.gradient_kernels("block")} == {f"bwd_chunks_{x}" for x in ("q", "k", "v", "i", "f")}


def test_plan_loads_only_what_each_kernel_reads():
    spec = typed(GATED)
    legality = analyze(spec)
    # the summary kernel reads no q and stores nothing; its grid has one segment fewer
    golden(str(plan(spec, legality, fuse(spec, legality))), """
        plan gated: split V; summary kernel runs first when segments > 1; with merge deferred, the walk updates the state only and the out kernel evaluates merge per chunk from the walk's states; a coarse walk (walk_chunk) runs the walk again per coarse chunk
          kernel summary  grid=(cdiv(V, BLOCK), B*H, P-1)
            per chunk: load k, v, g; store -
            carry S[K,V] on chip
            b : [C] = cumsum(g)
            bl : [] = last(b)
            _7 : [] = exp(bl)
            _8 : [K, V] = mul(S, _7)
            _9 : [C] = sub(bl, b)
            _10 : [C] = exp(_9)
            _11 : [C, 1] = expand(_10, [:, None])
            _14_a : [K, C] = transpose(k)
            _14_q : [C, V] = mul(v, _11)
            _14 : [K, V] = matmul(_14_a, _14_q)
            _next_S : [K, V] = add(_8, _14)
          kernel walk  grid=(cdiv(V, BLOCK), B*H, P)
            per chunk: load q, k, v, g; store o
            carry S[K,V] on chip
            b : [C] = cumsum(g)
            _2 : [C] = exp(b)
            _3 : [C, 1] = expand(_2, [:, None])
            o_m : [C, V] = matmul(q, S)
            o : [C, V] = mul(o_m, _3)
            bl : [] = last(b)
            _7 : [] = exp(bl)
            _8 : [K, V] = mul(S, _7)
            _9 : [C] = sub(bl, b)
            _10 : [C] = exp(_9)
            _11 : [C, 1] = expand(_10, [:, None])
            _14_a : [K, C] = transpose(k)
            _14_q : [C, V] = mul(v, _11)
            _14 : [K, V] = matmul(_14_a, _14_q)
            _next_S : [K, V] = add(_8, _14)
          kernel out  grid=(cdiv(V, BLOCK), B*H, chunks)
            per chunk: load q, g; store o
            read S[K,V] entering the chunk from the walk's history
            b : [C] = cumsum(g)
            _2 : [C] = exp(b)
            _3 : [C, 1] = expand(_2, [:, None])
            o_m : [C, V] = matmul(q, S)
            o : [C, V] = mul(o_m, _3)
    """)


# ---- codegen ----------------------------------------------------------------------------------

SMASK = ("mask=(m_K[:, None] & m_V[None, :] if ((K_P != K) | (V % BLOCK != 0)) else None), "
         "other=(0.0 if ((K_P != K) | (V % BLOCK != 0)) else None)")


def test_emit_module_key_lines_and_valid_python():
    src = emit_module(compile_text(GATED).plan)
    for line in [
        "def gated_summary_kernel(k_ptr, v_ptr, g_ptr, S_segw_ptr, S_segd_ptr,",  # no q, no o
        "def gated_walk_kernel(q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, S_init_ptr, S_final_ptr,",
        "v_g = tl.load(g_ptr + (bos + tok) * HX_g + i_h // (H // HX_g), mask=tv, other=0.0).to(tl.float32)",
        # padded feature columns masked under constexpr guards (false for power-of-two dims)
        "v_q = tl.load(q_ptr + ((bos + tok)[:, None] * HX_q + i_h // (H // HX_q)) * K + r_K[None, :], "
        "mask=(tv[:, None] & m_K[None, :] if (K_P != K) else tv[:, None]), other=0.0)",
        "r_K = tl.arange(0, K_P)",
        "m_V = r_V < V",
        "for j in tl.range(0, c_hi - c_lo):  # the reverse scan of the state adjoints",
        "for j in tl.range(0, n_seg_seq - 1 - seg):  # fold the summaries of later segments, the last first",
        "v_dS = v_dS * tl.load(S_segd_ptr + seg_offs, " + SMASK + ") + tl.load(S_segw_ptr + seg_offs, " + SMASK + ")",
        "d_S = d_S * v__7",  # the reverse summary: the same decay, multiplied out in the scan's body too
        "v__seed__next_S = v_dS",
        "r_V = pid_s * BLOCK + tl.arange(0, BLOCK)",  # V is split
        "v_b = tl.cumsum(v_g, axis=0)",
        # contracting K: the carried state's padded rows selected to 0 (they may hold anything; a loaded tile's
        # padded columns load as 0), q unscaled (passes.scale_placement scales the [C, V] product by exp(b))
        "v_o_m = tl.dot(v_q.to(DOT_DTYPE), "
        "(tl.where(m_K[:, None], v_S, 0.0) if (K_P != K) else v_S).to(DOT_DTYPE), input_precision=PRECISION)",
        "for seg in tl.range(0, pid_p):  # fold the summaries of earlier segments",
        "v_S = v_S * tl.load(S_segd_ptr + seg_offs, " + SMASK + ") + tl.load(S_segw_ptr + seg_offs, " + SMASK + ")",
        "d_S = d_S * v__7",  # the summary accumulates the decay
        "v_S = v__next_S",
    ]:
        assert line in src, line
    compile(src, "gated_triton.py", "exec")


def _segmented_vs_oracle(text: str):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # conftest: the interpreter on CPU
    op = effc.loads(text)
    dims = {"K": 16, "V": 16}
    xs = [x.to(device) for x in random_inputs(op.spec, 1, 64, 1, dims)]
    s0 = random_state(op.spec, 1, 1, dims, device)
    ref, ref_s = op.reference(*xs, initial_state=s0, output_final_state=True)
    o, s = op(*xs, initial_state=s0, output_final_state=True, segments=4)
    return max_err(o, ref), max_err(s, ref_s)


def test_segmented_walk_with_a_param_decay_matches_the_oracle():
    assert max(_segmented_vs_oracle(LA)) < 1e-3


def test_segmented_walk_with_a_constant_decay_matches_the_oracle():
    assert max(_segmented_vs_oracle(edit(LA, "S * gamma", "S * 0.5"))) < 1e-3


# ---- autodiff: the backward of one chunk step ---------------------------------------------------

TINY = """
spec tiny {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  input g: [B, T, H] logdecay
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  merge { o = (q * exp(g)[:, None]) @ S }
  inter { S = S * exp(last(g)) + k.T @ v }
}
"""


def test_differentiate_one_chunk_step():
    """dq = dO S^T exp(g); dk = v dS^T; dv = k dS; dg from both exp(g) and exp(last(g));
    the state adjoint entering the chunk is dS exp(last g) + (q exp(g))^T dO."""
    from effc.passes.autodiff import differentiate
    golden(str(differentiate(compile_text(TINY).typed)), """
        backward (one chunk, run in reverse chunk order):
          seeds: _seed_o = do, _seed__next_S = dS
            _1 : [C] = exp(g)
            _2 : [C, 1] = expand(_1, [:, None])
            _3 : [C, K] = mul(q, _2)
            _5 : [] = last(g)
            _6 : [] = exp(_5)
            _8 : [K, C] = transpose(k)
            _d1 : [V, C] = transpose(v)
            _d2 : [K, C] = matmul(_seed__next_S, _d1)
            _d3 : [C, K] = transpose(_8)
            _d4 : [C, V] = matmul(_d3, _seed__next_S)
            _d5 : [C, K] = transpose(_d2)
            _d6 : [K, V] = mul(_seed__next_S, _6)
            _d7 : [K, V] = mul(_seed__next_S, S)
            _d8 : [V] = colsum(_d7)
            _d9 : [] = total(_d8)
            _d10 : [] = mul(_d9, _6)
            _d11 : [C] = unlast(_d10)
            _d12 : [V, K] = transpose(S)
            _d13 : [C, K] = matmul(_seed_o, _d12)
            _d14 : [K, C] = transpose(_3)
            _d15 : [K, V] = matmul(_d14, _seed_o)
            _d16 : [K, V] = add(_d6, _d15)
            _d17 : [C, K] = mul(_d13, _2)
            _d18 : [C, K] = mul(_d13, q)
            _d19 : [C] = rowsum(_d18)
            _d21 : [C] = mul(_d19, _1)
            _d22 : [C] = add(_d11, _d21)
          gradients: dq = _d17, dk = _d5, dv = _d4, dg = _d22, dS = _d16
    """)


def test_loop_over_blocks_splits_a_gradient_kernel_around_the_sums_over_v():
    """passes.block_loop on the gated spec's q/k/g gradient kernel: the loop computes what has V and
    accumulates what sums over it (dS v^T, total(dS * S), dO S^T); the gates and the K-side adjoints,
    which read those sums, come after it (nothing K-side stays live across the loop)."""
    plan = compile_text(GATED).plan
    kp = plan.kernel("bwd_chunks_g")
    golden(str(loop_over_blocks(kp.ops, kp.types(plan.spec), "V")), """
          before the loop:
          per block of the split dim:
            _d1 : [V, C] = transpose(v)
            _d2 : [K, C] = matmul(_seed__next_S, _d1)   (accumulated)
            _d14 : [K, V] = mul(_seed__next_S, S)
            _d15 : [V] = colsum(_d14)
            _d16 : [] = total(_d15)   (accumulated)
            _d21 : [V, K] = transpose(S)
            _d22 : [C, K] = matmul(_seed_o, _d21)   (accumulated)
          after the loop:
            b : [C] = cumsum(g)
            _2 : [C] = exp(b)
            _3 : [C, 1] = expand(_2, [:, None])
            bl : [] = last(b)
            _7 : [] = exp(bl)
            _9 : [C] = sub(bl, b)
            _10 : [C] = exp(_9)
            _11 : [C, 1] = expand(_10, [:, None])
            _d5 : [C, K] = transpose(_d2)
            _d6 : [C, K] = mul(_d5, _11)
            _d7 : [C, K] = mul(_d5, k)
            _d8 : [C] = rowsum(_d7)
            _d10 : [C] = mul(_d8, _10)
            _d11 : [] = total(_d10)
            _d12 : [C] = neg(_d10)
            _d17 : [] = mul(_d16, _7)
            _d18 : [] = add(_d11, _d17)
            _d19 : [C] = unlast(_d18)
            _d20 : [C] = add(_d12, _d19)
            _d26 : [C, K] = mul(_d22, _3)
            _d27 : [C, K] = mul(_d22, q)
            _d28 : [C] = rowsum(_d27)
            _d30 : [C] = mul(_d28, _2)
            _d31 : [C] = add(_d20, _d30)
            _d32 : [C] = revcumsum(_d31)
    """)
    # a max over V is not a sum: this kernel would not loop
    rowmax = Op("_m", "rowmax", ("_seed_o",), TileType((C,)))
    assert loop_over_blocks(kp.ops + (rowmax,), {**kp.types(plan.spec), "_m": rowmax.type}, "V") is None


# the same with a per-token gate: the walk's decays read its cumulative sum, a scan across the chunk's rows
SOLVED_GATED = edit(SOLVED, "input v: [B, T, H, V]", "input v: [B, T, H, V]\n  input g: [B, T, H] logdecay").replace(
    "inter { S = S + k.T @ (v - w @ S) }",
    "inter { S = S * exp(last(cumsum(g))) + (k * exp(last(cumsum(g)) - cumsum(g))[:, None]).T @ (v - w @ S) }")


def test_hoist_writes_a_gate_cumsum_beside_the_solve_and_last_reads_one_row():
    """Where prep runs anyway, it writes the state-free [C] cumulative sums too: the serial kernels load them a
    chunk ahead and read the chunk's last value with one load, not a reduction across the program's warps."""
    op = effc.loads(SOLVED_GATED)
    hoisted = dict(op.comp.fused.hoisted)
    scans = [n for n in hoisted if hoisted[n].rank == 1]
    assert len(scans) == 1 and {"t", "w"} <= set(hoisted)
    plan = op.comp.plan
    for name in ("walk", "bwd_scan"):
        kernel = plan.kernel(name)
        assert not any(o.kind == "cumsum" for o in kernel.ops), name
        assert scans[0] in {d.name for d in kernel.hoisted_loads}, name
    source = op.comp.source("triton")
    walk = source[source.index("def " + op.spec.name + "_walk_kernel"):]
    walk = walk[:walk.index("@triton.jit")]
    assert f"nx_{scans[0]} = tl.load(" in walk and "n_valid - 1)" in walk and "tl.sum(tl.where((r_C == n_valid" not in walk
    _packed_matches_oracle(op, seed=2)


def test_hand_on_gives_later_kernels_what_the_serial_kernels_form():
    """The walk forms v - w S (`_10`) for the state update; the out kernel reads it instead of w, v and a matmul.
    The scan forms dv = k dS + causal(q k^T)^T dO whole (the per-token cut); each gradient kernel forming it
    too (as grad_terms' `_t4`, dv's own gradient, and under `-dv` in dk's terms) reads it instead: k dS and
    causal(q k^T)^T dO leave them, and -dv is recomputed from it, not written too."""
    fused = hand_on(_split_scan(SOLVED), "V")
    assert [n for n, _ in fused.handed] == ["_inj_d9", "_10", "_d9"]
    kernel = {k.name: k for k in fused.kernels}
    assert [n for n, _ in kernel["walk"].scratch_stores] == ["_10"]
    golden(textwrap.dedent(str(kernel["out"])), """
          kernel out [intra + merge] -> o
            _1 : [K, C] = transpose(k)
            _5 : [C, V] = matmul(q, S)
            _7 : [C, C] = matmul(q, _1)
            _8 : [C, C] = causal(_7)
            _11 : [C, V] = matmul(_8, _10)
            o : [C, V] = add(_5, _11)
    """)
    assert [n for n, _ in kernel["bwd_scan"].scratch_stores] == ["_d9"]
    for k in fused.kernels:
        if k.name.startswith("bwd_chunks_"):
            made = {op.out for op in k.ops}
            assert not made & {"_d4", "_d8", "_d9", "_t4"}, k.name
    golden(textwrap.dedent(str(next(k for k in fused.kernels if k.name == "bwd_chunks_k"))), """
          kernel bwd_chunks_k [inter + merge + intra] -> _d44, _d9; dk += _d44; dv += _d9
            _1 : [K, C] = transpose(k)
            _9 : [C, V] = matmul(w, S)
            _10 : [C, V] = sub(v, _9)
            _d1 : [V, C] = transpose(_10)
            _d2 : [K, C] = matmul(_seed__next_S, _d1)
            _d3 : [C, K] = transpose(_1)
            _d6 : [C, C] = matmul(_seed_o, _d1)
            _d10 : [C, V] = neg(_d9)
            _d11 : [V, K] = transpose(S)
            _d12 : [C, K] = matmul(_d10, _d11)
            _d16 : [C, C] = causal(_d6, 0.0)
            _d19 : [K, C] = transpose(q)
            _d20 : [K, C] = matmul(_d19, _d16)
            _d21 : [K, C] = add(_d2, _d20)
            _d29 : [C, C] = matmul(_d12, _1)
            _d30 : [C, C] = transpose(t)
            _d31 : [C, K] = matmul(_d30, _d12)
            _d33 : [C, C] = matmul(_d30, _d29)
            _d34 : [C, C] = matmul(_d33, _d30)
            _d35 : [C, C] = strict(_d34, 0.0)
            _d36 : [C, C] = neg(_d35)
            _d38 : [C, K] = matmul(_d36, _d3)
            _d39 : [C, K] = add(_d31, _d38)
            _d41 : [K, C] = matmul(_1, _d36)
            _d42 : [K, C] = add(_d21, _d41)
            _d43 : [C, K] = transpose(_d42)
            _d44 : [C, K] = add(_d39, _d43)
    """)
    # the oracle: forward and every gradient over packed sequences, the scan handing dv on
    _packed_matches_oracle(effc.loads(SOLVED), seed=2)


# a normalised output: the backward's adjoint of the normaliser reads the output
NORMED = edit(edit(LA, "param gamma = 0.9", "state z: [K]"), "merge { o = q @ S }\n  inter { S = S * gamma + k.T @ v }",
              "intra { A = causal(q @ k.T) }\n"
              "  merge {\n    den = rowsum(A) + rowsum(q * z[None, :])\n"
              "    o = (A @ v + q @ S) / (abs(den) + 1.0)[:, None]\n  }\n"
              "  inter {\n    S = S + k.T @ v\n    z = z + colsum(k)\n  }")


def test_read_outputs_gives_the_backward_the_output_it_recomputed():
    """A normalised output's adjoint reads the output (d den = -rowsum(dO * o) / den): the gradient kernels and
    bwd_inject load `o`, which autograd keeps, instead of forming A v + q S again (two matmuls and the loads
    of v and S per block of V)."""
    op = effc.loads(NORMED)
    fused = op.comp.fused
    assert fused.outputs_read == ("o",)
    readers = [k for k in op.comp.plan.kernels if any(d.name == "o" for d in k.loads)]
    assert readers and all(k.backward for k in readers)
    for k in readers:
        made = {o.out for o in k.ops}
        assert "o" not in made and not any(o.kind == "matmul" and "v" in o.args for o in k.ops), k.name
    _packed_matches_oracle(op, seed=4)
