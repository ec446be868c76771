"""`effc bench`: effc's kernels beside the peers, same inputs, one GPU, one run.

Each peer runs in its own subprocess (its first call may autotune for minutes, or crash).
FLOPs and bytes come from the spec itself: every matmul of the walk kernel, per chunk, and
every input and output read or written once. Achieved rates are reported against the GPU's peaks
(`PEAKS`), and `--plot` draws time against sequence length, effc beside each peer."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sympy

from ..errors import ArgumentError, BackwardRefused, SpecError
from ..ir.nodes import C, dim
from ..passes.shapes import value_types
from ..policy.tiling import padded
from ..runtime.dim_parts import tile_widths
from .peers import PEERS, time_training_step

# Machine limits per GPU name (substring match), measured on the lent H100 with the same software
# (../shared/ANCHORS.md: device-to-device copy ~3.0 TB/s, bf16 matmul 785-815 TFLOP/s). Other GPUs
# are compared with the H100's numbers, and the row says so.
PEAKS = {"H100": {"TB/s": 3.0, "TFLOP/s": 790.0}}
DEFAULT_PEAK = "H100"


def peaks(gpu: str) -> tuple[dict, str]:
    """(peak rates, which GPU's measurements they are) for a device name."""
    for name, p in PEAKS.items():
        if name in gpu:
            return p, name
    return PEAKS[DEFAULT_PEAK], f"{DEFAULT_PEAK} (no measured peaks for {gpu})"


def spec_flops(op, B: int, T: int, H: int, dims: dict[str, int], chunk: int) -> float:
    plan = op.comp.plan
    types = {**value_types(op.spec), **{o.out: o.type for k in plan.kernels for o in k.ops}}  # plan values too
    per_chunk = sympy.Integer(0)
    for o in [o for k in plan.kernels if k.role in ("prep", "walk") for o in k.ops]:  # prep: the hoisted part
        if o.kind == "matmul":
            (m, k), (_, n) = types[o.args[0]].shape, types[o.args[1]].shape
            per_chunk += 2 * m * k * n
        elif o.kind == "decay_dot":  # x [C, K] against y [C, K] (passes.decay_dot)
            (m, k) = types[o.args[0]].shape
            per_chunk += 2 * m * k * m
    subs = {C: chunk, **{dim(d): v for d, v in dims.items()}}
    return float(per_chunk.subs(subs)) * math.ceil(T / chunk) * B * H


def op_flops(op, B: int, T: int, H: int, dims: dict[str, int], chunk: int, backward: bool = False) -> float:
    """FLOPs of a forward (or forward + backward): the op's own count where it has one (softmax: its visible
    pairs; with the backward FlashAttention's 3.5x, as the backward recomputes the scores), else the walk's
    matmuls, 3x with the backward (each forward matmul has two in the backward)."""
    if hasattr(op, "flops"):
        return op.flops(B, T, H, dims, backward=backward)
    return spec_flops(op, B, T, H, dims, chunk) * (3.0 if backward else 1.0)


def io_bytes(xs, out) -> int:
    return sum(x.numel() * x.element_size() for x in xs) + out.numel() * out.element_size()


def _peer(spec: str, B: int, T: int, H: int, D: int, timeout: float, index: int = 0, backward: bool = False,
          kv_heads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "effc.tools.peers", spec, str(B), str(T), str(H), str(D), str(index)]
    cmd += ["bwd" if backward else "fwd", str(kv_heads or H)]
    return run_peer_process(cmd, timeout)


def run_peer_process(cmd: list[str], timeout: float) -> dict:
    """Run one peer's process and read its result line. A process that dies without one (a crash, or an
    abort such as an LLVM assertion inside Triton's compiler) gives the row an error naming the signal
    and the most telling line of its stderr; the bench goes on."""
    # a session of its own, so a timeout kills the peer's whole process group: nothing it started keeps the
    # GPU busy under the next rows' timings
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return {"error": f"no result within {timeout:.0f} s (first call autotuning)"}
    for line in out.splitlines():
        if line.startswith("EFFC_PEER_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    lines = [x.strip() for x in err.splitlines() if x.strip()]
    telling = [x for x in lines if "Assertion" in x or "error" in x.lower()]
    detail = (telling or lines or [""])[-1][:200]
    if p.returncode < 0:
        try:
            how = f"killed by {signal.Signals(-p.returncode).name}"
        except ValueError:
            how = f"killed by signal {-p.returncode}"
        return {"error": f"peer process {how}: {detail}"}
    return {"error": f"peer process exited {p.returncode}: {detail}"}


def _missing(name: str, error: SpecError) -> dict:
    waiting = ", ".join(p.label for p in PEERS.get(name, ()))
    why = str(error).removeprefix("error: ").splitlines()[0]
    return {"spec": name, "skipped": f"{why}" + (f"; its peers ({waiting}) run once it exists" if waiting else "")}


def run_bench(specs, shapes, H: int, D, peers: bool, peer_timeout: float, json_out: Path | None, *,
              plot: Path | None = None, backward: bool = False, backends: tuple = ("triton",),
              kv_heads: int | None = None):
    """`D`: the head dim, or several (every feature dim takes it; with several, a table of time per FLOP
    against the neighbouring power-of-two head dims follows: `head_dim_table`). `backward`: also time forward +
    backward and record its peak memory, effc's and each peer's. `backends`: the first is the row's effc
    time; the others are timed beside it (`effc_ms_<backend>`). `kv_heads`: the heads of the `key` inputs
    (grouped-query attention; None: H), the peers' too."""
    if kv_heads is not None and (kv_heads < 1 or H % kv_heads):
        raise ArgumentError(f"--kv-heads {kv_heads} must divide --heads {H}")
    import torch

    import effc

    if not torch.cuda.is_available():
        raise RuntimeError("effc bench needs a CUDA GPU (timings under the interpreter mean nothing)")
    if plot:
        _need_matplotlib()
    head_dims = (D,) if isinstance(D, int) else tuple(D)
    gpu = torch.cuda.get_device_name()
    rows = []
    for name in specs:
        try:
            op = effc.load(name, backend=backends[0])
            others = [effc.load(name, backend=b) for b in backends[1:]]
        except SpecError as e:
            rows.append(_missing(name, e))
            _print_row(rows[-1])
            continue
        for B, T in shapes:
            for d in head_dims:
                rows.append(_bench_row(op, others, name, B, T, H, d, gpu, peers, peer_timeout, backward, kv_heads))
                _print_row(rows[-1])
                torch.cuda.empty_cache()
    _print_table(rows)
    if len(head_dims) > 1:
        print(head_dim_table(rows))
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1))
    if plot:
        plot_rows(rows, plot)
        print(f"plot: {plot}")
    return rows


