"""Would the kernel cost model (passes.kernel_cost) make the dissolve decisions passes.grad_terms makes by
its live-value threshold? For every library spec (or those named), each decision grad_terms reaches: the
kernel, its hosts, both rules' verdicts and the model's estimate of the gradient kernels before and after
(each kernel at its cheaper of one program per block and the loop over blocks). CPU only.

    python scripts/grad_terms_model.py [SPEC ...]
"""
import sys
from dataclasses import replace
import effc
from effc.passes import grad_terms as G
from effc.passes.fusion import FusedKernel, live_ops, needed, depends
from effc.passes.partition import _costs
from effc.passes.transpose_sink import sink_transposes
from effc.passes.block_loop import loop_over_blocks
from effc.passes.vjp_rules import Adjoints

def cost_of(spec, split, name, stages, ops, roots, types):
    k = FusedKernel(name, stages, ops, roots, ())
    k = replace(k, ops=sink_transposes(k.ops, types))
    t = {**types, **{op.out: op.type for op in k.ops}}
    blk = _costs(spec, [replace(k, loop=False)], t, split, {})[0][1].us
    if split and loop_over_blocks(k.ops, t, split):
        lp = _costs(spec, [replace(k, loop=True)], t, split, {})[0][1].us
        return min(blk, lp)
    return blk

def run(name):
    op = effc.load(name)
    c = op.comp
    spec, backward = c.typed, c.backward
    if not hasattr(c.legality, "split_dims"): return
    split = c.legality.split_dims[0] if c.legality.split_dims else None
    from effc.passes.fusion import fuse
    fused = fuse(spec, c.legality, backward)
    chunks = {k.name: k for k in fused.kernels if k.name.startswith("bwd_chunks_")}
    if len(chunks) < 2: return
    adjoint = depends(backward.ops, {s for s, _ in backward.seeds})
    b = Adjoints(backward.types(spec), prefix="_t")
    sizes = G.typical_sizes(spec, split)
    placed = {n: list(k.grads) for n, k in chunks.items()}
    memo = {}
    def kernel_ops(n, extra=()):
        roots = tuple(t for _, t in placed[n]) + tuple(extra)
        if roots not in memo:
            memo[roots] = live_ops(backward.ops + tuple(b.ops), roots)
        return roots, memo[roots]
    def live(n, extra=()):
        roots, ops = kernel_ops(n, extra)
        return G.live_values(ops, roots, b.types, sizes) / G.THREADS
    def cost(n, extra=()):
        roots, ops = kernel_ops(n, extra)
        return cost_of(spec, split, n, chunks[n].stages, ops, roots, dict(b.types))
    dissolved, hosts = set(), set()
    for n in sorted(chunks, key=live, reverse=True):
        if n in hosts: continue
        moves = {}
        for x, g in placed[n]:
            for term in G.split_terms(backward.ops, g, adjoint, b):
                term_ops = needed(backward.ops + tuple(b.ops), (term,))
                costs = [(cc, h) for h in chunks if h != n and h not in dissolved
                         for cc in [G._host_cost(term_ops, kernel_ops(h)[1], b.types)] if cc is not None]
                if not costs: break
                moves.setdefault(min(costs)[1], []).append((x, term))
            else: continue
            break
        else:
            thr = all(live(h, [t for _, t in m]) <= max(G.HOST_LIVE_LIMIT, G.HOST_GROWTH * live(h)) for h, m in moves.items())
            before = cost(n) + sum(cost(h) for h in moves)
            after = sum(cost(h, [t for _, t in m]) for h, m in moves.items())
            model = after < before
            print(f"{name:22s} {n:22s} -> {','.join(moves):30s} threshold={'dissolve' if thr else 'keep':8s} model={'dissolve' if model else 'keep':8s} {before:8.0f} -> {after:8.0f} us {'AGREE' if thr==model else 'DIFFER'}", flush=True)
            if thr:
                dissolved.add(n); del placed[n]
                for h, m in moves.items():
                    hosts.add(h); placed[h] += m
names = sys.argv[1:] or [n for n in effc.library_names()]
for n in names:
    try: run(n)
    except Exception as e: print(n, "ERR", type(e).__name__, e)
