"""Registered SSL methods: importing this package imports every module in it, and each registers its method."""

import importlib
import pkgutil

from ssl_core.methods.base import (
    METHODS,
    MethodConfig,
    SSLMethod,
    StepOutput,
    available_methods,
    build_method,
    check_finetune_head_layers,
    method_config,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "MethodConfig",
    "SSLMethod",
    "StepOutput",
    "available_methods",
    "build_method",
    "check_finetune_head_layers",
    "method_config",
    "register_method",
]
