"""GPU check of the select stage (issue 22), not run yet: bf16 error against the fp64 oracle beside the bf16
reference's, how often the kernels' choice differs from the naive fp64 one, and fwd / fwd+bwd times of moba.attn
against effc's dense causal walk, SDPA and FlexAttention walking effc's own choice (a BlockMask built
from op.select_blocks, outside the timing: effc/tools/softmax_peers.py) at 8x2048, 2x8192, 1x32768 (H=16,
D=128). moba's time includes its select kernels; Flex's does not include making the choice.

    PYTHONPATH=. python scripts/select_gpu_check.py
"""
import sys

import torch
from triton.testing import do_bench

import effc
from effc.tools.softmax_peers import PEERS_SOFTMAX

sys.path.insert(0, "tests")
from naive_softmax import block_choice  # noqa
dev = "cuda"
SMALL = '''
import "moba.attn"
spec moba_k4 extends moba {
  select {
    block 64
    g = q @ blockmean(k).T
    mask kblock < qblock
    force kblock == qblock
    topk(g, 4)
  }
}
'''
op4 = effc.loads(SMALL, "moba_k4")
torch.manual_seed(0)
T, H, D = 1024, 4, 128
q, k, v = (torch.randn(1, T, H, D, device=dev) for _ in range(3))
xb = [x.bfloat16() for x in (q, k, v)]
o, _ = op4(*xb)
ref64, _ = op4.reference(q.double(), k.double(), v.double())
refb, _ = op4.reference(*xb, dtype=torch.float32, matmul_dtype=torch.bfloat16)
e_k = (o.double() - ref64).abs().max().item(); e_r = (refb.double() - ref64).abs().max().item()
print(f"bf16 fwd err vs fp64 oracle {e_k:.3e}; bf16 reference's {e_r:.3e}; ratio {e_k / e_r:.2f}")
ch = op4.select_blocks(*xb).permute(0, 2, 1, 3).cpu()
nv = block_choice(q.cpu().bfloat16().double(), k.cpu().bfloat16().double(), 64, 4)
print(f"choice: {(ch != nv).float().mean().item():.4%} of (query, block) entries differ from the fp64 naive choice on the same bf16 inputs")
nv32 = block_choice(q.cpu().double(), k.cpu().double(), 64, 4)
print(f"choice: {(ch != nv32).float().mean().item():.4%} differ from the fp64 choice on the fp32 inputs (bf16 rounding of q, k)")
op = effc.load("moba"); dense = effc.load("softmax_attn")
for (B, T, H) in ((8, 2048, 16), (2, 8192, 16), (1, 32768, 16)):
    xs = [torch.randn(B, T, H, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    g = torch.randn(B, T, H, 128, device=dev, dtype=torch.bfloat16)
    for name, f in (("moba k16 b64", op), ("effc dense causal", dense)):
        try:
            fw = do_bench(lambda: f(*xs), warmup=3, rep=20)
            def fb():
                out, _ = f(*xs); out.backward(g)
            fbt = do_bench(fb, warmup=3, rep=20, grad_to_none=xs)
            print(f"{B}x{T} H{H}: {name}: fwd {fw:.2f} ms, fwd+bwd {fbt:.2f} ms")
        except Exception as e:
            print(f"{B}x{T}: {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
    def sd():
        qq, kk, vv = (x.transpose(1, 2) for x in xs)
        return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
    def sdb():
        sd().backward(g.transpose(1, 2))
    try:
        _, _, build = next(p for p in PEERS_SOFTMAX["moba"] if "FlexAttention" in p[0])
        flex = build(xs, {"scale": 128 ** -0.5})
        ff = do_bench(flex, warmup=3, rep=20)
        ffb = do_bench(lambda: flex().backward(g), warmup=3, rep=20)
        print(f"{B}x{T} H{H}: FlexAttention, effc's BlockMask: fwd {ff:.2f} ms, fwd+bwd {ffb:.2f} ms")
    except Exception as e:
        print(f"{B}x{T}: FlexAttention: FAILED {type(e).__name__}: {str(e)[:300]}")
    print(f"{B}x{T} H{H}: SDPA flash dense: fwd {do_bench(sd, warmup=3, rep=20):.2f} ms, fwd+bwd {do_bench(sdb, warmup=3, rep=20, grad_to_none=xs):.2f} ms")
    sys.stdout.flush()
