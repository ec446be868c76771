"""The FoX library spec written with @attention_spec's Python front end (read, never run)."""
from effc.dsl.pyfront import Input, Output, Param, mask, merge, prefix, score  # noqa: F401


def forgetting_transformer(q: Input("B", "T", "H", "K"), k: Input("B", "T", "H", "K", "key"),
                           v: Input("B", "T", "H", "V", "key"),
                           f: Input("B", "T", "H", "logdecay")) -> Output("o", "B", "T", "H", "V"):
    scale = Param(K ** -0.5)  # noqa: F821
    with prefix:
        F = cumsum(f)  # noqa: F821
    with score:
        s = (q @ k.T) * scale + F - key(F)  # noqa: F821
        mask(kpos <= qpos)  # noqa: F821
    with merge:
        o = softmax(s) @ v  # noqa: F841, F821