def _bench_row(op, others, name: str, B: int, T: int, H: int, D: int, gpu: str, peers: bool, peer_timeout: float,
               backward: bool, kv_heads: int | None = None) -> dict:
    """One spec at one shape and head dim: effc's forward (and training step), then each peer's."""
    import torch
    from triton.testing import do_bench

    from ..runtime.verify import random_inputs

    peak, peak_of = peaks(gpu)
    dims = {d: D for d in op.spec.dims}
    xs = random_inputs(op.spec, B, T, H, dims, torch.bfloat16, "cuda", kv_heads=kv_heads)
    t0 = time.time()
    out, _ = op(*xs)
    torch.cuda.synchronize()
    first = time.time() - t0
    ms = do_bench(lambda: op(*xs), warmup=25, rep=100, return_mode="median")
    cfg = op.last_config
    tuned = any(r.startswith("tuned") for r in cfg.reasons)
    tbs = io_bytes(xs, out) / ms / 1e9
    flops = op_flops(op, B, T, H, dims, cfg.chunk)
    tflops = flops / ms / 1e9
    # the work the kernels do on tiles padded to powers of two (or split into power-of-two parts), over the
    # work the real dims need
    widths = tile_widths(op.comp, dims) if hasattr(op, "comp") else {d: padded(v) for d, v in dims.items()}
    padding = op_flops(op, B, T, H, widths, cfg.chunk) / flops if flops else 1.0
    row = {"spec": name, "B": B, "T": T, "H": H, "HK": kv_heads or H, "D": D, "gpu": gpu, "effc_ms": ms,
           "effc_first_call_s": first,
           "config": f"C={cfg.chunk} block={cfg.block} P={cfg.segments} warps={cfg.num_warps}"
                     + (" merge=deferred" if getattr(cfg, "defer_merge", False) else "")
                     + (" (tuned)" if tuned else ""),
           "TB/s": tbs, "TFLOP/s": tflops, "padding_flops_ratio": padding,
           "dim_parts": getattr(op, "last_dim_parts", ""), "bw_frac": tbs / peak["TB/s"],
           "flop_frac": tflops / peak["TFLOP/s"], "peak": {**peak, "of": peak_of}}
    for other in others:
        row[f"effc_ms_{other.backend}"] = do_bench(lambda: other(*xs), warmup=25, rep=100, return_mode="median")
    if backward:
        leaves = [x.requires_grad_() for x in xs]
        grad = torch.randn_like(out)
        try:
            row["effc_fwdbwd_ms"], row["effc_peak_mib"] = time_training_step(lambda: op(*leaves)[0], leaves, grad)
            row["fwdbwd_TFLOP/s"] = (op_flops(op, B, T, H, dims, cfg.chunk, backward=True)
                                     / row["effc_fwdbwd_ms"] / 1e9)
            row["history"] = getattr(op, "last_history_reason", "")
        except BackwardRefused as e:  # a backward refused here (policy.triton_faults): the row stays
            row["effc_bwd_error"] = str(e)
    if peers and name in PEERS:
        row["peers"] = []
        for i, p in enumerate(PEERS[name]):
            res = {"peer": p.label, **_peer(name, B, T, H, D, peer_timeout, i, backward, kv_heads)}
            if "ms" in res:
                res["speedup"] = res["ms"] / ms
            if "fwdbwd_ms" in res and "effc_fwdbwd_ms" in row:
                res["speedup_fwdbwd"] = res["fwdbwd_ms"] / row["effc_fwdbwd_ms"]
            row["peers"].append(res)
        first_peer = row["peers"][0]  # flat keys: the layout of earlier JSON files
        row.update({f"peer_{k}": v for k, v in first_peer.items() if k != "speedup"})
        if "speedup" in first_peer:
            row["speedup"] = first_peer["speedup"]
    return row


