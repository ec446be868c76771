"""effc's library specs against flash-linear-attention's conventions, at fla's own test cases.

The references here are written from the papers, token by token for the linear family (float64, autograd
for the gradients), and share nothing with effc (not its oracle, not tests/naive.py). What they pin down
is the convention a user porting an fla model relies on:

- state S: [K, V] per head, updated *before* it is read: o_t = scale * q_t^T S_t, S_t including token t
  (fla's chunk_gla, chunk_simple_gla, chunk_retention, chunk_linear_attn, chunk_delta_rule,
  chunk_gated_delta_rule all read S_t; so do effc's specs);
- scale multiplies q (default K^-1/2), and `scale=` overrides it;
- gates are log decays, applied as exp(g): per key channel (gla, [B, T, H, K]) or per head (simple_gla,
  gated_delta_net, [B, T, H]); retention's decay is fixed per head, gamma_h = 1 - 2^(-5 - h);
- the delta rule in fla's form S_t = S_{t-1} - beta_t k_t (k_t^T S_{t-1}) + beta_t k_t v_t^T (gated:
  S_{t-1} first multiplied by exp(g_t)), q and k as given (fla's default use_qk_l2norm_in_kernel=False;
  fla's tests normalise them before the call, and so do these);
- FoX: dense causal softmax of scale * q_i.k_j + F_i - F_j, F the cumulative sum of the log forget gate;
- initial and final states [N, H, K, V], one per sequence with cu_seqlens, whose sequences do not see each
  other (an empty sequence passes its initial state through unchanged).

Convention differences found between effc's library and fla (see the report of the commit):
- linear_attn: fla's `chunk_linear_attn` *function* defaults to normalize=True (o_t divided by
  scale * q_t . sum_{s<=t} k_s, with a second state z); effc's linear_attn has no normaliser. It matches
  fla with normalize=False, which is what fla's LinearAttention layer passes by default
  (do_feature_map_norm=False) and what fla's own tests compare. These tests use normalize=False.
- gla: the same convention; fla's strong gates (normaliser 0.1) once overflowed effc's kernel to NaN
  (fixed by passes.decay_dot, see the note above _params).
Every other spec matches fla's convention at every case (RMS ratios ~1e-7 to 7e-5 in fp32).

The judge is fla's: RMS(diff) / RMS(ref) (fla.utils.get_err_ratio), which fla bounds by 0.005 in its
16-bit tests. In fp32 against a float64 reference the kernels do far better, so the bound here is
RATIO_FP32 (1e-4): fla's 0.005 would hide a wrong convention in a small term (a missing decay on one
token, say, moves the output by well under 0.5%).

Cost: every kernel runs in Triton's interpreter. B = 1, H = 1 or 2, a covering set of fla's shapes (every
T in {63, 500, 1000}, every D in {60, 64, 100, 128, 256}, every gate normaliser in {0.1, 1, 10}, an
initial state and a packed batch with an empty sequence, for every spec) rather than their product; three
larger cases per spec are marked slow (T * D of 50K to 128K), and the long ones run with interpreter-only
tile knobs (cpu_knobs). On a shared 2-core machine: ~45 s for the fast tier, ~2 min for the slow one.
tests/gpu/test_fla_conventions_bf16.py runs the same references against fp16 and bf16 kernels on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import effc

# Measured: 1e-7 to 1e-5 for the linear family; FoX up to 7e-5 (dq, dk, df at T = 500 with gates / 0.1: its
# prefix F = cumsum(log f) reaches ~-4000 in fp32, and the logit's F_i - F_j keeps fewer digits of it)
RATIO_FP32 = 1e-4
RATIO_FLA = 0.005  # fla's bound (fla.utils.assert_close with ratio 0.005)

SPECS = ("gla", "simple_gla", "retention", "linear_attn", "delta_net", "gated_delta_net", "forgetting_transformer")
GATED = {"gla", "simple_gla", "gated_delta_net", "forgetting_transformer"}  # the specs a normaliser applies to


# ---------------------------------------------------------------------------------------------------------
# naive references, one sequence at a time: inputs [T, H, D] in any float dtype, computed in that dtype
# ---------------------------------------------------------------------------------------------------------

def _scan(step, S, xs, out_shape, every=64):
    """S, o_t = step(S, *x_t) for t = 0..T-1; returns (o [T, ...], S_T). Autograd keeps the state only every
    `every` tokens (torch.utils.checkpoint recomputes the tokens between): at T = 1000, D = 256 a plain
    loop would keep ~1 GB of float64 states for the backward."""
    def run(S, *xb):
        outs = []
        for t in range(xb[0].shape[0]):
            S, o = step(S, *(x[t] for x in xb))
            outs.append(o)
        return S, torch.stack(outs)

    T = xs[0].shape[0]
    outs = []
    for a in range(0, T, every):
        S, o = checkpoint(run, S, *(x[a:a + every] for x in xs), use_reentrant=False)
        outs.append(o)
    return (torch.cat(outs) if outs else S.new_zeros((0,) + out_shape)), S


def _read(q, S, scale):
    """o_t = scale * q_t^T S_t, per head: q [H, K], S [H, K, V] -> [H, V]."""
    return scale * torch.einsum("hk,hkv->hv", q, S)


def ref_gla(q, k, v, g, S, scale):
    """GLA (Yang et al. 2024, eq. for the recurrent form): S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T."""
    def step(S, q, k, v, g):
        S = g.exp()[:, :, None] * S + k[:, :, None] * v[:, None, :]
        return S, _read(q, S, scale)
    return _scan(step, S, (q, k, v, g), v.shape[1:])


def ref_simple_gla(q, k, v, g, S, scale):
    """Scalar-gated linear attention (Mamba2's SSD form, fla's simple_gla): S_t = exp(g_t) S_{t-1} + k_t v_t^T."""
    def step(S, q, k, v, g):
        S = g.exp()[:, None, None] * S + k[:, :, None] * v[:, None, :]
        return S, _read(q, S, scale)
    return _scan(step, S, (q, k, v, g), v.shape[1:])


def retention_log_decay(T, H, dtype, device):
    """RetNet (Sun et al. 2023): gamma_h = 1 - 2^(-5 - h) for head h, as fla's chunk_retention sets it."""
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64).log()
    return gamma.to(dtype=dtype, device=device).expand(T, H)


