"""Registered SSL methods; importing this package registers every one of them."""

from ssl_core.methods import barlow_twins, byol, dino, mae, moco, rotation, simclr  # noqa: F401  (registration)
from ssl_core.methods.base import (
    METHODS,
    MethodConfig,
    SSLMethod,
    StepOutput,
    available_methods,
    build_method,
    method_config,
    register_method,
)

__all__ = [
    "METHODS",
    "MethodConfig",
    "SSLMethod",
    "StepOutput",
    "available_methods",
    "build_method",
    "method_config",
    "register_method",
]
