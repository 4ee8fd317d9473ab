"""Bounded work per entry: a budget of steps, CPU time and memory around every simulator call, and
the process-wide state (numeric precision, module-level data of the simulators) kept as it was.

Why this mechanism. A short sequence of legal calls can make one later call do exponential work:
in ``GorillaFileSystem``, ``cp`` and ``mv`` share subdirectories instead of copying them, so a few
calls repeated k times give a tree of 2**k paths that ``find`` or ``du`` then walk (and ``cp x x``
makes a directory that contains itself). Bounding the arguments cannot prevent that, and a size
accounting of the state would have to know every simulator. Measuring the work itself does not:

* ``sys.setprofile`` installs a hook, for the current thread only and only while a simulator call
  runs, that counts profiler events (every Python and C function call and return). Every 64 events
  it also reads the thread's CPU time and the process's peak resident memory (``getrusage``), and
  the resident memory now (``/proc/self/statm``) when the process has been above the call's limit
  before: a peak set earlier (loading a model), or one the process took over from its parent at
  ``exec`` on Linux, would otherwise hide a call's growth up to that height. When
  the entry's step budget, its time budget or the call's memory allowance is used up, the hook
  raises :class:`BudgetExceeded`, which unwinds the simulator (it derives from ``BaseException``,
  so the simulators' ``except Exception`` clauses do not swallow it) and becomes an error result.
  Once exhausted, the budget refuses every further call of the entry at once.
* The step count is deterministic (the verdict of a trajectory does not depend on the machine's
  load, nor on the process's history: automatic garbage collection is off during the call, since
  a collection there would run the finalizers of unrelated objects under the hook). The price: cyclic
  garbage a call makes stays until the next automatic collection after it, and counts towards the
  call's memory allowance meanwhile (a call that makes much cyclic garbage can now exceed the allowance
  where a collection during it would have freed the garbage). The time budget and the memory allowance
  are backstops for single C calls that do much work in one event. Time is the CPU time of the calling thread, not wall time: on a loaded
  machine an entry of 500 steps can take 1.5 s of wall time (other processes, garbage
  collection), and a wall-clock budget would let the load change verdicts; a call that waits
  instead of computing (paging) is bounded by the memory allowance. No thread, signal or subprocess is involved: it works in any thread and on
  any platform with ``sys.setprofile`` (the memory check is skipped where ``resource`` is missing).
  The cost is one Python function call per event during simulator calls only, which the ground
  truth check of all 800 entries pays in well under a second.
* Memory between two checks is bounded because every object a simulator builds is built from the
  call's arguments (at most :data:`shiq_eval.bfcl.parse.MAX_CALL_CHARS` characters) and the state;
  a result longer than :data:`MAX_RESULT_CHARS` characters is replaced by an error result.

A worker subprocess per entry with a timeout and an address-space limit would also bound C code,
but every check would pay the start-up and the pickling of environments, and a rollout step would
have to ship the state across; the simulators run no long C loops of their own, so the in-process
hook suffices.

Process-wide state: ``MathAPI`` sets ``decimal.getcontext().prec`` and ``mpmath.mp.dps``, and the
long-context simulators share (and one of them fills) module-level dictionaries of ``bfcl_eval``.
:func:`bounded_call` runs each call in a local decimal context and restores ``mpmath.mp.prec``
afterwards; :class:`ModuleState` snapshots the module-level containers of the simulator modules
once and :func:`entry_scope` restores them when an entry starts and ends.
"""

from __future__ import annotations

import copy
import decimal
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

try:
    import resource
except ImportError:  # pragma: no cover - not on Linux
    resource = None

# A result string longer than this is an error result (the longest of the 800 ground truths is
# 31,706 characters: a long-context file read).
MAX_RESULT_CHARS = 1_000_000
# Defaults of one entry's budget. A run of one of the 800 ground truths takes at most 5,312 steps
# (about 860 on average, calls and text charged included); 10**6 steps are about 0.5 to 1 s of
# simulator work.
DEFAULT_STEPS = 1_000_000
DEFAULT_SECONDS = 5.0
DEFAULT_MEMORY_BYTES = 1 << 30
_CHECK_EVERY = 64  # events between two reads of the clock and of the memory
# Steps charged for each call attempt besides the profiled run (parsing, dispatch), so that a
# trajectory of very many cheap or refused calls also runs out, and for every CHARS_PER_STEP
# characters of a call string and of a result, so that the text an entry parses and keeps (the
# results are kept for the response check and fed back to the model) is at most about
# steps * CHARS_PER_STEP characters (10**8 by default).
CALL_STEPS = 100
CHARS_PER_STEP = 100


