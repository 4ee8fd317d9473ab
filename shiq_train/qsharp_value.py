"""Q♯'s distributional value model: the categorical return distribution of the reference (SHIQ_MATH §8).

Q♯ leaves the policy's weights alone and guides the frozen reference at decoding time with
``Q*(s,a) = β log E[exp(Z(s,a)/β)]``, where ``Z(s,a)`` is the reference's return-to-go after taking
token ``a`` in state ``s``. What is learned is the *distribution* of ``Z``: a categorical
``p_θ(·|s,a)`` over fixed atoms ``z_1 < … < z_A``, trained by cross-entropy against the observed
returns-to-go of reference samples projected onto the atoms (C51). ``β`` is not part of the model:
it is chosen at decoding time (``shiq_eval.qsharp``).

Math: :func:`atom_support`, :func:`project_returns`, :func:`returns_to_go`,
:func:`distributional_value_loss` (and :func:`qsharp_value_loss`, the loss with its metrics for a
training loop). Model: :class:`MegatronValueModel` (a megatron-core GPT trunk initialised from the
reference, its final hidden states fed to a linear head over the atoms instead of the vocabulary),
trained from a replay buffer by ``shiq_train.qsharp_train.train_value_model`` and saved as plain
tensors by :func:`save_value_model`; :func:`load_value_model` returns the same weights as an
:class:`HFValueModel` (a Hugging Face Llama trunk plus the head) for KV-cached decoding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
from pathlib import Path

import torch

from shiq_data.io import (
    atomic_dir,
    check_sha256,
    non_finite_as_null,
    one_line,
    read_json_file,
    write_checksum,
)
from shiq_train.checkpoint import load_problem, save_hashed
from shiq_train.hf_convert import (
    LlamaShape,
    ReadKeys,
    hf_classes,
    megatron_to_llama,
    model_config_from_llama,
)
from shiq_train.losses import suffix_sum
from shiq_train.model import full_param_name, model_inputs, unwrap

WEIGHTS_FILE = "value_model.pt"
CONFIG_FILE = "value_model.json"
FORMAT = "shiq-qsharp-value"


# ----------------------------------------------------------------------------------------------
# math (SHIQ_MATH §8)


def atom_support(v_min: float, v_max: float, num_atoms: int = 11, dtype=torch.float32) -> torch.Tensor:
    """``num_atoms`` evenly spaced atoms from ``v_min`` to ``v_max`` (both included), ``[A]`` (SHIQ_MATH §8)."""
    if not (isinstance(num_atoms, int) and num_atoms >= 2):
        raise ValueError(f"num_atoms must be an integer >= 2, got {num_atoms!r}")
    if not (torch.isfinite(torch.tensor([v_min, v_max], dtype=torch.float64)).all() and v_min < v_max):
        raise ValueError(f"need finite v_min < v_max, got v_min={v_min}, v_max={v_max}")
    atoms = torch.linspace(float(v_min), float(v_max), num_atoms, dtype=torch.float64).to(dtype)
    if not (torch.isfinite(atoms).all() and (atoms[1:] > atoms[:-1]).all()):  # (beyond its range, or too close)
        raise ValueError(
            f"{str(dtype).removeprefix('torch.')} cannot hold {num_atoms} finite distinct atoms from "
            f"v_min={float(v_min)!r} to v_max={float(v_max)!r}: give returns of a smaller scale, or a wider "
            "[v_min, v_max]"
        )
    return atoms


def _check_atoms(atoms: torch.Tensor) -> None:
    if atoms.dim() != 1 or atoms.numel() < 1:
        raise ValueError(f"atoms must be a non-empty 1-D tensor [A], got shape {tuple(atoms.shape)}")
    if not torch.isfinite(atoms).all():
        raise ValueError("atoms must be finite")
    if atoms.numel() > 1 and not (atoms[1:] > atoms[:-1]).all():
        raise ValueError(f"atoms must be strictly increasing, got {atoms.tolist()}")


def project_returns(returns: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """C51 projection of scalar returns onto the atoms (SHIQ_MATH §8): ``[...]`` -> ``[..., A]``.

    A return ``g`` is clipped to ``[z_1, z_A]``; between neighbours ``z_i ≤ g ≤ z_{i+1}`` its mass is
    split ``(z_{i+1} − g, g − z_i) / (z_{i+1} − z_i)``, so each row sums to 1 and its expectation is
    exactly ``g`` inside the support (the atoms may be unevenly spaced). A return equal to an atom is
    one-hot on it. Computed in float64; returned in ``returns``' floating dtype.
    """
    _check_atoms(atoms)
    if not torch.isfinite(returns).all():
        raise ValueError("returns must be finite")
    out_dtype = returns.dtype if returns.is_floating_point() else torch.float32
    z = atoms.to(device=returns.device, dtype=torch.float64)
    A = z.numel()
    g = returns.double().clamp(float(z[0]), float(z[-1]))
    if A == 1:
        return torch.ones(*g.shape, 1, dtype=out_dtype, device=g.device)
    lo = (torch.searchsorted(z, g.contiguous(), right=True) - 1).clamp(0, A - 2)
    hi_weight = (g - z[lo]) / (z[lo + 1] - z[lo])
    out = torch.zeros(*g.shape, A, dtype=torch.float64, device=g.device)
    out.scatter_(-1, lo.unsqueeze(-1), (1 - hi_weight).unsqueeze(-1))
    out.scatter_add_(-1, (lo + 1).unsqueeze(-1), hi_weight.unsqueeze(-1))
    return out.to(out_dtype)


def returns_to_go(
    rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """``Z_t = Σ_{k ≥ t, action} γ^{n(t,k)} r_k`` at every action position, ``[B, T]`` (SHIQ_MATH §2, §8).

    The observed return after taking action ``t`` (its own reward included): token rewards, turn
    rewards on the last token of a turn and a sequence reward on the last action all count; non-action
    tokens do not discount. Values at non-action positions are meaningless (mask them).

    Args: rewards ``[B, T]`` float; action_mask ``[B, T]`` bool; segment_ids ``[B, T]`` for packed rows.
    """
    return suffix_sum(rewards.float() if not rewards.is_floating_point() else rewards, action_mask, segment_ids, gamma)


def distributional_value_loss(
    atom_logits: torch.Tensor, returns_to_go: torch.Tensor, action_mask: torch.Tensor, atoms: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of ``p_θ`` against the C51-projected observed return, mean over actions (SHIQ_MATH §8).

    ``L = Σ_{b,t} m_bt H(proj(Z_bt), softmax(atom_logits[b, t])) / Σ m``. ``atom_logits[b, t]`` is the
    value model's output for the prefix ending with the action token at ``t`` (the state after taking
    that action), so its target is the return-to-go from ``t`` on, ``t``'s own reward included
    (:func:`returns_to_go`). For a fixed state the minimiser is the projected empirical distribution
    of its observed returns.

    Args: atom_logits ``[B, T, A]`` unnormalised; returns_to_go ``[B, T]``; action_mask ``[B, T]`` bool;
    atoms ``[A]``. Returns a scalar (0 with a gradient path when there is no action).
    """
    B, T, A = atom_logits.shape
    if returns_to_go.shape != (B, T) or action_mask.shape != (B, T) or atoms.shape != (A,):
        raise ValueError(
            f"shapes do not match: atom_logits {tuple(atom_logits.shape)} [B, T, A], returns_to_go "
            f"{tuple(returns_to_go.shape)} [B, T], action_mask {tuple(action_mask.shape)} [B, T], "
            f"atoms {tuple(atoms.shape)} [A]"
        )
    m = action_mask.bool()
    target = project_returns(torch.where(m, returns_to_go, torch.zeros_like(returns_to_go)).detach(), atoms)
    ce = -(target.to(atom_logits.dtype) * torch.log_softmax(atom_logits, -1)).sum(-1)  # [B, T]
    return (ce * m).sum() / m.sum().clamp(min=1)


