"""The ridge head's fit and its cross-validated penalty, against direct float64 numpy computations."""

import importlib
import re

import numpy as np
import pytest
import torch

from shiq_data.reward_head import cross_validate_l2, ridge


def _numpy_ridge(X, y, l2):
    """Ridge with an unpenalised intercept as one least-squares problem: rows [X 1] and sqrt(l2)·[I 0]."""
    n, d = X.shape
    A = np.vstack([np.hstack([X, np.ones((n, 1))]), np.hstack([np.sqrt(l2) * np.eye(d), np.zeros((d, 1))])])
    sol = np.linalg.lstsq(A, np.concatenate([y, np.zeros(d)]), rcond=None)[0]
    return sol[:d], sol[d]


def _data(n=120, d=15, noise=2.0, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) * 0.3 + 1.5 + noise * rng.normal(size=n)
    return X, y


def test_ridge_matches_least_squares_with_an_unpenalised_intercept():
    X, y = _data()
    for l2 in (0.01, 3.0, 300.0):
        w, b = ridge(torch.tensor(X), torch.tensor(y), l2)
        w_ref, b_ref = _numpy_ridge(X, y, l2)
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-8, atol=1e-10)
        assert b == pytest.approx(b_ref, rel=1e-8, abs=1e-10)


def test_cross_validation_scores_pooled_out_of_fold_predictions_and_picks_the_best():
    X, y = _data()
    l2s, folds, seed = [0.01, 1.0, 30.0, 1000.0], 4, 3
    best, scores = cross_validate_l2(torch.tensor(X), torch.tensor(y), l2s, folds, seed=seed)
    # the folds: the seeded permutation cut into `folds` near-equal parts (the documented contract)
    parts = [
        p.numpy()
        for p in torch.tensor_split(torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)), folds)
    ]
    expected = {}
    for l2 in l2s:
        pred = np.empty_like(y)
        for part in parts:
            keep = np.setdiff1d(np.arange(len(y)), part)
            w, b = _numpy_ridge(X[keep], y[keep], l2)
            pred[part] = X[part] @ w + b
        expected[l2] = np.corrcoef(pred, y)[0, 1]
    assert set(scores) == set(l2s)
    for l2 in l2s:
        assert scores[l2] == pytest.approx(expected[l2], abs=1e-9)
    assert best == max(expected, key=expected.get)
    # noisy, small data: the least regularised fit is not the best out of fold
    assert best != 0.01


def test_cross_validation_uses_as_many_folds_as_asked_when_they_do_not_divide_the_rows(monkeypatch):
    """9 rows in 6 folds are 3 folds of 2 rows and 3 of 1: six fits per penalty, on 7, 7, 7, 8, 8 and 8 rows
    (chunks of ceil(9 / 6) = 2 rows made 5 folds, one of them fitted on 6 rows)."""
    import shiq_data.reward_head as rh

    X, y = _data(n=9, d=3)
    sizes = []

    def counting(X, y, l2):
        sizes.append(X.shape[0])
        return ridge(X, y, l2)

    monkeypatch.setattr(rh, "ridge", counting)
    cross_validate_l2(torch.tensor(X), torch.tensor(y), [1.0], folds=6)
    assert sorted(sizes) == [7, 7, 7, 8, 8, 8]


@pytest.mark.parametrize("order", [(1e9, 1.0, 10.0), (1.0, 1e9, 10.0), (1.0, 10.0, 1e9)])
def test_cross_validation_never_picks_a_penalty_whose_correlation_is_undefined(monkeypatch, order):
    """A penalty whose out-of-fold predictions are constant has no correlation (NaN); comparing NaN made the
    pick depend on where it was listed. It is now never the best while another correlation is defined."""
    import shiq_data.reward_head as RH

    real = RH.ridge

    def flat_for_huge(X, y, l2):  # the huge penalty predicts a constant
        w, b = real(X, y, l2)
        return (torch.zeros_like(w), 0.0) if l2 > 1e8 else (w, b)

    monkeypatch.setattr(RH, "ridge", flat_for_huge)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64) + 0.3 * torch.randn(
        40, generator=g, dtype=torch.float64
    )
    best, scores = cross_validate_l2(X, y, list(order), folds=4)
    assert np.isnan(scores[1e9])
    finite = {k: v for k, v in scores.items() if not np.isnan(v)}
    assert best == max(finite, key=finite.get)  # the best defined correlation, wherever NaN was listed


