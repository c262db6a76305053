"""BYOL: its tiny test config and its asymmetric views."""

from __future__ import annotations

from ssl_core.methods import build_method

TINY = {"image_size": 16, "projection_hidden_dim": 64, "projection_dim": 32, "prediction_hidden_dim": 64}


def test_views_are_byols_asymmetric_pair() -> None:
    views = build_method("byol", TINY).view_generator().view_configs
    assert (views["view1"].solarize_prob, views["view2"].solarize_prob) == (0.0, 0.2)
