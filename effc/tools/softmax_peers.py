"""Peers of the softmax-family library specs for benchmarking: the same computation through torch's
scaled_dot_product_attention (SDPA: FlashAttention-2 / cuDNN / efficient backends) and FlexAttention
(torch.nn.attention.flex_attention, compiled), on the inputs `effc bench` builds
(`effc.runtime.verify.random_inputs`: (B, T, H, D) tensors, in the spec's input order).

    PEERS_SOFTMAX[spec] -> [(label, inputs, build)]   with build(xs, params) -> a zero-argument callable
                                                        returning the output (B, T, H, V)

effc/tools/peers.py puts them in the one peer table `effc bench` reads; the compiler never sees them.
Params are the spec's defaults unless given (e.g. {"window": 512}).
"""
from __future__ import annotations

import torch


_COPIES: list = []  # the copies `_bhtd` made since `made_copies` last drained them


def _bhtd(x):
    """The peers' own layout, (B, H, T, D) contiguous, made once outside the timed calls (their kernels
    are fastest on it). For a backward timing the copy is a leaf of its own: see `_fresh`."""
    copy = x.transpose(1, 2).contiguous().detach().requires_grad_(x.requires_grad)
    _COPIES.append(copy)
    return copy


def made_copies() -> list:
    """The leaf copies the builders made since the last call: a peer's backward writes its gradients to them,
    not to the bench's inputs, so a peak measured from a clean start clears theirs too (peers.time_training_step)."""
    out = list(_COPIES)
    _COPIES.clear()
    return out


def _fresh(*leaves):
    """Each timed step starts with no gradient on the copies, as `do_bench(grad_to_none=...)` does for the
    originals, so no step pays for accumulating into the previous one's."""
    for t in leaves:
        t.grad = None


def _sdpa(causal: bool, gate: bool = False, backend: str = "FLASH_ATTENTION"):
    """SDPA restricted to one backend (a row of its own: FlashAttention-2 and cuDNN differ by ~1.5x on Hopper);
    a backend that cannot run the inputs fails its row with torch's reason."""
    def build(xs, params):
        q, k, v = (_bhtd(x) for x in xs[:3])
        gqa = q.shape[1] != k.shape[1]
        scale = params.get("scale", q.shape[-1] ** -0.5)

        def run():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            _fresh(q, k, v)
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                      enable_gqa=gqa).transpose(1, 2)
            return o * torch.sigmoid(xs[3]) if gate else o
        return run
    return build


_FLEX_CACHE: dict = {}


def _flex(score_mod_for=None, mask_for=None, gate: bool = False, sinks: bool = False):
    """score_mod_for(xs, params, H) -> score_mod or None; mask_for(params) -> mask_mod or None. `sinks`: the
    fourth input is a sink logit per token and head (gpt-oss), added the way a FlexAttention user adds it: the
    log-sum-exp (natural log) returned with the output, then o * sigmoid(lse - sink), which puts exp(sink)
    into each query's denominator."""
    def build(xs, params):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        q, k, v = (_bhtd(x) for x in xs[:3])
        B, H, T, _ = q.shape
        scale = params.get("scale", q.shape[-1] ** -0.5)
        mask_mod = mask_for(params) if mask_for else None
        block_mask = create_block_mask(mask_mod, None, None, T, T, device=q.device) if mask_mod else None
        score_mod = score_mod_for(xs, params, H) if score_mod_for else None
        fn = _FLEX_CACHE.setdefault("flex", torch.compile(flex_attention, dynamic=False))
        gqa = q.shape[1] != k.shape[1]

        def run():
            _fresh(q, k, v)
            o = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=sinks)
            if sinks:
                o, lse = o
                o = o * torch.sigmoid(lse - xs[3].transpose(1, 2))[..., None].to(o.dtype)
            o = o.transpose(1, 2)
            return o * torch.sigmoid(xs[3]) if gate else o
        return run
    return build


