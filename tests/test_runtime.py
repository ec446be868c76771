"""The op boundary: bad tensors get errors that name the argument and the expected shape;
the generated module is cached on disk by a hash of its source."""
import pytest
import torch

import effc
import effc.library
from effc.errors import ArgumentError
from effc.runtime.verify import random_inputs

OP = effc.load("gla")
GOOD = random_inputs(OP.spec, 1, 20, 2, {"K": 16, "V": 16})


def _call(*xs, **kw):
    return OP(*xs, chunk=16, **kw)


@pytest.mark.parametrize("mutate, message", [
    (lambda q, k, v, g: (q, k, v), "gla takes 4 tensors (q, k, v, g), got 3"),
    (lambda q, k, v, g: (q[0], k, v, g), "argument 'q' must have shape (B, T, H, K), got (20, 2, 16)"),
    (lambda q, k, v, g: (q, k[:, :10], v, g), "argument 'k' has T=10 but 'q' has T=20"),
    (lambda q, k, v, g: (q, k, v, g[..., :8]), "argument 'g' has K=8 but 'q' has K=16"),
    (lambda q, k, v, g: (q, k, v.to(torch.int32), g), "argument 'v' has dtype torch.int32"),
    (lambda q, k, v, g: (q, k, v.numpy(), g), "argument 'v' must be a torch.Tensor of shape (B, T, H, V)"),
])
def test_bad_tensors_are_named(mutate, message):
    with pytest.raises(ArgumentError) as e:
        _call(*mutate(*GOOD))
    assert message in str(e.value)


def test_bad_initial_state():
    with pytest.raises(ArgumentError, match=r"initial_state 'S' must have shape \(1, 2, 16, 16\) \(B, H, K, V\)"):
        _call(*GOOD, initial_state=torch.zeros(1, 2, 16))
    with pytest.raises(ArgumentError, match="initial_state must hold 1 tensor"):
        _call(*GOOD, initial_state=(torch.zeros(1, 2, 16, 16),) * 2)


def test_unknown_param_and_bad_tiling():
    with pytest.raises(ArgumentError, match=r"gla has no parameter\(s\) \['temperature'\]"):
        _call(*GOOD, temperature=2.0)
    with pytest.raises(ArgumentError, match="block must be a power of two >= 16, got 12"):
        _call(*GOOD, block=12)
    with pytest.raises(effc.SpecError, match=r"tiling constraint BLOCK <= PadTo\(V\) fails .*BLOCK is at most V padded"):
        _call(*GOOD, block=32)


def test_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ArgumentError, match="CPU tensors need TRITON_INTERPRET=1"):
        _call(*GOOD)


def test_module_cached_on_disk_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFC_CACHE_DIR", str(tmp_path))
    text = (effc.library.LIBRARY_DIR / "linear_attn.attn").read_text().replace("linear_attn", "cache_probe")
    op = effc.loads(text)
    op.module  # noqa: B018 - compiles and caches
    files = list((tmp_path / "kernels").glob("effc_gen_cache_probe_*.py"))
    assert len(files) == 1 and files[0].read_text() == op.comp.source()
    assert effc.loads(text).module is op.module  # same source, same module


def test_random_inputs_follow_the_annotations():
    """What each annotation promises is what `effc check` and the tests draw: unitnorm rows of L2 norm 1 (the
    un-normalised delta rule is stable only for ||k||^2 beta < 2), logdecay <= 0, unit in (0, 1), positive > 0."""
    op = effc.loads("""
spec drawn {
  input q: [B, T, H, K]
  input k: [B, T, H, K] unitnorm
  input g: [B, T, H] logdecay
  input beta: [B, T, H] unit
  input p: [B, T, H, V] positive
  output o: [B, T, H, V]
  state S: [K, V]
  intra { kb = k * beta[:, None] * exp(g)[:, None] }
  merge { o = q @ S + p }
  inter { S = S + kb.T @ p }
}""")
    q, k, g, beta, p = random_inputs(op.spec, 2, 50, 3, {"K": 16, "V": 8})
    assert torch.allclose(k.norm(dim=-1), torch.ones(2, 50, 3)) and not torch.allclose(q.norm(dim=-1), k.norm(dim=-1))
    assert (g <= 0).all() and ((beta > 0) & (beta < 1)).all() and (p > 0).all()


def test_low_precision_judge_floors_at_fp32_summation_order():
    """A gradient no 16-bit rounding reaches matches the reference to fp32 summation order; the judge lets
    that through (the H200 gave 4.3e-6 against a bound of 2x 1.0e-6) but not an error of bf16's size."""
    from effc.runtime.verify import judge_low_precision
    gen = torch.Generator().manual_seed(0)
    oracle = torch.randn(4096, generator=gen, dtype=torch.float64)
    reference = oracle * (1 + 1e-6)
    assert judge_low_precision(oracle * (1 + 4.3e-6), oracle, reference).ok
    assert not judge_low_precision(oracle * (1 + 4e-3), oracle, reference).ok
