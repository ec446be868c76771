"""Independent references, written by hand from the papers, token by token (float64).
They share nothing with effc's oracle: that is the point."""
import math

import torch


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


def gated_delta_rule(q, k, v, g, beta, initial_state=None):
    """S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T ; o_t = q_t^T S_t (q, k L2-normalised)."""
    q, k = _l2norm(q.double()) * q.shape[-1] ** -0.5, _l2norm(k.double())
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


def delta_net(q, k, v, beta, initial_state=None):
    return gated_delta_rule(q, k, v, torch.zeros_like(beta), beta, initial_state)


NAIVE.update({"delta_net": delta_net, "gated_delta_net": gated_delta_rule})


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
