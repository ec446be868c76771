"""On the GPU: tests/test_fla_conventions.py's fla conventions with fp16 and bf16 inputs.

The same naive references (float64 on the GPU, token by token) and fla's judge: RMS(diff) / RMS(ref) < 0.005
for the output, the final state and every gradient (q, k, v, gates, h0), unless the reference's own 16-bit
error is larger (the same reference run with its inputs, initial state and arithmetic in the 16-bit dtype,
against float64): then within 2x of that. Initial states stay fp32, as fla keeps them. T in {63, 1000},
D in {64, 128}, fla's gates logsigmoid(randn) / normaliser at 1, and at 0.1 (strong) and 10 (weak) for
T = 1000, D = 128. Kernels take the tiling model's defaults (no interpreter knobs)."""
import pytest
import torch

from test_fla_conventions import GATED, RATIO_FLA, SPECS, Case, run_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CASES = tuple(Case(T, D, H=2, normalizer=1, h0=True) for T in (63, 1000) for D in (64, 128)) + (
    Case(1000, 128, H=2, normalizer=0.1, h0=True),
    Case(1000, 128, H=2, normalizer=10, h0=True),
)


def _params():
    out = []
    for name in SPECS:
        for c in CASES:
            if c.normalizer != 1 and name not in GATED:
                continue  # a normaliser changes nothing without a gate
            for tag in DTYPES:
                out.append(pytest.param(name, c, tag, id=f"{name}-{c.id(name)}-{tag}"))
    return out


@pytest.mark.parametrize("name,case,tag", _params())
def test_16bit_matches_fla_convention(name, case, tag):
    res = run_case(name, case, device="cuda", dtype=DTYPES[tag])
    rows, bad = [], []
    for q, (r, low) in res.items():
        bound = max(RATIO_FLA, 2 * low)
        rows.append(f"{q} {r:.2e} (16-bit ref {low:.2e}, bound {bound:.2e})")
        if not r < bound:  # NaN fails
            bad.append(rows[-1])
    print(f"{name} {case.id(name)} {tag}: " + "; ".join(rows))
    assert not bad, f"{name} {case.id(name)} {tag}: " + "; ".join(bad)
