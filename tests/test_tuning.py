"""Autotuning without a GPU: the pruned search space, the ranking and budget logic (a fake timer),
the tuning cache (atomic entries, corruption, codegen versions, concurrent writers), the op reading
it, `effc tune` / `effc cache`, and the pieces of `effc bench` that need no GPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import effc
from effc import codegen
from effc.tools.cli import app
from effc.policy.search import H100_SHARED_BYTES, SOFTMAX_STAGES, Candidate, model_default, search_space
from effc.passes.softmax import choose_softmax_tiles
from effc.policy.tiling import Problem, choose
from effc.policy.tuning import TuningKey, read_entry, shape_bucket, store
from effc.tools.tune import MARGIN, summary, tune_problem
from tuning_fakes import FakeClock, FakeRunner

KV128 = (("K", 128), ("V", 128))
KV64 = (("K", 64), ("V", 64))
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFC_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def gla():
    return effc.load("gla")


@pytest.fixture(scope="module")
def retention():
    return effc.load("retention")


def space_of(op, problem, **kw):
    return search_space(op.spec, op.comp.legality, problem, **kw)


# ---- the search space ---------------------------------------------------------------------------

def test_search_space_starts_at_the_model_default(gla):
    problem = Problem(2, 8192, 16, KV128)
    space = space_of(gla, problem)
    assert space.default == Candidate.of(choose(gla.spec, gla.comp.legality, problem))
    assert space.candidates[0] == space.default == Candidate(32, 64, 4, 4, 1)
    assert len(set(space.candidates)) == len(space.candidates)
    assert not {p.candidate for p in space.pruned} & set(space.candidates)
    groups = space.groups()
    assert groups[0][0] == space.default
    assert all(len({c.variant for c in g}) == 1 for g in groups)


def test_search_space_tries_both_merge_modes():
    """delta_net's walk cannot be segmented: P is 1, and every (C, block, warps, stages) compiles twice, merge
    fused in the walk and deferred to the out kernel; the model's choice (deferred at 2x8192) comes first."""
    op = effc.load("delta_net")
    space = space_of(op, Problem(2, 8192, 16, KV128))
    assert space.default.defer_merge and str(space.default).endswith("merge=deferred")
    assert {c.segments for c in space.candidates} == {1}
    fused = replace(space.default, defer_merge=False)
    assert fused in space.candidates and fused.variant != space.default.variant
    assert all(replace(c, defer_merge=not c.defer_merge) in space.candidates for c in space.candidates
               if not c.walk_chunk)
    # coarse walks (TileConfig.walk_chunk) of 2 and 4 chunks, their fine walks writing the outputs (merge fused)
    coarse = [c for c in space.candidates if c.walk_chunk]
    assert coarse and all(not c.defer_merge and c.walk_chunk in (2 * c.chunk, 4 * c.chunk) for c in coarse)
    # at the default's chunk and block, the serial block no narrower than Triton runs right at C=64
    assert any((c.chunk, c.block, c.walk_chunk) == (fused.chunk, fused.block, 2 * fused.chunk)
               and c.walk_block >= 32 for c in coarse)
    # a segmentable spec's model keeps merge fused; the deferred schedule is a candidate too, unless the
    # backend has no out kernel (TileLang)
    gla_space = space_of(effc.load("gla"), Problem(2, 8192, 16, KV128))
    assert not gla_space.default.defer_merge and any(c.defer_merge for c in gla_space.candidates)
    tilelang = space_of(effc.load("gla"), Problem(2, 8192, 16, KV128), merge_modes=(False,))
    assert not any(c.defer_merge or c.walk_chunk for c in tilelang.candidates)


def test_search_space_prunes_registers(gla):
    space = space_of(gla, Problem(2, 8192, 16, KV128))
    assert space.reason(Candidate(64, 64, 4, 4, 1)) == (
        "registers: ~320 live fp32 values per thread > 280 (40960 per program / (32 x 4 warps))")
    assert Candidate(64, 64, 4, 8, 1) in space.candidates  # 8 warps halve the values per thread: 160
    assert space.reason(Candidate(64, 64, 4, 8, 1)) is None


def test_search_space_prunes_shared_memory(gla):
    space = space_of(gla, Problem(2, 8192, 16, KV64), stages=(1, 2, 3, 4))
    # registers fit (208 per thread); the staged input tiles do not
    assert space.reason(Candidate(128, 64, 1, 8, 3)) == (
        "shared memory 245760 B > 232448 B per block "
        "(3 stages x 65536 B of input tiles per chunk + 49152 B of the largest matmul's operands)")
    assert space.reason(Candidate(128, 64, 1, 8, 4)).startswith("shared memory 311296 B > 232448 B")
    assert Candidate(128, 64, 1, 8, 2) in space.candidates


def test_shared_memory_limit_is_a_parameter(gla):
    problem = Problem(2, 8192, 16, KV128)
    cand = Candidate(64, 64, 4, 8, 2)  # 2 x 57344 B + 32768 B = 147456 B
    assert cand in space_of(gla, problem, smem_limit=H100_SHARED_BYTES).candidates
    small = space_of(gla, problem, smem_limit=101376)
    assert small.reason(cand) == ("shared memory 147456 B > 101376 B per block "
                                  "(2 stages x 57344 B of input tiles per chunk + 32768 B of the largest matmul's "
                                  "operands)")


def test_both_limits_in_one_reason(gla):
    space = space_of(gla, Problem(2, 8192, 16, KV128))
    assert space.reason(Candidate(128, 64, 4, 8, 3)) == (
        "shared memory 409600 B > 232448 B per block (3 stages x 114688 B of input tiles per chunk + 65536 B of the "
        "largest matmul's operands); registers: ~320 live fp32 values per thread > 280 "
        "(81920 per program / (32 x 8 warps))")


def test_the_default_is_kept_even_over_the_model(gla):
    space = space_of(gla, Problem(2, 8192, 16, KV128), smem_limit=1024)
    assert space.candidates[0] == space.default
    assert all(c.variant == space.default.variant for c in space.candidates)
    assert space.default_over_model.startswith("shared memory 53248 B > 1024 B per block")
    assert all(p.reason.startswith(("shared memory", "Triton 3.6 miscompiles")) for p in space.pruned)


def test_a_default_over_the_model_keeps_its_segment_counts():
    # the model's default (4 warps: its 257 live values per thread within LATE_LOADS_MARGIN of 255) over a
    # register limit set low
    op = effc.load("simple_gla")
    space = space_of(op, Problem(1, 32768, 16, KV128), max_registers=120)
    assert space.default == Candidate(64, 64, 8, 4, 1)
    assert space.default_over_model == (
        "registers: ~257 live fp32 values per thread > 120 (32832 per program / (32 x 4 warps))")
    assert {c.segments for c in space.groups()[0]} == {1, 4, 8, 16}  # the same kernels at other P
    assert space.reason(Candidate(64, 64, 8, 4, 2)) == space.default_over_model  # other kernels: pruned


