"""GPU acceptance of `effc tune`, in one process tree, from cold caches:

1. `effc tune SPEC` for each spec (a child process each) must finish within its budget;
2. a fresh process per (spec, shape) loads the spec, makes inputs and calls the op: the time to its first
   result (the tuned config read from the cache, the kernels from Triton's cache) must be under 2 s;
3. in that process the tuned op must not be slower than the model's default config (full do_bench,
   interleaved rounds, MARGIN_CHECK of noise allowed when the two configs differ; the same config passes).

Both families: a chunked-scan spec (gla) and a softmax spec (softmax_attn: its forward kernel's tiles are
tuned, the default is `choose_softmax_tiles`'s).

usage: python scripts/tune_check.py [--specs gla,softmax_attn] [--shapes 2x8192,1x32768] [--budget 150]
                                    [--workers 8] [--keep-caches]
Prints a table and one JSON line (`TUNE_CHECK {...}`); writes $OUT/tune_check.json when $OUT is set.
Exit status 1 when a check fails."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

T_PROCESS = time.monotonic()
FIRST_RESULT_S = 2.0
MARGIN_CHECK = 0.02  # do_bench medians of two runs of one config differ by ~1%


def default_candidate(op, B: int, T: int, H: int, D: int, sm_count: int):
    """The model's config for this call as an `effc tune` candidate (either family: `model_default`), which
    the tuned op is raced against."""
    from effc.policy.search import model_default
    from effc.policy.tiling import Problem

    dims = tuple(sorted({d: D for d in op.spec.dims}.items()))
    return model_default(op.spec, op.comp.legality, Problem(B, T, H, dims, sm_count))


def first_output(out):
    """The op's output; the first of them for a spec with several."""
    return out[0] if isinstance(out, tuple) else out


def _count_compiles() -> list:
    """Record every kernel Triton's JIT compiles or loads from its cache in this process, with the seconds
    it took (a cache miss takes seconds, a hit milliseconds): why a first call is slow, if it is."""
    import triton.compiler as tc

    seen, original = [], tc.compile

    def counted(src, *args, **kwargs):
        t = time.monotonic()
        out = original(src, *args, **kwargs)
        seen.append((getattr(src, "name", str(src))[:60], round(time.monotonic() - t, 3)))
        return out
    tc.compile = counted
    return seen


def child(spec: str, B: int, T: int, H: int, D: int) -> dict:
    """A second process using the tuned op: time to first result, then tuned vs default."""
    import torch
    t_imports = time.monotonic() - T_PROCESS
    from triton.testing import do_bench

    import effc
    from effc.policy.search import Candidate
    from effc.runtime.verify import random_inputs, rel_err

    compiles = _count_compiles()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()  # the CUDA context exists before the clock starts: any process pays it
    t0 = time.monotonic()
    op = effc.load(spec)
    t_load = time.monotonic() - t0
    xs = random_inputs(op.spec, B, T, H, {d: D for d in op.spec.dims}, torch.bfloat16, "cuda")
    torch.cuda.synchronize()  # making random inputs is the caller's business: not counted
    profile = None
    if os.environ.get("TUNE_CHECK_PROFILE"):  # where a slow first call spends its time
        import cProfile
        profile = cProfile.Profile()
        profile.enable()
    t1 = time.monotonic()
    out, _ = op(*xs)
    torch.cuda.synchronize()
    t2 = time.monotonic()
    if profile:
        import io
        import pstats
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(30)
        print(text.getvalue(), file=sys.stderr)
    first = t_load + t2 - t1
    first_compiles = list(compiles)
    tuned_cfg = op.last_config
    is_tuned = bool(tuned_cfg.reasons) and tuned_cfg.reasons[0].startswith("tuned")
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    default = default_candidate(op, B, T, H, D, sm)
    tuned = Candidate.of(tuned_cfg)  # a SoftmaxTiles gives its forward kernel's knobs
    ref, _ = op(*xs, **default.overrides())
    tuned_ms, default_ms = [], []
    for _ in range(3):  # interleaved, so drift hits both alike
        tuned_ms.append(do_bench(lambda: op(*xs), warmup=25, rep=100, return_mode="median"))
        default_ms.append(do_bench(lambda: op(*xs, **default.overrides()), warmup=25, rep=100, return_mode="median"))
    t, d = min(tuned_ms), min(default_ms)
    return {"spec": spec, "B": B, "T": T, "first_result_s": first, "load_s": t_load, "first_call_s": first - t_load,
            "process_start_to_first_result_s": t2 - T_PROCESS - (t1 - t0 - t_load), "imports_s": t_imports,
            "from_entry": is_tuned, "tuned": str(tuned), "default": str(default), "tuned_ms": t, "default_ms": d,
            "tuned_vs_default": t / d, "same_config": tuned == default,
            "first_call_kernels": first_compiles,  # (kernel, seconds in triton.compile: ~0.01 on a cache hit)
            "rel_diff_vs_default": rel_err(first_output(out).float(), first_output(ref).float())}


