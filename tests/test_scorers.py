"""Reward-model head against scikit-learn's Ridge, the rated-snippet reader on a fixture archive."""

import io
import math
import tarfile

import pytest
import torch

from shiq_data.reward_head import RegressionRewardModel, pearson
from shiq_eval.moviereviews import load_movie_snippets, opening, parse_ratings, split_ids
from shiq_eval.scorers import FunctionScorer


def test_ridge_head_matches_sklearn_and_round_trips(tmp_path):
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64)
    y = (
        X @ torch.randn(16, generator=g, dtype=torch.float64)
        + 0.3 * torch.randn(200, generator=g, dtype=torch.float64)
        + 2.0
    )
    table = {f"t{i}": X[i] for i in range(200)}
    encoder = lambda texts: torch.stack([table[t] for t in texts])
    rm = RegressionRewardModel.fit(encoder, list(table), y.tolist(), l2=3.0, joiner="")
    ref = sklearn.Ridge(alpha=3.0).fit(X.numpy(), y.numpy())
    assert torch.allclose(rm.weight, torch.from_numpy(ref.coef_), atol=1e-9)
    assert rm.bias == pytest.approx(float(ref.intercept_), abs=1e-9)
    rm.save(tmp_path / "rm.safetensors")
    back = RegressionRewardModel.load(tmp_path / "rm.safetensors", encoder)
    assert back(["t1", "t2"], ["", ""]) == pytest.approx(ref.predict(X[1:3].numpy()).tolist())
    assert back.meta["n_train"] == 200
    assert pearson(torch.tensor(back.score_texts(list(table))), y) > 0.9