def test_segments_only_for_segmentable_specs():
    op = effc.loads("""
spec la {
  input q: [B, T, H, K]
  input k: [B, T, H, K]
  input v: [B, T, H, V]
  output o: [B, T, H, V]
  state S: [K, V]
  chunk 16
  merge { o = q @ S }
  inter { S = (k.T @ k) @ S + k.T @ v }
}
""")
    space = space_of(op, Problem(1, 4096, 1, KV64))
    assert {c.segments for c in space.candidates} == {1}
    seg = space_of(effc.load("retention"), Problem(1, 4096, 1, KV64))
    assert max(c.segments for c in seg.candidates) > 1


def test_bad_model_arguments_name_the_argument(gla):
    with pytest.raises(ValueError, match="dtype_bytes must be 2"):
        space_of(gla, Problem(1, 64, 1, KV64), dtype_bytes=3)
    with pytest.raises(ValueError, match="smem_limit must be a positive"):
        space_of(gla, Problem(1, 64, 1, KV64), smem_limit=0)


# ---- ranking and budget (fake timer) ------------------------------------------------------------

PROBLEM = Problem(2, 8192, 16, KV128)


def run(op, runner, deadline=1e9, clock=None, **kw):
    return tune_problem(op, PROBLEM, "bfloat16", runner, deadline=deadline, clock=clock or FakeClock(), **kw)


def test_fastest_correct_candidate_wins(gla, cache):
    space = space_of(gla, PROBLEM)
    good, wrong, broken = space.groups()[1][0], space.groups()[2][0], space.groups()[3][0]
    speed = {good: 0.5, wrong: 0.1, broken: 0.2}
    runner = FakeRunner(lambda c: speed.get(c, 1.0), wrong={wrong}, broken={broken})
    r = run(gla, runner)
    assert r.winner == good and r.winner_ms == 0.5 and r.default_ms == 1.0
    assert r.trials[wrong].error.startswith("wrong output") and r.trials[wrong].ms is None
    assert r.trials[broken].error == "compile: CompilationError: boom"
    assert any(final for c, final in runner.timed if c == good)  # re-timed with the full do_bench
    entry = read_entry(r.path)
    assert entry.config == good.overrides() and entry.default == space.default.overrides()
    assert entry.key == TuningKey.of(gla, PROBLEM, "FakeGPU 80GB", torch.bfloat16)


def test_a_candidate_that_faults_is_recorded_and_pruned_next_time(gla, cache):
    """An illegal memory access loses the process's CUDA context: every later launch would fail, so the
    tuner stops at the culprit (not blaming the candidates after it), records it for this spec and GPU,
    and the next tune (a fresh process) prunes its compiled variant before compiling."""
    from effc.policy.tuning import known_faults
    from effc.tools.tune import CandidateFault
    faulty = space_of(gla, PROBLEM).groups()[2][0]
    with pytest.raises(CandidateFault, match=re.escape(f"candidate {faulty} faulted on the GPU")):
        run(gla, FakeRunner(lambda c: 1.0, faulty={faulty}))
    assert known_faults(gla, "FakeGPU 80GB") == {faulty.variant: FakeRunner.FAULT}
    assert known_faults(gla, "another GPU") == {}
    r = run(gla, FakeRunner(lambda c: 1.0, faulty={faulty}))
    assert faulty not in r.trials
    assert all(p.reason.endswith(f"faulted on this GPU in an earlier tune ({FakeRunner.FAULT})")
               for p in r.space.pruned if p.candidate.variant == faulty.variant)
    res = CliRunner().invoke(app, ["cache", "clear"])  # a Triton upgrade may fix it: clearing forgets it
    assert res.exit_code == 0 and "and 1 fault record(s)" in res.output, res.output
    assert known_faults(gla, "FakeGPU 80GB") == {}


def test_a_fault_goes_on_in_a_fresh_process_with_what_is_left():
    from effc.tools.cli_tune import restart_argv
    argv = restart_argv("gla", [(1, 32768)], 16, "K=64,V=64", "bfloat16", 41.25, None, "triton")
    assert argv[1:] == ["-m", "effc.tools.cli", "tune", "gla", "--shapes", "1x32768", "--heads", "16", "--dtype",
                        "bfloat16", "--budget", "41.2", "--backend", "triton", "--dims", "K=64,V=64"]


def test_configs_triton_miscompiles_are_pruned_before_compiling(gla):
    from effc.policy.search import compiler_fault
    space = space_of(gla, PROBLEM)
    assert not [c for c in space.candidates if c.chunk >= 64 and c.block < 32]
    reasons = {p.reason for p in space.pruned
               if p.candidate.chunk == 64 and p.candidate.block == 16 and not p.candidate.walk_chunk}
    assert reasons and all(r.endswith("Triton 3.6 miscompiles C=64 with block 16 < 32 on Hopper "
                                      "(wrong output or a fault)") for r in reasons)
    assert compiler_fault(32, 16) is None and compiler_fault(64, 32) is None  # delta_net_l2's fault there: recorded


def test_other_segment_counts_of_the_best_variants_are_refined(gla, cache):
    space = space_of(gla, PROBLEM)
    group = space.groups()[1]
    hidden = group[-1]  # not the variant's representative: reached only by refinement
    r = run(gla, FakeRunner(lambda c: 0.3 if c == hidden else 0.8 if c == group[0] else 1.0))
    assert r.winner == hidden
    assert not r.budget_hit


def test_default_kept_unless_clearly_faster(gla, cache):
    near = space_of(gla, PROBLEM).groups()[1][0]
    r = run(gla, FakeRunner(lambda c: 1.0 - MARGIN / 2 if c == near else 1.0))
    assert r.winner == r.default
    assert read_entry(r.path).config == r.default.overrides()
    r = run(gla, FakeRunner(lambda c: 0.5 if c == r.default else 1.0))
    assert r.winner == r.default and r.winner_ms == 0.5


def test_tuning_stops_at_the_budget(gla, cache):
    clock = FakeClock()
    runner = FakeRunner(lambda c: 1.0 + c.chunk / 1000, clock=clock, cost=1.0)  # every timing takes 1 s
    r = run(gla, runner, deadline=20.0, clock=clock)
    assert r.budget_hit
    assert r.elapsed <= 20.0
    assert len(r.trials) < len(r.space.candidates)
    assert r.path is not None and read_entry(r.path) is not None


def test_a_budget_too_short_still_records_the_default(gla, cache):
    clock = FakeClock()
    r = run(gla, FakeRunner(lambda c: 1.0, clock=clock, cost=1.0), deadline=2.0, clock=clock)
    assert r.winner == r.default and r.budget_hit
    assert read_entry(r.path).config == r.default.overrides()


# ---- the cache ----------------------------------------------------------------------------------

