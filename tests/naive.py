"""Independent references, written by hand from the papers, token by token (float64).
They share nothing with effc's oracle: that is the point."""
import math

import torch
import torch.nn.functional as F


def diagonal_recurrence(q, k, v, decay, scale, initial_state=None):
    """S_t = diag(decay_t) S_{t-1} + k_t v_t^T ; o_t = scale * q_t^T S_t.
    q, k, decay: (B, T, H, K); v: (B, T, H, V)."""
    q, k, v, decay = (x.double() for x in (q, k, v, decay))
    B, T, H, K = q.shape
    S = initial_state.double().clone() if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        S = decay[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


def _per_head(values, like):
    B, T, H, K = like.shape
    return values.double().reshape(1, 1, H, 1).expand(B, T, H, K)


def linear_attn(q, k, v, initial_state=None):
    return diagonal_recurrence(q, k, v, torch.ones_like(q), q.shape[-1] ** -0.5, initial_state)


def retention(q, k, v, initial_state=None):
    H = q.shape[2]
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64)
    return diagonal_recurrence(q, k, v, _per_head(gamma, q), q.shape[-1] ** -0.5, initial_state)


def lightning(q, k, v, initial_state=None):
    H = q.shape[2]
    gamma = torch.tensor([math.exp(-(2.0 ** (-8 * (h + 1) / H))) for h in range(H)], dtype=torch.float64)
    return diagonal_recurrence(q, k, v, _per_head(gamma, q), q.shape[-1] ** -0.5, initial_state)


def simple_gla(q, k, v, g, initial_state=None):
    return diagonal_recurrence(q, k, v, g.double().exp()[..., None].expand_as(q.double()), q.shape[-1] ** -0.5,
                               initial_state)


def gla(q, k, v, g, initial_state=None):
    return diagonal_recurrence(q, k, v, g.double().exp(), q.shape[-1] ** -0.5, initial_state)


def hgrn2(q, v, g, initial_state=None):
    f = g.double().exp()
    return diagonal_recurrence(q, 1 - f, v, f, 1.0, initial_state)


NAIVE = {"linear_attn": linear_attn, "retention": retention, "lightning": lightning,
         "simple_gla": simple_gla, "gla": gla, "hgrn2": hgrn2}


