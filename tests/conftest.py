import os

import pytest
import torch

# Without a GPU, run generated kernels in Triton's interpreter; Triton reads this when a kernel module
# is imported, so set it before any test imports one. With a GPU (tests/gpu) keep the real compiler.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_language_once_a_launch():
    """Triton's interpreter patches triton.language for a launch (inspect.getmembers over the language modules
    the kernel's globals hold), and again on every call of a @triton.jit function from inside the kernel
    (InterpretedFunction.__call__, Triton 3.6: tl.zeros, tl.cdiv and effc's helpers, per program), a patch
    never undone: a fifth of the interpreter's time in the backward tests. Within a launch, a call whose
    language modules are patched already skips it; one reading a module not yet patched (tl.core, from
    triton.language's own functions) patches it as before."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter as interp
    if not all(hasattr(interp, n) for n in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return  # another Triton: its interpreter as it is
    patch, launch = interp._patch_lang, interp.GridExecutor.__call__
    state = {"launches": 0, "patched": set()}

    def languages(fn) -> set:
        return {id(m) for m in fn.__globals__.values() if inspect.ismodule(m) and m in (tl, tl.core)}

    def patch_once(fn):
        mods = languages(fn)
        if state["launches"] and mods <= state["patched"]:
            return interp._LangPatchScope()  # nothing patched, nothing to undo
        if state["launches"]:
            state["patched"] |= mods
        return patch(fn)

    def counted_launch(self, *args, **kwargs):
        state["launches"] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["launches"] -= 1
            state["patched"] = set()
    interp._patch_lang, interp.GridExecutor.__call__ = patch_once, counted_launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_a_launch()


@pytest.fixture(autouse=True)
def _bounds_checked_interpreter():
    """Under the interpreter, every load and store a kernel makes must stay inside its tensor arguments
    (tests/memcheck.py): where a GPU would fault, the interpreter reads whatever lies past the tensor."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from memcheck import checked_memory
    with checked_memory():
        yield


_SLOW = os.path.join(os.path.dirname(__file__), "slow_tests.txt")


def pytest_collection_modifyitems(config, items):
    """The tests listed in slow_tests.txt (scripts/tier_tests.py: measured >= 1 s on 2 cores) run in the full
    tier only, as if marked `slow`: the fast tier (`-m "not slow"`) stays under 3 minutes on the CI's 2 cores."""
    with open(_SLOW) as f:
        listed = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    for item in items:
        if item.nodeid in listed:
            item.add_marker(pytest.mark.slow)