def test_shape_bucket_rule():
    assert shape_bucket(2, 8192, 16, KV128) == "BH32-T8192-K128-V128"
    assert shape_bucket(4, 4097, 8, KV128) == "BH32-T8192-K128-V128"  # T rounds up to a power of two
    assert shape_bucket(4, 4096, 8, KV128) == "BH32-T4096-K128-V128"
    assert shape_bucket(1, 1, 1, (("V", 64), ("K", 32))) == "BH1-T1-K32-V64"


def _tune_entry(op, problem, config, dtype=torch.float32, gpu="cpu"):
    key = TuningKey.of(op, problem, gpu, dtype)
    return store(key, config, 0.5, config, 1.0, {"B": problem.B, "T": problem.T, "H": problem.H}, tried=3)


TUNED = {"chunk": 16, "block": 16, "segments": 2, "num_warps": 8, "num_stages": 2, "defer_merge": 0}
DIMS16 = {"K": 16, "V": 16}
CPU = torch.device("cpu")
SMALL = Problem(2, 40, 2, tuple(DIMS16.items()))


def test_op_uses_the_tuned_config(retention, cache):
    _tune_entry(retention, SMALL, TUNED)
    op = effc.load("retention")
    cfg = op.config(2, 40, 2, DIMS16, CPU, dtype=torch.float32)
    assert (cfg.chunk, cfg.block, cfg.segments, cfg.num_warps, cfg.num_stages) == (16, 16, 2, 8, 2)
    assert cfg.reasons[0].startswith("tuned for BH4-T64-K16-V16 float32 on cpu: 0.500 ms vs the model's 1.000 ms")
    assert op.config(2, 64, 2, DIMS16, CPU, dtype=torch.float32).segments == 2  # same bucket
    untuned = choose(op.spec, op.comp.legality, Problem(2, 200, 2, tuple(DIMS16.items())))
    assert op.config(2, 200, 2, DIMS16, CPU, dtype=torch.float32) == untuned  # another bucket: the model
    assert op.config(2, 40, 2, DIMS16, CPU, dtype=torch.float16).num_warps == 4  # another dtype
    # explicit arguments win over the entry; the entry fills the rest
    over = op.config(2, 40, 2, DIMS16, CPU, dtype=torch.float32, segments=1, num_warps=4)
    assert (over.chunk, over.segments, over.num_warps, over.num_stages) == (16, 1, 4, 2)
    # and a call runs it
    from effc.runtime.verify import judge_fp32, random_inputs
    xs = random_inputs(op.spec, 2, 40, 2, DIMS16)
    o, _ = op(*xs)
    assert op.last_config.segments == 2 and op.last_config.reasons[0].startswith("tuned")
    assert judge_fp32(o, op.reference(*xs)[0]).ok


def test_codegen_version_change_invalidates(retention, cache, monkeypatch):
    _tune_entry(retention, SMALL, TUNED)
    monkeypatch.setattr(codegen, "CODEGEN_VERSION", codegen.CODEGEN_VERSION + 1)
    op = effc.load("retention")
    cfg = op.config(2, 40, 2, DIMS16, CPU, dtype=torch.float32)
    assert cfg == choose(op.spec, op.comp.legality, SMALL) and not cfg.reasons[0].startswith("tuned")
    path = _tune_entry(retention, SMALL, TUNED)  # re-tuning replaces the stale file: one file per key
    assert len(list((cache / "tuning").glob("*.json"))) == 1 and read_entry(path).key.codegen == codegen.CODEGEN_VERSION
    assert effc.load("retention").config(2, 40, 2, DIMS16, CPU, dtype=torch.float32).num_warps == 8