# issue 20's bar: a head dim that is not a power of two costs at most this much more time per FLOP than the
# power-of-two head dims measured beside it
HEAD_DIM_SLACK = 1.3


def _power_of_two_refs(D: int, measured: dict) -> list[dict]:
    """The rows of `measured` ({power-of-two D: row}) that D is compared with: the two it lies between where
    both were measured, else the nearest (in log2; ties to the larger), else none."""
    below, above = 1 << (D.bit_length() - 1), 1 << (D - 1).bit_length()
    if below != above and below in measured and above in measured:
        return [measured[below], measured[above]]
    if not measured:
        return []
    return [min(measured.values(), key=lambda x: (abs(math.log2(x["D"]) - math.log2(D)), -x["D"]))]


def head_dim_table(rows) -> str:
    """Time per FLOP of each head dim against the power-of-two head dims of the same spec and shape measured
    in the same run: the two it lies between where both were measured (96: 64 and 128), else the nearest
    (in log2; ties to the larger). Ratio = their TFLOP/s over this one's, forward and forward+backward; above
    HEAD_DIM_SLACK is marked. Where the kernels run padded tiles, the FLOP ratio of the padded dims to the
    real ones follows: what padding alone costs per FLOP."""
    timed = [r for r in rows if "TFLOP/s" in r]
    lines = [f"{'spec':14s} {'BxT':>9s} {'D':>4s} {'TFLOP/s':>8s} {'fwd+bwd':>8s}  per FLOP vs"]
    for r in timed:
        same = {x["D"]: x for x in timed if (x["spec"], x["B"], x["T"]) == (r["spec"], r["B"], r["T"])
                and x["D"] & (x["D"] - 1) == 0}
        refs = _power_of_two_refs(r["D"], same)
        against = []
        for ref in (x for x in refs if x is not r):
            cells = []
            for key in ("TFLOP/s", "fwdbwd_TFLOP/s"):
                if key in r and key in ref and r[key] > 0:
                    ratio = ref[key] / r[key]
                    cells.append(f"{'fwd' if key == 'TFLOP/s' else 'fwd+bwd'} {ratio:.2f}x"
                                 + (" (over %.1fx)" % HEAD_DIM_SLACK if ratio > HEAD_DIM_SLACK else ""))
            if cells:
                against.append(f"D={ref['D']}: " + ", ".join(cells))
        if against and r.get("padding_flops_ratio", 1.0) > 1.001:
            against.append(f"padding alone {r['padding_flops_ratio']:.2f}x")
        text = "; ".join(against) if against else ("reference" if r in refs else "-")
        fb = f"{r['fwdbwd_TFLOP/s']:8.1f}" if "fwdbwd_TFLOP/s" in r else f"{'-':>8s}"
        lines.append(f"{r['spec']:14s} {str(r['B']) + 'x' + str(r['T']):>9s} {r['D']:4d} {r['TFLOP/s']:8.1f} {fb}  "
                     f"{text}")
    return "\n".join(lines)