def test_a_file_that_is_not_a_reward_head_is_refused_naming_the_file_and_tensor(tmp_path):
    """An empty ``bias`` ended in an IndexError traceback, bad ``meta`` JSON in an error naming no file, and a
    misshapen or foreign tensor in torch's unnamed "size mismatch" (or was ignored): each is now a ValueError
    naming the file and the tensor or metadata field."""
    import re

    from safetensors.torch import save_file

    from shiq_data.reward_head import minilm_encoder

    w, b = torch.randn(16, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    state = {f"encoder.{k}": v.clone().contiguous() for k, v in minilm_encoder().model.state_dict().items()}
    word = "0.model.embeddings.word_embeddings.weight"  # (a tensor of the real encoder, misshapen below)
    assert state[f"encoder.{word}"].shape == (30522, 384)
    w384 = torch.randn(384, dtype=torch.float64)
    encoder = lambda texts: torch.zeros(len(texts), 16)  # noqa: E731
    cases = [
        ({"weight": w, "bias": torch.zeros(0, dtype=torch.float64)}, {}, encoder, "tensor 'bias': shape [0], expected"),
        ({"weight": w.reshape(8, 2), "bias": b}, {}, encoder, "tensor 'weight': shape [8, 2], expected [D]"),
        ({"weight": w, "bias": torch.tensor([math.nan])}, {}, encoder, "tensor 'bias': must hold finite"),
        ({"weight": w, "bias": b}, {"meta": "{bad"}, encoder, "metadata 'meta': not valid JSON"),
        ({"weight": w, "bias": b}, {"meta": '{"l2": 1, "l2": 2}'}, encoder, "metadata 'meta': not valid JSON"),
        ({"weight": w, "bias": b}, {"meta": "[1]"}, encoder, "metadata 'meta': must be the JSON text of an object"),
        ({"weight": w, "bias": b, "head.extra": b.clone()}, {}, encoder, "tensor 'head.extra': not a reward head's"),
        ({"bias": b}, {}, encoder, "tensor 'weight': missing"),
        ({"weight": w, "bias": b}, {}, None, "tensor 'weight': 16 values, the encoder's embeddings have 384"),
        (
            {"weight": w384, "bias": b, **state, f"encoder.{word}": torch.zeros(3, 3)},
            {},
            None,
            f"tensors 'encoder.*': not the MiniLM encoder's (size mismatch for {word}: copying a param with shape",
        ),
        (
            {"weight": w384, "bias": b, f"encoder.{word}": torch.zeros(3, 3)},
            {},
            None,
            "tensors 'encoder.*': not the MiniLM encoder's (Missing key(s) in state_dict:",
        ),
    ]
    for k, (tensors, meta, enc, needle) in enumerate(cases):
        path = tmp_path / f"h{k}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match=f"^{re.escape(f'{path}: {needle}')}"):
            RegressionRewardModel.load(path, enc)


def test_finetuned_head_beats_its_ridge_start_and_round_trips_with_its_encoder(tmp_path):
    """Fine-tuning MiniLM with the head from the ridge solution lowers the training error below the
    ridge solution's (the best any head on the frozen embeddings can do at that penalty); the saved
    file carries the encoder, so loading it needs none and scores exactly as before saving."""
    from shiq_data.reward_head import finetune, minilm_encoder

    texts = ["a wonderful, moving film", "dull and far too long", "I loved every minute", "a total mess",
             "the cast shines", "boring plot, wooden acting", "a small gem", "I walked out"]  # fmt: skip
    y = [3.0, -2.5, 3.5, -3.0, 2.0, -2.0, 2.5, -3.5]
    encoder = minilm_encoder()
    rm = RegressionRewardModel.fit(encoder, texts, y, l2=1.0)
    target = torch.tensor(y, dtype=torch.float64)
    ridge_mse = float(((torch.tensor(rm.score_texts(texts)) - target) ** 2).mean())
    frozen = torch.tensor(rm.score_texts(texts))
    rm.weight, rm.bias = finetune(encoder, texts, y, rm.weight, rm.bias, epochs=20, lr=1e-4, batch_size=4)
    rm.encoder_weights = encoder.model.state_dict()
    tuned = torch.tensor(rm.score_texts(texts))
    assert float(((tuned - target) ** 2).mean()) < 0.5 * ridge_mse
    rm.save(tmp_path / "rm.safetensors")
    back = RegressionRewardModel.load(tmp_path / "rm.safetensors")
    assert torch.allclose(torch.tensor(back.score_texts(texts)), tuned, atol=1e-5)
    assert not torch.allclose(tuned, frozen, atol=1e-2)
    # a head with its own encoder refuses another one rather than scoring with the wrong features
    with pytest.raises(ValueError, match="its own fine-tuned encoder"):
        RegressionRewardModel.load(tmp_path / "rm.safetensors", minilm_encoder())
    with pytest.raises(ValueError, match="as many targets as texts"):
        finetune(encoder, texts, y[:-1], rm.weight, rm.bias)


def test_frozen_layers_read_once_give_the_whole_encoders_embeddings():
    """The output of the embeddings and first layers, computed once per text (``_frozen_outputs``) and fed to
    the last layers in their place (``_from_layer``), gives the sentence embeddings of the whole encoder
    (eval mode) for a batch of texts of other lengths; the encoder is whole again afterwards."""
    from torch.nn.utils.rnn import pad_sequence

    from shiq_data.reward_head import _from_layer, _frozen_outputs, minilm_encoder

    texts = ["a wonderful, moving film", "dull", "I loved every minute of this long, strange and lovely picture"]
    model = minilm_encoder().model
    bert = model[0].auto_model
    embeddings, layers = bert.embeddings, bert.encoder.layer
    features = model.tokenize(texts)
    with torch.no_grad():
        whole = model(dict(features))["sentence_embedding"]
        below = _frozen_outputs(model, texts, 4, 2, False)
        assert [len(h) for h in below] == features["attention_mask"].sum(1).tolist()
        with _from_layer(bert, 4) as given:
            assert len(bert.encoder.layer) == 2
            given.value = pad_sequence(below, batch_first=True)
            top = model(dict(features))["sentence_embedding"]
    torch.testing.assert_close(top, whole, rtol=1e-5, atol=1e-5)
    assert bert.embeddings is embeddings and bert.encoder.layer is layers and len(layers) == 6


def test_finetune_of_the_last_layers_leaves_the_others_and_still_learns():
    """``last_layers=2``: the embeddings and the first four layers keep their weights to the bit, the last two
    change, and the training error falls below the ridge start's; a bad count is refused."""
    from shiq_data.reward_head import finetune, minilm_encoder

    texts = ["a wonderful, moving film", "dull and far too long", "I loved every minute", "a total mess",
             "the cast shines", "boring plot, wooden acting", "a small gem", "I walked out"]  # fmt: skip
    y = [3.0, -2.5, 3.5, -3.0, 2.0, -2.0, 2.5, -3.5]
    encoder = minilm_encoder()
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    rm = RegressionRewardModel.fit(encoder, texts, y, l2=1.0)
    target = torch.tensor(y, dtype=torch.float64)
    ridge_mse = float(((torch.tensor(rm.score_texts(texts)) - target) ** 2).mean())
    rm.weight, rm.bias = finetune(
        encoder, texts, y, rm.weight, rm.bias, epochs=20, lr=1e-4, batch_size=4, last_layers=2
    )
    bert = encoder.model[0].auto_model  # its embeddings and six layers are back after the swaps
    assert len(bert.encoder.layer) == 6 and type(bert.embeddings).__name__ == "BertEmbeddings"
    after = encoder.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".layer.4." in k or ".layer.5." in k for k in changed)
    assert any(".layer.4." in k for k in changed) and any(".layer.5." in k for k in changed)
    assert float(((torch.tensor(rm.score_texts(texts)) - target) ** 2).mean()) < 0.5 * ridge_mse
    for bad in (0, 7, 2.5):
        with pytest.raises(ValueError, match="last_layers must be an integer in 1..6"):
            finetune(encoder, texts, y, rm.weight, rm.bias, last_layers=bad)