def test_truncated_entry_warns_and_is_rebuilt(gla, cache):
    best = space_of(gla, PROBLEM).groups()[1][0]
    r = run(gla, FakeRunner(lambda c: 0.5 if c == best else 1.0))
    text = r.path.read_text()
    r.path.write_text(text[: len(text) // 2])
    with pytest.warns(UserWarning, match=f"ignoring unreadable entry {r.path}"):
        assert read_entry(r.path) is None
    r2 = run(gla, FakeRunner(lambda c: 0.5 if c == best else 1.0))
    assert r2.path == r.path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_entry(r.path).config == r2.winner.overrides()


def test_lookup_warns_about_a_corrupt_entry_and_falls_back(retention, cache):
    path = _tune_entry(retention, SMALL, TUNED)
    path.write_text('{"format": 1, "key": ')
    op = effc.load("retention")
    with pytest.warns(UserWarning, match=path.name):
        cfg = op.config(2, 40, 2, DIMS16, CPU, dtype=torch.float32)
    assert cfg == choose(op.spec, op.comp.legality, SMALL)


WRITER = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import effc
from effc.policy.search import search_space
from effc.policy.tiling import Problem
from effc.policy.tuning import TuningKey, store
from effc.tools.tune import tune_problem
from tuning_fakes import FakeClock, FakeRunner
me = int(sys.argv[2])
op = effc.load("retention")
for T in (1024, 2048, 4096, 1024, 2048, 4096):
    problem = Problem(2, T, 16, (("K", 64), ("V", 64)))
    best = search_space(op.spec, op.comp.legality, problem).groups()[me + 1][0]
    tune_problem(op, problem, "bfloat16", FakeRunner(lambda c: 0.5 if c == best else 1.0),
                 deadline=1e9, clock=FakeClock())
key = TuningKey.of(op, Problem(1, 512, 1, (("K", 64), ("V", 64))), "FakeGPU 80GB", torch.bfloat16)
cfg = {"chunk": 64, "block": 64, "segments": 1, "num_warps": 4, "num_stages": 1, "defer_merge": 0}
for i in range(300):  # both processes hammer one key
    store(key, cfg, 1.0 + me + i / 1000, cfg, 2.0, {"writer": me})
print("ok")
"""


@pytest.mark.slow  # the full tier only (README: test tiers)
def test_concurrent_tuners_leave_a_valid_cache(retention, cache):
    env = {**os.environ, "EFFC_CACHE_DIR": str(cache)}
    tests_dir = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tests_dir, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    files = sorted((cache / "tuning").glob("*"))
    assert len(files) == 4 and all(f.suffix == ".json" for f in files)  # 3 buckets + the hammered key; no temp files
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entries = [read_entry(f) for f in files]
    assert {e.key.bucket for e in entries} == {"BH32-T1024-K64-V64", "BH32-T2048-K64-V64", "BH32-T4096-K64-V64",
                                               "BH1-T512-K64-V64"}
    space = search_space(retention.spec, retention.comp.legality, Problem(2, 1024, 16, KV64))
    tuned = next(e for e in entries if e.key.bucket == "BH32-T1024-K64-V64")
    assert tuned.config in (space.groups()[1][0].overrides(), space.groups()[2][0].overrides())  # one writer's


# ---- the softmax family -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def softmax():
    return effc.load("softmax_attn")


def test_softmax_search_space_starts_at_the_model_default(softmax):
    space = space_of(softmax, PROBLEM)
    assert space.default == model_default(softmax.spec, softmax.comp.legality, PROBLEM) == Candidate(128, 64, 1, 8, 3)
    assert space.default == Candidate.of(choose_softmax_tiles(softmax.spec, dict(KV128), False))
    assert space.candidates[0] == space.default and len(set(space.candidates)) == len(space.candidates)
    assert {c.segments for c in space.candidates} == {1}  # one walk per query block
    assert len(space.groups()) == len(space.candidates)  # every candidate compiles its own kernel
    assert {c.num_stages for c in space.candidates} == set(SOFTMAX_STAGES)
    assert space.knobs.startswith("C = query block BM, block = key block BN")
    short = space_of(softmax, Problem(2, 40, 16, KV128))  # blocks past T rounded up to 64 only pad; the default stays
    assert {c.chunk for c in short.candidates} == {16, 32, 64, 128} and {c.block for c in short.candidates} <= {16, 32, 64}


def test_softmax_search_space_prunes_shared_memory(softmax):
    space = space_of(softmax, PROBLEM)
    # key and value blocks of 128 x 128 bf16 per stage; q [128, 128] and k.T [128, 128] for the score matmul
    assert space.reason(Candidate(128, 128, 1, 8, 3)) == (
        "shared memory 262144 B > 232448 B per block (3 stages x 65536 B of key-side tiles per key block + "
        "65536 B of the largest matmul's operands)")
    assert Candidate(128, 128, 1, 8, 2) in space.candidates  # 2 x 65536 B + 65536 B = 196608 B
    assert space_of(softmax, PROBLEM, smem_limit=101376).reason(Candidate(128, 64, 1, 8, 2)) == (
        "shared memory 114688 B > 101376 B per block (2 stages x 32768 B of key-side tiles per key block + "
        "49152 B of the largest matmul's operands)")


def test_softmax_search_space_prunes_registers(softmax):
    space = space_of(softmax, PROBLEM)
    # q tile, accumulator, score tile and the running (max, sum): 41216 fp32 values over 4 warps
    assert space.reason(Candidate(128, 64, 1, 4, 3)) == (
        "registers: ~322 live fp32 values per thread > 255 (41216 per program / (32 x 4 warps))")
    assert Candidate(64, 64, 1, 4, 3) in space.candidates  # half the query block: ~161 per thread
    fp32 = space_of(softmax, PROBLEM, dtype_bytes=4)  # twice the bytes: the default is over the model, kept
    assert fp32.candidates[0] == fp32.default
    assert fp32.default_over_model == (
        "shared memory 294912 B > 232448 B per block (3 stages x 65536 B of key-side tiles per key block + "
        "98304 B of the largest matmul's operands)")


@pytest.mark.parametrize("name", ["sliding_window", "alibi", "gated_attention", "forgetting_transformer"])
def test_softmax_family_spaces(name):
    op = effc.load(name)
    space = space_of(op, PROBLEM)
    assert space.candidates[0] == space.default == Candidate(128, 64, 1, 8, 3)
    assert space.reason(Candidate(128, 128, 1, 8, 4)).startswith("shared memory")


def test_a_hybrid_is_refused_with_a_reason():
    op = effc.load("swax")
    with pytest.raises(NotImplementedError, match="'swax' is a hybrid"):
        space_of(op, PROBLEM)


def test_softmax_fake_timer_stores_the_winner(softmax, cache):
    space = space_of(softmax, PROBLEM)
    good, wrong = space.candidates[3], space.candidates[1]
    runner = FakeRunner(lambda c: {good: 0.6, wrong: 0.2}.get(c, 1.0), wrong={wrong})
    r = run(softmax, runner)
    assert r.winner == good and r.winner_ms == 0.6 and r.default_ms == 1.0
    assert r.trials[wrong].error.startswith("wrong output")
    entry = read_entry(r.path)
    assert entry.key == TuningKey.of(softmax, PROBLEM, "FakeGPU 80GB", torch.bfloat16)
    assert entry.key.spec == "softmax_attn" and entry.key.bucket == "BH32-T8192-K128-V128"
    assert entry.config == good.overrides() and entry.config["segments"] == 1
    assert entry.default == {"chunk": 128, "block": 64, "segments": 1, "num_warps": 8, "num_stages": 3, "defer_merge": 0}


SOFTMAX_TUNED = {"chunk": 32, "block": 32, "segments": 1, "num_warps": 8, "num_stages": 2, "defer_merge": 0}


@no_cuda  # the kernels run in Triton's interpreter on CPU tensors
def test_softmax_op_uses_the_tuned_config(softmax, cache):
    from effc.runtime.verify import random_inputs
    xs = [x.requires_grad_() for x in random_inputs(softmax.spec, 2, 40, 2, DIMS16)]
    untuned = effc.load("softmax_attn")
    o, _ = untuned(*xs)
    base = untuned.last_config
    assert not base.reasons[0].startswith("tuned") and base.fwd == (16, 16, 4, 1)
    seed = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, seed)
    _tune_entry(softmax, SMALL, SOFTMAX_TUNED)
    op = effc.load("softmax_attn")
    o2, _ = op(*xs)
    cfg = op.last_config
    assert cfg.fwd == (32, 32, 8, 2)
    assert (cfg.dq, cfg.dkv, cfg.pre) == (base.dq, base.dkv, base.pre)  # the backward keeps the model's tiles
    assert cfg.reasons[0].startswith("tuned for BH4-T64-K16-V16 float32 on cpu: 0.500 ms vs the model's 1.000 ms")
    assert Candidate.of(cfg) == Candidate(32, 32, 1, 8, 2)
    torch.testing.assert_close(o2, o, rtol=1e-5, atol=1e-5)
    for g2, g in zip(torch.autograd.grad(o2, xs, seed), grads):  # the backward after a tuned forward
        torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-5)
    # explicit arguments win over the entry (for every kernel); another bucket gets the model
    op(*xs, chunk=16)
    assert op.last_config.fwd == (16, 32, 8, 2) and op.last_config.dq[0] == 16
    assert "given: chunk=16" in op.last_config.reasons[0]
    longer = random_inputs(softmax.spec, 2, 200, 2, DIMS16)
    op(*longer)
    assert op.last_config == base and not op.last_config.reasons[0].startswith("tuned")
    with pytest.raises(effc.ArgumentError, match="segments=2"):
        op(*xs, segments=2)


@no_cuda
def test_softmax_op_ignores_an_entry_it_cannot_run(softmax, cache):
    from effc.runtime.verify import random_inputs
    _tune_entry(softmax, SMALL, {**SOFTMAX_TUNED, "block": 24})
    op = effc.load("softmax_attn")
    with pytest.warns(UserWarning, match="ignoring entry .*powers of two"):
        op(*random_inputs(softmax.spec, 2, 40, 2, DIMS16))
    assert op.last_config.fwd == (16, 16, 4, 1)


def _tune_check():
    import importlib.util
    path = Path(__file__).parent.parent / "scripts" / "tune_check.py"
    spec = importlib.util.spec_from_file_location("tune_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tune_check_races_the_model_default_of_either_family(softmax, gla):
    tc = _tune_check()
    assert tc.default_candidate(softmax, 2, 8192, 16, 128, 132) == Candidate(128, 64, 1, 8, 3)
    assert tc.default_candidate(gla, 2, 8192, 16, 128, 132) == space_of(gla, PROBLEM).default
    # the child reads the tuned config off the op: a SoftmaxTiles gives the forward's knobs
    tiles = choose_softmax_tiles(softmax.spec, dict(KV128), False, tuned=SOFTMAX_TUNED)
    assert Candidate.of(tiles).overrides() == SOFTMAX_TUNED
    o = torch.zeros(1)
    assert tc.first_output(o) is o and tc.first_output((o, torch.ones(1))) is o


# ---- the command line ---------------------------------------------------------------------------

runner = CliRunner()


def test_cache_ls_and_clear(retention, cache):
    r = runner.invoke(app, ["cache", "ls"])
    assert r.exit_code == 0 and "no tuning entries in" in r.output
    _tune_entry(retention, SMALL, TUNED)
    stale = _tune_entry(retention, Problem(1, 4096, 4, tuple(DIMS16.items())), TUNED)
    raw = json.loads(stale.read_text())
    raw["key"]["codegen"] = 0
    stale.write_text(json.dumps(raw))
    (cache / "tuning" / "gla-broken.json").write_text("{")
    r = runner.invoke(app, ["cache", "ls"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any(ln.startswith("retention") and "BH4-T64-K16-V16" in ln and "C=16 block=16 P=2 warps=8 stages=2" in ln
               and ln.endswith("2.00x  ok") for ln in lines), r.output
    assert any("BH4-T4096-K16-V16" in ln and ln.endswith("stale (codegen 0)") for ln in lines), r.output
    assert any("corrupt: gla-broken.json" in ln for ln in lines), r.output
    assert "3 entries in" in r.output
    r = runner.invoke(app, ["cache", "clear", "--stale"])
    assert r.exit_code == 0 and "removed 2 tuning entries" in r.output
    assert "1 entries in" in runner.invoke(app, ["cache", "ls"]).output
    r = runner.invoke(app, ["cache", "clear"])
    assert r.exit_code == 0 and "removed 1 tuning entry" in r.output
    assert "no tuning entries" in runner.invoke(app, ["cache", "ls"]).output


@no_cuda
def test_tune_needs_cuda(cache):
    r = runner.invoke(app, ["tune", "gla", "--shapes", "2x8192", "--budget", "10"])
    assert r.exit_code == 1
    assert "error: effc tune needs a CUDA GPU" in r.output
    assert not (cache / "tuning").exists()


def test_tune_dry_run_prints_the_space(cache):
    r = runner.invoke(app, ["tune", "gla", "--shapes", "2x8192", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "search space for B=2 T=8192 H=16 {'K': 128, 'V': 128}:" in r.output
    assert "model default: C=32 block=64 P=4 warps=4 stages=1" in r.output
    assert ("pruned C=64 block=64 P=4 warps=4 stages=1: registers: ~320 live fp32 values per thread > 280"
            in r.output)


def test_tune_dry_run_prints_a_softmax_space(cache):
    r = runner.invoke(app, ["tune", "softmax_attn", "--shapes", "2x256", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "search space for B=2 T=256 H=16 {'K': 128, 'V': 128}:" in r.output
    assert "knobs: C = query block BM, block = key block BN of the forward kernel" in r.output
    assert "model default: C=128 block=64 P=1 warps=8 stages=3" in r.output
    assert ("pruned C=128 block=128 P=1 warps=8 stages=3: shared memory 262144 B > 232448 B per block "
            "(3 stages x 65536 B of key-side tiles per key block" in r.output)
    r = runner.invoke(app, ["tune", "swax", "--shapes", "2x256", "--dry-run"])
    assert r.exit_code == 1 and "'swax' is a hybrid" in r.output


def test_python_dash_m_has_the_commands():
    # under -m, effc.tools.cli is __main__: the commands must land on that app, not on a second import's
    p = subprocess.run([sys.executable, "-m", "effc.tools.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert " tune " in p.stdout and " cache " in p.stdout


@pytest.mark.parametrize("args, text", [
    (["--shapes", "2x"], "--shapes: '2x' is not BxT"),
    (["--dtype", "int8"], "'int8': expected one of bfloat16, float16, float32"),
    (["--workers", "-1"], "expected 0 or more processes"),
], ids=["shapes", "dtype", "workers"])
def test_tune_argument_errors(args, text):
    r = runner.invoke(app, ["tune", "gla", "--dry-run", *args])
    assert r.exit_code != 0
    assert text in " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split()), r.output


# ---- effc bench without a GPU -------------------------------------------------------------------

def test_peers_registered_for_softmax_specs():
    from effc.tools.peers import PEERS
    assert [p.label for p in PEERS["softmax_attn"]] == ["torch SDPA causal (flash)", "torch SDPA causal (cuDNN)",
                                                      "FlexAttention causal"]
    assert [p.label for p in PEERS["sliding_window"]] == ["FlexAttention window 1024"]
    assert set(effc.library_names("softmax")) <= set(PEERS)  # every softmax spec has a peer to race
    assert PEERS["gla"][0].inputs == ("q", "k", "v", "g")


def test_fla_moba_peer_packs_the_batch_and_names_flash_attn(monkeypatch):
    """fla's parallel_moba takes the batch packed as one varlen sequence (B = 1, cu_seqlens) and runs on
    flash-attn: without it the row's error says so, before any timing."""
    import types

    import torch

    from effc.tools.peers import PEERS
    (fla_peer,) = [p for p in PEERS["moba"] if p.label.startswith("fla")]
    calls = []
    parallel = types.SimpleNamespace(flash_attn_varlen_func=None, parallel_moba=lambda q, k, v, cu, longest, **kw: (
        calls.append((q.shape, cu.tolist(), longest, kw)) or v * 2))
    for name, mod in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops")),
                      ("fla.ops.moba", types.ModuleType("fla.ops.moba"))):
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["fla.ops.moba"].parallel = parallel
    monkeypatch.setitem(sys.modules, "fla.ops.moba.parallel", parallel)
    with pytest.raises(ImportError, match="flash-attn"):
        fla_peer.make(2, 8, 3, 4)
    parallel.flash_attn_varlen_func = object()
    run = fla_peer.make(2, 8, 3, 4)
    q, k, v = (torch.randn(2, 8, 3, 4) for _ in range(3))
    assert torch.equal(run(q, k, v, scale=0.5), v * 2)
    assert calls == [(torch.Size([1, 16, 3, 4]), [0, 8, 16], 8, {"chunk_size": 64, "topk": 16})]
    with pytest.raises(ValueError, match="D\\^-0.5 only"):
        run(q, k, v, scale=0.1)


def test_peer_table_is_complete_before_the_peer_process_runs():
    """`python -m effc.tools.peers` runs a peer by its index in PEERS: a table entry added below the module's
    `__main__` block is missing there (fla's MoBA peer was: its row read 'IndexError')."""
    import ast
    import inspect

    from effc.tools import peers
    body = ast.parse(inspect.getsource(peers)).body
    main = next(i for i, node in enumerate(body) if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
    assert main == len(body) - 1, f"statements after the __main__ block: {ast.unparse(body[main + 1])[:80]}"


def test_bench_explains_a_missing_spec_and_prints_peaks(capsys):
    from effc.tools import bench
    try:
        effc.load("softmax_attn")
        pytest.skip("softmax_attn exists now")
    except effc.SpecError as e:
        row = bench._missing("softmax_attn", e)
    assert row["skipped"] == ("no such spec file: softmax_attn; its peers (torch SDPA flash causal, "
                              "FlexAttention causal) run once it exists")
    assert bench.peaks("NVIDIA H100 80GB HBM3") == ({"TB/s": 3.0, "TFLOP/s": 790.0}, "H100")
    assert bench.peaks("NVIDIA H200")[1] == "H100 (no measured peaks for NVIDIA H200)"
    bench._print_table([row] + FAKE_ROWS)
    out = capsys.readouterr().out
    assert "softmax_attn skipped: no such spec file" in out
    assert "gla             2x8192    0.700  1.20  40%    30.0    4% fla chunk_gla" in out
    assert "%bw, %flop: of 3.0 TB/s and 790.0 TFLOP/s measured on the H100" in out


FAKE_ROWS = [
    {"spec": "gla", "B": B, "T": T, "H": 16, "D": 128, "gpu": "NVIDIA H100 80GB HBM3", "effc_ms": ms,
     "config": "C=32 block=64 P=4 warps=4 (tuned)", "TB/s": 1.2, "TFLOP/s": 30.0, "bw_frac": 0.4, "flop_frac": 0.038,
     "peak": {"TB/s": 3.0, "TFLOP/s": 790.0, "of": "H100"},
     "peers": [{"peer": "fla chunk_gla", "ms": 2 * ms, "speedup": 2.0, "rel_diff_vs_effc": 1e-3},
               {"peer": "other", "error": "RuntimeError: no"}]}
    for B, T, ms in ((8, 2048, 0.5), (2, 8192, 0.7), (1, 32768, 1.4))
]


def test_bench_prints_a_refused_backward_beside_the_peer(capsys):
    """A backward policy.triton_faults refuses on the GPU keeps its row: the forward, the reason, the peer."""
    from effc.tools import bench
    row = {**FAKE_ROWS[0], "spec": "mesanet", "effc_bwd_error": "mesanet: the backward of a square state ...",
           "peers": [{"peer": "fla mesa_net", "ms": 1.0, "speedup": 2.0, "fwdbwd_ms": 4.0, "peak_mib": 10.0}]}
    bench._print_table([row])
    out = capsys.readouterr().out
    assert "fwd+bwd: effc refused: mesanet: the backward of a square state" in out
    assert "fwd+bwd: fla mesa_net 4.000 ms, peak 10 MiB\n" in out


def test_a_peers_own_copies_are_the_leaves_its_backward_writes():
    """The softmax peers run on (B, H, T, D) copies of the inputs; their backward writes the copies'
    gradients, not the inputs'. The bench clears those too before it measures a step's peak memory
    (peers.time_training_step's own_leaves): left from the last timed step they were live at the start, and
    the peers' peaks missed their gradients (FlexAttention's 66 MiB at 2x8192 on the H200, against effc's 258)."""
    from effc.tools.peers import PEERS
    sdpa = next(p for p in PEERS["softmax_attn"] if p.label == "torch SDPA causal (flash)")  # Flex: no CPU backward
    fn = sdpa.make(1, 40, 2, 16)
    xs = [torch.randn(1, 40, 2, 16, requires_grad=True) for _ in range(3)]
    fn(*xs, scale=0.25).sum().backward()
    own = fn.own_leaves()
    assert len(own) == 3 and all(t.grad is not None and t.shape == (1, 2, 40, 16) for t in own)
    assert all(x.grad is None for x in xs)
    fn(*xs, scale=0.5)  # another build: only its copies are the peer's leaves
    assert len(fn.own_leaves()) == 3 and not any(t is u for t in fn.own_leaves() for u in own)


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from effc.tools.bench import plot_rows
    out = tmp_path / "bench.png"
    plot_rows(FAKE_ROWS, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_from_json_prints_and_plots_saved_rows(tmp_path):
    """A GPU machine without matplotlib writes --json; any machine draws the table and the plot from it,
    a forward+backward panel beside the forward one when the rows have training times."""
    pytest.importorskip("matplotlib")
    from typer.testing import CliRunner

    from effc.tools.cli import app
    rows = [{**r, "effc_fwdbwd_ms": 3 * r["effc_ms"], "effc_peak_mib": 100.0, "fwdbwd_TFLOP/s": 12.5,
             "history": "kept", "peers": [{**r["peers"][0], "fwdbwd_ms": 4 * r["effc_ms"], "peak_mib": 90.0,
                                           "speedup_fwdbwd": 4 / 3}]} for r in FAKE_ROWS]
    saved, png = tmp_path / "rows.json", tmp_path / "bench.png"
    saved.write_text(json.dumps(rows))
    res = CliRunner().invoke(app, ["bench", "--from-json", str(saved), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "fwd+bwd: effc 2.100 ms, 12.5 TFLOP/s, peak 100 MiB; kept" in res.output
    assert "fwd+bwd: fla chunk_gla 2.800 ms, peak 90 MiB -> 1.33x" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_bench_keeps_its_positional_signature():
    import inspect

    from effc.tools.bench import run_bench
    params = list(inspect.signature(run_bench).parameters.values())
    assert [p.name for p in params[:7]] == ["specs", "shapes", "H", "D", "peers", "peer_timeout", "json_out"]
    assert all(p.default is not inspect.Parameter.empty for p in params[7:])



def _row(spec, D, fwd, fwdbwd=None, T=4096):
    r = {"spec": spec, "B": 2, "T": T, "D": D, "TFLOP/s": fwd}
    return r if fwdbwd is None else {**r, "fwdbwd_TFLOP/s": fwdbwd}


def test_head_dim_table_compares_with_the_neighbouring_powers_of_two():
    from effc.tools.bench import head_dim_table
    rows = [_row("gla", 64, 10.0, 5.0), _row("gla", 96, 8.0, 2.0), _row("gla", 128, 20.0, 10.0),
            _row("gla", 192, 16.0, 9.0), _row("gla", 60, 10.0), _row("gla", 192, 1.0, T=63)]
    lines = {tuple(l.split()[:3]): l for l in head_dim_table(rows).splitlines()[1:]}
    assert lines[("gla", "2x4096", "96")].endswith(
        "D=64: fwd 1.25x, fwd+bwd 2.50x (over 1.3x); D=128: fwd 2.50x (over 1.3x), fwd+bwd 5.00x (over 1.3x)")
    assert "D=128: fwd 1.25x, fwd+bwd 1.11x" in lines[("gla", "2x4096", "192")]  # 256 not measured: 128
    assert "D=64: fwd 1.00x" in lines[("gla", "2x4096", "60")]
    padded = [{**_row("softmax_attn", 96, 3.0, 2.0), "padding_flops_ratio": 4 / 3}, _row("softmax_attn", 128, 4.0, 4.0)]
    line = head_dim_table(padded).splitlines()[1]
    assert line.endswith("D=128: fwd 1.33x (over 1.3x), fwd+bwd 2.00x (over 1.3x); padding alone 1.33x"), line
    assert lines[("gla", "2x4096", "64")].endswith("reference")
    assert lines[("gla", "2x63", "192")].endswith("-")  # no power of two at that shape


def test_bench_head_dims_are_checked():
    from typer.testing import CliRunner

    from effc.tools.cli import app
    r = CliRunner().invoke(app, ["bench", "--head-dim", "64,x"])
    assert r.exit_code != 0 and "one or more head dims" in r.output


def test_auto_backend_follows_the_tuned_times(cache):
    auto = effc.load("retention", backend="auto")
    from effc.runtime.verify import random_inputs
    xs = random_inputs(auto.spec, 2, 40, 2, DIMS16)
    assert auto.pick(*xs) == "triton" and "no tuning entry" in auto.last_backend_reason
    for backend, ms in (("triton", 0.9), ("tilelang", 0.4)):
        key = TuningKey.of(auto.ops[backend], SMALL, "cpu", torch.float32)
        store(key, TUNED, ms, TUNED, 1.0, {"B": 2, "T": 40, "H": 2})
    fresh = effc.load("retention", backend="auto")
    assert fresh.pick(*xs) == "tilelang"
    assert fresh.last_backend_reason == "tilelang: tuned times triton 0.900 ms, tilelang 0.400 ms"
    o, _ = effc.load("retention", backend="auto").ops["triton"](*xs)  # the Triton half still runs here
    assert o.shape == (2, 40, 2, 16)


class _PartitionRunner(FakeRunner):
    """FakeRunner that also times the backward's gradient partitions (forward+backward ms by name); a
    partition in `wrong` fails its gradient check."""

    def __init__(self, backward_ms: dict, wrong_partitions=()):
        super().__init__(lambda c: 1.0)
        self.backward_ms, self.wrong_partitions = backward_ms, set(wrong_partitions)

    def time_backward(self, c, partition, reference):
        if partition in self.wrong_partitions:
            raise RuntimeError(f"partition {partition}: gradients off")
        return self.backward_ms[partition]


def test_tune_records_the_fastest_gradient_partition_and_the_op_uses_it(cache):
    """tools.tune.tune_partition: each partition timed forward+backward at the winner's tiles; the fastest
    correct one replaces the plan's default only past MARGIN, is stored, and a later call runs it."""
    op = effc.load("delta_net")
    default = op.comp.plan.partition
    others = [c.name for c in op.comp.plan.partitions if c.name != default]
    fast, wrong, *slow = others
    r = run(op, _PartitionRunner({default: 4.0, fast: 3.0, wrong: 1.0, **{s: 5.0 for s in slow}},
                                 wrong_partitions={wrong}))
    assert r.partition == fast and set(r.partition_ms) == {default, fast, *slow}
    assert read_entry(r.path).partition == fast and f"; partition {fast} (" in summary(r)
    entry = read_entry(r.path)  # the same entry, as the CPU's: a later call there reads it
    store(TuningKey.of(op, PROBLEM, "cpu", torch.bfloat16), entry.config, entry.ms, entry.default,
          entry.default_ms, entry.shape, partition=entry.partition)
    cfg = effc.load("delta_net").config(PROBLEM.B, PROBLEM.T, PROBLEM.H, dict(PROBLEM.dims), CPU,
                                         dtype=torch.bfloat16)
    assert cfg.partition == fast and cfg.reasons[0].startswith("tuned")
    assert effc.load("delta_net").config(PROBLEM.B, PROBLEM.T, PROBLEM.H, dict(PROBLEM.dims), CPU,
                                         dtype=torch.bfloat16, partition=default).partition == default
    # within the margin the default stays
    r = run(op, _PartitionRunner({default: 4.0, fast: 4.0 * (1 - MARGIN / 2), wrong: 5.0, **{s: 5.0 for s in slow}}))
    assert r.partition is None and read_entry(r.path).partition is None


def test_tune_records_the_faster_row_partition_of_a_select_spec(cache):
    """The softmax family's row partitions (a choice of key blocks: 'heads', 'tokens') have no default per
    plan (the model picks per call): tune records the faster one, and a later call runs it."""
    op = effc.load("infllm_v2")
    assert op.comp.plan.partition is None
    r = run(op, _PartitionRunner({"heads": 3.0, "tokens": 2.0}))
    assert r.partition == "tokens" and read_entry(r.path).partition == "tokens"
    assert "; partition tokens (heads 3.000, tokens 2.000 ms forward+backward)" in summary(r)
    entry = read_entry(r.path)
    store(TuningKey.of(op, PROBLEM, "cpu", torch.bfloat16), entry.config, entry.ms, entry.default,
          entry.default_ms, entry.shape, partition=entry.partition)
    cfg = effc.load("infllm_v2").config(PROBLEM.B, PROBLEM.T, PROBLEM.H, dict(PROBLEM.dims), CPU,
                                         dtype=torch.bfloat16)
    assert not cfg.head_rows and cfg.reasons[0].startswith("tuned")
    r = run(op, _PartitionRunner({"heads": 2.0, "tokens": 2.5}, wrong_partitions={"tokens"}))
    assert r.partition == "heads" and set(r.partition_ms) == {"heads"}


class _GradientRunner(FakeRunner):
    """FakeRunner whose candidates in `wrong_grads` give the right output but wrong gradients."""

    def __init__(self, speed, wrong_grads):
        super().__init__(speed)
        self.wrong_grads, self.grad_checked = set(wrong_grads), []

    def check_gradients(self, c, reference):
        self.grad_checked.append(c)
        return "off the default tiling's by 7.2e-01" if c in self.wrong_grads else None


def test_a_winner_whose_gradients_are_off_is_not_recorded(gla, cache):
    """The screening checks outputs; the candidate about to win has its gradients checked against the
    default tiling's too (a miscompiled backward: delta_net_l2 at chunk=64, D=32 on Hopper with Triton 3.6),
    and the next fastest that passes wins instead."""
    space = space_of(gla, PROBLEM)
    fastest, second = space.groups()[1][0], space.groups()[2][0]
    runner = _GradientRunner(lambda c: {fastest: 0.3, second: 0.5}.get(c, 1.0), wrong_grads={fastest})
    r = run(gla, runner)
    assert r.winner == second and runner.grad_checked == [fastest, second]
    assert r.trials[fastest].error == "gradients: off the default tiling's by 7.2e-01"
    assert read_entry(r.path).config == second.overrides()
    r = run(gla, _GradientRunner(lambda c: {fastest: 0.3}.get(c, 1.0), wrong_grads={fastest}))
    assert r.winner == space.default  # nothing else beats the default: it stays


def test_gpu_runner_gradient_checks_on_the_cpu():
    """GpuRunner's gradient comparison (the winner check and the partition check share it), run under the
    interpreter: a candidate agrees with itself, another tiling agrees within fp32's tolerance, and a
    distance that is nan counts as off."""
    from effc.runtime.verify import random_inputs
    from effc.tools.tune import GpuRunner
    op = effc.load("retention")
    runner = object.__new__(GpuRunner)  # its constructor asks for a GPU; the checks need only these
    runner.op, runner.dtype = op, "float32"
    runner.xs = random_inputs(op.spec, 2, 40, 2, DIMS16)
    base, other = Candidate(16, 16, 1, 4, 1), Candidate(32, 16, 2, 4, 1)
    assert runner.check_gradients(base, base) is None and runner.check_gradients(other, base) is None
    one = [torch.ones(3)]
    assert runner._off(one, one) is None and runner._off([torch.full((3,), 2.0)], one) == 1.0
    nan = runner._off([torch.ones(3), torch.tensor([float("nan")])], [torch.ones(3), torch.ones(1)])  # not max()
    assert nan is not None and nan != nan


def test_a_call_in_dim_parts_reads_the_callers_tuning_entry(cache):
    """`effc tune gla` at K=48 times calls that run K in parts (32 + 16): the entry is the caller's op's, at
    the caller's dims, and the split op's calls read it."""
    op = effc.load("gla")
    dims = {"K": 48, "V": 16}
    _tune_entry(op, Problem(2, 40, 2, tuple(dims.items())), TUNED)
    from effc.runtime.verify import random_inputs
    xs = random_inputs(op.spec, 2, 40, 2, dims)
    op(*xs)
    assert op.last_dim_parts == "parts: K=48 as 32 + 16"
    cfg = op.last_config
    assert (cfg.chunk, cfg.block, cfg.segments, cfg.num_warps) == (16, 16, 2, 8), cfg
    assert cfg.reasons[0].startswith("tuned for BH4-T64-K48-V16 float32 on cpu")


def test_bench_kv_heads_reach_effc_and_the_peers(monkeypatch):
    """`effc bench --kv-heads`: the `key` inputs get that many heads (grouped-query attention), effc's row and
    each peer process alike (its argv); a count that does not divide --heads is refused before any GPU work."""
    from effc.errors import ArgumentError
    from effc.runtime.verify import random_inputs
    from effc.tools import bench
    op = effc.load("infllm_v2")
    q, k, v = random_inputs(op.spec, 1, 40, 8, {"K": 16, "V": 16}, kv_heads=2)
    assert q.shape[2] == 8 and k.shape[2] == v.shape[2] == 2
    seen = []
    monkeypatch.setattr(bench, "run_peer_process", lambda cmd, timeout: seen.append(cmd) or {"ms": 1.0})
    bench._peer("infllm_v2", 1, 40, 8, 16, 1.0, 0, True, 2)
    assert seen[0][-2:] == ["bwd", "2"]
    monkeypatch.setattr(bench, "_peer", None)  # nothing reaches a peer or the GPU check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ArgumentError, match="--kv-heads 3 must divide --heads 8"):
        bench.run_bench(["infllm_v2"], [(1, 64)], 8, 16, False, 1.0, None, kv_heads=3)


def test_the_readme_speed_table_is_the_benchmark_jsons():
    """README's speed table is `effc bench --from-json FILES --markdown` of the committed JSON its marker
    names, line for line: a hand edit, or a JSON file changed without the table, fails here."""
    from effc.tools.bench import markdown_table, saved_rows
    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    m = re.search(r"<!-- speed table: effc bench --from-json (\S+) --markdown -->\n(.*?)<!-- end speed table -->",
                  text, re.S)
    assert m, "README: the speed table's markers"
    assert m.group(2) == markdown_table(saved_rows([root / f for f in m.group(1).split(",")]))
    assert "| retention | fla chunk_retention | H200 | 2x8192 | 1.23x | 0.69x | 514 / 768 |" in m.group(2)


def test_bench_markdown_table_reads_several_jsons(tmp_path):
    """`effc bench --from-json A,B --markdown`: one line per (row, timed peer), ratios peer / effc, the peak
    memory where both sides measured it; a peer that failed adds no line; a row with fewer key/value heads
    than query heads says how many."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([{**FAKE_ROWS[1], "effc_peak_mib": 100.0,
                              "peers": [{"peer": "fla chunk_gla", "ms": 1.4, "speedup": 2.0, "fwdbwd_ms": 3.0,
                                         "speedup_fwdbwd": 0.5, "peak_mib": 80.0}, {"peer": "x", "error": "no"}]}]))
    b.write_text(json.dumps([{**FAKE_ROWS[0], "peers": [{"peer": "p", "ms": 1.0, "speedup": 2.0}]},
                             {**FAKE_ROWS[0], "HK": 1, "peers": [{"peer": "p", "ms": 1.0, "speedup": 2.0}]}]))
    result = CliRunner().invoke(app, ["bench", "--from-json", f"{a},{b}", "--markdown"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[2] == "| gla | fla chunk_gla | H100 | 2x8192 | 2.00x | 0.50x | 100 / 80 |"
    assert lines[3] == "| gla | p | H100 | 8x2048 | 2.00x | - | - |"
    assert lines[4] == "| gla | p | H100 | 8x2048, 1 KV head | 2.00x | - | - |" and len(lines) == 5  # fewer key heads


def test_bench_from_json_keeps_each_calls_newest_row(tmp_path):
    """A shape measured in two runs shows once, the later file's numbers in the earlier row's place."""
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    peer = {"peer": "p", "ms": 1.0, "speedup": 2.0}
    old.write_text(json.dumps([{**FAKE_ROWS[1], "peers": [peer]}, {**FAKE_ROWS[0], "peers": [peer]}]))
    new.write_text(json.dumps([{**FAKE_ROWS[1], "peers": [{**peer, "speedup": 3.0}]}]))
    result = CliRunner().invoke(app, ["bench", "--from-json", f"{old},{new}", "--markdown"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[2:] == ["| gla | p | H100 | 2x8192 | 3.00x | - | - |",
                                              "| gla | p | H100 | 8x2048 | 2.00x | - | - |"]