def run_tune(spec: str, shapes: str, budget: float, workers: int | None, env: dict) -> dict:
    args = ["tune", spec, "--shapes", shapes, "--budget", str(budget)]
    if workers is not None:
        args += ["--workers", str(workers)]
    if subprocess.run([sys.executable, "-c", "import effc.tools.cli"], env=env, capture_output=True).returncode == 0:
        cmd = [sys.executable, "-m", "effc.tools.cli", *args]
        how = "effc tune (CLI)"
    else:  # a machine where the CLI's dependencies do not import: the function the CLI calls
        cmd = [sys.executable, "-c", "import sys, time; t0 = time.monotonic(); from effc.tools.tune import tune, "
               "parse_shapes, summary; tune(sys.argv[1], parse_shapes(sys.argv[2]), budget=float(sys.argv[3]), "
               "workers=None if sys.argv[4] == '-' else int(sys.argv[4]), started=t0, "
               "on_result=lambda r: print(summary(r), flush=True))",
               spec, shapes, str(budget), "-" if workers is None else str(workers)]
        how = "effc.tools.tune.tune (effc.tools.cli does not import here)"
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env)
    return {"spec": spec, "how": how, "rc": p.returncode, "wall_s": time.monotonic() - t0, "budget_s": budget}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", default="gla,softmax_attn")
    ap.add_argument("--shapes", default="2x8192,1x32768")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds per `effc tune` run (all its shapes)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--keep-caches", action="store_true", help="use $EFFC_CACHE_DIR / $TRITON_CACHE_DIR as set")
    ap.add_argument("--child", nargs=5, metavar=("SPEC", "B", "T", "H", "D"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        spec, *nums = a.child
        print("TUNE_CHILD " + json.dumps(child(spec, *map(int, nums))), flush=True)
        return 0

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if not a.keep_caches:  # cold: everything the second process finds was made by the tuner
        root = tempfile.mkdtemp(prefix="effc-tune-check-")
        env["EFFC_CACHE_DIR"], env["TRITON_CACHE_DIR"] = f"{root}/effc", f"{root}/triton"
    specs = [s for s in a.specs.split(",") if s]
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",") if s]
    tunes, checks = [], []
    for spec in specs:
        tunes.append(run_tune(spec, a.shapes, a.budget, a.workers, env))
        print(f"== {spec}: tuner exited {tunes[-1]['rc']} after {tunes[-1]['wall_s']:.1f} s "
              f"(budget {a.budget:.0f} s)", flush=True)
        for B, T in shapes:
            p = subprocess.run([sys.executable, __file__, "--child", spec, str(B), str(T), str(a.heads), str(a.dim)],
                               env=env, capture_output=True, text=True)
            if env.get("TUNE_CHECK_PROFILE"):
                print(p.stderr[-12000:], flush=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("TUNE_CHILD ")), None)
            checks.append(json.loads(line.split(" ", 1)[1]) if line else
                          {"spec": spec, "B": B, "T": T, "error": (p.stderr.strip().splitlines() or ["?"])[-1]})
            print(json.dumps(checks[-1]), flush=True)

    ok = True
    print(f"\n{'spec':11s} {'tune wall s':>11s} {'budget':>6s}  verdict")
    for t in tunes:
        good = t["rc"] == 0 and t["wall_s"] <= t["budget_s"]
        ok &= good
        print(f"{t['spec']:11s} {t['wall_s']:11.1f} {t['budget_s']:6.0f}  {'ok' if good else 'FAIL'}  ({t['how']})")
    print(f"\n{'spec':11s} {'BxT':>8s} {'first s':>7s} {'tuned ms':>8s} {'dflt ms':>8s} {'ratio':>6s}  verdict  "
          f"tuned config / default config")
    for c in checks:
        if "error" in c:
            ok = False
            print(f"{c['spec']:11s} {c['B']}x{c['T']:<6d} FAIL: {c['error']}")
            continue
        fast = c["first_result_s"] < FIRST_RESULT_S
        not_slower = c["same_config"] or c["tuned_vs_default"] <= 1 + MARGIN_CHECK
        good = fast and not_slower and c["from_entry"]
        ok &= good
        why = [] if good else [w for w, bad in (("first result >= 2 s", not fast), ("slower", not not_slower),
                                                 ("no tuning entry used", not c["from_entry"])) if bad]
        print(f"{c['spec']:11s} {str(c['B']) + 'x' + str(c['T']):>8s} {c['first_result_s']:7.2f} {c['tuned_ms']:8.3f} "
              f"{c['default_ms']:8.3f} {c['tuned_vs_default']:6.3f}  {'ok' if good else 'FAIL ' + ', '.join(why)}  "
              f"{c['tuned']} / {c['default']}")
    result = {"ok": ok, "tunes": tunes, "checks": checks}
    print("TUNE_CHECK " + json.dumps(result), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tune_check.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