def test_cross_validation_refuses_bad_folds():
    X, y = _data(n=10)
    with pytest.raises(ValueError, match="folds"):
        cross_validate_l2(torch.tensor(X), torch.tensor(y), [1.0], folds=1)
    with pytest.raises(ValueError, match="folds"):
        cross_validate_l2(torch.tensor(X), torch.tensor(y), [], folds=2)


def test_a_missing_head_names_the_class_that_saves_one(tmp_path):
    """build hh --option reward_model=MISSING named shiq_eval.scorers.RegressionRewardModel.save, which does not
    exist: the class the message names is importable."""
    from shiq_data.readers.hh import regression_reward_fn

    with pytest.raises(FileNotFoundError, match="no such file") as e:
        regression_reward_fn(tmp_path / "missing.safetensors")
    module, name = re.search(r"a head saved by ([\w.]+)\.save\)", str(e.value)).group(1).rsplit(".", 1)
    assert hasattr(importlib.import_module(module), name), str(e.value)


def test_a_head_is_checked_against_the_record_beside_it(tmp_path):
    """A head with the demo's record beside it (reward_model.json, its SHA-256) was read by shiq-eval run and
    shiq-data build without that check (only the demo checked it): a head changed since was scored with. Every
    load now checks it; a head with no record, or one the record does not name, is read as it is."""
    import hashlib
    import json

    from shiq_data.reward_head import RegressionRewardModel

    def encoder(texts):
        return torch.ones(len(texts), 3)

    head = tmp_path / "reward_model.safetensors"
    RegressionRewardModel(encoder, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0.5).save(head)
    record = tmp_path / "reward_model.json"
    assert RegressionRewardModel.load(head, encoder).score_texts(["a"]) == [6.5]  # no record: read as it is
    record.write_text(json.dumps({"pearson_held_out": 0.7, "sha256": {"other.safetensors": "0" * 64}}))
    assert RegressionRewardModel.load(head, encoder).score_texts(["a"]) == [6.5]  # the record names another file
    record.write_text(json.dumps({"sha256": {head.name: hashlib.sha256(head.read_bytes()).hexdigest().upper()}}))
    assert RegressionRewardModel.load(head, encoder).score_texts(["a"]) == [6.5]  # the recorded digest
    RegressionRewardModel(encoder, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), 0.5).save(head)  # changed
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(head))}: its SHA-256 differs from the one {re.escape(str(record))}"
    ):
        RegressionRewardModel.load(head, encoder)


def test_a_head_saved_again_has_the_same_bytes(tmp_path):
    """safetensors wrote the head's metadata (meta, joiner) in a hash map's order, which changed from save to
    save: the same head had another SHA-256 each time (the demo's reward_model.json and report record it). The
    keys are now written sorted; the head reads back as saved."""
    from shiq_data.reward_head import RegressionRewardModel

    def encoder(texts):
        return torch.ones(len(texts), 3)

    rm = RegressionRewardModel(encoder, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0.5, joiner=" ")
    rm.meta["pearson_held_out"] = 0.7
    saved = set()
    for i in range(16):
        rm.save(tmp_path / f"head{i}.safetensors")
        saved.add((tmp_path / f"head{i}.safetensors").read_bytes())
    assert len(saved) == 1
    back = RegressionRewardModel.load(tmp_path / "head0.safetensors", encoder)
    assert back.score_texts(["a"]) == [6.5] and back.joiner == " " and back.meta["pearson_held_out"] == 0.7


def test_a_head_on_the_minilm_encoder_is_checked_against_its_width_without_a_warning(tmp_path):
    """Loading a head beside the MiniLM encoder asked the encoder its width by a name sentence-transformers has
    renamed, which printed a FutureWarning on every load (every shiq-eval run with a reward model). The width is
    still checked: 384 values load, 3 are refused naming the tensor."""
    import warnings

    from shiq_data.reward_head import RegressionRewardModel, minilm_encoder

    encoder = minilm_encoder()
    RegressionRewardModel(encoder, torch.zeros(384, dtype=torch.float64), 0.25).save(tmp_path / "good.safetensors")
    RegressionRewardModel(encoder, torch.zeros(3, dtype=torch.float64), 0.25).save(tmp_path / "bad.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RegressionRewardModel.load(tmp_path / "good.safetensors", encoder).score_texts(["a"]) == [0.25]
    with pytest.raises(ValueError, match="tensor 'weight': 3 values, the encoder's embeddings have 384"):
        RegressionRewardModel.load(tmp_path / "bad.safetensors", encoder)