def _l2norm(x):
    return x / (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()


def gated_delta_rule(q, k, v, g, beta, initial_state=None, l2=False):
    """S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T ; o_t = K^-1/2 q_t^T S_t, q and k as given
    (fla's chunk_gated_delta_rule by default) or, with l2, L2-normalised first (use_qk_l2norm_in_kernel=True)."""
    q, k = q.double(), k.double()
    if l2:
        q, k = _l2norm(q), _l2norm(k)
    q = q * q.shape[-1] ** -0.5
    v, g, beta = v.double(), g.double(), beta.double()
    B, T, H, K = q.shape
    S = initial_state.double().clone() if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        S = g[:, t, :, None, None].exp() * (S - bt * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :])
        S = S + bt * kt[..., :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


def delta_net(q, k, v, beta, initial_state=None, l2=False):
    return gated_delta_rule(q, k, v, torch.zeros_like(beta), beta, initial_state, l2)


def gated_delta_rule_l2(q, k, v, g, beta, initial_state=None):
    return gated_delta_rule(q, k, v, g, beta, initial_state, l2=True)


def delta_net_l2(q, k, v, beta, initial_state=None):
    return delta_net(q, k, v, beta, initial_state, l2=True)


NAIVE.update({"delta_net": delta_net, "gated_delta_net": gated_delta_rule,
              "delta_net_l2": delta_net_l2, "gated_delta_net_l2": gated_delta_rule_l2})


def mlstm(q, k, v, i, f, initial_state=None):
    """The stabilised mLSTM recurrence of xLSTM (Beck et al. 2024, eqs. 19-27), q scaled by K^-1/2."""
    q, k, v, i = (x.double() for x in (q, k, v, i))
    lf = torch.nn.functional.logsigmoid(f.double())
    B, T, H, K = q.shape
    if initial_state is None:
        C, n, m = q.new_zeros(B, H, K, v.shape[-1]), q.new_zeros(B, H, K), q.new_zeros(B, H)
    else:
        C, n, m = (x.double().clone() for x in initial_state)
    out = []
    for t in range(T):
        m_new = torch.maximum(lf[:, t] + m, i[:, t])
        a, e = (lf[:, t] + m - m_new).exp(), (i[:, t] - m_new).exp()
        C = a[..., None, None] * C + e[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = a[..., None] * n + e[..., None] * k[:, t]
        m = m_new
        qs = q[:, t] * K ** -0.5
        num = torch.einsum("bhk,bhkv->bhv", qs, C)
        den = torch.maximum(torch.einsum("bhk,bhk->bh", qs, n).abs(), (-m).exp())
        out.append(num / den[..., None])
    return torch.stack(out, 1), (C, n, m)


NAIVE["mlstm"] = mlstm


def mlstm_sig(q, k, v, i, f, initial_state=None, eps=1e-6):
    """mLSTM with a sigmoid input gate (TFLA, Beck et al. 2025; mlstm_kernels' *_siging kernels): no
    max-stabiliser, h_t = C_t^T q_t / (max(|n_t . q_t|, 1) + eps), q scaled by K^-1/2."""
    q, k, v = (x.double() for x in (q, k, v))
    ig, fg = torch.sigmoid(i.double()), torch.sigmoid(f.double())
    B, T, H, K = q.shape
    if initial_state is None:
        C, n = q.new_zeros(B, H, K, v.shape[-1]), q.new_zeros(B, H, K)
    else:
        C, n = (x.double().clone() for x in initial_state)
    out = []
    for t in range(T):
        C = fg[:, t, :, None, None] * C + ig[:, t, :, None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = fg[:, t, :, None] * n + ig[:, t, :, None] * k[:, t]
        qs = q[:, t] * K ** -0.5
        den = torch.einsum("bhk,bhk->bh", qs, n).abs().clamp_min(1.0) + eps
        out.append(torch.einsum("bhk,bhkv->bhv", qs, C) / den[..., None])
    return torch.stack(out, 1), (C, n)


def hdla(q, k, v, g, u, initial_state=None):
    """S_t = H_t diag(exp(g_t)) H_t S_{t-1} + k_t v_t^T, H_t = I - 2 u_t u_t^T (u_t normalised), with the
    K x K transition built explicitly; o_t = K^-1/2 S_t^T q_t."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    un = _l2norm(u.double())
    B, T, H, K = q.shape
    S = initial_state.double().clone() if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1])
    eye = torch.eye(K, dtype=torch.float64)
    out = []
    for t in range(T):
        refl = eye - 2 * un[:, t, :, :, None] * un[:, t, :, None, :]
        S = refl @ torch.diag_embed(g[:, t].exp()) @ refl @ S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S))
    return torch.stack(out, 1), S


def rwkv7(r, w, k, v, kappa, a, initial_state=None):
    """RWKV-7 (Peng et al. 2025, arXiv:2503.14456) in the paper's [V, K] state:
    S_t = S_{t-1} (diag(w_t) - kappa_t^T (a_t * kappa_t)) + v_t^T k_t, o_t = S_t r_t, w_t = exp(log decay).
    States in and out in effc's [K, V] layout (the transpose)."""
    r, w, k, v, a = (x.double() for x in (r, w, k, v, a))
    kn = _l2norm(kappa.double())
    B, T, H, K = r.shape
    S = (initial_state.double().transpose(-1, -2).clone() if initial_state is not None
         else r.new_zeros(B, H, v.shape[-1], K))
    out = []
    for t in range(T):
        trans = torch.diag_embed(w[:, t].exp()) - kn[:, t, :, :, None] * (a[:, t] * kn[:, t])[:, :, None, :]
        S = S @ trans + v[:, t, :, :, None] * k[:, t, :, None, :]
        out.append(torch.einsum("bhvk,bhk->bhv", S, r[:, t]))
    return torch.stack(out, 1), S.transpose(-1, -2)


NAIVE.update({"mlstm_sig": mlstm_sig, "hdla": hdla, "rwkv7": rwkv7})


def zeros(q, k, v, s, a, h, initial_state=None):
    """ZeroS (Lu et al. 2025, arXiv:2602.05230) in its prefix-sum form, token by token: with unit q, k,
    E_t = sum e^{s_i}, F_t = sum e^{s_i} k_i v_i^T, G_t = sum s_i k_i v_i^T, R_t = sum k_i v_i^T, P_t = sum s_i,
    o_t = q_t^T [g^h_t F_t / E_t + beta_t G_t + gamma_t R_t], beta_t = (g^1_t - g^h_t) / t,
    gamma_t = -(beta_t P_t + g^h_t) / t. The state (F, E, m, G, R, P, n) keeps F and E scaled by e^{-m}, m the
    largest logit so far (0 at the start); the sums here are plain: float64 and test-sized logits."""
    q, k = _l2norm(q.double()), _l2norm(k.double())
    v, s = v.double(), s.double()
    g1, gh = torch.sigmoid(a.double()), torch.sigmoid(h.double())
    B, T, H, K = q.shape
    if initial_state is None:
        E = q.new_zeros(B, H)
        F, G, R = (q.new_zeros(B, H, K, v.shape[-1]) for _ in range(3))
        P, n, m = q.new_zeros(B, H), q.new_zeros(B, H), q.new_zeros(B, H)
    else:
        F, E, m, G, R, P, n = (x.double().clone() for x in initial_state)
        F, E = F * m.exp()[..., None, None], E * m.exp()
    out = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        e = s[:, t].exp()
        E, F = E + e, F + e[..., None, None] * kv
        G, R = G + s[:, t, :, None, None] * kv, R + kv
        P, n, m = P + s[:, t], n + 1, torch.maximum(m, s[:, t])
        beta = (g1[:, t] - gh[:, t]) / n
        gamma = -(beta * P + gh[:, t]) / n
        core = (gh[:, t] / E)[..., None, None] * F + beta[..., None, None] * G + gamma[..., None, None] * R
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], core))
    out = torch.stack(out, 1) if out else v.new_zeros(B, 0, H, v.shape[-1])
    return out, (F * (-m).exp()[..., None, None], E * (-m).exp(), m, G, R, P, n)