def sliding_window(T: int, window: int, device):
    """A causal sliding window of `window` keys (the query's own included) through FlexAttention, as a
    function (q, k, v, scale) -> o on (B, T, H, D) tensors (grouped heads allowed); the BlockMask is built
    here, once, outside the timed calls. Compiled on a GPU, eager elsewhere."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block_mask = create_block_mask(_window({"window": window}), None, None, T, T, device=device)
    fn = (_FLEX_CACHE.setdefault("flex", torch.compile(flex_attention, dynamic=False))
          if torch.device(device).type == "cuda" else flex_attention)

    def run(q, k, v, scale):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        o = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(1, 2)
    return run


def select_block_mask(chosen, block: int, token_mask, q_block: int = 128, tokens: bool = False,
                      kv_block: int | None = None):
    """A FlexAttention BlockMask holding effc's own choice: `chosen` (B, T, H, nb) bool, what
    `op.select_blocks` returns (query token x key block of `block` tokens; `tokens`: x key token, a choice
    of key tokens). A (query block of `q_block`, key block) pair is visited when some query of the block
    chose the key block (a token of it); it is full (no mask_mod) when every query of the block chose it
    (every token of it) and token_mask keeps every pair in it. The mask_mod keeps a pair when its query chose
    the key's block (the key) and token_mask(q_idx, kv_idx) holds (the spec's score masks). `kv_block` (a
    multiple of `block`): the mask's key blocks hold several chosen ones, visited when one of them is."""
    from torch.nn.attention.flex_attention import BlockMask
    sel = chosen.permute(0, 2, 1, 3).contiguous()  # (B, H, T, nb or keys): the mask_mod's lookup
    lookup = block
    T = chosen.shape[1]
    if tokens:  # per key block: chosen by some (by every) query for some (for every) token of it
        per_block = chosen.unflatten(-1, (-1, block))
        tail = torch.arange(per_block.shape[-2] * block, device=chosen.device).reshape(-1, block) >= T
        chosen, whole = per_block.any(-1), (per_block | tail).all(-1)
    else:
        whole = chosen
    if kv_block is not None and kv_block != block:  # blocks past the sequence's end hold no key: no part missing
        r = kv_block // block
        pad = -chosen.shape[-1] % r
        chosen = torch.nn.functional.pad(chosen, (0, pad)).unflatten(-1, (-1, r)).any(-1)
        whole = torch.nn.functional.pad(whole, (0, pad), value=True).unflatten(-1, (-1, r)).all(-1)
        block = kv_block
    B, T, H, nb = chosen.shape
    nq = -(-T // q_block)

    def query_blocks(x):  # (B, T, H, nb) -> (B, H, nq, q_block, nb), padding rows False
        padded = torch.zeros(B, H, nq * q_block, nb, dtype=torch.bool, device=x.device)
        padded[:, :, :T] = x.permute(0, 2, 1, 3)
        return padded.reshape(B, H, nq, q_block, nb)
    rows, visited = query_blocks(whole), query_blocks(chosen).any(3)
    real = (torch.arange(nq * q_block, device=chosen.device) < T).reshape(nq, q_block, 1)
    kj = torch.arange(nb * block, device=chosen.device).reshape(1, 1, nb, block)
    every = torch.empty(nq, nb, dtype=torch.bool, device=chosen.device)  # token_mask keeps the whole tile
    step = max(1, 2**22 // (q_block * nb * block))  # query blocks at a time: a few MiB of pairs
    for a in range(0, nq, step):
        qi = torch.arange(a * q_block, min(nq, a + step) * q_block, device=chosen.device).reshape(-1, q_block, 1, 1)
        kept = token_mask(qi, kj) | (qi >= T) | (kj >= T)  # padding rows and keys keep
        every[a:a + step] = kept.all(3).all(1)
    full = (rows | ~real).all(3) & every & visited
    partial = visited & ~full

    def listed(m):
        # the blocks of each query block, first in increasing order (a stable sort of "not chosen")
        return m.sum(-1, dtype=torch.int32), torch.sort((~m).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return sel[b, h, q_idx, kv_idx if tokens else kv_idx // lookup] & token_mask(q_idx, kv_idx)
    n, idx = listed(partial)
    fn, fidx = listed(full)
    return BlockMask.from_kv_blocks(n, idx, fn, fidx, BLOCK_SIZE=(q_block, block), mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def _flex_select(spec: str, token_mask, q_block: int = 128):
    """FlexAttention with a BlockMask built from effc's own choice (select_block_mask) for a spec with a
    select stage: the same blocks, the same per-token choice; the choice and the mask are made once,
    outside the timed calls (they are effc's select kernels' work, timed in effc's row)."""
    def build(xs, params):
        import effc
        from torch.nn.attention.flex_attention import flex_attention
        op = _FLEX_CACHE.setdefault(f"effc {spec}", effc.load(spec))
        q, k, v = (_bhtd(x) for x in xs[:3])
        given = {p.name: params[p.name] for p in op.spec.params if p.name in params}
        with torch.no_grad():
            chosen = op.select_blocks(*(x.detach() for x in xs), **given)
        block = op.spec.selection.block
        # Flex's backward kernels take key tiles of 128 (each config's divides the mask's key block): a training
        # step's mask groups smaller chosen blocks into 128-key blocks (the mask_mod keeps the exact choice)
        training = q.is_cuda and q.requires_grad and block < 128
        block_mask = select_block_mask(chosen, block, token_mask, q_block, tokens=op.sched.select.per_token,
                                       kv_block=128 if training else block)
        scale = params.get("scale", q.shape[-1] ** -0.5)
        gqa = q.shape[1] != k.shape[1]
        if q.is_cuda:
            fn = _FLEX_CACHE.setdefault("flex", torch.compile(flex_attention, dynamic=False))
            # the forward's key tile within a key block
            options = {"BLOCK_N": block} if block < 128 and not training else None
        else:  # eager (tests on CPU)
            fn, options = flex_attention, None

        def run():
            _fresh(q, k, v)
            return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                      kernel_options=options).transpose(1, 2)
        return run
    return build


def _causal_pairs(q_idx, kv_idx):
    return kv_idx <= q_idx


def _causal(params):
    return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx


def _window(params):
    w = int(params.get("window", 1024))
    return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < w)


def _alibi(xs, params, H):
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=xs[0].device)
    return lambda score, b, h, q_idx, kv_idx: score - slopes[h] * (q_idx - kv_idx)


def _softcap(xs, params, H):
    cap = float(params.get("cap", 50.0))
    return lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap)


def _fox(xs, params, H):
    F = xs[3].float().cumsum(1).transpose(1, 2).contiguous()  # (B, H, T): the cumulative log forget gate
    # Flex differentiates a captured tensor only when the score_mod indexes it once: one copy per side
    Fq, Fk = F, F.clone()
    return lambda score, b, h, q_idx, kv_idx: score + Fq[b, h, q_idx] - Fk[b, h, kv_idx]


def _scale_invariant(xs, params, H):
    tau = float(params.get("tau", 10.0))

    def mod(score, b, h, q_idx, kv_idx):
        lt = torch.log1p(torch.clamp(q_idx - kv_idx, min=0).to(torch.float32) / tau)
        return torch.sqrt(2 * lt + 1) * score - lt
    return mod


def _taylor(xs, params, H):
    # log of Based's Taylor kernel: Flex's softmax then normalises 1 + s + s^2/2
    return lambda score, b, h, q_idx, kv_idx: torch.log(1 + score + 0.5 * score * score)


def _sum(*builds):
    """Several attention calls on the same inputs, summed (Based's two branches)."""
    def build(xs, params):
        runs = [b(xs, params) for b in builds]
        return lambda: sum(run() for run in runs)
    return build


def _formed(form):
    """SDPA (flash) causal on q, k, v formed on the host by form(xs) -> (q, k, v) (mla: the two logit parts
    concatenated; tpa: keys and values from their factors); the forming is timed with the attention."""
    def build(xs, params):
        def run():
            q, k, v = (x.transpose(1, 2) for x in form(xs))
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=params.get("scale"))
            return o.transpose(1, 2)
        return run
    return build


