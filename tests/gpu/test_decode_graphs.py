"""Decoding replayed from a CUDA graph, as servers run it: op.decode reads nothing on the host while a graph
is captured (the launches are sized by the cache's room, not the longest context), so a captured step,
replayed after the new tokens and the lengths change in place, gives what an eager step gives for them (the
split-KV decode may split the keys differently: equal within bf16 rounding)."""
import pytest
import torch

import effc
from effc.runtime.verify import rel_err
from effc.tools.bench_decode import captured, decode_call

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", ["softmax_attn", "infllm_v2", "moba"])
def test_a_captured_step_replays_what_eager_computes(name):
    op = effc.load(name)
    step = decode_call(op, 3, 3000, 8, 2, 128, 1)
    lens = torch.tensor([100, 2999, 1700], dtype=torch.int32, device="cuda")

    def decode():
        return op.decode(*step.tokens, cache=step.cache, cache_seqlens=lens)
    replay, out = captured(decode)
    for seed, new_lens in ((1, [5, 2000, 2999]), (2, [0, 64, 1234])):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for t in step.tokens:
            t.copy_(torch.randn(t.shape, generator=g, device="cuda", dtype=torch.float32).to(t.dtype))
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        replay()
        eager = decode()  # writes the same tokens at the same rows of the cache
        err = rel_err(out.float(), eager.float())
        print(f"{name} lengths {new_lens}: replay against eager, relative difference {err:.2e}")
        assert err < 1e-2, (name, new_lens, err)