def ref_retention(q, k, v, S, scale):
    return ref_simple_gla(q, k, v, retention_log_decay(q.shape[0], q.shape[1], q.dtype, q.device), S, scale)


def ref_linear_attn(q, k, v, S, scale):
    """Linear attention (Katharopoulos et al. 2020) with the identity feature map and fla's normalize=False:
    S_t = S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t (no division by q_t . sum k)."""
    def step(S, q, k, v):
        S = S + k[:, :, None] * v[:, None, :]
        return S, _read(q, S, scale)
    return _scan(step, S, (q, k, v), v.shape[1:])


def ref_linear_attn_normalized(q, k, v, S, scale):
    """fla's chunk_linear_attn default (normalize=True), no initial z: o_t / (scale * q_t . sum_{s<=t} k_s + 1e-10)."""
    o, S = ref_linear_attn(q, k, v, S, scale)
    z = (scale * q * k.cumsum(0)).sum(-1, keepdim=True) + 1e-10
    return o / z, S


def ref_gated_delta(q, k, v, g, beta, S, scale):
    """The (gated) delta rule (Schlag et al. 2021; Yang et al. 2024, 2025) in fla's recurrent form:
    S <- exp(g_t) S_{t-1}; v'_t = beta_t (v_t - S^T k_t); S_t = S + k_t v'_t^T; o_t = scale * q_t^T S_t."""
    def step(S, q, k, v, g, beta):
        S = g.exp()[:, None, None] * S
        v_new = beta[:, None] * (v - torch.einsum("hk,hkv->hv", k, S))
        S = S + k[:, :, None] * v_new[:, None, :]
        return S, _read(q, S, scale)
    return _scan(step, S, (q, k, v, g, beta), v.shape[1:])


def ref_delta(q, k, v, beta, S, scale):
    return ref_gated_delta(q, k, v, torch.zeros_like(beta), beta, S, scale)


