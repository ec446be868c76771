"""codegen.at_first_use: a generated block's tile loads moved down to their first reader (registers a tile
holds before it is read), and runtime.launch.spill_free, which runs a kernel from the module with late loads
only where its own compiled form spills."""
from __future__ import annotations

from effc.codegen import at_first_use

BLOCK = """\
    a = 1
    v_x = tl.load(p + a)
    v_y = tl.load(q)
    v_z = tl.load(r)
    b = 2
    for i in range(3):
        c = v_y + i
    d = v_x + b
    a = 5"""


def test_a_load_moves_to_its_first_reader_and_above_a_block_that_reads_it():
    assert at_first_use(BLOCK).split("\n") == [
        "    a = 1", "    b = 2", "    v_y = tl.load(q)", "    for i in range(3):", "        c = v_y + i",
        "    v_x = tl.load(p + a)", "    d = v_x + b", "    a = 5", "    v_z = tl.load(r)"]


def test_a_load_stays_above_a_line_that_redefines_its_address():
    block = "    v_x = tl.load(p + a)\n    b = 2\n    a = 3\n    d = v_x"
    assert at_first_use(block).split("\n") == ["    b = 2", "    v_x = tl.load(p + a)", "    a = 3", "    d = v_x"]


def test_a_load_unread_in_its_loop_body_stays_in_it():
    block = ("    for vb in range(2):\n        v_s = tl.load(s + vb)\n        e = 1\n    v_g = tl.load(g)\n"
             "    f = v_g")
    assert at_first_use(block).split("\n") == [
        "    for vb in range(2):", "        e = 1", "        v_s = tl.load(s + vb)", "    v_g = tl.load(g)",
        "    f = v_g"]


def test_move_false_leaves_the_block():
    assert at_first_use(BLOCK, move=False) == BLOCK


def test_a_load_read_in_an_else_branch_goes_above_the_if():
    block = "    v_q = tl.load(q)\n    if A:\n        x = 1\n    else:\n        y = v_q\n    z = 2"
    assert at_first_use(block).split("\n") == [
        "    v_q = tl.load(q)", "    if A:", "        x = 1", "    else:", "        y = v_q", "    z = 2"]


def _kernel_text(source: str, name: str) -> str:
    start = source.index(f"def {name}(")
    end = source.find("\n@triton.jit", start)
    return source[start:end if end > 0 else None]


def test_the_module_keeps_loads_first_and_its_late_twin_moves_them_in_chunk_parallel_kernels_only():
    import effc
    from effc.codegen.triton import emit_module

    plan = effc.load("gated_delta_net").comp.plan
    early, late = emit_module(plan), emit_module(plan, late_loads=True)
    assert _kernel_text(early, "gated_delta_net_walk_kernel") == _kernel_text(late, "gated_delta_net_walk_kernel")
    sums_early = _kernel_text(early, "gated_delta_net_bwd_sums_kernel").split("\n")
    sums_late = _kernel_text(late, "gated_delta_net_bwd_sums_kernel").split("\n")
    assert sorted(sums_early) == sorted(sums_late) and sums_early != sums_late
    first_load = lambda lines: next(i for i, x in enumerate(lines) if x.lstrip().startswith("v_") and "tl.load(" in x)
    first_dot = lambda lines: next(i for i, x in enumerate(lines) if "tl.dot(" in x)
    assert first_load(sums_early) < first_dot(sums_early)
    loads = lambda lines: [i for i, x in enumerate(lines) if x.lstrip().startswith("v_") and "tl.load(" in x]
    assert max(loads(sums_late)) > max(loads(sums_early))


class _Compiled:
    def __init__(self, spills):
        self.n_spills = spills

    def _init_handles(self):
        if self.n_spills is None:
            from triton.runtime.errors import OutOfResources
            raise OutOfResources(300000, 232448, "shared memory")
        if self.n_spills == "broken":
            raise TypeError("a Triton whose warmup takes other arguments")


class _Kernel:
    arg_names, constexprs = ("x_ptr", "C"), (1,)

    def __init__(self, name, spills):
        self.__name__, self.spills, self.compiles = name, spills, 0

    def warmup(self, *, grid, **kwargs):
        self.compiles += 1
        return _Compiled(self.spills)


def test_a_kernel_that_spills_runs_from_the_late_module_decided_once_per_compiled_form(monkeypatch):
    import types

    import torch

    from effc.runtime import launch

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "_SPILL_FREE", {})
    twin = _Kernel("k_kernel", 0)
    late = lambda: types.SimpleNamespace(k_kernel=twin)
    spilling, fitting, too_big = _Kernel("k_kernel", 96), _Kernel("k_kernel", 0), _Kernel("k_kernel", None)
    broken = _Kernel("k_kernel", "broken")
    args = {"x_ptr": torch.zeros(2), "C": 32}
    for _ in range(2):
        assert launch.spill_free(spilling, late, (1,), args, {"num_warps": 8}) is twin
        assert launch.spill_free(fitting, late, (1,), args, {"num_warps": 8}) is fitting
        assert launch.spill_free(too_big, late, (1,), args, {"num_warps": 8}) is too_big  # launch_fitting's case
        assert launch.spill_free(broken, late, (1,), args, {"num_warps": 8}) is broken  # the launch raises it
    assert spilling.compiles == fitting.compiles == 1
    assert launch.spill_free(spilling, late, (1,), {**args, "C": 64}, {"num_warps": 8}) is twin
    assert spilling.compiles == 2  # another compiled form: decided again


def test_the_interpreter_never_compiles_for_the_spill_check(monkeypatch):
    from effc.runtime import launch

    monkeypatch.setattr(launch, "interpreting", lambda: True)
    k = _Kernel("k_kernel", 96)
    assert launch.spill_free(k, lambda: None, (1,), {"C": 32}, {}) is k and k.compiles == 0


def test_every_linear_spec_has_a_late_twin_with_the_same_kernels_and_signatures():
    """spill_free takes a kernel from the twin by name on the GPU only: a twin missing a kernel, or one whose
    arguments differ, would fail there and nowhere in the CPU suite."""
    import effc

    for name in effc.library_names():
        op = getattr(effc.load(name), "linear", effc.load(name))
        if not hasattr(op, "late_module"):
            continue  # the softmax family: no chunk-parallel linear kernels
        early, late = op.module, op.late_module
        for kp in op.comp.plan.kernels:
            fn = f"{op.name}_{kp.name}_kernel"
            assert getattr(late, fn).arg_names == getattr(early, fn).arg_names, (name, kp.name)
