"""The persistent tuning cache: `effc tune` writes the fastest tile configuration it measured; the op
reads it (`lookup`, through the `Tuned` mixin of both op families) before falling back to the model's
choice. Nothing here ever times or compiles.

Key: (spec hash, backend, GPU name, shape bucket, dtype), plus effc's CODEGEN_VERSION.
- spec hash: sha256 of the typed IR's printed form, so edits to comments or formatting keep entries
  and any change to what the spec computes drops them.
- shape bucket: `BH{B*H}-T{T rounded up to a power of two}-{dim}{size}...`, e.g. BH32-T8192-K128-V128.
  B*H is the number of programs per split block (what the wave model fills the GPU with); T picks how
  many chunks each walks, and configurations tuned at 8192 serve 4097..8192. The feature dims are
  exact: they fix the tile shapes.
- an entry whose codegen version differs from the running effc's is ignored (and rewritten by the
  next `effc tune`): the kernels it was measured on no longer exist.

One JSON file per key under `$EFFC_CACHE_DIR/tuning/`, written atomically (temp file + rename), so
concurrent tuners never leave a half-written entry; the last writer of a key wins. A file that does
not parse is ignored with a warning naming it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import codegen
from ..errors import SpecError
from ..ir.printer import print_spec
from ..runtime.cache import cache_dir, write_atomic
from .tiling import Problem
from .triton_faults import backward_fault, block_limit, longest_dot_chain, triton_version

FORMAT = 1
KNOBS = ("chunk", "block", "segments", "num_warps", "num_stages", "defer_merge", "walk_block", "walk_chunk")
_FLAG_KNOBS = ("defer_merge",)  # 0 or 1; the others are positive integers
# knobs an entry may leave out: the softmax family has no walk_block or walk_chunk, entries written before
# they existed take the model's, and a walk_chunk is recorded only where a coarse walk won
_OPTIONAL_KNOBS = ("walk_block", "walk_chunk")


def tuning_dir() -> Path:
    return cache_dir() / "tuning"


def shape_bucket(B: int, T: int, H: int, dims) -> str:
    t = 1 << max(0, T - 1).bit_length()
    return f"BH{B * H}-T{t}-" + "-".join(f"{n}{v}" for n, v in sorted(dict(dims).items()))


def spec_hash(comp) -> str:
    return hashlib.sha256(print_spec(comp.typed).encode()).hexdigest()[:16]


def device_name(device) -> str:
    """The GPU's name as the cache keys it; CPU tensors (Triton's interpreter) are 'cpu'."""
    import torch
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TuningKey:
    spec: str
    spec_hash: str
    backend: str
    gpu: str
    bucket: str
    dtype: str
    codegen: int

    @classmethod
    def of(cls, op, problem: Problem, gpu: str, dtype) -> "TuningKey":
        return cls(op.name, spec_hash(op.comp), op.backend, gpu, shape_bucket(problem.B, problem.T, problem.H,
                                                                             problem.dims),
                   dtype_name(dtype), codegen.CODEGEN_VERSION)

    @property
    def path(self) -> Path:
        # the codegen version stays out of the name, so a newer effc's `effc tune` replaces the stale file
        ident = json.dumps([self.spec_hash, self.backend, self.gpu, self.bucket, self.dtype])
        digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
        return tuning_dir() / f"{self.spec}-{self.bucket}-{self.dtype}-{digest}.json"


@dataclass(frozen=True)
class Entry:
    key: TuningKey
    config: dict  # the KNOBS
    ms: float  # the winner's time when tuned
    default: dict  # the model's choice it was measured against
    default_ms: float
    shape: dict  # the call shape it was tuned at (B, T, H, dims)
    tried: int = 0  # candidates timed
    tuned_at: float = 0.0
    partition: str | None = None  # the backward's gradient partition, when one beat the plan's default


# what a damaged file raises on reading and parsing (ValueError covers bad JSON and bad UTF-8,
# RecursionError JSON nested too deep): a corrupt entry is ignored, never an exception
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, RecursionError)


def _parse(text: str) -> Entry:
    raw = json.loads(text)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"not an effc tuning entry of format {FORMAT}")
    key = TuningKey(**raw["key"])
    if not all(isinstance(getattr(key, f), int if f == "codegen" else str) for f in key.__dataclass_fields__):
        raise ValueError(f"'key' has fields of the wrong type: {raw['key']}")
    for part in ("config", "default"):
        knobs = raw[part]
        required = set(KNOBS) - set(_OPTIONAL_KNOBS)
        if not isinstance(knobs, dict) or not required <= set(knobs) <= set(KNOBS) or not all(
                isinstance(v, int) and (v in (0, 1) if k in _FLAG_KNOBS else v > 0) for k, v in knobs.items()):
            raise ValueError(f"'{part}' must give positive integers for {', '.join(KNOBS)} (0 or 1 for "
                             f"{', '.join(_FLAG_KNOBS)}), got {knobs}")
    ms, default_ms = float(raw["ms"]), float(raw["default_ms"])
    if not (0 < ms < math.inf and 0 < default_ms < math.inf):
        raise ValueError(f"times must be positive, got ms={ms}, default_ms={default_ms}")
    if not isinstance(raw["shape"], dict):
        raise ValueError(f"'shape' must be an object, got {raw['shape']!r}")
    partition = raw.get("partition")
    if partition is not None and not isinstance(partition, str):
        raise ValueError(f"'partition' must be a partition's name or null, got {partition!r}")
    return Entry(key, raw["config"], ms, raw["default"], default_ms, raw["shape"],
                 int(raw.get("tried", 0)), float(raw.get("tuned_at", 0.0)), partition)


def read_entry(path: Path) -> Entry | None:
    """The entry in `path`; None when there is none, or (with a warning) when it does not parse."""
    try:
        return _parse(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # no entry (NotADirectoryError: the cache dir is below a file)
        return None
    except _UNREADABLE as e:
        warnings.warn(f"effc tuning cache: ignoring unreadable entry {path} ({type(e).__name__}: {str(e)[:200]}); "
                      "`effc tune` rebuilds it", stacklevel=2)
        return None


def store(key: TuningKey, config: dict, ms: float, default: dict, default_ms: float, shape: dict,
          tried: int = 0, partition: str | None = None) -> Path:
    entry = {"format": FORMAT, "key": asdict(key), "config": {k: int(config[k]) for k in KNOBS if k in config},
             "ms": ms, "default": {k: int(default[k]) for k in KNOBS if k in default}, "default_ms": default_ms,
             "shape": shape, "tried": tried, "tuned_at": time.time(), "partition": partition}
    return write_atomic(key.path, json.dumps(entry, indent=1))


# -- compiled variants that faulted on a GPU ---------------------------------------------------------
# A kernel that faults (an illegal memory access: a Triton miscompile) loses its process's CUDA context,
# so `effc tune` records it here and goes on in a fresh process, which prunes it. One file per
# (spec, backend, GPU, variant): concurrent tuners never rewrite each other's.

def _faults_root() -> Path:
    return tuning_dir() / "faults"


def _faults_dir(op, gpu: str) -> Path:
    ident = json.dumps([spec_hash(op.comp), op.backend, gpu, codegen.CODEGEN_VERSION])
    return _faults_root() / f"{op.name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def clear_faults() -> int:
    """Forget every recorded fault (a Triton upgrade may have fixed them; the next tune finds any that
    remain). Returns how many records were removed."""
    records = list(_faults_root().rglob("*.json")) if _faults_root().is_dir() else []
    for path in records:
        path.unlink(missing_ok=True)
    return len(records)


def record_fault(op, gpu: str, variant: tuple[int, ...], reason: str) -> Path:
    path = _faults_dir(op, gpu) / ("-".join(map(str, variant)) + ".json")
    return write_atomic(path, json.dumps({"variant": list(variant), "reason": reason, "gpu": gpu, "at": time.time()}))


def known_faults(op, gpu: str) -> dict[tuple[int, ...], str]:
    """The variants (chunk, block, warps, stages, defer_merge) that faulted for this spec, backend and GPU under the
    running codegen version, with what the GPU said."""
    out = {}
    d = _faults_dir(op, gpu)
    for path in sorted(d.glob("*.json")) if d.is_dir() else ():
        try:
            raw = json.loads(path.read_text())
            out[tuple(int(v) for v in raw["variant"])] = str(raw["reason"])
        except _UNREADABLE:
            continue  # a half-written or foreign file: the fault is found again if it is real
    return out


def entries() -> list[tuple[Path, Entry | None]]:
    """Every file of the tuning cache with its entry (None: unreadable), for `effc cache ls`."""
    d = tuning_dir()
    if not d.is_dir():
        return []
    out = []
    for path in sorted(d.glob("*.json")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append((path, read_entry(path)))
    return out


def is_current(entry: Entry) -> bool:
    return entry.key.codegen == codegen.CODEGEN_VERSION


def lookup(op, problem: Problem, device, dtype, overrides: dict, keyed=None):
    """The tuned configuration for this call, with `overrides` (the op's explicit arguments) winning
    over tuned values; None when nothing current is recorded (the op then asks the model). The op
    builds the configuration from the entry's knobs (`op.tiles`). `keyed`: the (op, problem) the entry is
    recorded under when it is not this op's (a call whose dims run in parts: the caller's op and dims, which
    `effc tune` timed)."""
    if dtype is None:
        return None
    key_op, key_problem = keyed or (op, problem)
    key = TuningKey.of(key_op, key_problem, device_name(device), dtype)
    entry = read_entry(key.path)
    if entry is None or entry.key != key:
        return None
    given = {k: v for k, v in overrides.items() if v is not None}
    tuned = dict(entry.config)
    if "block" in given:  # the tuned walk block was chosen for the tuned block: the model picks one for the given
        tuned = {k: v for k, v in tuned.items() if k != "walk_block"}
    if "chunk" in given:  # so was a coarse walk's chunk for the tuned chunk
        tuned = {k: v for k, v in tuned.items() if k != "walk_chunk"}
    if entry.partition and entry.partition in {c.name for c in getattr(op.comp.plan, "partitions", ())}:
        tuned["partition"] = entry.partition
    try:
        cfg = op.tiles(problem, tuned, **given)
    except SpecError as e:
        warnings.warn(f"effc tuning cache: ignoring entry {key.path}: {e}", stacklevel=2)
        return None
    why = (f"tuned for {key.bucket} {key.dtype} on {key.gpu}: {entry.ms:.3f} ms vs the model's "
           f"{entry.default_ms:.3f} ms ({key.path.name})")
    if given:
        why += f"; given: {', '.join(f'{k}={v}' for k, v in given.items())}"
    return replace(cfg, reasons=(why,) + cfg.reasons)


def sm_count(device) -> int:
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # model an H100 when interpreting


class Tuned:
    """Mixed into an op (AttentionOp, SoftmaxOp): its tile configuration per call shape, from `effc tune`'s
    entry when one is recorded for the shape's bucket, else from the model. The op supplies
    `tiles(problem, tuned, **given)`: its configuration from the tuned knobs (None: the model's) with the
    explicit arguments winning. Memoised per call shape in the op's `_configs`: sympy and the cache read
    are slow."""

    _configs: dict

    def tuning_key(self, problem: Problem):
        """The (op, problem) whose `effc tune` entry this op's calls read: its own (None)."""
        return None

    def config(self, B: int, T: int, H: int, dims: dict[str, int], device, dtype=None, **overrides):
        key = (B, T, H, tuple(sorted(dims.items())), str(device), dtype, tuple(sorted(overrides.items())))
        if key not in self._configs:
            import torch
            problem = Problem(B, T, H, key[3], sm_count(device))
            cfg = (lookup(self, problem, device, dtype, overrides, self.tuning_key(problem))  # `effc tune`'s entry
                   or self.tiles(problem, None, **overrides))
            limit = block_limit(self.comp.plan.kernels, torch.device(device))
            if limit and cfg.block > limit:
                split = getattr(self.comp.plan, "split_dim", None)  # none on a hybrid plan: states held whole
                if backward_fault(self.spec.states, dict(problem.dims), split, limit, torch.device(device)):
                    # the narrow block would not make the backward run here (it is refused: policy.triton_faults),
                    # and the forward repeats its K-side work once per block (mesanet's CG steps, 4x at 32, D=128)
                    cfg = replace(cfg, reasons=cfg.reasons + (
                        f"block {cfg.block} kept: the backward is refused on this GPU, so the {limit}-wide block "
                        "that avoids its miscompile would only slow the forward (policy.triton_faults)",))
                elif overrides.get("block") is None:
                    cfg = self.tiles(problem, None, **{**overrides, "block": limit})
                    cfg = replace(cfg, reasons=cfg.reasons + (
                        f"block {limit}: a gradient kernel chains {longest_dot_chain(self.comp.plan.kernels)} "
                        f"dots, which Triton {triton_version()} miscompiles on this GPU at wider blocks "
                        "(policy.triton_faults)",))
            if torch.device(device).type == "cpu":  # the model's reasons are about a GPU
                cfg = replace(cfg, reasons=cfg.reasons + ("on the CPU (Triton's interpreter): the tiles the model "
                                                          "picks for an H100; warps, stages and occupancy do not apply",))
            self._configs[key] = cfg
        return self._configs[key]
