"""Test-harness speed for Triton's interpreter (no effect on what a kernel computes); used by conftest.py and by
the context-parallel rank processes (cp_worker.py), which conftest does not reach."""
from __future__ import annotations


def patch_language_once_a_launch() -> None:
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