def test_finetune_in_bfloat16_computes_in_bfloat16_keeps_float32_weights_and_learns():
    """``dtype="bfloat16"``: the encoder's linear layers compute in bfloat16 during fine-tuning (seen from a
    hook), the weights and the head stay float32, the training error falls below the ridge start's as in
    float32, and the encoder scores in float32 afterwards; an unknown precision is refused."""
    from shiq_data.reward_head import finetune, minilm_encoder, precision

    texts = ["a wonderful, moving film", "dull and far too long", "I loved every minute", "a total mess",
             "the cast shines", "boring plot, wooden acting", "a small gem", "I walked out"]  # fmt: skip
    y = [3.0, -2.5, 3.5, -3.0, 2.0, -2.0, 2.5, -3.5]
    target = torch.tensor(y, dtype=torch.float64)
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        encoder = minilm_encoder()
        rm = RegressionRewardModel.fit(encoder, texts, y, l2=1.0)
        ridge_mse = float(((torch.tensor(rm.score_texts(texts)) - target) ** 2).mean())
        seen = []
        query = encoder.model[0].auto_model.encoder.layer[0].attention.self.query
        hook = query.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        rm.weight, rm.bias = finetune(
            encoder, texts, y, rm.weight, rm.bias, epochs=20, lr=1e-4, batch_size=4, dtype=dtype
        )
        n_train = len(seen)
        tuned = torch.tensor(rm.score_texts(texts))
        hook.remove()
        assert n_train == 40 and set(seen[:n_train]) == {expected}  # 20 epochs of 2 batches
        assert len(seen) > n_train and set(seen[n_train:]) == {torch.float32}  # scoring afterwards: float32
        assert {p.dtype for p in encoder.model.parameters()} == {torch.float32} and rm.weight.dtype == torch.float64
        assert float(((tuned - target) ** 2).mean()) < 0.5 * ridge_mse
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, got 'half'"):
        precision("half")
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16"):
        finetune(encoder, texts, y, rm.weight, rm.bias, dtype="float16")