def ref_fox(q, k, v, f, scale):
    """Forgetting Transformer (Lin et al. 2025): softmax_j<=i(scale * q_i.k_j + F_i - F_j) v_j, F = cumsum(log f)."""
    T = q.shape[0]
    Fc = f.cumsum(0).transpose(0, 1)                                                 # [H, T]
    s = scale * torch.einsum("ihd,jhd->hij", q, k) + Fc[:, :, None] - Fc[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", p, v), None


REFERENCES = {"gla": ref_gla, "simple_gla": ref_simple_gla, "retention": ref_retention,
              "linear_attn": ref_linear_attn, "delta_net": ref_delta, "gated_delta_net": ref_gated_delta,
              "forgetting_transformer": ref_fox}


def reference(name, xs, h0=None, cu_seqlens=None, scale=None, dtype=torch.float64):
    """The reference over a (B, T, H, D) batch or a packed (1, total, H, D) one: each sequence alone, from
    its own initial state. Returns (o, final states [N, H, K, V] or None), computed in `dtype`."""
    xs = [x.to(dtype) for x in xs]
    h0 = None if h0 is None else h0.to(dtype)
    K, V = xs[0].shape[-1], xs[2].shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        spans = [(b, 0, xs[0].shape[1]) for b in range(xs[0].shape[0])]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, a, e) for a, e in zip(bounds, bounds[1:])]
    outs, finals = [], []
    for i, (b, a, e) in enumerate(spans):
        seq = [x[b, a:e] for x in xs]
        if name == "forgetting_transformer":
            o, _ = ref_fox(*seq, scale)
        else:
            H = seq[0].shape[1]
            S0 = h0[i] if h0 is not None else seq[0].new_zeros(H, K, V)
            o, S = REFERENCES[name](*seq, S0, scale)
            finals.append(S)
        outs.append(o)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    return o, (torch.stack(finals) if finals else None)


# ---------------------------------------------------------------------------------------------------------
# inputs, drawn as fla's tests draw them
# ---------------------------------------------------------------------------------------------------------

def draw(name, T, D, H, normalizer, seed=42, n_states=1):
    """(inputs in effc's order, h0 [n_states, H, D, D]): q, k, v ~ randn; gates logsigmoid(randn) / normalizer
    (0.1: strong decay, each step ~exp(-8); 10: weak); beta = sigmoid(randn); the delta rule's q, k
    L2-normalised (fla's tests: F.normalize before the call). fp32, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(shape, generator=gen)  # noqa: E731
    q, k, v = randn(1, T, H, D), randn(1, T, H, D), randn(1, T, H, D)
    gate = lambda *shape: F.logsigmoid(randn(*shape)) / normalizer  # noqa: E731
    if name == "gla":
        xs = [q, k, v, gate(1, T, H, D)]
    elif name in ("simple_gla", "forgetting_transformer"):
        xs = [q, k, v, gate(1, T, H)]
    elif name in ("retention", "linear_attn"):
        xs = [q, k, v]
    elif name == "delta_net":
        xs = [F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, randn(1, T, H).sigmoid()]
    elif name == "gated_delta_net":
        xs = [F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, gate(1, T, H), randn(1, T, H).sigmoid()]
    else:
        raise KeyError(name)
    return xs, randn(n_states, H, D, D)


def rms_ratio(got, ref) -> float:
    """fla's get_err_ratio: RMS(got - ref) / RMS(ref)."""
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).square().mean().sqrt() / (ref.square().mean().sqrt() + 1e-8)).item()


# ---------------------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------------------

# gla's strong gates (fla's logsigmoid(x) / 0.1, about -8 per step) once overflowed: k * exp(-cumsum(g))
# leaves fp32 after ~11 tokens. passes.decay_dot now evaluates that product from its exponents (sub-chunk
# anchors and a pairwise diagonal once a chunk's decay exceeds the matmul dtype), and these cases run
# like the others.


@dataclass(frozen=True)
class Case:
    T: int
    D: int
    H: int = 1
    normalizer: float = 1.0
    h0: bool = False
    cu_seqlens: tuple[int, ...] | None = None    # packed sequences (B = 1); T is their total
    scale: float | None = None                   # None: effc's and fla's default K^-1/2
    slow: bool = False

    def id(self, name):
        parts = [f"T{self.T}", f"D{self.D}", f"H{self.H}"]
        if name in GATED:
            parts.append(f"gate{self.normalizer:g}")
        if self.h0:
            parts.append("h0")
        if self.cu_seqlens:
            parts.append("varlen" + "-".join(map(str, self.cu_seqlens)))
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        return "-".join(parts)


