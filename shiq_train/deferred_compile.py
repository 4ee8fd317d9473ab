"""megatron-core's fused kernels compiled at their first call, not wrapped at import.

megatron-core decorates its fused element-wise functions (bias-GeLU, bias-SwiGLU, bias-dropout-add, ...)
with ``megatron.core.jit.jit_fuser``, which is ``torch.compile``. ``torch.compile(fn)`` compiles nothing
until ``fn`` is called, but it imports TorchInductor at once: seconds of every process that imports
megatron-core (3.8 s of a 10.2-s ``import torch; import megatron.core`` on a slow 2-core machine:
``tools/bench_startup.py``), paid even by runs, like ours, that switch every fusion off.

:func:`install` (called by the ``shiq_train`` and ``shiq_eval`` packages, before either imports megatron-core)
makes ``jit_fuser`` a decorator that calls ``torch.compile(fn)`` at ``fn``'s first call and the compiled
function from then on: the same compiled function, compiled at the same moment, without the import. It
changes nothing if megatron-core was imported before, or if its ``jit_fuser`` is not ``torch.compile``.
"""

import functools
import importlib.abc
import importlib.util
import sys

JIT_MODULE = "megatron.core.jit"


def compile_at_first_call(fn=None, **options):
    """``torch.compile(fn, **options)``, made when the result is first called; usable as ``@decorator`` and
    ``@decorator(**options)``."""
    if fn is None:
        return functools.partial(compile_at_first_call, **options)
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return call


class _Loader(importlib.abc.Loader):
    """megatron-core's own loader of ``megatron/core/jit.py``; afterwards, ``jit_fuser`` swapped if it is
    ``torch.compile``."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # get_source, get_filename, ...: tracebacks and inspect read the file as before
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        import torch

        if getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = compile_at_first_call


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing but ``megatron.core.jit`` (through the other finders), once."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Swap megatron-core's ``jit_fuser`` when ``megatron.core.jit`` is imported (nothing if it already was, or
    if this was called before)."""
    if JIT_MODULE in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
