"""The tokenizer's pipeline fingerprint: two tokenizers with one vocabulary and merges (one ``fingerprint``) that
cut text differently (GPT-2 with and without ``add_prefix_space``) differ in ``tokenizer.pipeline_fingerprint``;
append, show and mix refuse the other one in one line naming the manifest and the field (exit 2); a manifest
written before the field existed still opens, validates, appends and shows; new manifests carry it through
build, append, curation, retokenize and export."""

import json
import shutil

import pytest
from data_cli_runs import run

from shiq_data.buffer import read_manifest, write_buffer
from shiq_data.readers import get_format
from shiq_data.tokenizers import (
    PIPELINE_FIELD,
    fingerprint,
    gpt2_folder,
    load_tokenizer,
    pipeline_fingerprint,
    pipeline_mismatch,
)

FIELD = f"tokenizer.{PIPELINE_FIELD}"
RECORDS = [
    {"prompt": "Say hello.", "completion": "hello world", "reward": 1.0},
    {"prompt": "Say hello.", "completion": "hello there", "reward": -1.0},
    {"prompt": "Name a fruit.", "completion": "apple", "reward": 0.5},
]


def _save_gpt2(folder, **kwargs):
    """GPT-2's tokenizer saved as a Hugging Face folder, with ``kwargs`` (e.g. ``add_prefix_space``)."""
    from transformers import GPT2TokenizerFast

    GPT2TokenizerFast.from_pretrained(str(gpt2_folder()), **kwargs).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """``{"plain": (tok, info), "prefix": (tok, info)}``: gpt2, and gpt2 with ``add_prefix_space=True`` read
    from a folder, plus the folder itself."""
    folder = _save_gpt2(tmp_path_factory.mktemp("tok") / "gpt2-prefix", add_prefix_space=True)
    return {"plain": load_tokenizer("gpt2"), "prefix": load_tokenizer(str(folder)), "folder": folder}


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def _build(capsys, jsonl, out, tokenizer):
    code, _, err = run(capsys, "build", "jsonl", jsonl, "--tokenizer", tokenizer, "--out", out, "--no-progress")
    assert code == 0, err
    return out


