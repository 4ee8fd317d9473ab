"""The chat template's fingerprint: two tokenizers of one vocabulary and pipeline (a base model's and its chat
model's, here SmolLM2's tokenizer with and without another template) differ in
``tokenizer.chat_template_fingerprint``. ``shiq-data append`` refuses rows rendered through another template
than the buffer's in one line naming the manifest and the field (exit 2, the buffer unchanged), also with
``--workers``, and accepts plain-text rows, which never go through it; a manifest written before the field
existed appends as before; curation keeps the field only when every parent records the same one."""

import hashlib
import json

import pytest
from data_cli_runs import run, write_jsonl

from shiq_data.buffer import read_manifest
from shiq_data.tokenizers import CHAT_TEMPLATE_FIELD, chat_template_fingerprint, load_tokenizer, smollm2_folder

FIELD = f"tokenizer.{CHAT_TEMPLATE_FIELD}"
CHAT = [
    {"prompt": "What is 2+3?", "completion": [{"role": "assistant", "content": "It is 5."}], "reward": 1.0},
    {"prompt": "Name a fruit.", "completion": [{"role": "assistant", "content": "An apple."}], "reward": -1.0},
]
PLAIN = [{"prompt": "Say hello.", "completion": "hello world", "reward": 1.0}]


def _other_template(template: str) -> str:
    """SmolLM2's template with another layout of the turns (a blank line after each turn), the same default
    system turn."""
    other = template.replace("<|im_end|>\n'", "<|im_end|>\n\n'").replace("'<|im_end|>' + '\n'", "'<|im_end|>' + '\n\n'")
    assert other.count("\n\n") == 2
    return other


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """SmolLM2's tokenizer saved as a folder with another chat template (same vocabulary and pipeline)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_folder()))
    tok.chat_template = _other_template(tok.chat_template)
    folder = tmp_path_factory.mktemp("tok") / "smollm2-other-template"
    tok.save_pretrained(str(folder))
    return folder


def test_the_fingerprint_is_the_templates_sha256_and_only_the_template_differs(other):
    tok, info = load_tokenizer("smollm2")
    tok2, info2 = load_tokenizer(str(other))
    assert info[CHAT_TEMPLATE_FIELD] == hashlib.sha256(tok.chat_template.encode()).hexdigest()
    assert info2[CHAT_TEMPLATE_FIELD] == hashlib.sha256(_other_template(tok.chat_template).encode()).hexdigest()
    assert info["fingerprint"] == info2["fingerprint"] and info["pipeline_fingerprint"] == info2["pipeline_fingerprint"]
    gpt2, gpt2_info = load_tokenizer("gpt2")
    assert gpt2_info[CHAT_TEMPLATE_FIELD] is None and chat_template_fingerprint(gpt2) is None


@pytest.mark.parametrize("workers", [1, 2])
def test_append_refuses_chat_rows_through_another_template_and_accepts_plain_rows(tmp_path, capsys, other, workers):
    buf = tmp_path / "buf"
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    assert run(capsys, "build", "jsonl", chat, "--tokenizer", "smollm2", "--out", buf, "--no-progress")[0] == 0
    manifest = read_manifest(buf)
    assert manifest["tokenizer"][CHAT_TEMPLATE_FIELD] == load_tokenizer("smollm2")[1][CHAT_TEMPLATE_FIELD]
    before = (buf / "manifest.json").read_bytes()
    code, _, err = run(
        capsys, "append", buf, "jsonl", chat, "--tokenizer", other, "--workers", workers, "--no-progress"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{buf / 'manifest.json'}: field '{FIELD}'" in err and "another layout of the turns" in err
    assert "Traceback" not in err and (buf / "manifest.json").read_bytes() == before
    # a buffer of plain rows from a tokenizer without a template: chat rows through one are refused too
    bare = tmp_path / "bare-tok"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(other))
    tok.chat_template = None
    tok.save_pretrained(str(bare))
    plain_buf = tmp_path / "plain-buf"
    plain = write_jsonl(tmp_path / "plain0.jsonl", PLAIN)
    assert run(capsys, "build", "jsonl", plain, "--tokenizer", bare, "--out", plain_buf, "--no-progress")[0] == 0
    assert read_manifest(plain_buf)["tokenizer"][CHAT_TEMPLATE_FIELD] is None
    plain_chat = tmp_path / "plain-chat-tok"  # a template with no default system turn, as the buffer records
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.save_pretrained(str(plain_chat))
    code, _, err = run(capsys, "append", plain_buf, "jsonl", chat, "--tokenizer", plain_chat, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"field '{FIELD}'" in err and "has no chat template, so its rows are plain text" in err
    # plain text rows never go through the template: the same tokenizer appends them
    plain = write_jsonl(tmp_path / "plain.jsonl", PLAIN)
    code, _, err = run(capsys, "append", buf, "jsonl", plain, "--tokenizer", other, "--no-progress")
    assert code == 0, err
    assert read_manifest(buf)["rows"] == len(CHAT) + len(PLAIN)
    # and the buffer's own tokenizer appends chat rows
    assert run(capsys, "append", buf, "jsonl", chat, "--no-progress")[0] == 0
    code, out, _ = run(capsys, "info", buf)
    assert code == 0 and f"chat template {manifest['tokenizer'][CHAT_TEMPLATE_FIELD][:16]}" in out


def test_a_manifest_from_before_the_field_appends_chat_rows_as_before(tmp_path, capsys, other):
    buf = tmp_path / "buf"
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    assert run(capsys, "build", "jsonl", chat, "--tokenizer", "smollm2", "--out", buf, "--no-progress")[0] == 0
    path = buf / "manifest.json"
    m = json.loads(path.read_text())
    del m["tokenizer"][CHAT_TEMPLATE_FIELD]
    path.write_text(json.dumps(m))
    code, _, err = run(capsys, "append", buf, "jsonl", chat, "--tokenizer", other, "--no-progress")
    assert code == 0, err
    assert CHAT_TEMPLATE_FIELD not in read_manifest(buf)["tokenizer"]
    code, out, _ = run(capsys, "info", buf)
    assert code == 0 and "chat template not recorded" in out
    # a bad value is refused when the manifest is read
    m = json.loads(path.read_text())
    m["tokenizer"][CHAT_TEMPLATE_FIELD] = 7
    path.write_text(json.dumps(m))
    code, _, err = run(capsys, "info", buf)
    assert code == 2 and f"field '{FIELD}' must be a string or null" in err


def test_curation_keeps_the_field_only_when_every_parent_records_the_same(tmp_path, capsys, other):
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    for name, tok in (("a", "smollm2"), ("b", "smollm2"), ("c", other)):
        assert (
            run(capsys, "build", "jsonl", chat, "--tokenizer", tok, "--out", tmp_path / name, "--no-progress")[0] == 0
        )
    same = read_manifest(tmp_path / "a")["tokenizer"][CHAT_TEMPLATE_FIELD]
    assert (
        run(capsys, "mix", f"{tmp_path / 'a'}:1", f"{tmp_path / 'b'}:1", "--out", tmp_path / "ab", "--no-progress")[0]
        == 0
    )
    assert read_manifest(tmp_path / "ab")["tokenizer"][CHAT_TEMPLATE_FIELD] == same
    assert (
        run(capsys, "mix", f"{tmp_path / 'a'}:1", f"{tmp_path / 'c'}:1", "--out", tmp_path / "ac", "--no-progress")[0]
        == 0
    )
    assert CHAT_TEMPLATE_FIELD not in read_manifest(tmp_path / "ac")["tokenizer"]
    # a parent from before the field: the mix cannot say which template its rows went through
    path = tmp_path / "b" / "manifest.json"
    m = json.loads(path.read_text())
    del m["tokenizer"][CHAT_TEMPLATE_FIELD]
    path.write_text(json.dumps(m))
    code, _, err = run(
        capsys, "mix", f"{tmp_path / 'a'}:1", f"{tmp_path / 'b'}:1", "--out", tmp_path / "ab2", "--no-progress"
    )
    assert code == 0, err
    assert CHAT_TEMPLATE_FIELD not in read_manifest(tmp_path / "ab2")["tokenizer"]
    code, _, err = run(capsys, "filter", tmp_path / "a", "--where", "reward > 0", "--out", tmp_path / "f")
    assert code == 0, err
    assert read_manifest(tmp_path / "f")["tokenizer"][CHAT_TEMPLATE_FIELD] == same


def test_training_and_evaluation_warn_of_another_chat_template(other, caplog):
    """``check_tokenizer_matches`` (shiq-train, ref-stats, shiq-eval run): a model tokenizer with the buffer's
    vocabulary and pipeline but another chat template is a warning naming both template fingerprints; nothing
    for the same template or a buffer that records none."""
    import logging

    from shiq_train.reference import check_tokenizer_matches

    mine, theirs = load_tokenizer("smollm2")[1], load_tokenizer(str(other))[1]
    logger = logging.getLogger("shiq_train.reference")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="shiq_train.reference")
    try:
        check_tokenizer_matches(mine, theirs, None, "BUF", role="evaluation model")
        warned = sorted({r.getMessage() for r in caplog.records})
        assert len(warned) == 1 and "BUF" in warned[0] and "chat template" in warned[0], warned
        assert mine[CHAT_TEMPLATE_FIELD][:12] in warned[0] and theirs[CHAT_TEMPLATE_FIELD][:12] in warned[0]
        caplog.clear()
        check_tokenizer_matches(mine, dict(mine), None, "BUF")
        check_tokenizer_matches({k: v for k, v in mine.items() if k != CHAT_TEMPLATE_FIELD}, theirs, None, "BUF")
        assert caplog.records == []
    finally:
        logger.removeHandler(caplog.handler)
