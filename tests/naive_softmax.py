"""Independent references for the softmax family, written by hand from the papers: plain PyTorch
softmax over an explicit [T, T] mask, float64. They share nothing with effc's oracle."""
import torch

from naive import rope  # RoFormer's rotation, shared with the linear references


def attend(q, k, v, mask, bias=None, scale=None, cap=None, logit_map=None):
    """softmax(q k^T * scale (+ bias), masked) v for (B, T, H, D) tensors; k, v may have fewer heads."""
    q, k, v = (x.double() for x in (q, k, v))
    H = q.shape[2]
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    v = v.repeat_interleave(H // v.shape[2], dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if logit_map is not None:
        s = logit_map(s)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query that sees no key reads 0
    return torch.einsum("bhij,bjhd->bihd", p, v), torch.logsumexp(s, dim=-1).transpose(1, 2)


def positions(T):
    i = torch.arange(T).reshape(T, 1)
    j = torch.arange(T).reshape(1, T)
    return i, j


def causal(T):
    i, j = positions(T)
    return j <= i


def softmax_attn(q, k, v):
    return attend(q, k, v, causal(q.shape[1]))[0]


def softmax_full(q, k, v):
    T = q.shape[1]
    return attend(q, k, v, torch.ones(T, T, dtype=torch.bool))[0]


def sliding_window(q, k, v, window=1024):
    i, j = positions(q.shape[1])
    return attend(q, k, v, (j <= i) & (i - j < window))[0]


def sink_window(q, k, v, sink, window=128):
    """gpt-oss attention (arXiv:2508.10925): the per-head sink logit is one more softmax column whose value
    is 0, written as that column appended to the masked scores."""
    B, T, H, D = q.shape
    q, k, v = q.double(), _heads_like(k, H), _heads_like(v, H)               # grouped heads: shared k, v
    i, j = positions(T)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * D ** -0.5
    s = s.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    col = sink.double().transpose(1, 2)[..., None]                           # (B, H, T, 1)
    p = torch.softmax(torch.cat([s, col], -1), dim=-1)[..., :T]
    return torch.einsum("bhij,bjhd->bihd", p, v)


def alibi(q, k, v):
    T, H = q.shape[1], q.shape[2]
    i, j = positions(T)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    bias = -slopes.reshape(1, H, 1, 1) * (i - j).double()
    return attend(q, k, v, j <= i, bias=bias)[0]


def softcap(q, k, v, cap=50.0):
    return attend(q, k, v, causal(q.shape[1]), cap=cap)[0]


def forgetting_transformer(q, k, v, f):
    F = f.double().cumsum(1).transpose(1, 2)  # (B, H, T)
    bias = F[..., :, None] - F[..., None, :]
    return attend(q, k, v, causal(q.shape[1]), bias=bias)[0]


def scale_invariant(q, k, v, tau=10.0):
    i, j = positions(q.shape[1])
    t = (i - j).clamp_min(0).double()
    lt = torch.log1p(t / tau)
    return attend(q, k, v, j <= i, logit_map=lambda s: torch.sqrt(2 * lt + 1) * s - lt)[0]


def gated_attention(q, k, v, g):
    return softmax_attn(q, k, v) * torch.sigmoid(g.double())


def swax(q, k, v, g, window=512, initial_state=None):
    """Sliding-window softmax plus a scalar-decay linear attention state (token by token)."""
    from naive import diagonal_recurrence
    i, j = positions(q.shape[1])
    local = attend(q, k, v, (j <= i) & (i - j < window))[0]
    decay = g.double().exp()[..., None].expand(q.shape)
    lin, state = diagonal_recurrence(q, k, v, decay, q.shape[-1] ** -0.5, initial_state)
    return local + lin, state


def based(q, k, v, window=64):
    """Based as its paper writes it: the Taylor feature map phi(x) = [1, x, vec(x x^T) / sqrt(2)] of
    x * scale^(1/2), a token-by-token recurrence of the state sum phi(k) v^T and normaliser sum phi(k),
    plus a sliding-window softmax."""
    q, k, v = (x.double() for x in (q, k, v))
    B, T, H, K = q.shape
    root = K ** -0.25  # phi(q).phi(k) then expands 1 + s + s^2/2 with s = q.k / sqrt(K)

    def phi(x):
        x = x * root
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / 2 ** 0.5
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)

    S = q.new_zeros(B, H, 1 + K + K * K, v.shape[-1])
    z = q.new_zeros(B, H, 1 + K + K * K)
    linear = torch.empty_like(v)
    for t in range(T):
        fk, fq = phi(k[:, t]), phi(q[:, t])
        S = S + fk[..., :, None] * v[:, t, :, None, :]
        z = z + fk
        linear[:, t] = torch.einsum("bhf,bhfd->bhd", fq, S) / torch.einsum("bhf,bhf->bh", fq, z)[..., None]
    i, j = positions(T)
    return linear + attend(q, k, v, (j <= i) & (i - j < window))[0]


