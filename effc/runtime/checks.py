"""Argument checks at the op boundary: every message names the argument and what was expected."""
from __future__ import annotations

import numbers
import os

import torch

from ..errors import ArgumentError
from ..ir import ops as O
from ..ir.nodes import Spec

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernels'; the oracle also takes float64


class TensorInfo:
    """What the checks need of a tensor: its metadata, so they can run outside a torch.compile graph."""

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)

    def dim(self) -> int:
        return len(self.shape)


def describe(x):
    """A hashable, compile-time-constant description of an argument (tensors by metadata)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), str(x.dtype), str(x.device))
    return ("other", type(x).__name__)


def rebuild(desc):
    if desc[0] == "tensor":
        return TensorInfo(desc[1], getattr(torch, desc[2].split(".")[-1]), desc[3])
    return type(desc[1], (), {})()  # a stand-in of the right type name, for the error message


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_meta(values: dict) -> bool:
    """Does a launch take meta tensors (tools.memory's dry run: buffers with shapes and no data)? Then it is
    skipped: the call allocates what it would on a GPU and runs nothing. A launch's tensors share one
    device, so the first tells (this runs before every launch)."""
    first = next((v for v in values.values() if isinstance(v, torch.Tensor)), None)
    return first is not None and first.is_meta


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a tensor that one kernel writes and another reads as a matmul operand: the input's
    16-bit dtype on a GPU (tl.dot's operands are cast to it anyway), fp32 otherwise and under the
    interpreter (whose 16-bit tl.dot is wrong)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) and not interpreting() else torch.float32


def chunk_tile_row(decl, chunk: int, dims: dict[str, int], dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
    """A token's row of a per-token buffer of tiles `decl` (prep's hoisted values, the cut's sums): its shape
    (the feature dims, `C` the chunk) and dtype: [C, d] tiles feed matmuls, the operand dtype; [C] rows fp32."""
    sizes = {**dims, "C": chunk}
    return (tuple(sizes[n] for n in decl.feature_dims),
            operand_dtype(dtype) if decl.feature_dims else torch.float32)


def history_dtype(state, dtype: torch.dtype) -> torch.dtype:
    """Per-chunk states: matrix states are matmul operands (operand_dtype); vector and scalar states
    (normalisers, log-space stabilisers that enter exp) are small and precision-critical: fp32."""
    return operand_dtype(dtype) if len(state.dims) >= 2 else torch.float32


def _count(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pow2(v) -> bool:
    return _count(v) and v > 0 and not v & (v - 1)


_TILE = (lambda v: _pow2(v) and v >= 16, "a power of two >= 16")
_FLAG = (lambda v: isinstance(v, bool), "True or False")
# what the tilings (passes.tiling, passes.softmax) and Triton's launcher accept of each call knob; the rules
# that depend on the call's shapes (a block dividing its dim, segments of a general transition) stay there
_KNOBS = {
    "chunk": _TILE,
    "block": _TILE,
    "walk_block": _TILE,
    "walk_chunk": _TILE,
    "segments": (lambda v: _count(v) and v >= 1, "an integer >= 1"),
    "num_warps": (lambda v: _pow2(v) and v <= 32, "a power of two from 1 to 32"),
    "num_stages": (lambda v: _count(v) and v >= 1, "an integer >= 1"),
    "save_states": _FLAG,
    "defer_merge": _FLAG,
    "output_final_state": _FLAG,
}


# knobs of the linear family's op alone (its walk's block and chunk): elsewhere they would read as params
_SCAN_ONLY_KNOBS = ("walk_block", "walk_chunk")


def check_knobs(split: bool = True, **knobs) -> None:
    """The call's tiling knobs and flags (None: the model's choice), each against what the kernels accept:
    a bad one would otherwise run with garbage tiles or fail deep inside the tiling or the launch.
    `split=False`: a linear spec that splits no dim, whose block is 1 (as `effc tune` passes it)."""
    one = (lambda v: _count(v) and v == 1, "1 (no dim is split)")
    rules = _KNOBS if split else {**_KNOBS, "block": one, "walk_block": one}
    for name, value in knobs.items():
        ok, want = rules[name]
        if value is not None and not ok(value):
            raise ArgumentError(f"{name} must be {want}, got {value!r}")


def check_inputs(spec: Spec, tensors: tuple, for_kernels: bool = True) -> tuple[int, int, int, dict[str, int]]:
    """Returns (B, T, H, feature dim sizes)."""
    names = [d.name for d in spec.inputs]
    if len(tensors) != len(names):
        raise ArgumentError(f"{spec.name} takes {len(names)} tensors ({', '.join(names)}), got {len(tensors)}")
    sizes: dict[str, tuple[int, str]] = {}
    device = None
    for d, x in zip(spec.inputs, tensors):
        want = "(" + ", ".join(d.dims) + ")"
        if not isinstance(x, (torch.Tensor, TensorInfo)):
            raise ArgumentError(f"argument '{d.name}' must be a torch.Tensor of shape {want}, got {type(x).__name__}")
        if x.dim() != len(d.dims):
            raise ArgumentError(f"argument '{d.name}' must have shape {want}, got {tuple(x.shape)}")
        if x.dtype not in DTYPES and (for_kernels or x.dtype != torch.float64):
            want = "float32, bfloat16 or float16" if for_kernels else "float64, float32, bfloat16 or float16"
            raise ArgumentError(f"argument '{d.name}' has dtype {x.dtype}; expected {want}")
        if device is None:
            device = x.device
        elif x.device != device:
            raise ArgumentError(f"argument '{d.name}' is on {x.device}, but '{spec.inputs[0].name}' is on {device}")
        for n, s in zip(d.dims, x.shape):
            if n == "H" and n in sizes and sizes[n][0] != s:
                if s == 0 or sizes[n][0] % s:
                    raise ArgumentError(f"argument '{d.name}' has H={s} heads, which does not divide the "
                                        f"{sizes[n][0]} heads of '{sizes[n][1]}' (grouped heads need H % {s} == 0)")
                continue  # grouped-query: this input is shared by H // s heads
            if n in sizes and sizes[n][0] != s:
                raise ArgumentError(f"argument '{d.name}' has {n}={s} but '{sizes[n][1]}' has {n}={sizes[n][0]}; "
                                    f"expected shape {want} with {n}={sizes[n][0]}")
            sizes.setdefault(n, (s, d.name))
    if for_kernels and device.type == "cpu" and not interpreting():
        raise ArgumentError("CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter); move the inputs to a CUDA "
                            "device, or call op.reference(...) for the PyTorch oracle")
    B, T, H = (sizes[n][0] for n in ("B", "T", "H"))
    _check_rotated_dims(spec, sizes)
    seqs = {d.seq for d in spec.inputs}  # T, and a key sequence of its own (softmax family: S)
    return B, T, H, {n: s for n, (s, _) in sizes.items() if n not in ("B", "H") and n not in seqs}


def _check_rotated_dims(spec: Spec, sizes: dict[str, tuple[int, str]]) -> None:
    """A rotation (rotate_half, rotate_pairs) pairs the features of its axis: that dim must be even."""
    for st in (spec.prefix, spec.score, spec.intra, spec.merge, spec.inter):
        for op in st.ops:
            if op.kind in O.ROTATIONS and op.type is not None:
                d = str(op.type.shape[-1])
                if d in sizes and sizes[d][0] % 2:
                    raise ArgumentError(f"argument '{sizes[d][1]}' has {d}={sizes[d][0]}, but '{op.kind}' at {op.loc} "
                                        f"pairs the features of dim {d}: expected an even {d}")


def state_list(spec: Spec, initial_state) -> list:
    """initial_state (a tensor, a sequence, or a dict by state name) as a list in declaration order."""
    states = [s.name for s in spec.states]
    if initial_state is None:
        return []
    if isinstance(initial_state, dict):
        if set(initial_state) != set(states):
            raise ArgumentError(f"initial_state must give every state of {spec.name} ({', '.join(states)}); "
                                f"got {sorted(initial_state)}")
        return [initial_state[n] for n in states]
    given = [initial_state] if not isinstance(initial_state, (tuple, list)) else list(initial_state)
    if len(given) != len(states):
        raise ArgumentError(f"initial_state must hold {len(states)} tensor(s) ({', '.join(states)}), got {len(given)}")
    return given


def decode_inputs(spec: Spec, tokens: tuple, context=None) -> list:
    """A decoding step's inputs as op(...) takes them, (B, t + 1, H, D): each token, (B, H, D) (a gate (B, H)),
    after that input's earlier tokens in `context` (a sequence of (B, t, H, D) tensors, one per input; None:
    no earlier token)."""
    names = [d.name for d in spec.inputs]
    if len(tokens) != len(names):
        raise ArgumentError(f"{spec.name}.step takes {len(names)} tokens ({', '.join(names)}), got {len(tokens)}")
    for d, x in zip(spec.inputs, tokens):
        want = "(" + ", ".join(n for n in d.dims if n != "T") + ")"
        if not isinstance(x, torch.Tensor) or x.dim() != len(d.dims) - 1:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ArgumentError(f"token '{d.name}' must be one token of shape {want}, got {got}")
    xs = [x.unsqueeze(1) for x in tokens]
    if context is None:
        return xs
    if not isinstance(context, (tuple, list)) or len(context) != len(names):
        raise ArgumentError(f"context must hold the earlier tokens of each input of {spec.name} ({', '.join(names)}) "
                            "as (B, t, H, D) tensors, as the step before returned it")
    check_inputs(spec, tuple(context), for_kernels=False)
    for d, c, x in zip(spec.inputs, context, xs):
        if c.shape[:1] + c.shape[2:] != x.shape[:1] + x.shape[2:]:
            raise ArgumentError(f"token '{d.name}' has shape {tuple(x.shape[:1] + x.shape[2:])}, but its context "
                                f"{tuple(c.shape)} holds tokens of shape {tuple(c.shape[:1] + c.shape[2:])}")
    return [torch.cat([c, x], 1) for c, x in zip(context, xs)]


def check_state(spec: Spec, initial_state, B: int, H: int, dims: dict[str, int], device) -> dict[str, torch.Tensor]:
    if initial_state is None:
        return {}
    states = spec.states
    if isinstance(initial_state, (torch.Tensor, TensorInfo)):
        initial_state = (initial_state,)
    if isinstance(initial_state, dict):
        unknown = set(initial_state) - {s.name for s in states}
        if unknown:
            raise ArgumentError(f"initial_state has unknown state(s) {sorted(unknown)}; "
                                f"{spec.name} has {[s.name for s in states]}")
        given = initial_state
    else:
        if len(initial_state) != len(states):
            raise ArgumentError(f"initial_state must hold {len(states)} tensor(s) "
                                f"({', '.join(s.name for s in states)}), got {len(initial_state)}")
        given = {s.name: x for s, x in zip(states, initial_state)}
    out = {}
    for s in states:
        x = given.get(s.name)
        if x is None:
            continue
        want = (B, H) + tuple(dims[n] for n in s.dims)
        if not isinstance(x, (torch.Tensor, TensorInfo)) or tuple(x.shape) != want:
            got = tuple(x.shape) if isinstance(x, (torch.Tensor, TensorInfo)) else type(x).__name__
            raise ArgumentError(f"initial_state '{s.name}' must have shape {want} (B, H, {', '.join(s.dims)}), got {got}")
        if x.device != device:
            raise ArgumentError(f"initial_state '{s.name}' is on {x.device}; the inputs are on {device}")
        out[s.name] = x
    return out


def check_cu_seqlens(cu_seqlens, B: int, T: int, device) -> int:
    """Packed variable-length batches: returns the number of sequences."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (
            torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ArgumentError("cu_seqlens must be a 1-D int32/int64 tensor [0, end_1, ..., total_T] of sequence ends")
    if B != 1:
        raise ArgumentError(f"with cu_seqlens the inputs are packed as (1, total_T, H, D); got B={B}")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
        raise ArgumentError(f"cu_seqlens must start at 0, not decrease and end at total_T={T}; got {c[:8]}"
                            + ("..." if len(c) > 8 else ""))
    if cu_seqlens.device != device:
        raise ArgumentError(f"cu_seqlens is on {cu_seqlens.device}; the inputs are on {device}")
    return len(c) - 1