def test_finetune_epochs_visit_every_text_once_per_epoch():
    """One epoch shows the encoder every text exactly once (the last batch may be short); two, twice."""
    from shiq_data.reward_head import finetune, minilm_encoder

    texts = [f"review number {i} was {'good' if i % 2 else 'bad'}" for i in range(10)]
    encoder = minilm_encoder()
    seen = []
    preprocess = encoder.model.preprocess
    encoder.model.preprocess = lambda batch: (seen.extend(batch), preprocess(batch))[1]
    w, b = torch.zeros(384, dtype=torch.float64), 0.0
    for epochs in (1, 2):
        seen.clear()
        finetune(encoder, texts, [float(i % 2) for i in range(10)], w, b, epochs=epochs, batch_size=4)
        assert sorted(seen) == sorted(texts * epochs)


def test_finetune_depends_on_its_seed_not_on_what_the_process_drew_before():
    """The encoder trains with dropout: two fine-tunings with the same seed from the same start give the
    same head and encoder to the bit however many random numbers the process drew before (the reward
    model of a resumed or differently started run is the same), and the global generator is left as it was."""
    from shiq_data.reward_head import finetune, minilm_encoder

    texts = [f"review number {i} was {'good' if i % 2 else 'bad'}" for i in range(8)]
    y = [float(i % 2) for i in range(8)]
    results = []
    for draws in (0, 1000):
        encoder = minilm_encoder()
        torch.manual_seed(123)
        torch.rand(draws)
        state = torch.get_rng_state()
        w, b = finetune(encoder, texts, y, torch.zeros(384, dtype=torch.float64), 0.0, batch_size=4, lr=1e-3)
        assert torch.equal(torch.get_rng_state(), state)
        results.append((w, b, encoder.model.state_dict()))
    (w0, b0, s0), (w1, b1, s1) = results
    assert torch.equal(w0, w1) and b0 == b1 and all(torch.equal(s0[k], s1[k]) for k in s0)
    other = finetune(
        minilm_encoder(), texts, y, torch.zeros(384, dtype=torch.float64), 0.0, batch_size=4, lr=1e-3, seed=1
    )
    assert not torch.equal(other[0], w0)


def test_function_scorer():
    s = FunctionScorer(lambda p, c: len(c) - len(p))
    assert s(["a", "bb"], ["xyz", "q"]) == [2.0, -1.0]


def _fixture_archive(path, body: str):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        data = body.encode()
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as t:
        data = inner.getvalue()
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


def test_reads_snippets_from_nested_archive(tmp_path):
    _fixture_archive(tmp_path / "v.tar.gz", "1\t2.5\tA fine film.\r\n2\t-3.0\tDreadful from start to end\r\n")
    rows = load_movie_snippets(tmp_path / "v.tar.gz")
    assert [(r.id, r.rating, r.text) for r in rows] == [
        (1, 2.5, "A fine film."),
        (2, -3.0, "Dreadful from start to end"),
    ]
    assert opening(rows[1].text, 2) == "Dreadful from"


@pytest.mark.parametrize(
    "line,field", [("1\tx\ttext", "rating"), ("a\t1\ttext", "id"), ("1\t1\t ", "text"), ("1\tnan\ttext", "rating")]
)
def test_bad_lines_name_source_line_and_field(line, field):
    with pytest.raises(ValueError, match=rf"src, line 2, field '{field}'"):
        parse_ratings("7\t1.0\tok\n" + line, "src")
    with pytest.raises(ValueError, match="line 1: expected 3"):
        parse_ratings("1\t2", "src")


def test_an_id_given_twice_is_refused_naming_both_lines():
    """One snippet id on two lines could be split into both train and held-out (the split shuffles ids)."""
    with pytest.raises(ValueError, match=r"src, line 3, field 'id': 7 is the id of line 1 too"):
        parse_ratings("7\t1.0\tok\n8\t0.5\tfine\n7\t-2.0\tawful", "src")


