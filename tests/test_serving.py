"""Served models without Ray: the python_function model a registered version is (loads with ssl_core alone, bytes
in, evaluation's preprocessing, class names with probabilities out), bad input, and the ONNX copies."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BLOCK_PIPELINES_IMPORT
from pipelines import tracking
from pipelines.config import config_from_mapping
from pipelines.serving.models import (load_predictor, load_served_torch_module, load_torch_module,
                                      log_served_model)
from pipelines.serving.onnx_export import export_onnx
from ssl_core.classifier import student_classifier
from ssl_core.data import encode_png
from ssl_core.methods import build_method
from ssl_core.serving import BadInput, ServingSpec, decode_value

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CLASSES = ("cat", "dog", "eel")


def _student(seed: int = 0):
    torch.manual_seed(seed)
    model = student_classifier("resnet8", 8, 3, mean=MEAN, std=STD)
    torch.nn.init.normal_(model.linear.weight, std=0.5)  # a zero-initialised layer would make every answer equal
    torch.nn.init.normal_(model.linear.bias, std=0.5)
    return model.eval()


def _spec(**overrides) -> ServingSpec:
    values = {"kind": "classifier", "image_size": 8, "mean": MEAN, "std": STD, "class_names": CLASSES,
              "architecture": {"builder": "student", "backbone": "resnet8", "num_classes": 3}}
    return ServingSpec(**{**values, **overrides})


def _pngs(count: int, seed: int = 1) -> list[bytes]:
    """Images of assorted sizes and shapes (square, wide, tall, grayscale): preprocessing must resize them all."""
    rng = np.random.default_rng(seed)
    shapes = [(8, 8, 3), (12, 20, 3), (30, 10, 3), (9, 9)]
    return [encode_png(rng.integers(0, 256, shapes[i % len(shapes)], dtype=np.uint8)) for i in range(count)]


def _naive_probabilities(model, png: bytes) -> torch.Tensor:
    """Evaluation's path written out: PIL decode + resize/crop, /255, (x - mean) / std per channel, softmax."""
    from PIL import Image
    import io

    image = Image.open(io.BytesIO(png)).convert("RGB")
    width, height = image.size
    scale = 8 / min(width, height)
    if width != height:
        new = (max(8, round(width * scale)), max(8, round(height * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR)
        left, top = (new[0] - 8) // 2, (new[1] - 8) // 2
        image = image.crop((left, top, left + 8, top + 8))
    elif width != 8:
        image = image.resize((8, 8), Image.Resampling.BILINEAR)
    pixels = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255.0
    for channel in range(3):
        pixels[channel] = (pixels[channel] - MEAN[channel]) / STD[channel]
    with torch.no_grad():
        return model(pixels[None]).softmax(dim=1)[0]


@pytest.fixture()
def store(tmp_path: Path):
    cfg = config_from_mapping({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db",
                                            "artifact_location": str(tmp_path / "artifacts")}}, base=tmp_path)
    return cfg.tracking, tracking.start_run(cfg.tracking, "serving")


def test_served_classifier_loads_without_pipelines_and_answers_like_evaluation(store, tmp_path: Path) -> None:
    tracking_config, run_id = store
    model = _student()
    uri = log_served_model(tracking_config, run_id, "student", model, _spec())
    version = tracking.register_version(tracking_config, uri, "tiny", {"test_top1": 0.5}, ["champion"])
    pngs = _pngs(5)
    (tmp_path / "images.json").write_text(json.dumps([png.hex() for png in pngs]))
    code = BLOCK_PIPELINES_IMPORT + textwrap.dedent(f"""
        import json
        sys.path = [p for p in sys.path if p not in ("", {str(Path.cwd())!r})]
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({tracking_config.uri!r})
        model = mlflow.pyfunc.load_model("models:/tiny@champion")
        images = [bytes.fromhex(h) for h in json.load(open("images.json"))]
        print(json.dumps(model.predict(pd.DataFrame({{"image": images}}))))
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & {{"pipelines", "ssl_core"}})))
    """)
    loaded = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    predictions, modules = (json.loads(line) for line in loaded.stdout.strip().splitlines()[-2:])
    assert modules == ["ssl_core"]  # the copy shipped in the model (code_paths), pipelines never imported
    assert version == "1" and len(predictions) == len(pngs)
    for png, record in zip(pngs, predictions):
        expected = _naive_probabilities(model, png)
        assert record["probabilities"] == pytest.approx(expected.tolist(), abs=1e-5)
        assert record["label_index"] == int(expected.argmax()) and record["label"] == CLASSES[record["label_index"]]
        assert record["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert len({tuple(r["probabilities"]) for r in predictions}) > 1

    predictor = load_predictor(tracking_config, uri)
    arrays = [np.full((8, 8, 3), 40 * i, dtype=np.uint8) for i in range(3)]  # uint8 arrays, HWC and CHW
    from_arrays = predictor.predict({"image": [arrays[0], arrays[1].transpose(2, 0, 1), arrays[2]]})
    from_pngs = predictor.predict({"image": [encode_png(array) for array in arrays]})
    for array_record, png_record in zip(from_arrays, from_pngs):
        assert array_record["probabilities"] == pytest.approx(png_record["probabilities"], abs=1e-6)
    module, spec = load_served_torch_module(tracking_config, uri)  # what evaluation consumers get
    assert spec.class_names == CLASSES and torch.equal(module.linear.weight, model.linear.weight)
    evaluated = load_torch_module(tracking_config, "models:/tiny@champion")  # as `sslflow evaluate MODEL_URI` loads
    assert torch.equal(evaluated.linear.bias, model.linear.bias)


def test_base64_text_is_decoded_as_the_scoring_server_hands_it_over() -> None:
    import base64

    png = _pngs(2)[1]
    assert np.array_equal(decode_value(np.bytes_(base64.b64encode(png)), 8), decode_value(png, 8))
    assert np.array_equal(decode_value(base64.encodebytes(png), 8), decode_value(png, 8))  # with newlines


def test_bad_input_is_refused_with_a_reason() -> None:
    with pytest.raises(BadInput, match="row 0: not a decodable image"):
        decode_value(b"this is no image", 8)
    with pytest.raises(BadInput, match="shape"):
        decode_value(np.zeros((4, 4, 5), dtype=np.uint8), 8)
    with pytest.raises(BadInput, match="uint8"):
        decode_value(np.full((4, 4, 3), 300), 8)
    with pytest.raises(BadInput, match="string"):
        decode_value("aGVsbG8=", 8)
    from ssl_core.serving import Predictor
    predictor = Predictor(_student(), _spec())
    with pytest.raises(BadInput, match="empty batch"):
        predictor.predict({"image": []})
    with pytest.raises(BadInput, match="needs a key 'image'"):
        predictor.predict({"picture": [b""]})
    with pytest.raises(ValueError, match="class_names"):
        _spec(class_names=("a", "b"))


def test_onnx_copies_match_torch_with_a_dynamic_batch(tmp_path: Path) -> None:
    import onnxruntime

    method = build_method("simclr", {"backbone": "resnet8", "projection_hidden_dim": 16, "projection_dim": 8})
    encoder_spec = _spec(kind="encoder", class_names=(), architecture={
        "builder": "method_encoder", "method": "simclr",
        "method_config": {"backbone": "resnet8", "projection_hidden_dim": 16, "projection_dim": 8}})
    for module, spec in ((_student(), _spec()), (method.encoder.eval(), encoder_spec)):
        path = tmp_path / f"{spec.kind}.onnx"
        assert export_onnx(module, spec, path) < 1e-4
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (1, 5):  # neither is the export's batch of 2
            images = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                expected = module(images).numpy()
            actual = session.run(None, {"images": images.numpy()})[0]
            assert actual.shape == expected.shape and np.abs(actual - expected).max() < 1e-4
        metadata = session.get_modelmeta().custom_metadata_map
        assert json.loads(metadata["mean"]) == list(MEAN) and metadata["kind"] == spec.kind