def kernel_cu_seqlens(cu_seqlens: torch.Tensor, device) -> torch.Tensor:
    """cu_seqlens as the kernels read it: int32 and contiguous, since they index it with unit stride (a
    strided view of the right values would have them read other memory)."""
    return cu_seqlens.to(device=device, dtype=torch.int32).contiguous()


def param_values(spec: Spec, cache: dict, dims: dict[str, int], given: dict) -> dict[str, float]:
    """Every param of `spec` for these feature dims: given values over defaults (memoised in `cache`,
    since evaluating sympy defaults is slow on a hot path)."""
    from ..ir.nodes import dim
    given = {k: v for k, v in given.items() if v is not None}
    known = {p.name for p in spec.params}
    unknown = set(given) - known
    if unknown:
        knobs = sorted(unknown & set(_SCAN_ONLY_KNOBS))
        hint = f" ({', '.join(knobs)}: knobs of a linear spec's op, not of this one)" if knobs else ""
        raise ArgumentError(f"{spec.name} has no parameter(s) {sorted(unknown)}; its params: {sorted(known)}{hint}")
    for k, v in given.items():
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise ArgumentError(f"parameter {k} must be a real number, got {v!r}")
    key = tuple(sorted(dims.items()))
    if key not in cache:
        subs = {dim(n): v for n, v in dims.items()}
        cache[key] = {p.name: float(p.default.subs(subs)) for p in spec.params}
    return {**cache[key], **{k: float(v) for k, v in given.items()}}