def test_split_is_seeded_disjoint_and_complete():
    rows = parse_ratings("\n".join(f"{i}\t0\tt{i}" for i in range(1, 101)), "s")
    a, b = split_ids(rows, held_out=0.2, seed=1), split_ids(rows, held_out=0.2, seed=1)
    assert a == b and len(a["held_out"]) == 20
    assert not set(a["train"]) & set(a["held_out"])
    assert sorted(a["train"] + a["held_out"]) == list(range(1, 101))
    assert split_ids(rows, held_out=0.2, seed=2) != a


def test_bfcl_checker_as_a_scorer():
    """Ground truth scores 1; an empty turn (the official `empty_turn_model_response`) and malformed
    completions score 0; per_turn gives the mean cumulative turn reward."""
    import json

    pytest.importorskip("bfcl_eval")  # the official checker is an optional asset
    from shiq_eval.bfcl import checker, data
    from shiq_eval.scorers import BFCLScorer

    e = data.load_entry("multi_turn_base", 15)
    truth = data.ground_truth_decoded(e)
    turns = len(truth)
    broken = [[]] + truth[1:]  # no calls in turn 0, whose ground truth has calls
    assert truth[0]
    ids = [e["id"]] * 4
    texts = [json.dumps(truth), json.dumps(broken), "I cannot do that", json.dumps([["pwd()"]])]
    assert BFCLScorer()(ids, texts) == [1.0, 0.0, 0.0, 0.0]
    per_turn = BFCLScorer(per_turn=True)(ids[:2], texts[:2])
    assert per_turn[0] == 1.0 and 0.0 <= per_turn[1] < 1.0
    verdict = checker.check_entry("multi_turn_base", e["id"], broken)
    assert verdict["error_type"] == "multi_turn:empty_turn_model_response" and len(verdict["turn_rewards"]) == turns


def test_movie_prompts_are_held_out_openings_with_text_left_to_continue(tmp_path, monkeypatch):
    """``--movie-prompts N`` took the first N held-out snippets whatever their length, so a snippet of six
    words or fewer was its own "opening" (11 of the first 160 on the shipped archive). Only snippets longer
    than their opening are taken now, as the demo's prompts are; all are held out, in id order."""
    from shiq_eval import moviereviews

    body = "".join(f"{i}\t1.0\t{' '.join(f'w{i}' for _ in range(3 + i % 5))}\r\n" for i in range(1, 41))  # 3-7 words
    _fixture_archive(tmp_path / "v.tar.gz", body)
    monkeypatch.setattr(moviereviews, "vader_archive", lambda: tmp_path / "v.tar.gz")
    prompts, shown = moviereviews.movie_prompts(5, held_out=0.5, words=4, instruction="Go: ")
    snippets = load_movie_snippets(tmp_path / "v.tar.gz")
    rows = {r.id: r.text for r in snippets}
    held = split_ids(snippets, held_out=0.5, seed=0)["held_out"]
    longer = [i for i in held if len(rows[i].split()) > 4][:5]  # the expected ids, by hand from the rule
    assert len(longer) == 5 and shown == [" ".join(rows[i].split()[:4]) for i in longer]
    assert prompts == ["Go: " + s for s in shown]


def test_finetune_tokenizes_without_the_deprecated_tokenize_call():
    """The fine-tuning and the frozen layers' pass tokenize through ``preprocess``: sentence-transformers
    deprecates ``tokenize``, whose warning broke into the stage's progress bar in every run."""
    from shiq_data.reward_head import finetune, minilm_encoder

    texts = ["a wonderful, moving film", "dull and far too long", "I loved every minute", "a total mess"]
    y = [3.0, -2.5, 3.5, -3.0]
    encoder = minilm_encoder()
    rm = RegressionRewardModel.fit(encoder, texts, y, l2=1.0)

    def deprecated(*args, **kwargs):
        raise AssertionError("SentenceTransformer.tokenize is deprecated: use preprocess")

    encoder.model.tokenize = deprecated
    for last_layers in (None, 2):  # the whole encoder, and the last two layers over the frozen ones' output
        finetune(encoder, texts, y, rm.weight, rm.bias, epochs=1, batch_size=2, last_layers=last_layers)