def race(q, k, v, initial_state=None, scale=1.0, eps=1e-6):
    """RACE attention (Joshi et al. 2025, arXiv:2510.04008), causal, token by token, on given soft-hash
    probabilities q = phi(q), k = phi(k): per bucket b, S_b += phi(k)_b v, z_b += phi(k)_b;
    o_t = sum_b phi(q_t)_b S_b / (z_b + eps)."""
    q, k, v = (x.double() for x in (q, k, v))
    B, T, H, K = q.shape
    if initial_state is None:
        S, z = q.new_zeros(B, H, K, v.shape[-1]), q.new_zeros(B, H, K)
    else:
        S, z = (x.double().clone() for x in initial_state)
    out = []
    for t in range(T):
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + k[:, t]
        means = S / (z + eps)[..., None]  # each bucket's mean value
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], means))
    return torch.stack(out, 1), (S, z)


NAIVE.update({"zeros": zeros, "race": race})


def mesanet(q, k, v, g, beta, initial_state=None, lam=1.0, steps=4):
    """MesaNet (von Oswald et al. 2025, arXiv:2506.05233), token by token: G_t = gamma_t G_{t-1} +
    beta_t k_t k_t^T, S_t = gamma_t S_{t-1} + beta_t k_t^T v_t, o_t = x_t @ S_t with x_t after `steps` of
    conjugate gradient on (G_t + lam I) x = q_t from x = 0."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    if initial_state is None:
        G, S = q.new_zeros(B, H, K, K), q.new_zeros(B, H, K, v.shape[-1])
    else:
        G, S = (x.double() for x in initial_state)
    eye = torch.eye(K, dtype=q.dtype)
    out = []
    for t in range(T):
        gamma, b_t = g[:, t].exp()[..., None, None], beta[:, t][..., None, None]
        G = gamma * G + b_t * k[:, t, :, :, None] * k[:, t, :, None, :]
        S = gamma * S + b_t * k[:, t, :, :, None] * v[:, t, :, None, :]
        x, r, p = torch.zeros_like(q[:, t]), q[:, t], q[:, t]
        for _ in range(steps):
            ap = torch.einsum("bhk,bhkj->bhj", p, G + lam * eye)
            w = (r * r).sum(-1, keepdim=True) / (p * ap).sum(-1, keepdim=True)
            x, r_next = x + w * p, r - w * ap
            p = r_next + (r_next * r_next).sum(-1, keepdim=True) / (r * r).sum(-1, keepdim=True) * p
            r = r_next
        out.append(torch.einsum("bhk,bhkv->bhv", x, S))
    out = torch.stack(out, 1) if out else v.new_zeros(B, 0, H, v.shape[-1])
    return out, (G, S)


NAIVE["mesanet"] = mesanet


def rope(x, base=10000.0):
    """RoFormer's rotation (arXiv:2104.09864), rotate-half pairing: feature i < D/2 and i + D/2 of the token at
    position t turn by the angle t * base^(-2i/D)."""
    x = x.double()
    T, D = x.shape[1], x.shape[-1]
    inv = base ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * torch.cat((inv, inv))[None]
    half = torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1)
    return x * ang.cos()[None, :, None] + half * ang.sin()[None, :, None]


def retention_rope(q, k, v, initial_state=None):
    """RetNet with its rotation: retention on q and k rotated by their positions (from 0 in every call)."""
    return retention(rope(q), rope(k), v, initial_state)


NAIVE["retention_rope"] = retention_rope


def lion_s(q, k, v, g, initial_state=None):
    """LION (Afzal et al., arXiv:2502.16249) as its full attention matrix: y = C^-1 (phi(Q) phi(K)^T . M) V,
    C_i = sum_j M_ij phi(q_i).phi(k_j), M_ij = prod of lambda_t = exp(g_t) for min(i,j) < t <= max(i,j),
    phi = elu + 1. Initial states: (S0, Z0) before the first token (decayed to query i by lambda_1..lambda_i),
    (R0, ZR0) after the last (decayed from the last token back to i). Final states: (S, Z) after the last
    token; (R, ZR) before the first, every token decayed to the sequence's start."""
    phi = lambda x: F.elu(x.double()) + 1
    qf, kf, v = phi(q), phi(k), v.double()
    G = g.double().cumsum(1).permute(0, 2, 1)  # (B, H, T): log decay from the start to t, inclusive
    M = torch.exp(-(G[..., :, None] - G[..., None, :]).abs())  # G falls along t: |G_i - G_j| is the gap's decay
    a = torch.einsum("bihk,bjhk->bhij", qf, kf) * M
    num = torch.einsum("bhij,bjhv->bhiv", a, v)
    den = a.sum(-1)
    B, H, T = G.shape
    K, V = qf.shape[-1], v.shape[-1]
    S0, Z0, R0, ZR0 = (x.double() for x in initial_state) if initial_state is not None else (
        qf.new_zeros(B, H, K, V), qf.new_zeros(B, H, K), qf.new_zeros(B, H, K, V), qf.new_zeros(B, H, K))
    end = G[..., -1:] if T else G.new_zeros(B, H, 1)
    to_start, to_end = G.exp(), (end - G).exp()  # (B, H, T): query i from the start / to the end
    qh = qf.permute(0, 2, 1, 3)  # (B, H, T, K)
    num = num + to_start[..., None] * (qh @ S0) + to_end[..., None] * (qh @ R0)
    den = den + to_start * (qh @ Z0[..., None])[..., 0] + to_end * (qh @ ZR0[..., None])[..., 0]
    o = (num / den[..., None]).permute(0, 2, 1, 3)
    kh, vh = kf.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    fwd, rev = (end - G).exp()[..., None], G.exp()[..., None]  # key j to the end / to the start
    total = end.exp()[..., None]
    S = total * S0 + (kh * fwd).transpose(-1, -2) @ vh
    Z = total[..., 0] * Z0 + (kh * fwd).sum(2)
    R = total * R0 + (kh * rev).transpose(-1, -2) @ vh
    ZR = total[..., 0] * ZR0 + (kh * rev).sum(2)
    return o, (S, Z, R, ZR)


