"""What a user sees when something is off: a misspelt spec name, the tiling reasons on the CPU, the
interpreter's NumPy warnings in `effc check`."""
import warnings

import pytest
import torch

import effc
from effc.errors import SpecError


def test_a_misspelt_library_name_gets_a_suggestion():
    with pytest.raises(SpecError, match=r"did you mean gla\?"):
        effc.load("gal")


def test_an_unknown_name_lists_the_library():
    with pytest.raises(SpecError, match="library specs: .*retention"):
        effc.load("no_such_mechanism_xyz")


def test_cpu_runs_say_the_tiling_reasons_are_a_gpu_model():
    op = effc.load("retention")
    xs = [torch.randn(1, 20, 1, 16) for _ in range(3)]
    op(*xs)
    assert op.last_config.reasons[-1].startswith("on the CPU (Triton's interpreter)")


def test_check_silences_the_interpreters_numpy_warnings():
    from effc.tools.cli import _use_interpreter_without_gpu
    if torch.cuda.is_available():
        pytest.skip("with a GPU the interpreter does not run")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _use_interpreter_without_gpu()  # installs its filter in front of "always"
        warnings.warn_explicit("overflow encountered in exp", RuntimeWarning, "interpreter.py", 1,
                               module="triton.runtime.interpreter")
        warnings.warn_explicit("a real warning", RuntimeWarning, "x.py", 1, module="somewhere.else")
    assert [str(w.message) for w in seen] == ["a real warning"]