def _shared(x, H):
    return x.expand(-1, -1, H, -1) if x.shape[2] == 1 else x


def _mla_form(xs):
    q, qr, k, kr, v = xs
    H = q.shape[2]
    return torch.cat([q, qr], -1), torch.cat([_shared(k, H), _shared(kr, H)], -1), v


def _tpa_form(xs):
    q, ak0, ak1, bk0, bk1, av0, av1, bv0, bv1 = xs
    H = q.shape[2]
    k = (ak0[..., None] * _shared(bk0, H) + ak1[..., None] * _shared(bk1, H)) * 0.5
    v = (av0[..., None] * _shared(bv0, H) + av1[..., None] * _shared(bv1, H)) * 0.5
    return q, k, v


def _rope_pp(xs, params):
    """RoPE++'s real and imaginary heads as two SDPA calls on [qa, qb] and [qb, -qa] against [ka, kb],
    the outputs side by side on the feature axis (effc's two outputs are compared the same way)."""
    qa, qb, ka, kb, v = xs
    real = _formed(lambda x: (torch.cat([qa, qb], -1), torch.cat([ka, kb], -1), v))(xs, params)
    imag = _formed(lambda x: (torch.cat([qb, -qa], -1), torch.cat([ka, kb], -1), v))(xs, params)
    return lambda: torch.cat([real(), imag()], -1)