def lion(q, k, v, initial_state=None):
    """LION-LIT: lion_s with every lambda = 1 (M is all ones)."""
    return lion_s(q, k, v, q.new_zeros(q.shape[:3]), initial_state)


NAIVE.update({"lion": lion, "lion_s": lion_s})


def log_linear_attn(q, k, v, g, lam, initial_state=None, nlevels=16):
    """Log-linear Mamba-2 (Guo, Yang et al., arXiv:2506.04761), the paper's recurrent form: one state per
    Fenwick bucket of the prefix, decayed by exp(g_t) each step; o_t = scale * sum_l lam_t[l] q_t^T S^(l);
    then the binary-counter carry for t + 1 merges buckets 0..z into bucket z + 1 (z = trailing zeros of t + 1).
    Levels past nlevels or lam's last weigh 0. The spec's states are A_j = buckets 1..j of the next token;
    an initial A_j (before position 0) reaches the tokens t < 2^j with weight lam_t[j] - lam_t[j + 1]."""
    q, k, v, g, lam = (x.double() for x in (q, k, v, g, lam))
    B, T, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    scale = K ** -0.5
    init = [x.double() for x in (initial_state or ())] or [q.new_zeros(B, H, K, V)] * nlevels
    S = {}  # level -> bucket state (B, H, K, V)

    def w(t, level):  # lam_t[level], 0 past the levels that are held
        return lam[:, t, :, level, None, None] if level < L and level <= nlevels else 0.0

    out, decay = [], q.new_ones(B, H)
    for t in range(T):
        a = g[:, t].exp()[..., None, None]
        decay = decay * g[:, t].exp()
        S = {lv: s * a for lv, s in S.items()}
        S[0] = k[:, t, :, :, None] * v[:, t, :, None, :]
        total = sum(w(t, lv) * s for lv, s in S.items())
        for j in range(1, nlevels + 1):
            if t < 2 ** j:
                weight = w(t, j) - (w(t, j + 1) if j < nlevels else 0.0)
                total = total + weight * decay[..., None, None] * init[j - 1]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], total))
        z = ((t + 1) & -(t + 1)).bit_length() - 1
        S[z + 1] = sum(S.pop(lv) for lv in range(z + 1) if lv in S)
    final = []
    for j in range(1, nlevels + 1):
        a_j = sum((s for lv, s in S.items() if 1 <= lv <= j), q.new_zeros(B, H, K, V))
        final.append(a_j + (decay[..., None, None] * init[j - 1] if T < 2 ** j else 0.0))
    return torch.stack(out, 1) if out else q.new_zeros(B, 0, H, V), tuple(final)


NAIVE["log_linear_attn"] = log_linear_attn