def value_mean(atom_logits: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Expected return ``Σ_j p_θ(z_j) z_j`` of each categorical, ``[..., A]`` -> ``[...]`` (SHIQ_MATH §8)."""
    return (torch.softmax(atom_logits.float(), -1) * atoms.to(atom_logits.device).float()).sum(-1)


def qsharp_value_loss(atom_logits: torch.Tensor, batch: dict, atoms: torch.Tensor, gamma: float = 1.0):
    """The value loss of a micro-batch and its metrics, for a training loop (SHIQ_MATH §8).

    Args: atom_logits ``[B, T, A]``; batch with ``rewards``, ``action_mask`` ``[B, T]`` (and
    ``segment_ids`` when packed); atoms ``[A]``. Returns ``(loss, metrics)``: ``value_ce``, ``reward``
    (mean return per row of the batch) and ``value_abs_error`` (mean ``|E_p[Z] − Z|`` over actions).
    """
    m = batch["action_mask"].bool()
    z = returns_to_go(batch["rewards"], m, gamma, batch.get("segment_ids"))
    loss = distributional_value_loss(atom_logits, z, m, atoms)
    with torch.no_grad():
        err = (value_mean(atom_logits, atoms) - z.float()).abs()[m]
        metrics = {
            "value_ce": float(loss),
            "value_abs_error": float(err.mean()) if err.numel() else 0.0,
            "reward": float((batch["rewards"].double() * m).sum(1).mean()),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# the value model


class MegatronValueModel(torch.nn.Module):
    """A megatron-core GPT trunk with a linear head over ``A`` atoms in place of the vocabulary output.

    ``trunk`` is a ``ShiQGPTModel`` from :func:`shiq_train.model.build_model` (single stage), switched
    to return its final normed hidden states ``[B, T, H]``; ``head`` is ``Linear(H, A)`` in float32,
    initialised to zero (a uniform categorical). ``forward(tokens [B, T]) -> [B, T, A]`` atom logits,
    position ``t`` scoring the prefix that ends with token ``t``; ``decoder_input`` ``[T, B, H]`` starts
    the trunk from those hidden states (``shiq_train.prefix_cache``) instead of embedding ``tokens``;
    ``prefix_tree`` runs the rows' shared leading tokens once (``shiq_train.prefix_tree``).
    """

    def __init__(self, trunk, num_atoms: int):
        super().__init__()
        inner = unwrap(trunk)
        inner.return_hidden = True
        self.trunk = trunk
        self.head = torch.nn.Linear(inner.config.hidden_size, num_atoms)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(
        self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None, decoder_input=None, prefix_tree=None
    ):
        tree = {} if prefix_tree is None else {"prefix_tree": prefix_tree}  # shiq_train.prefix_tree
        hidden = self.trunk(**model_inputs(tokens, segment_ids), decoder_input=decoder_input, **tree)  # [B, T, H]
        return self.head(hidden.float())


class HFValueModel(torch.nn.Module):
    """A Hugging Face decoder trunk (``transformers.LlamaModel``) with the linear atom head, for
    KV-cached scoring at decoding time (``shiq_eval.qsharp.GuidedPolicy``).

    ``forward(input_ids [B, L], attention_mask=None, position_ids=None, cache=None) -> [B, L, A]``
    float32 atom logits; ``attention_mask`` may be a 2-D padding mask or a prepared additive
    ``[B, 1, L, P + L]`` mask; ``cache`` a ``transformers`` cache holding ``P`` earlier positions.
    ``atoms`` ``[A]`` is kept as a buffer.
    """

    def __init__(self, trunk, head: torch.nn.Linear, atoms: torch.Tensor):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.register_buffer("atoms", torch.as_tensor(atoms, dtype=torch.float32).clone())

    @property
    def config(self):
        return self.trunk.config

    @classmethod
    def from_causal_lm(cls, causal_lm, atoms: torch.Tensor, head: torch.nn.Linear | None = None) -> HFValueModel:
        """A value model whose trunk is a copy of a Hugging Face causal LM's decoder (``causal_lm.model``)
        and whose head is ``head`` (default: a randomly initialised ``Linear(H, A)``)."""
        trunk = copy.deepcopy(causal_lm.model)
        if head is None:
            head = torch.nn.Linear(trunk.config.hidden_size, len(atoms))
        return cls(trunk, head, atoms)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        hidden = self.trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state
        return self.head(hidden.float())


def save_value_model(
    out_dir, model: MegatronValueModel, atoms: torch.Tensor, hf_config, meta=None, history=None, carry=()
):
    """Write ``out_dir`` atomically: ``value_model.pt`` (plain tensors, ``weights_only`` loadable, its SHA-256
    in ``value_model.pt.sha256``: the
    trunk's full parameters under ``trunk.`` named as in a TP=1, PP=1 megatron GPT, ``head.weight``,
    ``head.bias``, ``atoms``) and ``value_model.json`` (atoms, the Hugging Face config of the trunk and
    ``meta``; no ``β``: it is chosen at decoding time; its SHA-256 in ``value_model.json.sha256``); ``history``
    goes to ``metrics.jsonl``. ``carry``: names of files of the folder replaced that the new one keeps as the same
    files (hard links), so a lock held on one (a run's ``.lock``) is still held once the new folder is in place."""
    tensors = {
        "trunk." + full_param_name(model.trunk, n): p.detach().cpu().clone()
        for n, p in unwrap(model.trunk).named_parameters()
    }
    tensors["head.weight"] = model.head.weight.detach().cpu().clone()
    tensors["head.bias"] = model.head.bias.detach().cpu().clone()
    tensors["atoms"] = atoms.detach().cpu().float().clone()
    config = {
        "format": FORMAT,
        "atoms": [float(a) for a in atoms],
        "num_atoms": int(atoms.numel()),
        "hf_config": json.loads(hf_config.to_json_string()),
        **(meta or {}),
    }

    # standard JSON (_read_config refuses NaN/Infinity): a diverged loss in meta's "last", null
    text = (json.dumps(non_finite_as_null(config), indent=2, allow_nan=False) + "\n").encode()

    def fill(tmp: Path) -> None:
        for name in carry:  # (the folder replaced is still in place while fill runs)
            kept = Path(out_dir) / name
            if kept.is_file() and not kept.is_symlink():
                try:
                    os.link(kept, tmp / name, follow_symlinks=False)
                except OSError:  # a file system without hard links: the new folder starts without it
                    pass
        save_hashed(tensors, tmp / WEIGHTS_FILE)  # and value_model.pt.sha256, checked before loading
        (tmp / CONFIG_FILE).write_bytes(text)  # its SHA-256 beside it too: it shapes the model and the results
        write_checksum(tmp / CONFIG_FILE, hashlib.sha256(text).hexdigest())
        if history is not None:
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")

    return atomic_dir(out_dir, fill, replace=True)


def load_value_model(path, dtype=torch.float32) -> HFValueModel:
    """The saved value model as an :class:`HFValueModel` (``transformers.LlamaModel`` trunk, ``Qwen2Model`` for a
    Qwen2 reference, ``Qwen3Model`` for a Qwen3 one, with the trained weights plus the head), ready for ``shiq_eval.qsharp.GuidedPolicy(ref, value, value.atoms, β)``.
    A damaged or edited folder (a field of value_model.json, weights that do not fit its config, a file that
    is not this format's) is a ``ValueError`` naming the file."""
    from huggingface_hub.errors import StrictDataclassError  # (transformers' config validation)

    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} does not exist: expected a folder written by train_value_model")
    check_sha256(path / CONFIG_FILE)
    config = _read_config(path / CONFIG_FILE)
    check_sha256(path / WEIGHTS_FILE)
    tensors = _read_tensors(path / WEIGHTS_FILE)
    try:
        # (Qwen2's biases, Qwen3's query and key norms: their own trunk, not a Llama one)
        config_class, _, model_class = hf_classes(config["hf_config"].get("model_type"))
        hf_config = config_class.from_dict(config["hf_config"])
        # a trunk training could have built (no sliding window that acts, SiLU MLPs, whole-head rotary embeddings...)
        model_config_from_llama(hf_config)
        shape = LlamaShape.from_hf_config(hf_config)
        trunk = model_class(hf_config)
    except (StrictDataclassError, ValueError, TypeError, ArithmeticError, AttributeError) as e:
        raise ValueError(f"{path / CONFIG_FILE}: field 'hf_config': {one_line(e, 200)}") from None
    mg = ReadKeys({k[len("trunk.") :]: v for k, v in tensors.items() if k.startswith("trunk.")})
    head = torch.nn.Linear(hf_config.hidden_size, config["num_atoms"])
    try:
        hf = megatron_to_llama(mg, shape)
        if mg.unused():  # a value_model.json with fewer layers than the weights: a truncated trunk otherwise
            raise ValueError(f"weights its hf_config has no place for: {mg.unused()[:3]}")
        trunk.load_state_dict({k[len("model.") :]: v for k, v in hf.items() if k.startswith("model.")})
        head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        atoms = tensors["atoms"]
        if not torch.equal(atoms.double(), torch.tensor(config["atoms"], dtype=torch.float64)):
            raise ValueError("its atoms differ from those of value_model.json")
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(
            f"{path / WEIGHTS_FILE}: does not fit {path / CONFIG_FILE} ({one_line(e, 200)}): the folder is "
            "damaged or its value_model.json was edited"
        ) from None
    return HFValueModel(trunk.to(dtype), head, atoms.float()).eval()


def _read_config(path: Path) -> dict:
    """A value_model.json, its fields checked: ``format``, ``hf_config`` an object, ``num_atoms`` an integer
    >= 2 and ``atoms`` that many strictly increasing finite numbers."""
    config = read_json_file(path, hint="; the folder is damaged")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    n, atoms = config.get("num_atoms"), config.get("atoms")
    problems = [
        ("hf_config", "an object", isinstance(config.get("hf_config"), dict)),
        ("num_atoms", "an integer >= 2", isinstance(n, int) and not isinstance(n, bool) and n >= 2),
        (
            "atoms",
            "num_atoms increasing finite numbers",
            isinstance(atoms, list)
            and len(atoms) == n
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) < 1e300 for a in atoms)
            and all(b > a for a, b in zip(atoms, atoms[1:])),
        ),
    ]
    for field, kind, ok in problems:
        if not ok:
            raise ValueError(f"{path}: field {field!r} must be {kind}, got {config.get(field)!r}")
    return config


def _read_tensors(path: Path) -> dict:
    """value_model.pt read with ``weights_only=True``: a dict of tensors, or a ``ValueError`` naming it."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable value model ({load_problem(e)})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{path}: not a value model written by shiq-train (expected a dict of tensors)")
    return tensors
