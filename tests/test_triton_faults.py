"""The call-time choices that avoid known Triton miscompiles (policy.triton_faults), checked on the CPU with
the GPU's answers faked: which plans they touch, and that the op's configuration follows them."""
import pytest
import torch

import effc
from effc.compiler import compile_file
from effc.policy import triton_faults
from effc.policy.triton_faults import LONG_DOT_CHAIN, block_limit, longest_dot_chain

CUDA = torch.device("cuda", 0)


@pytest.fixture
def affected(monkeypatch):
    monkeypatch.setattr(triton_faults, "hopper_dot_miscompile", lambda index: True)
    monkeypatch.setattr(triton_faults, "hopper", lambda index: True)


@pytest.fixture
def untuned_h100(affected, monkeypatch):
    """An affected GPU of 132 SMs with no `effc tune` entry: the op's config is the model's."""
    import effc.policy.tuning as tuning
    monkeypatch.setattr(tuning, "sm_count", lambda device: 132)
    monkeypatch.setattr(tuning, "lookup", lambda *a, **k: None)


def test_long_dot_chains_are_counted_per_gradient_kernel():
    for long in ("hdla", "mesanet", "log_linear_attn"):  # the three faulted at 64-wide blocks on the H200
        assert longest_dot_chain(compile_file(long).plan.kernels) > LONG_DOT_CHAIN, long
    for short in ("rwkv7", "gated_delta_net", "gla", "softmax_attn"):
        assert longest_dot_chain(compile_file(short).plan.kernels) <= LONG_DOT_CHAIN, short


def test_block_limit_only_where_the_miscompile_is(affected, monkeypatch):
    kernels = compile_file("hdla").plan.kernels
    assert block_limit(kernels, CUDA) == 32
    assert block_limit(compile_file("rwkv7").plan.kernels, CUDA) is None
    assert block_limit(kernels, torch.device("cpu")) is None
    monkeypatch.setattr(triton_faults, "hopper_dot_miscompile", lambda index: False)
    assert block_limit(kernels, CUDA) is None


def test_the_op_narrows_its_block_and_says_why(untuned_h100):
    op = effc.load("hdla")
    cfg = op.config(2, 2048, 16, {d: 128 for d in op.spec.dims}, "cuda:0")
    assert cfg.block == 32 and any("miscompiles" in r for r in cfg.reasons), cfg
    given = op.config(2, 2048, 16, {d: 128 for d in op.spec.dims}, "cuda:0", block=64)
    assert given.block == 64  # an explicit block is the user's call


def test_a_refused_backward_does_not_narrow_the_forwards_block(untuned_h100):
    """mesanet's backward is refused on the affected GPU at every block (its square state), so the 32-wide
    block that avoids the long chains' miscompile would only repeat its forward's CG steps per block."""
    op = effc.load("mesanet")
    assert block_limit(op.comp.plan.kernels, CUDA) == 32
    cfg = op.config(8, 2048, 16, {d: 128 for d in op.spec.dims}, "cuda:0")
    assert cfg.block > 32 and any("backward is refused" in r for r in cfg.reasons), cfg


def test_backward_warps_four_only_for_long_dot_chains(affected, monkeypatch):
    from effc.policy.triton_faults import FOUR_WARP_CHAIN, backward_warps, dot_chain

    def longest(name):
        return max((k for k in compile_file(name).plan.kernels if k.backward), key=dot_chain)

    long, short = longest("rwkv7"), longest("zeros")
    assert dot_chain(long) > FOUR_WARP_CHAIN >= dot_chain(short)
    assert backward_warps(4, long, CUDA) == 4  # 8 warps miscompiled rwkv7's gradients
    assert backward_warps(4, short, CUDA) == 8  # 4 warps miscompiled zeros' looping gradient kernels
    for name in ("delta_net", "gated_delta_net_l2", "mlstm_sig"):  # the delta rules' 15-16: right at 8
        assert backward_warps(4, longest(name), CUDA) == 8, name
    # per kernel: a plan's short kernels keep 8 warps beside its long one
    kernels = [k for k in compile_file("rwkv7").plan.kernels if k.backward]
    assert {backward_warps(4, k, CUDA) for k in kernels} == {4, 8}
    monkeypatch.setattr(triton_faults, "hopper_dot_miscompile", lambda index: False)
    assert backward_warps(4, long, CUDA) == 8
    assert backward_warps(8, long, torch.device("cpu")) == 8


def test_backwards_that_fault_are_refused_with_the_reason(affected, monkeypatch):
    from effc.policy.triton_faults import backward_fault

    def fault(name, block, D=128):
        spec = effc.load(name).spec
        return backward_fault(spec.states, {d: D for d in spec.dims}, "V", block, CUDA)

    assert "square state (G: [K, K])" in fault("mesanet", 32) and fault("mesanet", 16, D=64)
    assert "65536 state elements" in fault("log_linear_attn", 32)
    for name in ("zeros", "rwkv7", "hdla", "lion_s", "delta_net"):  # these ran right on the affected GPU
        assert fault(name, 64) is None and fault(name, 128) is None, name
    assert backward_fault(effc.load("mesanet").spec.states, {"K": 128, "V": 128}, "V", 32, torch.device("cpu")) is None
    # Triton 3.7.1 ends the dot miscompiles but not these faults (H100, 2026-12-06): refused on sm_90 still
    monkeypatch.setattr(triton_faults, "hopper_dot_miscompile", lambda index: False)
    assert "Triton 3.6.0 and 3.7.1" in fault("mesanet", 32)
    monkeypatch.setattr(triton_faults, "hopper", lambda index: False)  # another GPU
    assert fault("mesanet", 32) is None


def test_a_refused_backward_raises_before_any_launch(monkeypatch):
    import effc.runtime.launch as launch
    from effc.runtime.verify import random_inputs

    monkeypatch.setattr(launch, "backward_fault", lambda *a: "the reason")
    op = effc.load("mesanet")
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, 16, 1, {d: 16 for d in op.spec.dims})]
    out = op(*xs)
    from effc.errors import BackwardRefused
    assert issubclass(BackwardRefused, NotImplementedError)  # what a caller of an unlowered feature catches
    with pytest.raises(BackwardRefused, match="mesanet: the reason"):
        (out[0] if isinstance(out, tuple) else out).sum().backward()


@pytest.mark.parametrize("version,warns", [("3.5.1", True), ("3.6.0", False), ("3.9.0+git1234", False),
                                           ("3.10.0", True)])
def test_a_triton_outside_the_tested_range_warns_once(monkeypatch, version, warns):
    import warnings

    monkeypatch.setattr(triton_faults.triton, "__version__", version)
    triton_faults.warn_untested_triton.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        effc.load("retention")
        effc.load("softmax_attn")
    triton_faults.warn_untested_triton.cache_clear()
    said = [str(w.message) for w in caught if "effc is tested with Triton" in str(w.message)]
    assert len(said) == (1 if warns else 0), said
    if warns:
        assert f"this is Triton {version}" in said[0] and "3.6 to 3.9" in said[0]