def _rope_tables(x, base: float):
    """cos and sin (T, D) of the rotate-half RoPE angles, as a model caches them (built once, untimed)."""
    T, D = x.shape[1], x.shape[-1]
    inv = base ** (-2 * torch.arange(D // 2, dtype=torch.float32, device=x.device) / D)
    ang = torch.arange(T, dtype=torch.float32, device=x.device)[:, None] * torch.cat((inv, inv))[None]
    return ang.cos()[None, :, None].to(x.dtype), ang.sin()[None, :, None].to(x.dtype)


def _rotated(attend):
    """q and k rotated in PyTorch (the pass over q and k that softmax_rope fuses), then attend(q, k, v, params)
    -> a callable; the rotation is timed with the attention."""
    def build(xs, params):
        cos, sin = _rope_tables(xs[0], params.get("base", 10000.0))

        def rope(x):
            h = x.shape[-1] // 2
            return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin

        def run():
            return attend(rope(xs[0]), rope(xs[1]), xs[2], params)
        return run
    return build


def _sdpa_attend(q, k, v, params):
    o = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True,
                                                         scale=params.get("scale"))
    return o.transpose(1, 2)


def _effc_attend(q, k, v, params):
    import effc
    op = _FLEX_CACHE.setdefault("effc softmax_attn", effc.load("softmax_attn"))
    return op(q, k, v, **({"scale": params["scale"]} if "scale" in params else {}))[0]


def _nsa_cmp(xs, params):
    """nsa_cmp: SDPA (memory-efficient backend, which takes a mask) over the S compressed keys with the
    block-end mask key s at 32 s + 31 <= query t; the queries of the first block see no key (NaN rows in
    SDPA, 0 in effc): a timing peer, not a reference."""
    q, k, v = (_bhtd(x) for x in xs[:3])
    T, S = q.shape[2], k.shape[2]
    mask = (torch.arange(S, device=q.device)[None, :] * 32 + 31) <= torch.arange(T, device=q.device)[:, None]
    scale = params.get("scale", q.shape[-1] ** -0.5)

    def run():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        _fresh(q, k, v)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)
    return run


_QKV = ("q", "k", "v")
PEERS_SOFTMAX = {
    "softmax_attn": [("torch SDPA causal (flash)", _QKV, _sdpa(True)),
                     ("torch SDPA causal (cuDNN)", _QKV, _sdpa(True, backend="CUDNN_ATTENTION")),
                     ("FlexAttention causal", _QKV, _flex(mask_for=_causal))],
    "softmax_full": [("torch SDPA (flash)", _QKV, _sdpa(False)), ("FlexAttention", _QKV, _flex())],
    "sliding_window": [("FlexAttention window 1024", _QKV, _flex(mask_for=_window))],
    "sink_window": [("FlexAttention window 128, lse-rescaled sinks", _QKV + ("sink",),
                     _flex(mask_for=lambda p: _window({"window": p.get("window", 128)}), sinks=True))],
    "alibi": [("FlexAttention alibi", _QKV, _flex(_alibi, _causal))],
    "softcap": [("FlexAttention softcap", _QKV, _flex(_softcap, _causal))],
    "forgetting_transformer": [("FlexAttention FoX", _QKV + ("f",), _flex(_fox, _causal))],
    "scale_invariant": [("FlexAttention scale-inv.", _QKV, _flex(_scale_invariant, _causal))],
    "gated_attention": [("torch SDPA causal (flash) + gate", _QKV + ("g",), _sdpa(True, gate=True)),
                        ("FlexAttention causal + gate", _QKV + ("g",), _flex(mask_for=_causal, gate=True))],
    "based": [("FlexAttention Taylor + window 64", _QKV,
               _sum(_flex(_taylor, _causal), _flex(mask_for=lambda p: _window({"window": p.get("window", 64)}))))],
    "mla": [("torch SDPA causal (flash), nope|rope concatenated", ("q", "qr", "k", "kr", "v"), _formed(_mla_form))],
    "tpa": [("torch SDPA causal (flash), K and V formed from factors",
             ("q", "ak0", "ak1", "bk0", "bk1", "av0", "av1", "bv0", "bv1"), _formed(_tpa_form))],
    "rope_pp": [("torch SDPA causal (flash) x2, real and imaginary", ("qa", "qb", "ka", "kb", "v"), _rope_pp)],
    "softmax_rope": [("torch RoPE + SDPA causal (flash)", _QKV, _rotated(_sdpa_attend)),
                     ("torch RoPE + effc softmax_attn", _QKV, _rotated(_effc_attend))],
    # the dense baseline sparse attention must beat, and FlexAttention walking effc's own choice (issue 22)
    "moba": [("torch SDPA causal (flash), dense", _QKV, _sdpa(True)),
             ("FlexAttention, effc's BlockMask", _QKV, _flex_select("moba", _causal_pairs))],
    "topp": [("torch SDPA causal (flash), dense", _QKV, _sdpa(True)),
             ("FlexAttention, effc's BlockMask", _QKV, _flex_select("topp", _causal_pairs))],
    "infllm_v2": [("torch SDPA causal (flash), dense", _QKV, _sdpa(True)),
                  ("FlexAttention, effc's BlockMask", _QKV, _flex_select("infllm_v2", _causal_pairs))],
    "dsa": [("torch SDPA causal (flash), dense", _QKV, _sdpa(True)),
            ("FlexAttention, effc's token mask", _QKV + ("qi", "ki", "wi"), _flex_select("dsa", _causal_pairs))],
    "nsa_cmp": [("torch SDPA (efficient), block-end mask over S keys", ("q", "kc", "vc"), _nsa_cmp)],
    "nsa": [("torch SDPA causal (flash), dense", _QKV, _sdpa(True))],  # fla's parallel_nsa: tools/peers.py
}