# one covering set for every spec: each T, each D, each normaliser (for the gated specs), an initial state and
# a packed batch whose second sequence is empty (fla's varlen tests: [0, 15], [0, 0, 16], [0, 256, 500, 1000])
# (H = 2 where the heads differ in more than their inputs: retention's per-head decay, at T = 63)
VARLEN = (0, 15, 15, 100, 300, 500)
CASES = (
    Case(63, 64, H=2, normalizer=1, h0=True),
    Case(63, 256, normalizer=10, h0=True, scale=0.1),              # fla tests scale 0.1 too
    Case(500, 60, normalizer=1),                                   # non-power-of-two D (fla: B2-T500-H4-D60)
    Case(500, 128, normalizer=0.1, h0=True, cu_seqlens=VARLEN),
    Case(1000, 64, normalizer=10),
    Case(500, 128, normalizer=0.1, h0=True, slow=True),
    # the two widest run at T = 500 (8 chunks of 64 and a ragged tail), not 1000: T = 1000 is Case(1000, 64)'s,
    # D = 256 Case(63, 256)'s too, and T = 1000 at these D cost ~2x for no value of T, D or gate not run above
    Case(500, 100, normalizer=10, h0=True, slow=True),            # non-power-of-two D
    Case(500, 256, normalizer=1, h0=True, slow=True),
)


def cpu_knobs(name, case):
    """Tile knobs for the interpreter only (cost, not semantics): the interpreter runs programs one after
    another, so the long cases run one V block, one segment, and for FoX 64 x 64 blocks (its interpreter
    default is 16 x 16, 16x the programs). The short cases keep the tiling model's choice."""
    if case.T < 500:
        return {}
    if name == "forgetting_transformer":
        return {"chunk": 64, "block": 64}
    knobs = {"block": max(16, 1 << (case.D - 1).bit_length())}  # one block: V padded to a power of two
    if name in ("gla", "simple_gla", "retention", "linear_attn"):  # segmentable: one segment
        knobs["segments"] = 1
    return knobs


def _params():
    out = []
    for name in SPECS:
        for c in CASES:
            marks = []
            if c.slow:
                marks.append(pytest.mark.slow)
            out.append(pytest.param(name, c, id=f"{name}-{c.id(name)}", marks=marks))
    return out


# ---------------------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------------------

def run_case(name, case, device="cpu", dtype=torch.float32, knobs=None):
    """effc's output, final state and gradients (q, k, v, gates, h0) against the float64 reference's, and the
    same reference run in `dtype` (its own rounding error, for the 16-bit judge). Returns
    {quantity: (effc's ratio, the low-precision reference's ratio)}."""
    op = effc.load(name)
    has_state = name != "forgetting_transformer"
    cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, dtype=torch.int32, device=device)
    n_seq = 1 if cu is None else len(case.cu_seqlens) - 1
    xs, h0 = draw(name, case.T, case.D, case.H, case.normalizer, n_states=n_seq)
    xs = [x.to(device=device, dtype=dtype) for x in xs]
    h0 = h0.to(device) if case.h0 and has_state else None   # fp32 states, as fla keeps them
    gen = torch.Generator().manual_seed(7)
    d_o = torch.randn(xs[2].shape, generator=gen).to(device)
    d_s = torch.randn((n_seq, case.H, case.D, case.D), generator=gen).to(device) if has_state else None
    names = [d.name for d in op.spec.inputs] + (["h0"] if h0 is not None else [])

    def grads(fn, leaves):
        leaves = [x.detach().clone().requires_grad_() for x in leaves]
        o, s = fn(leaves)
        loss = (o * d_o.to(o.dtype)).sum()
        if s is not None:
            loss = loss + (s * d_s.to(s.dtype)).sum()
        loss.backward()
        return o.detach(), (None if s is None else s.detach()), [x.grad for x in leaves]

    leaves = xs + ([h0] if h0 is not None else [])
    kw = dict(cu_seqlens=cu, output_final_state=has_state, **(knobs or {}))
    if case.scale is not None:
        kw["scale"] = case.scale

    def effc_fn(ls):
        return op(*ls[:len(xs)], initial_state=ls[len(xs)] if h0 is not None else None, **kw)

    def ref_fn(ref_dtype):
        return lambda ls: reference(name, ls[:len(xs)], ls[len(xs)] if h0 is not None else None, cu, case.scale,
                                    ref_dtype)

    got = grads(effc_fn, leaves)            # effc first: a head dim it rejects raises before the reference runs
    ref = grads(ref_fn(torch.float64), leaves)
    low = grads(ref_fn(dtype), leaves) if dtype != torch.float32 else None

    def flat(r):
        o, s, g = r
        return [("o", o)] + ([("ht", s)] if s is not None else []) + [(f"d{n}", x) for n, x in zip(names, g)]

    res = {}
    for i, ((q, a), (_, b)) in enumerate(zip(flat(got), flat(ref))):
        assert a is not None and a.shape == b.shape, f"{name} {q}: shape {None if a is None else a.shape} vs {b.shape}"
        low_ratio = rms_ratio(flat(low)[i][1], b) if low is not None else None
        res[q] = (rms_ratio(a, b) if torch.isfinite(a).all() else math.nan, low_ratio)
    return res


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The float64 references are thousands of small ops; on a loaded 2-core machine two torch threads made
    them ~10x slower than one (measured: 8 s against 0.4 s at T = 500, D = 128)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name,case", _params())
