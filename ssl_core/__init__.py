"""sslflow core: SSL methods, losses, augmentations and evaluation in plain PyTorch (no Ray, no MLflow).

The top-level names load lazily so that ``import ssl_core.queue`` (e.g. in a spawned DDP worker) does not import
torchvision and every method.
"""

from __future__ import annotations

from typing import Any

__all__ = ["available_methods", "build_backbone", "build_method", "method_config"]


def __getattr__(name: str) -> Any:
    if name == "build_backbone":
        from ssl_core.backbones import build_backbone

        return build_backbone
    if name in {"available_methods", "build_method", "method_config"}:
        import ssl_core.methods as methods

        return getattr(methods, name)
    raise AttributeError(f"module 'ssl_core' has no attribute {name!r}")
