"""Time the softmax-family kernels beside torch SDPA and FlexAttention (bf16, one GPU), forward and
forward+backward: `python scripts/softmax_bench.py --specs softmax_attn --shapes 8x2048,2x8192,1x32768`.
Writes the rows as JSON with --json. (Until `effc bench` maps these peers: effc/softmax_peers.py.)"""
import argparse
import json

from effc.softmax_peers import bench_softmax

ap = argparse.ArgumentParser()
ap.add_argument("--specs", default="softmax_attn")
ap.add_argument("--shapes", default="8x2048,2x8192,1x32768")
ap.add_argument("--heads", type=int, default=16)
ap.add_argument("--head-dim", type=int, default=128)
ap.add_argument("--backward", action="store_true", help="also time forward+backward")
ap.add_argument("--no-peers", action="store_true")
ap.add_argument("--json")
a = ap.parse_args()
shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
rows = bench_softmax(a.specs.split(","), shapes, a.heads, a.head_dim, False, not a.no_peers)
if a.backward:
    rows += bench_softmax(a.specs.split(","), shapes, a.heads, a.head_dim, True, not a.no_peers)
print(f"{'spec':24s} {'pass':8s} {'BxT':>9s} {'effc ms':>8s} {'TFLOP/s':>8s}  peers (ms, peer/effc)")
for r in rows:
    peers = "; ".join(f"{k}: {v['ms']:.3f} ({v['speedup']:.2f}x, diff {v['rel_diff']:.1e})" if "ms" in v else f"{k}: {v['error']}"
                      for k, v in r.items() if isinstance(v, dict))
    print(f"{r['spec']:24s} {r['pass']:8s} {str(r['B']) + 'x' + str(r['T']):>9s} {r['effc_ms']:8.3f} {r['effc_TFLOPs']:8.1f}  {peers}")
if a.json:
    open(a.json, "w").write(json.dumps(rows, indent=1))
