"""megatron-core's ``jit_fuser`` compiles at the first call (``shiq_train.deferred_compile``)."""

import subprocess
import sys
from pathlib import Path

import torch

from shiq_train.deferred_compile import compile_at_first_call

REPO = Path(__file__).resolve().parents[1]


def test_compiles_once_at_the_first_call_with_the_options_given(monkeypatch):
    made = []

    def fake_compile(fn, **options):
        made.append((fn, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    monkeypatch.setattr(torch, "compile", fake_compile)

    def add(x, y=1):
        """adds"""
        return x + y

    plain = compile_at_first_call(add)
    with_options = compile_at_first_call(dynamic=True)(add)
    assert made == [] and plain.__name__ == "add" and plain.__doc__ == "adds"
    assert plain(2, y=3) == ("compiled", 5) and made == [(add, {})]
    assert plain(4) == ("compiled", 5) and len(made) == 1
    assert with_options(1) == ("compiled", 2) and made[1] == (add, {"dynamic": True})


def importing(code: str) -> list[str]:
    res = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split()


PROBE = (
    "import sys; import megatron.core.jit as j; from megatron.core.jit import jit_fuser; "
    "assert j.__loader__.get_source(j.__name__) == open(j.__file__).read(); "
    "from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl; "
    "print('torch._inductor.compile_fx' in sys.modules, jit_fuser.__name__)"
)

# A function megatron-core decorated at import runs through the deferred compile and gives the tanh-approximated
# GeLU of its input plus bias. The eager backend stands in for Inductor, which would need a C++ compiler and
# tens of seconds.
FUSED = (
    "\nimport torch\n"
    "real = torch.compile\n"
    "torch.compile = lambda fn, **o: real(fn, backend='eager', **o)\n"
    "from megatron.core.fusions import fused_bias_gelu as m\n"
    "x, b = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), torch.randn(8)\n"
    "want = torch.nn.functional.gelu(x + b, approximate='tanh')\n"
    "print(torch.allclose(m.bias_gelu(b, x), want, rtol=0, atol=1e-6))\n"
)


def test_megatron_imported_through_the_packages_does_not_load_inductor_and_its_kernels_still_run():
    # (megatron-core imported alone keeps torch.compile and loads Inductor: tests/test_bench_startup.py)
    assert importing("import shiq_train; " + PROBE + FUSED) == ["False", "compile_at_first_call", "True"]
    assert importing("import shiq_eval; " + PROBE) == ["False", "compile_at_first_call"]