def _need_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'effc[bench]'") from None


# (what is plotted, effc's key, a peer's key): forward, and forward+backward where the bench timed it
PLOTTED = (("forward", "effc_ms", "ms"), ("forward+backward", "effc_fwdbwd_ms", "fwdbwd_ms"))


def plot_rows(rows, path) -> None:
    """One panel per spec and timing (forward; forward+backward when timed): time against sequence length,
    effc beside each peer, log axes."""
    _need_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "effc_ms" in r]
    specs = list(dict.fromkeys(r["spec"] for r in timed))
    if not specs:
        raise RuntimeError("nothing to plot: no spec was timed")
    kinds = [k for k in PLOTTED if any(k[1] in r for r in timed)]
    fig, axes = plt.subplots(len(kinds), len(specs), figsize=(5 * len(specs), 4 * len(kinds)), squeeze=False)
    for row_axes, (what, effc_key, peer_key) in zip(axes, kinds):
        for ax, spec in zip(row_axes, specs):
            rs = sorted((r for r in timed if r["spec"] == spec and effc_key in r), key=lambda r: (r["T"], r["B"]))
            ts = [r["T"] for r in rs]
            ax.plot(ts, [r[effc_key] for r in rs], "o-", label="effc")
            labels = dict.fromkeys(p["peer"] for r in rs for p in r.get("peers", ()) if peer_key in p)
            for label in labels:
                pts = [(r["T"], p[peer_key]) for r in rs for p in r.get("peers", ())
                       if p.get("peer") == label and peer_key in p]
                ax.plot([t for t, _ in pts], [m for _, m in pts], "s--", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ts, [f"{r['B']}x{r['T']}" for r in rs])
            ax.set_xlabel("B x T (sequence length T)")
            ax.set_ylabel(f"{what} ms (median)")
            ax.set_title(f"{spec} {what}  H={rs[0]['H'] if rs else '?'} D={rs[0]['D'] if rs else '?'} bf16")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(timed[0].get("gpu", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def show_saved(json_in, plot: Path | None = None, markdown: bool = False) -> list[dict]:
    """The table (and plot) of rows earlier `effc bench --json` calls wrote (`json_in`: a path or several): a
    GPU machine without matplotlib times, any machine draws. `markdown`: the README's speed table instead
    (`markdown_table`)."""
    rows = saved_rows(json_in)
    if markdown:
        print(markdown_table(rows), end="")
    else:
        _print_table(rows)
    if plot:
        plot_rows(rows, plot)
        print(f"plot: {plot}")
    return rows


def saved_rows(json_in) -> list[dict]:
    """The rows `effc bench --json` calls wrote (`json_in`: a path or several), one per measured call (spec,
    shape, heads, head dim): a later file's row replaces an earlier one's in its place, so a table of several
    runs shows each call's newest measurement once (rows written before the bench recorded key heads have as
    many as query heads)."""
    paths = [json_in] if isinstance(json_in, (str, Path)) else list(json_in)
    kept: dict[tuple, dict] = {}
    for r in (r for p in paths for r in json.loads(Path(p).read_text())):
        kept[(*(str(r.get(k)) for k in ("spec", "B", "T", "H", "D")), str(r.get("HK") or r.get("H")))] = r
    return list(kept.values())


def _ratio(r: dict, p: dict, key: str) -> str:
    return f"{p[key]:.2f}x" if key in p else "-"


def _gpu_model(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100': the word of a device name that is a letter and digits; '-' if none."""
    return next((w for w in str(name).split() if w[:1].isalpha() and w[1:].isdigit()), "-")


def markdown_table(rows: list[dict]) -> str:
    """A line per (row, peer) that timed: spec, peer, the GPU's model (H100, ...), B x T, the forward and
    forward+backward ratios (peer / effc: above 1, effc is faster) and the training step's peak memory,
    effc's / the peer's (MiB); B x T names the key/value heads where fewer than the query heads (a sparse
    spec's choice is shared by their groups). Rows with several head dims (the head-dim tables) are left
    out: their table is `head_dim_table`'s."""
    lines = ["| spec | peer | GPU | B x T | forward | forward+backward | peak MiB, effc / peer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in r.get("peers") or []:
            if "ms" not in p:
                continue
            peak = (f"{r['effc_peak_mib']:.0f} / {p['peak_mib']:.0f}" if "effc_peak_mib" in r and "peak_mib" in p
                    else "-")
            gpu = _gpu_model(r.get("gpu", ""))
            shape = f"{r['B']}x{r['T']}" + (f", {r['HK']} KV head{'s' * (r['HK'] > 1)}"
                                            if r.get("HK", r.get("H")) != r.get("H") else "")
            lines.append(f"| {r['spec']} | {p['peer']} | {gpu} | {shape} | {_ratio(r, p, 'speedup')} | "
                         f"{_ratio(r, p, 'speedup_fwdbwd')} | {peak} |")
    return "\n".join(lines) + "\n"


def _print_row(r):
    print(json.dumps(r), flush=True)


def _print_table(rows):
    head = (f"{'spec':12s} {'BxT':>9s} {'effc ms':>8s} {'TB/s':>5s} {'%bw':>4s} {'TFLOP/s':>7s} {'%flop':>5s} "
            f"{'peer':22s} {'peer ms':>8s} {'speedup':>7s} {'diff':>8s}  config")
    print(head)
    for r in rows:
        if "skipped" in r:
            print(f"{r['spec']:12s} skipped: {r['skipped']}")
            continue
        peers = r.get("peers") or [{}]
        for i, p in enumerate(peers):
            peer = p.get("peer", "-") if "error" not in p else "error"
            pms = f"{p['ms']:.3f}" if "ms" in p else "-"
            sp = f"{p['speedup']:.2f}x" if "speedup" in p else "-"
            diff = f"{p['rel_diff_vs_effc']:.1e}" if "rel_diff_vs_effc" in p else "-"
            lead = (f"{r['spec']:12s} {str(r['B']) + 'x' + str(r['T']):>9s} {r['effc_ms']:8.3f} {r['TB/s']:5.2f} "
                    f"{100 * r['bw_frac']:3.0f}% {r['TFLOP/s']:7.1f} {100 * r['flop_frac']:4.0f}%")
            lead = lead if i == 0 else " " * len(lead)  # further peers of the row: their own lines
            print(f"{lead} {peer:22s} {pms:>8s} {sp:>7s} {diff:>8s}  {r['config'] if i == 0 else ''}".rstrip())
            if "error" in p:
                print(f"    peer {p.get('peer', '')}: {p['error']}")
            if "effc_fwdbwd_ms" in r and i == 0:
                print(f"    fwd+bwd: effc {r['effc_fwdbwd_ms']:.3f} ms, {r['fwdbwd_TFLOP/s']:.1f} TFLOP/s, "
                      f"peak {r['effc_peak_mib']:.0f} MiB; {r['history']}")
            if "effc_bwd_error" in r and i == 0:
                print(f"    fwd+bwd: effc refused: {r['effc_bwd_error']}")
            if "bwd_error" in p:
                print(f"    fwd+bwd: {p['peer']}: {p['bwd_error']}")
            if "fwdbwd_ms" in p:
                ratio = f" -> {p['speedup_fwdbwd']:.2f}x" if "speedup_fwdbwd" in p else ""
                print(f"    fwd+bwd: {p['peer']} {p['fwdbwd_ms']:.3f} ms, peak {p['peak_mib']:.0f} MiB{ratio}")
    pk = next((r["peak"] for r in rows if "peak" in r), None)
    if pk:
        print(f"%bw, %flop: of {pk['TB/s']} TB/s and {pk['TFLOP/s']} TFLOP/s measured on the {pk['of']}")
