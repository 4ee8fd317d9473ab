"""Process groups, seeding, and the CPU adaptations megatron-core 0.16.1 needs (nothing else).

megatron-core assumes a CUDA device in a few places on the training path. Without a GPU
(``torch.cuda.is_available()`` False) :func:`apply_cpu_adaptations` patches exactly those places,
each as narrowly as it can (one name as seen from one megatron module; torch itself is untouched
except ``Tensor.cuda`` or ``Tensor.type`` for the duration of one megatron call). The measured list follows; line
numbers refer to megatron-core 0.16.1:

- ``rng_tracker`` -- ``tensor_parallel/random.py:235-240``: ``CudaRNGStatesTracker.add`` reads
  ``torch.cuda.get_rng_state()``, and ``:250-277`` ``fork`` swaps CUDA generator states (needed by
  ``model_parallel_cuda_manual_seed`` and by every attention-dropout ``fork()``). Patched:
  ``random.CudaRNGStatesTracker``, the class the tracker factory instantiates, becomes a subclass
  whose named states are CPU generator states (the existing tracker is rebuilt from it).
- ``checkpoint_rng`` -- ``tensor_parallel/random.py:444-460``: activation recomputation
  (``CheckpointFunction``, model.recompute = selective or full) saves and restores the CUDA
  generator state with ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` besides the CPU one and the
  tracker's. Patched: those two functions of ``random`` hold and restore nothing (there is no CUDA
  generator; the CPU state and the tracker's CPU states are still saved and restored).
- ``memory_buffer`` -- ``utils.py:628-633``: ``GlobalMemoryBuffer.get_tensor`` (the attention score
  buffer of ``DotProductAttention``) allocates on ``torch.cuda.current_device()``. Patched:
  ``current_device`` as seen from ``megatron.core.utils`` returns the CPU.
- ``rope_device`` -- ``models/common/embeddings/rotary_pos_embedding.py:162``: the CPU-initialised
  ``inv_freq`` is moved to ``current_device()`` at the first forward. Patched: ``current_device``
  as seen from that module.
- ``schedule_zeros`` -- ``pipeline_parallel/schedules.py:596, 983, 2138``: the token counters
  ``torch.zeros([], device="cuda")``. Patched: ``zeros`` as seen from ``schedules`` maps
  ``"cuda"`` to the CPU.
- ``p2p_device_and_sync`` -- ``pipeline_parallel/p2p_communication.py:190-202, 313, 321``: receive
  and shape buffers on ``current_device()``; ``:242, 398``: ``torch.cuda.synchronize()`` after
  ``batch_isend_irecv``. Patched: ``current_device`` (CPU) and ``synchronize`` (no-op: gloo work is
  complete once ``wait()`` returned) as seen from ``p2p_communication``.
- ``tied_embedding_copy`` -- ``models/common/language_module/language_module.py:244``:
  ``weight.data.cuda()`` before the first/last-stage all-reduce that copies tied embeddings under
  pipeline parallelism. Patched: ``LanguageModule.setup_embeddings_and_output_layer`` is wrapped
  so that, during that call only, ``Tensor.cuda()`` of a CPU tensor returns the tensor itself.
- ``sp_linear_grad`` -- ``tensor_parallel/layers.py:552``: under sequence parallelism the backward of
  a column-parallel linear layer allocates the reduce-scattered input gradient on
  ``current_device()`` (as do ``:261, 597, 607, 873, 899, 1197, 1218``, reached only with options
  not used on CPU). Patched: ``current_device`` as seen from ``layers``.
- ``kv_cache`` -- ``transformer/attention.py:424-431``: the inference KV cache
  (``Attention._allocate_memory``, used when sampling with a ``StaticInferenceContext``) is allocated
  on ``current_device()``. Patched: ``current_device`` as seen from ``attention``.
- ``tp_gather`` -- ``tensor_parallel/mappings.py:91, 141, 148, 181``: gather buffers (the logits
  gathered over vocabulary shards when sampling under tensor parallelism) on ``current_device()``.
  Patched: ``current_device`` as seen from ``mappings``.

On the path of megatron's DistributedDataParallel and distributed optimizer (``shiq_train.dist_optim``):

- ``grad_buffer`` -- ``distributed/param_and_grad_buffer.py:783, 800, 806``: the contiguous parameter and
  gradient buffers on ``current_device()``. Patched: ``current_device`` as seen from ``param_and_grad_buffer``.
- ``optimizer_flags`` -- ``optimizer/optimizer.py:473, 481, 485``: ``MixedPrecisionOptimizer``'s
  found-inf flag, overflow buffer and unit loss scale ``torch.tensor(..., device='cuda')``. Patched:
  ``tensor`` as seen from ``optimizer.optimizer`` maps ``"cuda"`` to the CPU.
- ``grad_norm_device`` -- ``optimizer/clip_grads.py:90, 103, 115, 174, 207``: the norm's and clipping's
  work tensors ``torch.zeros``/``torch.tensor(..., device='cuda')``; ``utils.py:1207``: the l2 norm
  without Apex/Transformer Engine (``local_multi_tensor_l2_norm``) returns its result on ``"cuda"``.
  Patched: ``zeros`` and ``tensor`` as seen from ``clip_grads``, ``tensor`` as seen from ``megatron.core.utils``.
- ``param_type_names`` -- ``optimizer/distrib_optimizer.py:361, 420, 582`` and ``clip_grads.py:167``:
  parameters and gradients are recognised by ``tensor.type()`` being ``'torch.cuda.FloatTensor'`` (or
  Half/BFloat16). Patched: ``DistributedOptimizer.__init__`` and ``clip_grad_by_total_norm_fp32`` as seen
  from ``optimizer.optimizer`` are wrapped so that, during those calls only, ``Tensor.type()`` of a CPU
  tensor names its CUDA counterpart.
- ``optimizer_state_alloc`` -- ``optimizer/distrib_optimizer.py:791``: ``load_state_dict`` allocates the
  AdamW state slices on ``current_device()``. Patched: ``current_device`` as seen from ``distrib_optimizer``.

Gloo runs everything else on that path as is: the reduce-scatter of the gradient buffer
(``reduce_scatter_tensor``) and the all-gather of the updated parameters (``all_gather_into_tensor``), both
inside ``_coalescing_manager``.

Two CUDA assumptions are met by configuration instead of patches (see ``shiq_train.model``):
``TransformerConfig(use_cpu_initialization=True)`` (weights and rotary frequencies on CPU) and an
explicit boolean causal mask (``attention_mask=None`` builds it on ``"cuda"``, ``transformer/utils.py:35``).

The "torch view" patches replace the module-global ``torch`` of one megatron module by a view that
forwards every attribute to the real ``torch`` except the one or two named above, so no other module
(and no user code) sees a changed ``torch``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import random
import socket
import types
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")  # parallel.backend

_APPLIED: list[str] = []


# ----------------------------------------------------------------------------------------------
# CPU adaptations


class _CudaView:
    """Stands in for ``torch.cuda`` inside one megatron module; overrides only what it is given."""

    def __init__(self, **overrides):
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchView(types.ModuleType):
    """Stands in for ``torch`` inside one megatron module: every attribute forwards to ``torch``
    except the overrides (and ``cuda``, if a :class:`_CudaView` is given)."""

    def __init__(self, cuda: _CudaView | None = None, **overrides):
        super().__init__("torch")
        if cuda is not None:
            self.cuda = cuda
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _no_sync(device=None) -> None:
    """``torch.cuda.synchronize`` on CPU: gloo ops have completed once ``wait()`` returned."""


def _no_cuda_rng_state(*args, **kwargs) -> None:
    """``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` on CPU: no CUDA generator to save or restore."""


def _zeros_cuda_to_cpu(*size, device=None, **kwargs):
    """``torch.zeros`` that allocates on CPU what megatron asked to allocate on ``"cuda"``."""
    if device is not None and torch.device(device).type == "cuda":
        device = "cpu"
    return torch.zeros(*size, device=device, **kwargs)


def _tensor_cuda_to_cpu(*args, device=None, **kwargs):
    """``torch.tensor`` that allocates on CPU what megatron asked to allocate on ``"cuda"``."""
    if device is not None and torch.device(device).type == "cuda":
        device = "cpu"
    return torch.tensor(*args, device=device, **kwargs)


def _cpu_rng_tracker_class():
    """A ``CudaRNGStatesTracker`` whose named states are CPU generator states.

    On CPU every random op (dropout, CPU initialisation) draws from torch's default CPU generator,
    so ``fork(name)`` swaps that generator's state with the named one and back, which is what the
    CUDA tracker does with the CUDA generator.
    """
    from megatron.core.tensor_parallel import random as mrandom  # heavy: megatron

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(
                        f"current state name {self._current_state_name} is not the same as the "
                        f"desired state name {name}."
                    )
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    CpuRNGStatesTracker._shiq_cpu = True
    return CpuRNGStatesTracker


def _while_calling(original, name: str, replacement):
    """``original`` (a megatron function) that, for the duration of one call, sees the ``torch.Tensor``
    method ``name`` replaced by ``replacement(original_method, tensor, *args, **kwargs)``."""

    def wrapped(*args, **kwargs):
        own = name in vars(torch.Tensor)  # else inherited from torch's C base class
        method = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, lambda t, *a, **kw: replacement(method, t, *a, **kw))
        try:
            return original(*args, **kwargs)
        finally:
            if own:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)

    wrapped._shiq_cpu = True
    wrapped.__wrapped__ = original
    return wrapped


def _cuda_identity_on_cpu(cuda_method, t, *args, **kwargs):
    """``Tensor.cuda()`` that returns a CPU tensor itself."""
    return t if t.device.type == "cpu" else cuda_method(t, *args, **kwargs)


def _cuda_type_name(type_method, t, *args, **kwargs):
    """``Tensor.type()`` naming a CPU tensor as its CUDA counterpart (``torch.cuda.FloatTensor``)."""
    if args or kwargs or t.device.type != "cpu":
        return type_method(t, *args, **kwargs)
    return type_method(t).replace("torch.", "torch.cuda.", 1)


def apply_cpu_adaptations() -> list[str]:
    """Patch megatron-core's CUDA assumptions when no GPU is present; idempotent.

    Returns the names of the adaptations in force (empty when a GPU is available: nothing is
    patched then). Call before building a model; safe to call many times (re-applies nothing).
    """
    if torch.cuda.is_available():
        return []
    if _APPLIED:
        return list(_APPLIED)

    from megatron.core import utils as mutils  # heavy: megatron
    from megatron.core.distributed import param_and_grad_buffer  # heavy: megatron
    from megatron.core.models.common.embeddings import rotary_pos_embedding  # heavy: megatron
    from megatron.core.models.common.language_module import language_module  # heavy: megatron
    from megatron.core.optimizer import clip_grads, distrib_optimizer  # heavy: megatron
    from megatron.core.optimizer import optimizer as moptimizer  # heavy: megatron
    from megatron.core.pipeline_parallel import p2p_communication, schedules  # heavy: megatron
    from megatron.core.tensor_parallel import layers, mappings  # heavy: megatron
    from megatron.core.tensor_parallel import random as mrandom  # heavy: megatron
    from megatron.core.transformer import attention  # heavy: megatron

    if not getattr(mrandom.CudaRNGStatesTracker, "_shiq_cpu", False):
        mrandom.CudaRNGStatesTracker = _cpu_rng_tracker_class()
        # a tracker built before this call (from the CUDA class) would still read CUDA states
        mrandom.initialize_rng_tracker(force_reset=True)
    if mrandom._get_cuda_rng_state is not _no_cuda_rng_state:
        mrandom._get_cuda_rng_state = mrandom._set_cuda_rng_state = _no_cuda_rng_state
    if not isinstance(mutils.torch, _TorchView):
        mutils.torch = _TorchView(cuda=_CudaView(current_device=_cpu_device), tensor=_tensor_cuda_to_cpu)
    if not isinstance(rotary_pos_embedding.torch, _TorchView):
        rotary_pos_embedding.torch = _TorchView(cuda=_CudaView(current_device=_cpu_device))
    if not isinstance(schedules.torch, _TorchView):
        schedules.torch = _TorchView(zeros=_zeros_cuda_to_cpu)
    if not isinstance(p2p_communication.torch, _TorchView):
        p2p_communication.torch = _TorchView(cuda=_CudaView(current_device=_cpu_device, synchronize=_no_sync))
    lm = language_module.LanguageModule
    if not getattr(lm.setup_embeddings_and_output_layer, "_shiq_cpu", False):
        lm.setup_embeddings_and_output_layer = _while_calling(
            lm.setup_embeddings_and_output_layer, "cuda", _cuda_identity_on_cpu
        )
    if not isinstance(layers.torch, _TorchView):
        layers.torch = _TorchView(cuda=_CudaView(current_device=_cpu_device))
    if not isinstance(attention.torch, _TorchView):
        attention.torch = _TorchView(cuda=_CudaView(current_device=_cpu_device))
    if not isinstance(mappings.torch, _TorchView):
        mappings.torch = _TorchView(cuda=_CudaView(current_device=_cpu_device))
    if not isinstance(param_and_grad_buffer.torch, _TorchView):
        param_and_grad_buffer.torch = _TorchView(cuda=_CudaView(current_device=_cpu_device))
    if not isinstance(moptimizer.torch, _TorchView):
        moptimizer.torch = _TorchView(tensor=_tensor_cuda_to_cpu)
    if not isinstance(clip_grads.torch, _TorchView):
        clip_grads.torch = _TorchView(tensor=_tensor_cuda_to_cpu, zeros=_zeros_cuda_to_cpu)
    if not isinstance(distrib_optimizer.torch, _TorchView):
        distrib_optimizer.torch = _TorchView(cuda=_CudaView(current_device=_cpu_device))
    dopt = distrib_optimizer.DistributedOptimizer
    if not getattr(dopt.__init__, "_shiq_cpu", False):
        dopt.__init__ = _while_calling(dopt.__init__, "type", _cuda_type_name)
    if not getattr(moptimizer.clip_grad_by_total_norm_fp32, "_shiq_cpu", False):
        moptimizer.clip_grad_by_total_norm_fp32 = _while_calling(
            moptimizer.clip_grad_by_total_norm_fp32, "type", _cuda_type_name
        )
    _APPLIED[:] = [
        "rng_tracker",
        "checkpoint_rng",
        "memory_buffer",
        "rope_device",
        "schedule_zeros",
        "p2p_device_and_sync",
        "tied_embedding_copy",
        "sp_linear_grad",
        "kv_cache",
        "tp_gather",
        "grad_buffer",
        "optimizer_flags",
        "grad_norm_device",
        "param_type_names",
        "optimizer_state_alloc",
    ]
    return list(_APPLIED)


def device_type() -> str:
    """``cuda`` where a GPU is visible, else ``cpu`` (which GPU is not asked: no CUDA context is made)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device() -> torch.device:
    """The device this process computes on: its local GPU, or the CPU."""
    if device_type() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# process groups


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallelism is whatever is left: ``world / (tp * pp * cp)``.

    ``context_parallel_size`` (cp) splits each sequence over cp ranks inside attention; megatron-core
    runs it only in Transformer Engine's attention (its local attention refuses cp > 1), so it needs
    a CUDA GPU with Transformer Engine (:func:`check_context_parallel`).

    ``virtual_pipeline_model_parallel_size`` (vpp > 1, with pp > 1): each pipeline rank holds vpp
    model chunks (``shiq_train.model.build_model_chunks``; chunk c of rank p holds the layers of
    virtual stage ``c * pp + p``) and ``train_step.forward_backward`` runs megatron's interleaved
    1F1B schedule over the list, which shrinks the pipeline bubble by vpp.

    ``backend`` (``parallel.backend``): the process groups' communication backend. ``auto`` takes ``nccl``
    where a CUDA GPU is visible and ``gloo`` (CPU) where none is; ``nccl`` and ``gloo`` ask for one; each is
    refused in one line where it cannot run (:meth:`resolved_backend`: ``auto`` too, with a GPU and no NCCL).

    ``timeout_minutes`` (``parallel.timeout_minutes``): how long a collective may wait for the slowest rank
    before the run stops, e.g. while data-parallel rank 0 writes and hashes a checkpoint (minutes for 70B).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int = 1
    backend: str = "auto"
    timeout_minutes: float = 30.0

    def __post_init__(self):
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "virtual_pipeline_model_parallel_size",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"parallel.{name} must be an integer >= 1, got {v!r}")
        t = self.timeout_minutes
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 10**6:
            raise ValueError(f"parallel.timeout_minutes must be a number of minutes > 0, got {t!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"parallel.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.virtual_pipeline_model_parallel_size > 1 and self.pipeline_model_parallel_size == 1:
            raise ValueError(
                f"parallel.vpp (virtual_pipeline_model_parallel_size) = {self.virtual_pipeline_model_parallel_size} "
                "interleaves pipeline stages: it needs parallel.pp (pipeline_model_parallel_size) >= 2, or vpp=1"
            )

    def resolved_backend(self) -> str:
        """``nccl`` or ``gloo`` for this machine, or a RuntimeError saying why the one asked for cannot run:
        ``nccl`` needs a CUDA GPU and a torch built with NCCL; ``gloo`` trains on the CPU, so a visible GPU
        (whose tensors the model would be built on) is refused with the way to hide it."""
        gpu = torch.cuda.is_available()
        if self.backend == "auto" and gpu and not dist.is_nccl_available():  # (torch's Windows CUDA builds)
            raise RuntimeError(
                "parallel.backend=auto takes nccl for the visible CUDA GPU, but this torch is built without NCCL: "
                "hide the GPUs with CUDA_VISIBLE_DEVICES= to train on the CPU (gloo), or install a torch with NCCL"
            )
        if self.backend == "auto":
            return "nccl" if gpu else "gloo"
        if self.backend == "nccl" and not (gpu and dist.is_nccl_available()):
            why = "no CUDA GPU is visible" if not gpu else "this torch is built without NCCL"
            raise RuntimeError(f"parallel.backend=nccl needs a CUDA GPU and NCCL, but {why}: use parallel.backend=auto")
        if self.backend == "gloo" and gpu:
            raise RuntimeError(
                "parallel.backend=gloo trains on the CPU, but a CUDA GPU is visible (the model would be built on it): "
                "hide the GPUs with CUDA_VISIBLE_DEVICES= to train on the CPU, or use parallel.backend=auto"
            )
        return self.backend

    def check_fits(self, num_layers: int, micro_batches: int) -> None:
        """Refuse, in one line naming the keys, a model or step the layout cannot run: ``num_layers`` must
        split evenly over the pp (times vpp) stages, and megatron's interleaved schedule (vpp > 1) needs
        ``micro_batches`` (per optimizer step and data-parallel rank) a multiple of pp."""
        pp, vpp = self.pipeline_model_parallel_size, self.virtual_pipeline_model_parallel_size
        if num_layers % (pp * vpp):
            stages = f"parallel.pp x parallel.vpp = {pp} x {vpp}" if vpp > 1 else f"parallel.pp = {pp}"
            raise ValueError(
                f"model.num_layers={num_layers} must be divisible by the number of (virtual) pipeline stages "
                f"{stages}: every stage holds as many layers ({', '.join(str(d) for d in range(1, num_layers + 1) if num_layers % d == 0)} "
                "stages divide it)"
            )
        if vpp > 1 and micro_batches % pp:
            raise ValueError(
                f"parallel.vpp={vpp} (the interleaved schedule) needs data.micro_batches_per_step={micro_batches} "
                f"a multiple of parallel.pp={pp}: use data.micro_batches_per_step={-(-micro_batches // pp) * pp}"
            )


def check_context_parallel(cp: int) -> None:
    """Refuse context parallelism (``cp > 1``) where it cannot run, naming what is needed.

    megatron-core exchanges the key/value blocks of context parallelism only inside Transformer
    Engine's attention (``TEDotProductAttention``); its local attention, the one this machine can run
    without a GPU, asserts ``context_parallel_size == 1``. The training step would also have to give
    each rank its share of every sequence and gather the per-token statistics over the
    context-parallel group before the loss (the losses sum over whole trajectories), which it does
    not do: cp > 1 is refused everywhere, with the reason.
    """
    if cp == 1:
        return
    missing = [
        what
        for what, ok in (
            ("a CUDA GPU", torch.cuda.is_available()),
            ("Transformer Engine", importlib.util.find_spec("transformer_engine") is not None),
        )
        if not ok
    ]
    if missing:
        raise RuntimeError(
            f"parallel.cp={cp}: context parallelism needs a CUDA GPU and Transformer Engine (megatron-core runs it "
            f"only in Transformer Engine's attention); missing here: {' and '.join(missing)}. Use parallel.cp=1"
        )
    raise RuntimeError(
        f"parallel.cp={cp}: context parallelism is not supported by the training step (it would need each rank's "
        "share of every sequence and the per-token statistics gathered over the context-parallel group before the "
        "loss). Use parallel.cp=1 (sequence_parallel and recompute also cut activation memory)"
    )


def _ephemeral_low() -> int:
    """The lowest port of the kernel's range for automatically bound ports (Linux's default where it
    cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago, for a single-host process group's rendezvous.

    Chosen at random *below* the kernel's ephemeral range: the port stays unused between this call and
    the moment rank 0 listens on it (seconds later, after the workers import torch), because the
    kernel never hands it to another socket's automatic bind or outgoing connection, such as gloo's
    own connections in a test running alongside. Falls back to a kernel-chosen port if none is free.
    """
    lo = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(max(1024, lo - 12000), lo)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    parallel: ParallelConfig | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    backend: str | None = None,
    seed: int | None = None,
    timeout_s: float | None = None,
) -> None:
    """Initialise ``torch.distributed`` and megatron's model-parallel groups.

    Rank, world size and rendezvous come from the arguments, else from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); a lone process with none of them
    gets world size 1 with an in-memory store. The backend is ``backend`` if given, else ``parallel.backend``
    (:meth:`ParallelConfig.resolved_backend`: by default ``nccl`` with a GPU, ``gloo`` without).
    Applies the CPU adaptations when no GPU is present, and seeds (:func:`set_seed`) if ``seed`` is
    given. ``world_size`` must be a multiple of ``tp * pp``; cp > 1 is refused (:func:`check_context_parallel`).
    A collective waits ``timeout_s`` seconds at most (default: ``parallel.timeout_minutes``).
    """
    parallel = parallel or ParallelConfig()
    check_context_parallel(parallel.context_parallel_size)
    apply_cpu_adaptations()
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if rank is None:  # (a RANK left in the environment of a lone process is no rank of a launch)
        rank = int(os.environ.get("RANK", 0)) if world_size != 1 else 0
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not a multiple of tensor_model_parallel_size * "
            f"pipeline_model_parallel_size = {tp} * {pp}"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    if not dist.is_initialized():
        if backend is None:
            backend = parallel.resolved_backend()
        rendezvous: dict = {"init_method": init_method}
        if init_method is None and "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise ValueError("init_method (or MASTER_ADDR/MASTER_PORT) is needed for world size > 1")
            rendezvous = {"store": dist.HashStore()}  # a lone process: an in-memory store, no port to race for
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s if timeout_s is not None else 60 * parallel.timeout_minutes),
            **rendezvous,
        )
    from megatron.core import parallel_state  # heavy: megatron

    if dist.get_backend() == "gloo":  # advice for GPUs, said by every rank of a CPU run: not for this one
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
    # megatron's distributed optimizer: torch's deprecations to megatron, and its zeroing of the gradients of
    # parameter shards (views of one buffer, not leaves) are not our users' to act on, said by every rank
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    )
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf", module="megatron")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = parallel.virtual_pipeline_model_parallel_size
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
    )
    if seed is not None:
        set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed torch's CPU generator and megatron's model-parallel RNG tracker.

    Every rank gets the same default seed (so ``use_cpu_initialization`` draws identical master
    weights on every tensor-parallel rank); the tracker gives each tensor-parallel rank its own
    stream for dropout inside tensor-parallel regions.
    """
    from megatron.core import tensor_parallel  # heavy: megatron

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (safe if not initialised)."""
    from megatron.core import parallel_state  # heavy: megatron

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(parallel: ParallelConfig | None = None, **kwargs):
    """``with distributed(ParallelConfig(2, 1), rank=r, world_size=2, init_method=...):`` — calls
    :func:`init_distributed` and always :func:`destroy_distributed` on exit."""
    init_distributed(parallel, **kwargs)
    try:
        yield
    finally:
        destroy_distributed()