def nsa_cmp(q, kc, vc, block=32):
    """NSA's compressed branch: key s stands for tokens [block * s, block * s + block - 1] and sits at its
    last token; query i sees the compressed keys whose block has ended by i."""
    i = torch.arange(q.shape[1]).reshape(-1, 1)
    s = torch.arange(kc.shape[1]).reshape(1, -1)
    return attend(q, kc, vc, block * s + block - 1 <= i)[0]


NAIVE_SOFTMAX = {
    "nsa_cmp": nsa_cmp, "softmax_attn": softmax_attn, "softmax_full": softmax_full, "sliding_window": sliding_window,
    "alibi": alibi, "softcap": softcap, "forgetting_transformer": forgetting_transformer,
    "scale_invariant": scale_invariant, "gated_attention": gated_attention, "based": based,
}


def _heads_like(x, H):
    """A shared (fewer-head) input repeated to H heads, as grouped heads read it."""
    return x.double().repeat_interleave(H // x.shape[2], dim=2)


def mla(q, qr, k, kr, v):
    """MLA (DeepSeek-V2): one softmax over the 192-wide logit [q_nope, q_rope] . [k_nope, k_rope] / sqrt(192),
    here the concatenation of the two parts; the RoPE key may be one head shared by all."""
    H = q.shape[2]
    qc = torch.cat([q.double(), qr.double()], -1)
    kc = torch.cat([_heads_like(k, H), _heads_like(kr, H)], -1)
    return attend(qc, kc, v, causal(q.shape[1]), scale=qc.shape[-1] ** -0.5)[0]


def tpa(q, ak0, ak1, bk0, bk1, av0, av1, bv0, bv1):
    """TPA (Zhang et al. 2025): K_t = (1/2) A_K^T B_K and V_t = (1/2) A_V^T B_V as explicit [H, D] matrices per
    token (rank 2; the B factors may have one head, shared), then causal softmax attention."""
    H = q.shape[2]
    a_k = torch.stack([ak0, ak1], -1).double()                            # (B, T, H, R)
    b_k = torch.stack([_heads_like(bk0, H), _heads_like(bk1, H)], -2)      # (B, T, H, R, K)
    a_v = torch.stack([av0, av1], -1).double()
    b_v = torch.stack([_heads_like(bv0, H), _heads_like(bv1, H)], -2)
    k = torch.einsum("bthr,bthrd->bthd", a_k, b_k) / 2
    v = torch.einsum("bthr,bthrd->bthd", a_v, b_v) / 2
    return attend(q, k, v, causal(q.shape[1]))[0]


def rope_pp(qa, qb, ka, kb, v):
    """RoPE++ (Liu et al. 2025): the complex logit z = sum_c q_c conj(k_c) of the rotated halves as complex
    numbers; real heads softmax Re z, imaginary heads Im z (scale (2K)^-1/2, the full head dim)."""
    qc = torch.complex(qa.double(), qb.double())
    kc = torch.complex(ka.double(), kb.double())
    z = torch.einsum("bihd,bjhd->bhij", qc, kc.conj()) * (2 * qa.shape[-1]) ** -0.5
    mask = causal(qa.shape[1])
    outs = []
    for logits in (z.real, z.imag):
        p = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append(torch.einsum("bhij,bjhd->bihd", p, v.double()))
    return tuple(outs)


NAIVE_SOFTMAX.update({"mla": mla, "tpa": tpa, "rope_pp": rope_pp})


def softmax_rope(q, k, v):
    """Causal softmax attention on q and k rotated by their positions."""
    return attend(rope(q), rope(k), v, causal(q.shape[1]))[0]


NAIVE_SOFTMAX["softmax_rope"] = softmax_rope
NAIVE_SOFTMAX["sink_window"] = sink_window


def _gates(q, pooled, round_to=None):
    """(B, T, H, D) queries . (B, nb, H, D) pooled keys -> (B, H, T, nb) in float64; `round_to`: both operands
    rounded to that dtype first (a 16-bit kernel's dot)."""
    if round_to is not None:
        q, pooled = q.to(round_to), pooled.to(round_to)
    # products summed per (query, block), not a BLAS matmul: whose rounding can differ between columns, so
    # copies of one key block would not tie exactly (the tie rule is what some tests check)
    q, pooled = q.detach().double().permute(0, 2, 1, 3), pooled.detach().double().permute(0, 2, 1, 3)
    return torch.cat([(q[:, :, i:i + 256, None, :] * pooled[:, :, None]).sum(-1)
                      for i in range(0, q.shape[2], 256)], 2)


def block_choice(q, k, block, topk, pool="mean", window=1, round_to=None):
    """MoBA's choice, written plainly: per query token i (in block qb = i // block) and key block b, the gate
    q_i . pool(k over b's tokens); the `window` blocks qb-window+1..qb are always chosen and take their slots
    first (lowest index first), then the blocks before qb by gate descending (ties: the lower index), up to
    `topk` in all. Returns (B, H, T, nb) bool."""
    B, T, H, D = q.shape
    k = _heads_like(k, H)
    nb = -(-T // block)
    pooled = []
    for b in range(nb):
        part = k[:, b * block:(b + 1) * block]
        pooled.append(part.double().mean(1) if pool == "mean" else part.double().amax(1))
    pooled = torch.stack(pooled, 1)                                         # (B, nb, H, D)
    gate = _gates(q, pooled.float() if round_to is not None else pooled, round_to)
    chosen = torch.zeros(B, H, T, nb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                qb = i // block
                forced = [x for x in range(max(0, qb - window + 1), qb + 1)]
                rest = sorted(range(qb), key=lambda x: (-gate[b, h, i, x].item(), x))
                rest = [x for x in rest if x not in forced]
                for x in (forced + rest)[:topk]:
                    chosen[b, h, i, x] = True
    return chosen


def moba(q, k, v, block=64, topk=16, pool="mean", window=1):
    """MoBA (arXiv:2502.13189): causal softmax attention over the chosen key blocks only."""
    T = q.shape[1]
    chosen = block_choice(q, k, block, topk, pool, window)
    i, j = positions(T)
    mask = chosen[..., j.reshape(-1) // block].reshape(chosen.shape[:3] + (T,)) & (j <= i)
    return attend(q, k, v, mask)[0]


NAIVE_SOFTMAX["moba"] = moba


def topp_choice(q, k, block=64, p=0.9, cap=32, round_to=None):
    """library/topp.attn's choice, plainly: per query i (block qb), the gates q_i . mean(k over block b) *
    D^-1/2 of the blocks before qb, softmaxed; the blocks by gate descending (ties: the lower index) taken
    while the mass ahead is < p (every one when p = 1), after the own block, at most `cap` in all.
    Returns (B, H, T, nb) bool."""
    B, T, H, D = q.shape
    kh = _heads_like(k, H).double()
    nb = -(-T // block)
    pooled = torch.stack([kh[:, b * block:(b + 1) * block].mean(1) for b in range(nb)], 1)   # (B, nb, H, D)
    gate = _gates(q, pooled.float() if round_to is not None else pooled, round_to) * D ** -0.5
    chosen = torch.zeros(B, H, T, nb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                qb = i // block
                keep = [qb]
                order = sorted(range(qb), key=lambda x: (-gate[b, h, i, x].item(), x))
                mass = torch.softmax(gate[b, h, i, :qb], 0) if qb else None
                ahead = 0.0
                for x in order:
                    if ahead < p or p >= 1:
                        keep.append(x)
                    ahead += mass[x].item()
                for x in keep[:cap]:
                    chosen[b, h, i, x] = True
    return chosen


def topp(q, k, v, block=64, p=0.9, cap=32):
    """library/topp.attn: causal softmax attention over the blocks topp_choice chooses."""
    T = q.shape[1]
    chosen = topp_choice(q, k, block, p, cap)
    i, j = positions(T)
    mask = chosen[..., j.reshape(-1) // block].reshape(chosen.shape[:3] + (T,)) & (j <= i)
    return attend(q, k, v, mask)[0]


NAIVE_SOFTMAX["topp"] = topp


def infllm_choice(q, k, block=64, topk=16, round_to=None):
    """InfLLM-V2's choice (arXiv:2506.07900) as library/infllm_v2.attn writes it: per query i (block qb) and
    group of query heads sharing key head g, the score of key block b is the sum over the group's heads of
    q_i . mean(k_g over b's tokens); blocks 0, qb - 1 and qb are always chosen and take the first slots
    (lowest index first), then the blocks before qb by score descending (ties: the lower index), `topk` in
    all; every head of a group shares its group's blocks. Returns (B, H, T, nb) bool."""
    B, T, H, D = q.shape
    Hk = k.shape[2]
    nb = -(-T // block)
    pooled = torch.stack([k[:, b * block:(b + 1) * block].double().mean(1) for b in range(nb)], 1)  # (B, nb, Hk, D)
    pooled = _heads_like(pooled, H)
    per_head = _gates(q, pooled.float() if round_to is not None else pooled, round_to)
    score = per_head.reshape(B, Hk, H // Hk, T, nb).sum(2)                    # (B, Hk, T, nb)
    chosen = torch.zeros(B, Hk, T, nb, dtype=torch.bool)
    for b in range(B):
        for g in range(Hk):
            for i in range(T):
                qb = i // block
                forced = sorted({x for x in (0, qb - 1, qb) if 0 <= x <= qb})
                rest = [x for x in sorted(range(qb), key=lambda x: (-score[b, g, i, x].item(), x)) if x not in forced]
                for x in (forced + rest)[:topk]:
                    chosen[b, g, i, x] = True
    return chosen.repeat_interleave(H // Hk, dim=1)


def infllm_v2(q, k, v, block=64, topk=16):
    """InfLLM-V2: every head of a group walks its group's blocks (infllm_choice) with causal softmax."""
    T = q.shape[1]
    chosen = infllm_choice(q, k, block, topk)
    i, j = positions(T)
    mask = chosen[..., j.reshape(-1) // block].reshape(chosen.shape[:3] + (T,)) & (j <= i)
    return attend(q, k, v, mask)[0]


NAIVE_SOFTMAX["infllm_v2"] = infllm_v2


# the choice of each select spec (B, H, T, nb) bool, for judging a kernel's choice by itself
NAIVE_CHOICE = {"moba": lambda q, k, round_to=None: block_choice(q, k, 64, 16, round_to=round_to),
                "topp": lambda q, k, round_to=None: topp_choice(q, k, 64, 0.9, 32, round_to),
                "infllm_v2": lambda q, k, round_to=None: infllm_choice(q, k, 64, 16, round_to)}


def nsa(q, kc, vc, k, v, gc, gs, gw, block=64, topk=16, window=512, stride=16, length=32):
    """NSA (arXiv:2502.11089) as library/nsa.attn writes it: the compressed keys s standing at token
    stride * s + length - 1; the top-k blocks by InfLLM-V2's rule (blocks 0, qb - 1, qb forced, the group's
    summed mean-key scores; infllm_choice); a causal window; the three outputs summed with sigmoid gates."""
    T = q.shape[1]
    i, j = positions(T)
    s = torch.arange(kc.shape[1]).reshape(1, -1)
    oc = attend(q, kc, vc, stride * s + length - 1 <= i)[0]
    chosen = infllm_choice(q, k, block, topk)
    os_ = attend(q, k, v, chosen[..., j.reshape(-1) // block].reshape(chosen.shape[:3] + (T,)) & (j <= i))[0]
    ow = attend(q, k, v, (j <= i) & (i - j < window))[0]
    gate = [torch.sigmoid(g.double())[..., None] for g in (gc, gs, gw)]
    return gate[0] * oc + gate[1] * os_ + gate[2] * ow


NAIVE_BRANCHED = {"nsa": nsa}


def token_choice(score, topk, forced=None, threshold=None):
    """A choice of key tokens, plainly: per (b, h, query t) the keys s <= t, the forced ones first (lowest
    position first), then the rest by score descending (ties: the lower position), scores of -inf or nan never
    chosen; `threshold`: only those scoring >= it; at most `topk` in all (None: no cap). `score` (B, H, T, T)
    float64, `forced` (T, T) bool or None. Returns (B, H, T, T) bool."""
    B, H, T, _ = score.shape
    chosen = torch.zeros(B, H, T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = score[b, h, t].tolist()
                first = [s for s in range(t + 1) if forced is not None and forced[t, s]]
                ok = [s for s in range(t + 1) if s not in first and row[s] == row[s] and row[s] > float("-inf")
                      and (threshold is None or row[s] >= threshold)]
                order = first + sorted(ok, key=lambda s: (-row[s], s))
                for s in order[:topk]:
                    chosen[b, h, t, s] = True
    return chosen


def dsa_choice(qi, ki, wi, topk=2048, dtype=torch.float64):
    """DSA's lightning indexer (DeepSeek-V3.2-Exp): I(t, s) = sum_j w(t, j) relu(qi(t, j) . ki(s)), the indexer
    heads j being the query heads that share key head ki; each query keeps its top-k keys s <= t. (B, H, T, T).
    `dtype`: the scores' precision (float32: as a kernel accumulates them)."""
    B, T, H, _ = qi.shape
    per = H // ki.shape[2]
    dots = torch.einsum("bthd,bshd->bhts", qi.to(dtype), _heads_like(ki, H).to(dtype)).clamp_min(0.0)
    terms = wi.to(dtype).permute(0, 2, 1)[..., None] * dots                      # (B, H, T, T), one per indexer head
    index = terms.reshape(B, H // per, per, T, T).sum(2)                         # summed over a group's heads
    return token_choice(index.double(), topk).repeat_interleave(per, dim=1)


def dsa(q, k, v, qi, ki, wi, topk=2048):
    """DeepSeek Sparse Attention: causal softmax attention over each query's chosen key tokens."""
    return attend(q, k, v, dsa_choice(qi, ki, wi, topk) & causal(q.shape[1]))[0]


NAIVE_SOFTMAX["dsa"] = dsa
