"""On the GPU: every chunked-state library spec through the TileLang backend, against the fp64 oracle (the bf16
tolerance policy of effc.runtime.verify, as tests/gpu/test_bf16_accuracy.py applies it to Triton),
then timed against the Triton backend at the README's shapes.

    python scripts/tilelang_check.py [--specs gla,retention] [--shapes 8x2048,2x8192,1x32768]
                                     [--no-bench] [--edge] [--stages 1,2] [--json out.json]

Needs tilelang on the GPU machine (scripts/gpu.sh setup installs .device/wheels-b). Specs whose ops the
backend refuses (by name, NotImplementedError) are listed as skipped, not failed.

`--edge` adds calls the accuracy shape does not reach: T not a multiple of the chunk, several
segments, grouped heads, packed (varlen) sequences and the state history, each compared with the
Triton launcher on the same inputs. Exits 1 if any check fails."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import effc  # noqa: E402
from effc.runtime.launch import Launcher, make_layout  # noqa: E402
from effc.runtime.tilelang_backend import forward, launcher  # noqa: E402
from effc.runtime.verify import judge_low_precision, random_inputs, random_state, rel_err  # noqa: E402

H, D = 16, 128


def _dims(op):
    return {d: D for d in op.spec.dims}


def _config(op, B, T, xs, **overrides):
    return op.config(B, T, H, _dims(op), xs[0].device, dtype=xs[0].dtype, **overrides)


def _init(op, s0):
    states = (s0,) if torch.is_tensor(s0) else s0
    return {s.name: x for s, x in zip(op.spec.states, states)}


def accuracy(name: str, segments, stages=None) -> tuple[bool, str]:
    op = effc.load(name)
    launcher(op.comp.plan).num_stages = stages
    B, T = 2, 4096
    xs = random_inputs(op.spec, B, T, H, _dims(op), torch.bfloat16, "cuda", seed=3)
    s0 = random_state(op.spec, B, H, _dims(op), "cuda")
    cfg = _config(op, B, T, xs, segments=segments)
    pvals = op.param_values(_dims(op), {})
    o, s = forward(op.comp.plan, cfg, xs, pvals, _init(op, s0), True)
    torch.cuda.synchronize()
    ref, ref_s = op.reference(*xs, initial_state=s0, output_final_state=True)
    low, low_s = op.reference(*xs, initial_state=s0, output_final_state=True, dtype=torch.float32,
                              matmul_dtype=torch.bfloat16)
    v, vs = judge_low_precision(o, ref, low), judge_low_precision(s, ref_s, low_s)
    ok = v.ok and vs.ok and bool(torch.isfinite(o).all())
    return ok, f"{name:12s} segments={cfg.segments} stages={stages or 1}: output {v}; final state {vs}"


def edge_cases(name: str) -> list[tuple[bool, str]]:
    """TileLang vs the Triton launcher on the same calls, which the Triton tests already cover."""
    op = effc.load(name)
    spec, plan = op.spec, op.comp.plan
    dims = _dims(op)
    out = []
    gen = torch.Generator(device="cpu").manual_seed(5)
    cases = [("T=1000, 3 segments", 2, 1000, None, dict(segments=3)),
             ("grouped heads (4 of 16)", 2, 1024, "gqa", dict(segments=2)),
             ("varlen [300, 1, 1723]", 1, 2024, [0, 300, 301, 2024], dict(segments=2))]
    for label, B, T, extra, overrides in cases:
        xs = random_inputs(spec, B, T, H, dims, torch.bfloat16, "cuda", seed=7)
        if extra == "gqa":  # k and v (when inputs) shared by groups of heads
            xs = [x[:, :, :4].contiguous() if d.name in ("k", "v") else x for d, x in zip(spec.inputs, xs)]
        cu = torch.tensor(extra, dtype=torch.int32, device="cuda") if isinstance(extra, list) else None
        n_seq = B if cu is None else len(extra) - 1
        s0 = random_state(spec, n_seq, H, dims, "cuda")
        cfg = _config(op, n_seq, T, xs, **overrides)
        lay = make_layout(spec, xs, H, dims, cu, cfg.chunk)
        named = {d.name: x.contiguous() for d, x in zip(spec.inputs, xs)}
        pvals = op.param_values(dims, {})
        init = {k: v.float().contiguous() for k, v in _init(op, s0).items()}
        tl_o, tl_f, tl_h = launcher(plan).forward(cfg, lay, named, pvals, init, True, True)
        tr_o, tr_f, tr_h = Launcher(spec, plan, op.module).forward(cfg, lay, named, pvals, init, True, True)
        torch.cuda.synchronize()
        errs = {f"out {n}": rel_err(tl_o[n], tr_o[n]) for n in tr_o}
        errs.update({f"final {n}": rel_err(tl_f[n], tr_f[n]) for n in tr_f})
        errs.update({f"history {n}": rel_err(tl_h[n], tr_h[n]) for n in tr_h})
        worst = max(errs.values())
        # both round matmul operands to bf16, in different places: agreement to a few bf16 ulps
        ok = worst < 2e-2 and all(torch.isfinite(t).all() for t in tl_o.values())
        out.append((ok, f"{name:12s} {label:26s} vs Triton: " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items())))
    return out


def bench(name: str, B: int, T: int, stages=(None,)) -> dict:
    """Forward only, bf16, no initial or final state; `stages`: TileLang pipeline depths to time
    (None: the launcher's default)."""
    from triton.testing import do_bench

    op = effc.load(name)
    xs = random_inputs(op.spec, B, T, H, _dims(op), torch.bfloat16, "cuda", seed=0)
    cfg = _config(op, B, T, xs)
    pvals = op.param_values(_dims(op), {})
    plan = op.comp.plan
    tl_ms = {}
    for st in stages:
        launcher(plan).num_stages = st
        t0 = time.time()
        forward(plan, cfg, xs, pvals, {}, False)  # compile outside the timing
        compile_s = time.time() - t0
        tl_ms[st or 1] = do_bench(lambda: forward(plan, cfg, xs, pvals, {}, False), warmup=25, rep=100)
    launcher(plan).num_stages = None
    tr_ms = do_bench(lambda: op(*xs), warmup=25, rep=100)
    best = min(tl_ms, key=tl_ms.get)
    return dict(spec=name, B=B, T=T, H=H, D=D, config=str(cfg).splitlines()[0], tilelang_ms=tl_ms[best],
                tilelang_stages=best, tilelang_ms_by_stages=tl_ms, triton_ms=tr_ms, ratio=tl_ms[best] / tr_ms,
                tilelang_compile_s=compile_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(effc.library_names("linear")))
    ap.add_argument("--shapes", default="8x2048,2x8192,1x32768")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--edge", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--stages", default="", help="TileLang pipeline depths to check and time, e.g. 1,2 "
                                                 "(default: the launcher's)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    names = args.specs.split(",") if args.specs else effc.library_names("linear")
    stages = tuple(int(x) for x in args.stages.split(",")) if args.stages else (None,)
    failed, refused = 0, set()
    print(f"accuracy: bf16, B=2, T=4096, H={H}, D={D}, against the fp64 oracle", flush=True)
    for name in names:
        for st in stages:
            for segments in (None, 1):
                try:
                    ok, line = accuracy(name, segments, st)
                except NotImplementedError as e:  # an op the backend refuses by name: reported, not failed
                    if name not in refused:
                        print(f"  skip {name:12s} {e}", flush=True)
                    refused.add(name)
                    break
                except Exception as e:  # report and go on: one spec's failure should not hide the others
                    ok, line = False, f"{name:12s} segments={segments}: ERROR {type(e).__name__}: {str(e)[:400]}"
                failed += not ok
                print(("  ok   " if ok else "  FAIL ") + line, flush=True)
    names = [n for n in names if n not in refused]
    if args.edge:
        print("edge cases: TileLang vs Triton on the same inputs (relative error)", flush=True)
        for name in names:
            try:
                results = edge_cases(name)
            except Exception as e:
                results = [(False, f"{name:12s} ERROR {type(e).__name__}: {str(e)[:400]}")]
            for ok, line in results:
                failed += not ok
                print(("  ok   " if ok else "  FAIL ") + line, flush=True)
    rows = []
    if not args.no_bench:
        shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
        print("\n| spec | B x T | TileLang ms | Triton ms | TileLang / Triton | config |", flush=True)
        print("|---|---|---|---|---|---|", flush=True)
        for name in names:
            for B, T in shapes:
                try:
                    r = bench(name, B, T, stages)
                except Exception as e:
                    print(f"| {name} | {B}x{T} | ERROR {type(e).__name__}: {str(e)[:200]} | | | |", flush=True)
                    failed += 1
                    continue
                rows.append(r)
                by = ", ".join(f"{k}: {v:.3f}" for k, v in r["tilelang_ms_by_stages"].items())
                print(f"| {name} | {B}x{T} | {r['tilelang_ms']:.3f} | {r['triton_ms']:.3f} | {r['ratio']:.2f}x "
                      f"| {r['config']}; TileLang stages {by} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{'all checks passed' if not failed else f'{failed} check(s) failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