def test_matches_fla_convention(name, case):
    res = run_case(name, case, knobs=cpu_knobs(name, case))
    report = ", ".join(f"{q} {r:.1e}" for q, (r, _) in res.items())
    print(f"{name} {case.id(name)}: {report}")
    bad = {q: r for q, (r, _) in res.items() if not r < RATIO_FP32}   # NaN (non-finite output) fails too
    assert not bad, f"{name} {case.id(name)}: RMS(diff)/RMS(ref) over {RATIO_FP32:g} (fla's bound {RATIO_FLA:g}) " \
                    f"for {', '.join(f'{q} {r:.2e}' for q, r in bad.items())}; all: {report}"


def test_linear_attn_is_fla_unnormalized():
    """effc's linear_attn is fla's normalize=False form, not its chunk_linear_attn default (normalize=True):
    the two differ by the per-token divisor scale * q_t . sum_{s<=t} k_s. Positive q, k (rand, as a feature
    map would give) keep that divisor away from 0, so the difference is not noise."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand((1, 63, 1, 64), generator=gen) for _ in range(3))
    o, _ = effc.load("linear_attn")(q, k, v)
    unnormalized, _ = reference("linear_attn", [q, k, v])
    seq = [x[0].double() for x in (q, k, v)]
    normalized, _ = ref_linear_attn_normalized(*seq, seq[0].new_zeros(1, 64, 64), 64 ** -0.5)
    assert rms_ratio(o, unnormalized) < RATIO_FP32
    assert rms_ratio(o, normalized[None]) > 1.0


def test_references_agree_with_a_dense_form():
    """The references themselves, checked against a closed form written differently: for simple_gla (hence
    retention), o = ((scale q k^T) * exp(G_i - G_j) masked to j <= i) v + scale * (q * exp(G)) h0, G the
    cumulative log decay; and the delta rule with beta = 0 leaves h0 alone."""
    gen = torch.Generator().manual_seed(1)
    T, H, D = 40, 2, 8
    q, k, v, h0 = (torch.randn(s, generator=gen, dtype=torch.float64) for s in [(T, H, D)] * 3 + [(H, D, D)])
    g = F.logsigmoid(torch.randn((T, H), generator=gen, dtype=torch.float64))
    o, S = ref_simple_gla(q, k, v, g, h0, 0.3)
    G = g.cumsum(0).T                                                            # [H, T]
    decay = (G[:, :, None] - G[:, None, :]).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    dense = torch.einsum("hij,jhv->ihv", 0.3 * torch.einsum("ihd,jhd->hij", q, k) * decay.exp(), v)
    dense = dense + 0.3 * torch.einsum("ihk,hkv->ihv", q * G.T.exp()[..., None], h0)
    assert torch.allclose(o, dense, atol=1e-10)
    to_end = (G[:, -1:].T - G.T).exp()[..., None]                                # [T, H, 1]
    S_dense = G[:, -1].exp()[:, None, None] * h0 + torch.einsum("jhk,jhv->hkv", k * to_end, v)
    assert torch.allclose(S, S_dense, atol=1e-10)
    kn = F.normalize(k, dim=-1)
    o, S = ref_delta(q, kn, v, torch.zeros(T, H, dtype=torch.float64), h0, 0.3)
    assert torch.allclose(S, h0) and torch.allclose(o, 0.3 * torch.einsum("ihk,hkv->ihv", q, h0))
    # beta = 1 with a unit key overwrites what the state recalls for that key: k_t^T S_t = v_t
    _, S = ref_delta(q[:1], kn[:1], v[:1], torch.ones(1, H, dtype=torch.float64), h0, 0.3)
    assert torch.allclose(torch.einsum("hk,hkv->hv", kn[0], S), v[0])
