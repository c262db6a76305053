"""ONNX copies of the served modules, checked with onnxruntime against torch.

The ONNX graph is the torch module alone: input ``images``, float32 (batch, 3, S, S) already resized and
normalised as ``ssl_core.serving`` does (its ``metadata_props`` hold ``image_size``, ``mean``, ``std``, ``kind``
and ``class_names``), output ``outputs``: logits of a classifier, unnormalised features of an encoder. The batch
axis is dynamic. Exported with torch's TorchScript-based exporter (``dynamo=False``): on a ResNet-8 it takes ~3 s
against ~13 s for the dynamo exporter, and the onnxruntime check below guards the result either way.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssl_core.serving import ServingSpec

ONNX_TOLERANCE = 1e-4
"""Largest accepted max-abs difference between onnxruntime and torch outputs on the check batch."""
CHECK_IMAGES = 8
OPSET = 17


def export_onnx(module: nn.Module, spec: ServingSpec, path: str | Path) -> float:
    """Write ``module`` (CPU copy, eval mode) as ONNX to ``path`` and return the max abs difference between
    onnxruntime and torch on ``CHECK_IMAGES`` seeded normalised images; ``RuntimeError`` above ``ONNX_TOLERANCE``."""
    import copy

    import onnx
    import onnxruntime

    module = copy.deepcopy(module).cpu().float().eval()
    generator = torch.Generator().manual_seed(0)
    images = spec.normalization()(torch.rand(CHECK_IMAGES, 3, spec.image_size, spec.image_size, generator=generator))
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (images[:2],), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=["outputs"],
                          dynamic_axes={"images": {0: "batch"}, "outputs": {0: "batch"}})
    model = onnx.load(str(path))
    metadata = {"kind": spec.kind, "image_size": str(spec.image_size), "mean": json.dumps(list(spec.mean)),
                "std": json.dumps(list(spec.std)), "class_names": json.dumps(list(spec.class_names))}
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_out = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        torch_out = module(images).float().flatten(1).numpy()
    difference = float(np.abs(ort_out.reshape(len(images), -1) - torch_out).max())
    if not difference <= ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX export of the {spec.kind} differs from torch by {difference:.3g} "
                           f"(> {ONNX_TOLERANCE}) on {CHECK_IMAGES} images")
    return difference
