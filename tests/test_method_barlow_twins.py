"""Barlow Twins: its tiny test config and its views (BYOL's)."""

from __future__ import annotations

from ssl_core.methods import build_method
from ssl_core.views import byol_views

TINY = {"image_size": 16, "projection_hidden_dim": 64, "projection_dim": 64}


def test_views_are_byols() -> None:
    assert build_method("barlow_twins", TINY).view_generator().view_configs == byol_views(16).view_configs