def _refused(code, err, manifest):
    """One line ``shiq-data: error: ...`` naming the manifest and the field, exit 2, no traceback."""
    assert code == 2, err
    assert err.startswith("shiq-data: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(manifest) in err and FIELD in err, err


def _drop_field(buffer):
    """Make ``buffer``'s manifest one written before the pipeline fingerprint was recorded."""
    path = buffer / "manifest.json"
    m = json.loads(path.read_text())
    del m["tokenizer"][PIPELINE_FIELD]
    path.write_text(json.dumps(m, indent=1))


def test_same_fingerprint_other_pipeline(tokenizers):
    (plain, plain_info), (prefix, prefix_info) = tokenizers["plain"], tokenizers["prefix"]
    # they cut the same text differently ...
    assert plain("hello world")["input_ids"] != prefix("hello world")["input_ids"]
    # ... which the vocabulary fingerprint does not see, and the pipeline fingerprint does
    assert plain_info["fingerprint"] == prefix_info["fingerprint"] == fingerprint(prefix)
    assert plain_info[PIPELINE_FIELD] != prefix_info[PIPELINE_FIELD]
    assert prefix_info[PIPELINE_FIELD] == pipeline_fingerprint(prefix) and len(prefix_info[PIPELINE_FIELD]) == 64
    assert pipeline_mismatch(plain_info, prefix_info)
    # a tokenizer lacking the field (a manifest from before it) is not a mismatch
    assert not pipeline_mismatch({k: v for k, v in plain_info.items() if k != PIPELINE_FIELD}, prefix_info)
    # the same tokenizer loaded twice, or saved and read back, keeps its pipeline fingerprint
    assert load_tokenizer("gpt2")[1][PIPELINE_FIELD] == plain_info[PIPELINE_FIELD]
    assert load_tokenizer(str(tokenizers["folder"]))[1][PIPELINE_FIELD] == prefix_info[PIPELINE_FIELD]


def test_pipeline_fingerprint_covers_normalizer_and_pre_tokenizer():
    """Tokenizers built from one ``tokenizers.Tokenizer`` whose normalizer or pre-tokenizer alone is changed."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def make(normalizer=None, pre=None):
        t = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2, "A": 3, "a,b": 4, ",": 5}, unk_token="[UNK]"))
        if normalizer is not None:
            t.normalizer = normalizer
        t.pre_tokenizer = pre or pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=t)

    base, lower = make(), make(normalizers.Lowercase())
    split = make(pre=pre_tokenizers.WhitespaceSplit())
    assert base("A")["input_ids"] != lower("A")["input_ids"]
    assert base("a,b")["input_ids"] != split("a,b")["input_ids"]
    assert fingerprint(base) == fingerprint(lower) == fingerprint(split)
    assert len({pipeline_fingerprint(t) for t in (base, lower, split)}) == 3
    assert pipeline_fingerprint(base) == pipeline_fingerprint(make())


def test_new_manifests_carry_the_pipeline_fingerprint(tokenizers, jsonl, tmp_path, capsys):
    plain_info, prefix_info = tokenizers["plain"][1], tokenizers["prefix"][1]
    buf = _build(capsys, jsonl, tmp_path / "buf", "gpt2")
    assert read_manifest(buf)["tokenizer"][PIPELINE_FIELD] == plain_info[PIPELINE_FIELD]
    assert run(capsys, "append", buf, "jsonl", jsonl, "--no-progress")[0] == 0
    assert read_manifest(buf)["tokenizer"][PIPELINE_FIELD] == plain_info[PIPELINE_FIELD]
    code, out, err = run(capsys, "info", buf)
    assert code == 0 and f"pipeline {plain_info[PIPELINE_FIELD][:16]}" in out, err
    # curated buffers keep it, and name it among their parents
    assert run(capsys, "filter", buf, "--where", "reward > 0", "--out", tmp_path / "f", "--no-progress")[0] == 0
    m = read_manifest(tmp_path / "f")
    assert m["tokenizer"][PIPELINE_FIELD] == plain_info[PIPELINE_FIELD]
    assert m["parents"][0]["tokenizer_pipeline_fingerprint"] == plain_info[PIPELINE_FIELD]
    # a retokenised buffer records its new tokenizer's
    code, _, err = run(
        capsys, "retokenize", buf, "--tokenizer", tokenizers["folder"], "--out", tmp_path / "r", "--no-progress"
    )
    assert code == 0, err
    assert read_manifest(tmp_path / "r")["tokenizer"][PIPELINE_FIELD] == prefix_info[PIPELINE_FIELD]
    # the export's card names it
    assert run(capsys, "export", buf, "--format", "jsonl", "--out", tmp_path / "e")[0] == 0
    assert f"pipeline fingerprint {plain_info[PIPELINE_FIELD]}" in (tmp_path / "e" / "README.md").read_text()


def test_append_refuses_a_tokenizer_that_splits_text_differently(tokenizers, jsonl, tmp_path, capsys):
    buf = _build(capsys, jsonl, tmp_path / "buf", "gpt2")
    before = (buf / "manifest.json").read_text()
    code, _, err = run(capsys, "append", buf, "jsonl", jsonl, "--tokenizer", tokenizers["folder"], "--no-progress")
    _refused(code, err, buf / "manifest.json")
    assert tokenizers["plain"][1][PIPELINE_FIELD][:12] in err and tokenizers["prefix"][1][PIPELINE_FIELD][:12] in err
    assert (buf / "manifest.json").read_text() == before  # nothing appended


def test_show_refuses_a_tokenizer_folder_that_changed(tokenizers, jsonl, tmp_path, capsys):
    """A buffer built with a tokenizer folder whose pre-tokenizer later changed (same vocabulary)."""
    folder = _save_gpt2(tmp_path / "tok", add_prefix_space=True)
    buf = _build(capsys, jsonl, tmp_path / "buf", folder)
    shutil.rmtree(folder)
    _save_gpt2(folder)  # add_prefix_space False now
    code, _, err = run(capsys, "show", buf, "--rows", 1)
    _refused(code, err, buf / "manifest.json")


def test_mix_refuses_buffers_of_two_pipelines(tokenizers, jsonl, tmp_path, capsys):
    a = _build(capsys, jsonl, tmp_path / "a", "gpt2")
    b = _build(capsys, jsonl, tmp_path / "b", tokenizers["folder"])
    assert read_manifest(a)["tokenizer"]["fingerprint"] == read_manifest(b)["tokenizer"]["fingerprint"]
    code, _, err = run(capsys, "mix", f"{a}:1", f"{b}:1", "--out", tmp_path / "x", "--no-progress")
    _refused(code, err, b / "manifest.json")
    assert str(a) in err and not (tmp_path / "x").exists()


def test_old_manifest_without_the_field_still_works(tokenizers, jsonl, tmp_path, capsys):
    old = _build(capsys, jsonl, tmp_path / "old", "gpt2")
    _drop_field(old)
    assert PIPELINE_FIELD not in read_manifest(old)["tokenizer"]
    assert run(capsys, "validate", old, "--no-progress")[0] == 0
    code, out, _ = run(capsys, "info", old)
    assert code == 0 and "pipeline not recorded" in out
    code, out, err = run(capsys, "show", old, "--rows", 1)
    assert code == 0 and "hello" in out, err
    # an append checks the vocabulary fingerprint only, and does not vouch for the old rows' pipeline
    code, _, err = run(capsys, "append", old, "jsonl", jsonl, "--no-progress")
    assert code == 0, err
    m = read_manifest(old)
    assert m["rows"] == 2 * len(RECORDS) and PIPELINE_FIELD not in m["tokenizer"]
    # mixed with a new buffer: accepted, and the mix records no pipeline fingerprint
    new = _build(capsys, jsonl, tmp_path / "new", "gpt2")
    code, _, err = run(capsys, "mix", f"{new}:1", f"{old}:1", "--out", tmp_path / "mix", "--no-progress")
    assert code == 0, err
    assert PIPELINE_FIELD not in read_manifest(tmp_path / "mix")["tokenizer"]


def test_manifest_with_a_malformed_field_is_refused(tokenizers, tmp_path):
    tok, info = tokenizers["plain"]
    read = get_format("jsonl").read
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    buf = tmp_path / "buf"
    write_buffer(read(path, tok), buf, tokenizer_info=info, command=["t"], progress=False)
    m = json.loads((buf / "manifest.json").read_text())
    m["tokenizer"][PIPELINE_FIELD] = 7
    (buf / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"manifest.json: field '{FIELD}' must be a string"):
        read_manifest(buf)


def test_training_and_evaluation_warn_of_another_pipeline(tokenizers, caplog):
    """shiq-train, ref-stats and shiq-eval run compare the buffer's tokenizer with the model's
    (``check_tokenizer_matches``): another vocabulary is refused as before; the same vocabulary with another
    pipeline is a warning naming both pipeline fingerprints (the buffer's ids stay valid, text encoded now may
    be split otherwise); nothing for the same pipeline or a buffer that records none."""
    import logging

    from shiq_train.reference import check_tokenizer_matches

    logger = logging.getLogger("shiq_train.reference")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="shiq_train.reference")
    try:
        plain, prefix = tokenizers["plain"][1], tokenizers["prefix"][1]
        check_tokenizer_matches(plain, prefix, None, "BUF", role="evaluation model")
        warned = sorted({r.getMessage() for r in caplog.records})  # (the handler may see it twice if it propagates)
        assert len(warned) == 1 and "BUF" in warned[0] and "evaluation model" in warned[0], warned
        assert plain[PIPELINE_FIELD][:12] in warned[0] and prefix[PIPELINE_FIELD][:12] in warned[0]
        caplog.clear()
        check_tokenizer_matches(plain, dict(plain), None, "BUF")
        old = {k: v for k, v in plain.items() if k != PIPELINE_FIELD}  # a buffer written before the field
        check_tokenizer_matches(old, prefix, None, "BUF")
        assert caplog.records == []
        with pytest.raises(ValueError, match="use the model the buffer was tokenised for"):
            check_tokenizer_matches(plain, {**prefix, "fingerprint": "0" * 64}, None, "BUF")
    finally:
        logger.removeHandler(caplog.handler)


def test_export_warns_of_a_tokenizer_of_another_pipeline(tokenizers, tmp_path, caplog):
    """shiq-train export --tokenizer: the run's recorded tokenizer against the one given; the same pipeline is
    silent, another pipeline a warning naming both fingerprints (the tokenizer is still shipped)."""
    import logging

    from shiq_train.export import export_tokenizer

    logger = logging.getLogger("shiq_train.export")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="shiq_train.export")
    try:
        plain = tokenizers["plain"][1]
        assert export_tokenizer({"tokenizer": plain}, tmp_path, "gpt2") is not None
        assert caplog.records == []
        tok = export_tokenizer({"tokenizer": plain}, tmp_path, str(tokenizers["folder"]))
        warned = sorted({r.getMessage() for r in caplog.records})
        assert tok is not None and len(warned) == 1 and "another pipeline" in warned[0], warned
        assert tokenizers["prefix"][1][PIPELINE_FIELD][:12] in warned[0] and plain[PIPELINE_FIELD][:12] in warned[0]
    finally:
        logger.removeHandler(caplog.handler)


def test_what_leaves_the_ids_alone_leaves_the_pipeline_fingerprint_alone(tmp_path, tokenizers):
    """GPT-2 saved with ``add_bos_token=True`` and another ``clean_up_tokenization_spaces`` encodes text to the
    same ids as the project encodes them (``add_special_tokens=False``): one pipeline fingerprint, so append,
    show and mix accept it (the fingerprint covers what cuts text, not special tokens or decoding)."""
    plain_tok, plain = tokenizers["plain"]
    folder = _save_gpt2(tmp_path / "bos", add_bos_token=True, clean_up_tokenization_spaces=True)
    tok, info = load_tokenizer(str(folder))
    text = "hello world, Hello  world!"
    assert tok(text, add_special_tokens=False).input_ids == plain_tok(text, add_special_tokens=False).input_ids
    assert info["fingerprint"] == plain["fingerprint"] and info[PIPELINE_FIELD] == plain[PIPELINE_FIELD]
    assert not pipeline_mismatch(plain, info)
