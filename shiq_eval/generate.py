"""Sampling from a policy, batched, with a KV cache: the one interface evaluation needs.

A policy is anything with ``generate(prompt_ids, cfg) -> completion_ids`` and ``eos_id``; ``HFPolicy``
wraps a Hugging Face causal LM (its ``generate`` keeps the KV cache). Token ids in, token ids out:
chat templating belongs to the caller, so the same prompts reach every model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class HFPolicy:
    """A Hugging Face causal LM as a policy. Prompts are left-padded within a batch."""

    def __init__(self, model, eos_id: int, pad_id: int | None = None):
        self.model = model.eval()
        self.eos_id = int(eos_id)
        self.pad_id = int(eos_id if pad_id is None else pad_id)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], cfg: SamplingConfig, progress: bool = False) -> list[list[int]]:
        """Completion token ids per prompt, cut after the first end-of-sequence token (kept).

        Batch ``i`` is sampled under seed ``cfg.seed + i``, so results do not depend on what else runs.
        """
        out: list[list[int]] = []
        starts = range(0, len(prompt_ids), cfg.batch_size)
        for i, start in enumerate(tqdm(starts, desc="generate", disable=not progress)):
            batch = prompt_ids[start : start + cfg.batch_size]
            if any(len(p) == 0 for p in batch):
                raise ValueError(f"prompt {start + next(j for j, p in enumerate(batch) if not p)} is empty")
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for j, p in enumerate(batch):
                ids[j, width - len(p) :] = torch.tensor(p)
                attn[j, width - len(p) :] = 1
            torch.manual_seed(cfg.seed + i)
            kw = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0) if cfg.temperature > 0 \
                else dict(do_sample=False)
            gen = self.model.generate(
                input_ids=ids, attention_mask=attn, max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos_id,
                pad_token_id=self.pad_id, use_cache=True, **kw,
            )[:, width:]
            for row in gen.tolist():
                out.append(row[: row.index(self.eos_id) + 1] if self.eos_id in row else row)
        return out
