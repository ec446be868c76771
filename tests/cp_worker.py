"""One rank of tests/test_context_parallel.py: `python cp_worker.py CASES.pt OUT_DIR` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set. For every case in CASES.pt (full-length inputs, made by the test), runs
the context-parallel op on this rank's shard, forward and backward, and saves what it computed to
OUT_DIR/rank{RANK}.pt for the test to compare with the single-process op."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import effc  # noqa: E402
from effc.distributed import context_parallel, shard  # noqa: E402
from interpreter_speed import patch_language_once_a_launch  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1":
    patch_language_once_a_launch()


def run_case(case: dict, rank: int, world: int) -> dict:
    layout = case.get("layout", "contiguous")
    cp = context_parallel(effc.load(case["spec"]), layout=layout, schedule=case.get("schedule", "allgather"),
                          overlap=case.get("overlap", True))
    bounds = case.get("bounds")  # uneven shards: explicit (start, end) per rank
    cut = (lambda x: x[:, bounds[rank][0]:bounds[rank][1]]) if bounds else (lambda x: shard(x, layout=layout))
    last = 0 if layout == "zigzag" else world - 1  # the rank holding the sequence's last piece
    xs = [cut(x).detach().clone().requires_grad_(True) for x in case["inputs"]]
    init, cu = case["init"], case.get("cu_seqlens")
    if init is not None:  # dense: read on rank 0; varlen: each rank reads the rows of documents starting on it
        init = tuple(s.detach().clone().requires_grad_(rank == 0 or cu is not None) for s in init)
    stateful = bool(case["grad_final"])  # the softmax family has no state
    o, final = cp(*xs, initial_state=init, output_final_state=stateful, cu_seqlens=cu, **case.get("kw", {}))
    loss = (o * cut(case["grad_o"])).sum()
    if rank == last and stateful:
        finals = (final,) if torch.is_tensor(final) else tuple(final)
        loss = loss + sum((f * g).sum() for f, g in zip(finals, case["grad_final"]))
    else:
        assert final is None, "only the rank of the last piece returns a final state, and only for a spec with a state"
        finals = None
    loss.backward()
    return {"o": o.detach(), "finals": None if finals is None else tuple(f.detach() for f in finals),
            "grads": [x.grad for x in xs],
            "init_grads": None if init is None or (rank != 0 and cu is None) else tuple(s.grad for s in init),
            "plan_bytes": cp.plan(*xs).bytes_per_rank,
            # the state path's steps in order (a hybrid's state branch; none for the softmax family)
            "schedule": getattr(getattr(cp, "linear", cp), "schedule_taken", ()), "plan": str(cp.plan(*xs))}


def main() -> None:
    cases_path, out_dir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cases = torch.load(cases_path)
        results = [run_case(c, rank, world) for c in cases]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
