"""What every kernel of a plan states, in either family: its role, the per-token tensors it loads and
stores, its grid, and its arguments by name in signature order. The code generators print a kernel's
signature from `args` and the launchers build its call from the same list (`Kernel.call`), so the two
cannot drift apart: no positional list is kept in step with a template by hand."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..ir.nodes import TensorDecl

# Who supplies an argument at launch. The first four are run-time values, the rest constexprs (Triton
# compiles a variant per value):
#   tensor - a buffer the op allocates or is given (inputs, outputs, scratch, gradients)
#   param  - a spec parameter (`p_<name>`)
#   layout - the call's batch layout (token counts, cu_seqlens, ...)
#   slot   - where a gradient kernel's part of an input's gradient goes among the buffer's slots
#   shape  - head counts and feature dim sizes (real and padded)
#   tile   - tile sizes of the call's configuration
#   option - code options (varlen, dot dtype, precision)
#   flag   - a switch one launch of the kernel sets (store the history, the summary pass, ...)
ARG_ROLES = ("tensor", "param", "layout", "slot", "shape", "tile", "option", "flag")
CONSTEXPR_ROLES = frozenset({"shape", "tile", "option", "flag"})


@dataclass(frozen=True)
class KernelArg:
    name: str
    role: str

    def __post_init__(self):
        if self.role not in ARG_ROLES:
            raise ValueError(f"kernel argument {self.name}: unknown role '{self.role}' (one of {ARG_ROLES})")

    @property
    def constexpr(self) -> bool:
        return self.role in CONSTEXPR_ROLES


def kernel_args(role: str, names) -> tuple[KernelArg, ...]:
    return tuple(KernelArg(n, role) for n in names)


def unique_args(args) -> tuple[KernelArg, ...]:
    """`args` with repeated names dropped (the first kept): a kernel takes each buffer once."""
    seen: set[str] = set()
    return tuple(a for a in args if not (a.name in seen or seen.add(a.name)))


# what a kernel does; code generators and launchers branch on these, never on a kernel's name
KERNEL_ROLES = ("prep", "walk", "summary", "out", "bwd_inject", "bwd_scan", "bwd_chunks",  # chunked scan
                # online softmax (its forward is a walk too; prefix and its backward: per token)
                "prefix", "bwd_pre", "bwd_walk", "bwd_prefix",
                "pool", "select", "select_t",  # the select stage's block lists (passes.select)
                "decode", "decode_combine")  # decoding against a KV cache: split-KV partials, their merge


@dataclass(frozen=True)
class Kernel:
    """The fields both families' kernel plans share (passes.plan.KernelPlan, passes.softmax_plan.SoftmaxKernel)."""

    name: str  # unique in its plan; also the generated function's infix (<spec>_<name>_kernel)
    role: str  # what the kernel does; kernels of one role share a code shape (bwd_chunks_v, bwd_chunks_g: bwd_chunks)
    loads: tuple[TensorDecl, ...]  # per-token tensors it reads
    stores: tuple[TensorDecl, ...]  # per-token outputs it writes
    grid: str
    args: tuple[KernelArg, ...]  # the signature, in order

    def __post_init__(self):
        if self.role not in KERNEL_ROLES:
            raise ValueError(f"kernel {self.name}: unknown role '{self.role}' (one of {', '.join(KERNEL_ROLES)})")

    @property
    def backward(self) -> bool:
        """A kernel of the derived backward."""
        return self.role.startswith("bwd")

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    def call(self, values: Mapping) -> dict:
        """The keyword arguments of one launch, in signature order, picked by name from `values` (which may
        hold more: values shared by several kernels)."""
        missing = [a.name for a in self.args if a.name not in values]
        if missing:
            raise RuntimeError(f"effc: no value for argument(s) {', '.join(missing)} of kernel {self.name} "
                               "(an effc bug: the launcher does not supply what the plan lists)")
        return {a.name: values[a.name] for a in self.args}