def call_cost(call: object) -> int:
    """Steps charged for one call attempt (:data:`CALL_STEPS` plus its length)."""
    return CALL_STEPS + (len(call) // CHARS_PER_STEP if isinstance(call, str) else 0)


class BudgetExceeded(BaseException):
    """The work budget of an entry is used up (``BaseException``: simulators cannot swallow it)."""


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if resource else 0


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _open_statm() -> int | None:
    """A descriptor of this process's ``/proc/self/statm`` (opened per call: after a fork it would name
    the parent), or None where there is none."""
    try:
        return os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        return None


def _resident_bytes(statm: int) -> int:
    return int(os.pread(statm, 128, 0).split()[1]) * _PAGE_BYTES  # (size, resident, ...) in pages


@dataclass
class Budget:
    """The work allowed for the simulator calls of one entry.

    ``steps``: profiler events over all calls (deterministic); ``seconds``: CPU time of the
    calling thread over all calls; ``memory_bytes``: growth of the process's resident memory
    during one call over what it held when the call started. Copies of an environment share their budget (``deepcopy`` returns the same
    object).
    """

    steps: int = DEFAULT_STEPS
    seconds: float = DEFAULT_SECONDS
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    spent_steps: int = 0
    spent_seconds: float = 0.0
    exhausted: str | None = field(default=None)

    def __deepcopy__(self, memo) -> Budget:
        return self

    def charge(self, steps: int) -> str | None:
        """Count ``steps`` spent outside a profiled call; the exhaustion message, or None."""
        self.spent_steps += steps
        if self.spent_steps > self.steps and not self.exhausted:
            self.exhausted = f"work limit of this entry: step budget of {self.steps} exhausted"
        return self.exhausted


def bounded_call(budget: Budget | None, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` within ``budget`` (None: unbounded), in a local decimal context and
    with ``mpmath.mp.prec`` restored after; raises :class:`BudgetExceeded` when the budget runs out
    (also at once if it already has)."""
    mp = getattr(sys.modules.get("mpmath"), "mp", None)
    prec = mp.prec if mp is not None else None
    try:
        with decimal.localcontext():
            if budget is None:
                return fn(*args, **kwargs)
            return _run_profiled(budget, fn, args, kwargs)
    finally:
        if mp is not None and mp.prec != prec:
            mp.prec = prec


def _run_profiled(budget: Budget, fn, args, kwargs):
    if budget.exhausted:
        raise BudgetExceeded(budget.exhausted)
    start = time.thread_time()
    deadline = start + budget.seconds - budget.spent_seconds
    max_steps = budget.steps - budget.spent_steps
    peak_start = _peak_rss_bytes()
    statm = _open_statm() if resource else None
    limit = (_resident_bytes(statm) if statm is not None else peak_start) + budget.memory_bytes
    if statm is not None and peak_start <= limit:  # a new peak above the limit is the only way past it
        os.close(statm)
        statm = None
    steps = 0

    def over_memory() -> bool:
        peak = _peak_rss_bytes()
        if peak > limit and peak > peak_start:  # this call set a new peak, above its limit
            return True
        return statm is not None and _resident_bytes(statm) > limit

    def hook(frame, event, arg):
        nonlocal steps
        steps += 1
        if steps % _CHECK_EVERY == 0:
            why = None
            if steps > max_steps:
                why = f"step budget of {budget.steps} exhausted"
            elif time.thread_time() > deadline:
                why = f"time budget of {budget.seconds:g} s exhausted"
            elif resource and over_memory():
                why = f"memory allowance of {budget.memory_bytes} bytes per call exceeded"
            if why:
                budget.exhausted = f"work limit of this entry: {why}"
                raise BudgetExceeded(budget.exhausted)

    previous = sys.getprofile()
    collecting = gc.isenabled()
    gc.disable()  # a collection would run other objects' finalizers under the hook
    sys.setprofile(hook)
    try:
        return fn(*args, **kwargs)
    finally:
        sys.setprofile(previous)
        if collecting:
            gc.enable()
        if statm is not None:
            os.close(statm)
        budget.spent_seconds += time.thread_time() - start
        budget.charge(steps)


class ModuleState:
    """The module-level containers (dict, list, set) of some modules, snapshot once and restorable.

    ``add(module)`` records the module's current bindings and a deep copy of each container the
    first time it is seen (a container bound in several modules is copied once); ``restore()``
    rebinds every name to its original object and puts back the original contents of every
    container that changed.
    """

    def __init__(self):
        self._modules: set[str] = set()
        self._bindings: list[tuple[Any, str, Any]] = []
        self._pristine: dict[int, tuple[Any, Any]] = {}

    def add(self, module) -> None:
        if module.__name__ in self._modules:
            return
        self._modules.add(module.__name__)
        for name, value in vars(module).items():
            if isinstance(value, (dict, list, set)) and not name.startswith("__"):
                self._bindings.append((module, name, value))
                if id(value) not in self._pristine:
                    self._pristine[id(value)] = (value, copy.deepcopy(value))

    def restore(self) -> None:
        for module, name, value in self._bindings:
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        for value, pristine in self._pristine.values():
            if value != pristine:
                fresh = copy.deepcopy(pristine)
                if isinstance(value, list):
                    value[:] = fresh
                else:
                    value.clear()
                    value.update(fresh)


MODULE_STATE = ModuleState()


@contextmanager
def entry_scope() -> Iterator[None]:
    """Run one entry: the simulator modules' data is restored when it starts and when it ends."""
    MODULE_STATE.restore()
    try:
        yield
    finally:
        MODULE_STATE.restore()
