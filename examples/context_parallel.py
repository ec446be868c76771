"""Context parallel: one long sequence split over the ranks of a process group, checked against one process.

    torchrun --nproc_per_node 2 examples/context_parallel.py            # CPU (gloo, Triton's interpreter)
    torchrun --nproc_per_node 4 examples/context_parallel.py --spec delta_net --tokens 4096   # GPUs (NCCL)
    torchrun --nproc_per_node 2 examples/context_parallel.py --spec softmax_attn     # all-gather of K and V
    torchrun --nproc_per_node 2 examples/context_parallel.py --spec swax --window 16  # both paths at once
    torchrun --nproc_per_node 4 examples/context_parallel.py --spec softmax_attn --layout zigzag  # balanced
    torchrun --nproc_per_node 4 examples/context_parallel.py --spec delta_net --schedule ring  # states rank to rank

Every rank draws the same full inputs (same seed), keeps its shard of the time axis (contiguous or zig-zag),
runs the context-parallel op forward and backward, and compares its shard of the output and of the gradients,
and (the rank of the last piece) the final state of a spec with a state, with the single-process op run on the
full sequence.
"""
import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before effc imports a kernel module

import torch.distributed as dist  # noqa: E402

import effc  # noqa: E402
from effc.distributed import context_parallel  # noqa: E402
from effc.distributed import shard as cut  # noqa: E402
from effc.runtime.verify import random_inputs, random_state  # noqa: E402


def say(line: str) -> None:
    """One write per line: the ranks share the terminal, and print's two writes could interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="gla", help="a library spec or .attn file: linear, softmax or hybrid")
    ap.add_argument("--tokens", type=int, default=90, help="total sequence length, split over the ranks")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=16, help="every feature dim (K, V)")
    ap.add_argument("--window", type=int, default=None, help="the spec's `window` param, if it has one")
    ap.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag"),
                    help="zigzag: rank r holds pieces r and 2N-1-r of 2N (balances causal attention)")
    ap.add_argument("--schedule", default="allgather", choices=("allgather", "ring"),
                    help="ring: each rank receives its entering state from the previous one (state specs)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="state specs: keep the serial schedule (summary, all-gather, fold, local run)")
    args = ap.parse_args()
    params = {} if args.window is None else {"window": args.window}

    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)

    op = effc.load(args.spec)
    cp = context_parallel(op, layout=args.layout, schedule=args.schedule, overlap=not args.no_overlap)

    def shard(x):
        return cut(x, layout=args.layout)

    dims = {d: args.dim for s in op.spec.inputs for d in s.feature_dims}
    full = random_inputs(op.spec, 1, args.tokens, args.heads, dims, device=device)
    stateful = bool(op.spec.states)  # the softmax family carries no state
    s0 = random_state(op.spec, 1, args.heads, dims, device=device) if stateful else None
    if rank == 0:
        say(str(cp.plan(*[shard(x) for x in full])))

    def leaves(s):
        if s is None:
            return None
        return s.clone().requires_grad_(True) if torch.is_tensor(s) else tuple(x.clone().requires_grad_(True) for x in s)

    xs = [shard(x).clone().requires_grad_(True) for x in full]
    init = leaves(s0)
    o, final = cp(*xs, initial_state=init, output_final_state=stateful, **params)  # final: last rank only
    finals = [] if final is None else [final] if torch.is_tensor(final) else list(final)
    (o.square().sum() + sum(f.sum() for f in finals)).backward()      # each rank: its part of the loss

    # the same on one process, for the check
    ref_xs = [x.clone().requires_grad_(True) for x in full]
    ref_init = leaves(s0)
    ref_o, ref_final = op(*ref_xs, initial_state=ref_init, output_final_state=stateful, **params)
    ref_finals = [] if ref_final is None else [ref_final] if torch.is_tensor(ref_final) else list(ref_final)
    (ref_o.square().sum() + sum(f.sum() for f in ref_finals)).backward()

    errs = {"output": (o - shard(ref_o)).abs().max().item()}
    for i, (x, r) in enumerate(zip(xs, ref_xs)):
        errs[f"grad {op.spec.inputs[i].name}"] = (x.grad - shard(r.grad)).abs().max().item()
    if rank == (0 if args.layout == "zigzag" else world - 1) and stateful:  # the rank of the last piece
        errs["final state"] = max((f - r).abs().max().item() for f, r in zip(finals, ref_finals))
    if rank == 0 and stateful:
        mine = [init] if torch.is_tensor(init) else list(init)
        refs = [ref_init] if torch.is_tensor(ref_init) else list(ref_init)
        errs["grad initial_state"] = max((a.grad - b.grad).abs().max().item() for a, b in zip(mine, refs))
    steps = getattr(getattr(cp, "linear", cp), "schedule_taken", ())  # the state path's steps, in order
    if steps:
        say(f"rank {rank}/{world} steps: {'; '.join(steps)}")
    say(f"rank {rank}/{world}: {xs[0].shape[1]} tokens; max |cp - single process|: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
