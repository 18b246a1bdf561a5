"""Properties of an opened run that other commands decide on."""

from __future__ import annotations


def test_has_features_on_labelled_images(run_factory) -> None:
    run = run_factory(data={"name": "digits", "n_train": 60, "n_valid": 50, "n_test": 50})
    assert run.splits.train.ndim == 4 and run.splits.y_train is not None
    assert run.has_features is True


def test_no_classifier_features_on_2d_data(run_factory) -> None:
    run = run_factory()
    assert run.splits.train.ndim == 2
    assert run.has_features is False
