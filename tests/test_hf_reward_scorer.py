"""A Hugging Face sequence-classification reward model as a scorer (shiq-eval run --scorer hf_reward_model).

The independent reference is the same transformers model run on each text alone (no padding): batching
with padding must give the same scores; a classifier with more than one output is refused, and so is a folder
without the classifier's score head (a causal LM's), which transformers would fill with random weights.
"""

import pytest
import torch
import transformers
from test_eval_cli import VOCAB, tiny_hf_folder  # (a word-level tokenizer of w0..w127)

from shiq_eval.scorers import SequenceClassifierScorer


def classifier_folder(path, num_labels=1):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_folder(path / "tok"))
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(path / "rm")
    tok.save_pretrained(path / "rm")
    return path / "rm", tok


def test_batched_scores_equal_one_text_at_a_time(tmp_path):
    folder, tok = classifier_folder(tmp_path)
    prompts = ["w3 w4", "w5", "w6 w7 w8 w9", "w10"]
    completions = ["w11", "w12 w13 w14 w15 w16", "w17", "w18 w19"]
    got = SequenceClassifierScorer(folder, batch_size=3)(prompts, completions)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    want = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = tok(p + " " + c, return_tensors="pt")["input_ids"]
            want.append(float(model(input_ids=ids).logits[0, 0]))
    assert got == pytest.approx(want, abs=1e-5)
    assert max(want) - min(want) > 1e-4  # different texts, different scores: equality is not trivial
    two, _ = classifier_folder(tmp_path / "two", num_labels=2)
    with pytest.raises(ValueError, match="one output"):
        SequenceClassifierScorer(two)


def test_a_folder_without_a_score_head_is_refused_naming_the_weight(tmp_path):
    """A causal LM's folder whose config.json says one label loads as a classifier whose score head transformers
    draws at random (logging it only): its rewards would be noise. LlamaForSequenceClassification's head is
    ``score.weight``; the folder's weight files hold none. The refusal is the only word of it: transformers' load
    report (a table naming the missing weight) is not printed before it, and its logging level is left as it was."""
    import logging

    from transformers.utils import logging as hf_logging

    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_folder(tmp_path / "tok"))
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_labels=1
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    records = []  # what transformers logs (to its own handler, which pytest's capture may not see)
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    before = hf_logging.get_verbosity()
    try:
        with pytest.raises(ValueError, match=r"lm: its weight files lack score\.weight, .* not a reward model"):
            SequenceClassifierScorer(tmp_path / "lm")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "score.weight" in r], records
    assert hf_logging.get_verbosity() == before


def test_a_load_report_of_other_weights_is_printed(tmp_path):
    """Only the report of a missing weight, which the scorer refuses in its own line, is held back: one of a weight
    of another shape (a score head of two outputs under a config.json of one label) comes before the error that
    points to it ("look at the above report"), and one of weights the model does not read (an extra tensor in the
    weight file) is printed by a load that goes on."""
    import json
    import logging

    from safetensors.torch import load_file, save_file

    two, _ = classifier_folder(tmp_path / "two", num_labels=2)
    config = json.loads((two / "config.json").read_text())
    config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (two / "config.json").write_text(json.dumps(config))
    extra, _ = classifier_folder(tmp_path / "extra")
    weights = load_file(extra / "model.safetensors")
    save_file({**weights, "unread.weight": torch.zeros(2)}, extra / "model.safetensors", metadata={"format": "pt"})
    records = []  # what reaches transformers' own handlers
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises(RuntimeError, match="above report"):
            SequenceClassifierScorer(two)
        shape_report = [r for r in records if "score.weight" in r and "MISMATCH" in r]
        records.clear()
        SequenceClassifierScorer(extra)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert shape_report, records
    assert [r for r in records if "unread.weight" in r and "UNEXPECTED" in r], records


def test_the_suite_fingerprint_holds_the_reward_models_tokenizer(tmp_path):
    """Two folders with the same weights and config but another tokenizer score the same text differently, so
    they are two scorers: their suites' fingerprints differ (a leaderboard would otherwise merge their rows)."""
    import shutil

    from shiq_eval.suite import Suite, scorer_sha256

    folder, _ = classifier_folder(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    shifted = transformers.AutoTokenizer.from_pretrained(folder)
    vocab = shifted.backend_tokenizer.to_str()
    (other / "tokenizer.json").write_text(
        vocab.replace('"w3":', '"w3_":').replace('"w4":', '"w3":').replace('"w3_":', '"w4":')
    )
    a, b = (SequenceClassifierScorer(f)(["w3"], ["w4 w5"]) for f in (folder, other))
    assert a != b  # the same weights, another tokenizer: other scores
    fp = [scorer_sha256(Suite(scorer="hf_reward_model", reward_model=str(f))) for f in (folder, other)]
    assert fp[0] != fp[1]
    shutil.copytree(folder, tmp_path / "copy")  # a copy elsewhere is the same scorer
    assert scorer_sha256(Suite(scorer="hf_reward_model", reward_model=str(tmp_path / "copy"))) == fp[0]
