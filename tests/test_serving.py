"""The served model: decoding requests, error answers, and a real `mlflow models serve` on the smoke flow's model."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient
from PIL import Image

from cxr_model.config import TTA_VIEWS
from cxr_model.errors import ConfigError
from cxr_model.serving import INPUT_COLUMN, BadRequest, ServedClassifier, decode_base64, decode_request_rows
from cxr_pneumonia.model_server import start_model_server, stop_model_server
from cxr_pneumonia.predict import BadRows, find_images, format_table, invocations_url, score_files
from cxr_pneumonia.pyfunc import CxrPneumoniaModel, RequestError
from cxr_pneumonia.tasks.packaging import SIGNATURE, model_kwargs, pip_requirements
from tests.conftest import FlowRun
from tests.test_preprocess import png_bomb, png_header_only

MODEL_URI = "models:/cxr-pneumonia@champion"
TINY_VIEWS = [[1.0, 1.0], [0.85, 1.0], [1.0, 1.18]]  # test-time views in the tiny model's meta.json
MAX_MESSAGE = 600  # an error message is a sentence or two, never the request echoed back


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png(img: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save_args)
    return buf.getvalue()


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def as_16bit_png(jpeg_bytes: bytes) -> bytes:
    """The same picture as a 16-bit grayscale PNG: each 8-bit gray level v stored as v * 257."""
    gray = np.asarray(Image.open(io.BytesIO(jpeg_bytes)).convert("L"), dtype=np.uint16)
    return png(Image.fromarray(gray * 257))


def as_large_rgba_png(jpeg_bytes: bytes, size: tuple[int, int] = (2400, 2000)) -> bytes:
    """The picture upscaled to a scanner-export size, RGBA, with a transparent 40-pixel frame."""
    rgba = Image.open(io.BytesIO(jpeg_bytes)).convert("RGBA").resize(size, Image.Resampling.BICUBIC)
    alpha = np.zeros(size[::-1], np.uint8)
    alpha[40:-40, 40:-40] = 255
    rgba.putalpha(Image.fromarray(alpha))
    return png(rgba, compress_level=1)


def split_body(images: list[str], column: str = INPUT_COLUMN) -> dict:
    return {"dataframe_split": {"columns": [column], "data": [[image] for image in images]}}


# (name, request body builder from one good base64 image, status, patterns the message must contain)
_TWO_TONE = np.full((64, 64), 90, np.uint8)
_TWO_TONE[:, 32:] = 170  # grey 90 on the left, 170 on the right: not blank (serving refuses a flat frame)
GOOD_IMAGE = b64(jpeg(Image.fromarray(_TWO_TONE, "L")))
BAD_REQUESTS: list[tuple[str, Callable[[str], object], list[str]]] = [
    ("invalid-base64", lambda good: split_body(["@@@ this is not base64 @@@"]), ["row 0", "invalid base64"]),
    ("not-an-image", lambda good: split_body([b64(b"%PDF-1.4 a report, not an image")]),
     ["row 0", "not a decodable image"]),
    ("empty-string", lambda good: split_body([""]), ["row 0", "empty string"]),
    ("null", lambda good: {"dataframe_split": {"columns": [INPUT_COLUMN], "data": [[None]]}},
     ["row 0", "missing value"]),
    ("number", lambda good: {"dataframe_split": {"columns": [INPUT_COLUMN], "data": [[42]]}},
     ["row 0", "expected a base64 string, got int"]),
    ("over-pixel-limit", lambda good: split_body([b64(png_header_only(9000, 9000))]),
     ["row 0", "9000x9000", "over the limit"]),
    ("truncated", lambda good: split_body([good[: len(good) // 2 // 4 * 4]]), ["row 0", "truncated"]),
    ("missing-column", lambda good: split_body([good], column="img"), ["no column 'image'"]),
    ("misnamed-inputs-key", lambda good: {"inputs": {"images": [good]}}, ["no column 'image'"]),
    ("one-bad-row-in-batch", lambda good: split_body([good, b64(b"GIF89a but not really"), good, ""]),
     ["2 of 4 rows", "row 1: not a decodable image", "row 3: empty string"]),
]


def check_bad_request(post: Callable[[object], tuple[int, str]], body: object, patterns: list[str]) -> dict:
    """Send `body`; the answer must be a short 400 naming the rows and problems in `patterns`."""
    status, text = post(body)
    assert status == 400, text[:1000]
    answer = json.loads(text)
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    message = answer["message"]
    assert len(message) < MAX_MESSAGE, message[:1000]
    for pattern in patterns:
        assert pattern in message
    return answer


# ---------------------------------------------------------------- unit: request decoding and errors


def test_decode_base64_accepts_what_tools_emit() -> None:
    data = bytes(range(256)) * 4
    text = b64(data)
    assert decode_base64(text) == data
    assert decode_base64("\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\n") == data  # `base64`
    assert decode_base64(f"data:image/png;base64,{text}") == data  # a browser data: URL


@pytest.mark.parametrize(
    ("value", "reason"),
    [("", "empty string"), ("  \n", "empty string"), ("abc$", "invalid base64"), ("abcde", "invalid base64"),
     (None, "missing value"), (float("nan"), "missing value"), (pd.NA, "missing value"), (7, "got int"),
     (b"bytes", "got bytes"), (["x"], "got list")],
)
def test_decode_base64_rejects_with_a_reason(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_base64(value)


def test_bad_rows_are_all_named_and_good_rows_are_not_scored() -> None:
    good = GOOD_IMAGE
    with pytest.raises(BadRequest) as info:
        decode_request_rows([good, "!!", good, b64(b"text"), None], image_size=16)
    err = info.value
    assert [e["row"] for e in err.errors] == [1, 3, 4]
    err = RequestError(err.message, err.errors)  # as the pyfunc wrapper answers it
    assert err.message.startswith("3 of 5 rows could not be read as images, so no row was scored: row 1: invalid")
    assert "row 3: not a decodable image" in err.message and "row 4: expected a base64 string" in err.message
    assert err.get_http_status_code() == 400
    body = json.loads(err.serialize_as_json())
    assert body["errors"] == err.errors and body["message"] == err.message


def test_long_error_lists_are_cut_in_the_message_but_complete_in_errors() -> None:
    with pytest.raises(BadRequest) as info:
        decode_request_rows([""] * 40, image_size=16)
    assert len(info.value.errors) == 40
    assert "; and 35 more" in info.value.message and len(info.value.message) < MAX_MESSAGE


def test_request_error_message_survives_the_scoring_servers_rewrite() -> None:
    err = RequestError("row 0: empty string")
    # what mlflow.pyfunc.scoring_server.invocations does before answering
    err.message = f"Failed to predict data '{'A' * 100_000}'. \nError: {err.message}"
    assert err.message == "row 0: empty string"
    assert json.loads(err.serialize_as_json())["message"] == "row 0: empty string"


def test_decode_request_rows_returns_a_model_batch() -> None:
    colour = np.full((200, 300, 4), (90, 90, 90, 255), np.uint8)  # a grey film with an opaque red | green band on
    colour[:20, :150], colour[:20, 150:] = (200, 10, 10, 255), (10, 200, 10, 255)  # top: colour, under the limit
    batch = decode_request_rows([GOOD_IMAGE, b64(png(Image.fromarray(colour, "RGBA")))], 16)
    assert batch.shape == (2, 16, 16, 1) and batch.dtype == np.uint8
    assert abs(int(batch[0, 0, 0, 0]) - 90) <= 1 and batch[1, 0, 0, 0] == 67  # 0.299*200 + 0.587*10 + 0.114*10
    assert decode_request_rows([], 16).shape == (0, 16, 16, 1)


def test_a_blank_image_is_refused_and_named() -> None:
    """A frame with no spread of grey levels (a detector fault, a saturated export) carries nothing to score; the
    network would answer for it all the same (a flat grey square scores PNEUMONIA 1.00)."""
    blank = b64(png(Image.new("L", (300, 200), 128)))
    with pytest.raises(BadRequest) as caught:
        decode_request_rows([GOOD_IMAGE, blank, b64(png(Image.new("RGB", (50, 50), (255, 255, 255))))], 16)
    assert [e["row"] for e in caught.value.errors] == [1, 2]
    assert all("blank image" in e["error"] for e in caught.value.errors)
    faint = np.full((64, 64), 120, np.uint8)
    faint[::2] = 125  # a faint film still passes: sd 2.5
    assert decode_request_rows([b64(png(Image.fromarray(faint, "L")))], 64).shape == (1, 64, 64, 1)
    # a 12-bit film in a 16-bit PNG, of narrow latitude (1800..2300 of 4095): scaled as 16-bit data, its grey
    # levels would span 7..9 and it would be refused as blank
    film = np.linspace(1800, 2300, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    (twelve_bit,) = decode_request_rows([b64(png(Image.fromarray(film)))], 64)
    assert twelve_bit.std() > 5
    assert decode_request_rows([], 16).shape == (0, 16, 16, 1)


def annotated_film(share: float) -> Image.Image:
    """A grey film (RGB) with a red arrow shaft and a yellow label covering about `share` of it, as exports have."""
    film = np.repeat(np.linspace(40, 220, 256, dtype=np.uint8)[None, :, None], 256, axis=0).repeat(3, axis=2)
    rows = int(round(256 * share))  # two bands, each half the width
    film[100:100 + rows, 20:148] = (230, 20, 20)  # the arrow: half the share
    film[200:200 + rows, 120:248] = (240, 220, 0)  # the label's box: the other half
    return Image.fromarray(film, "RGB")


def test_a_colour_photograph_is_refused_and_an_annotated_film_is_not() -> None:
    """A colour photograph is no radiograph, and the network would score it all the same; films are grey, and an
    export's coloured arrow or label must not cost it its score."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as photo:  # a colour portrait matplotlib ships
        portrait = b64(photo.read())
    red = b64(jpeg(Image.new("RGB", (120, 100), (200, 30, 30))))
    with pytest.raises(BadRequest) as caught:
        decode_request_rows([GOOD_IMAGE, portrait, b64(jpeg(annotated_film(0.05))), red], 32)
    assert [e["row"] for e in caught.value.errors] == [1, 3]
    assert caught.value.errors[0]["error"].startswith("colour image: 51% of its pixels are coloured")
    assert "100% of its pixels" in caught.value.errors[1]["error"]
    # an annotated film is scored: 5 % and 9 % coloured; at 12 % it is refused
    assert decode_request_rows([b64(png(annotated_film(s))) for s in (0.05, 0.09)], 32).shape == (2, 32, 32, 1)
    with pytest.raises(BadRequest, match="colour image: 1[23]%"):
        decode_request_rows([b64(png(annotated_film(0.12)))], 32)


def test_pip_requirements_pin_what_the_model_imports() -> None:
    reqs = pip_requirements()
    assert all("==" in r for r in reqs)
    assert {r.split("==")[0] for r in reqs} >= {"mlflow", "tensorflow-cpu", "keras", "pillow", "numpy", "pandas",
                                                "scikit-learn"}


def test_pip_requirements_pin_tensorflow_under_the_name_it_was_installed_as(monkeypatch) -> None:
    """A GPU worker or a Mac has `tensorflow`, not `tensorflow-cpu`: registering must not fail there."""
    import importlib.metadata

    real = importlib.metadata.version

    def gpu_machine(name: str) -> str:
        if name == "tensorflow-cpu":
            raise importlib.metadata.PackageNotFoundError(name)
        return "2.21.0" if name == "tensorflow" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", gpu_machine)
    names = [r.split("==")[0] for r in pip_requirements()]
    assert "tensorflow" in names and "tensorflow-cpu" not in names
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name)))
    with pytest.raises(ConfigError, match="None of"):
        pip_requirements()


def test_signature_has_one_string_column_and_three_outputs() -> None:
    assert SIGNATURE.inputs.input_names() == [INPUT_COLUMN]
    assert SIGNATURE.outputs.input_names() == ["probability", "label", "threshold"]


# ---------------------------------------------------------------- unit: the pyfunc on a tiny untrained convnet


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 32-pixel convnet saved as an MLflow pyfunc directory (no registry, no training)."""
    import mlflow

    from cxr_model.model import ConvNetConfig, build_convnet

    root = tmp_path_factory.mktemp("tiny")
    build_convnet(ConvNetConfig(image_size=32, blocks=2, filters=8, dense_units=0)).save(root / "model.keras")
    (root / "meta.json").write_text(json.dumps({"threshold": 0.5, "image_size": 32, "views": TINY_VIEWS}))
    mlflow.pyfunc.save_model(str(root / "pyfunc"), **model_kwargs(root / "model.keras", root / "meta.json", None))
    return root


def test_pyfunc_output_equals_in_process_predict_proba(tiny_model_dir: Path) -> None:
    import keras

    from cxr_model.inference import predict_proba
    from cxr_model.preprocess import decode_image

    model = CxrPneumoniaModel()
    model.load_context(SimpleNamespace(artifacts={"keras_model": str(tiny_model_dir / "model.keras"),
                                                  "meta": str(tiny_model_dir / "meta.json")}))
    rng = np.random.default_rng(0)
    files = [png(Image.fromarray(rng.integers(0, 255, (40 + i, 50), np.uint8), "L")) for i in range(5)]
    out = model.predict(None, pd.DataFrame({INPUT_COLUMN: [b64(f) for f in files]}))
    assert list(out.columns) == ["probability", "label", "threshold"]
    assert model.classifier.views == tuple(map(tuple, TINY_VIEWS))  # the registered test-time views, not a default
    expected = predict_proba(keras.models.load_model(tiny_model_dir / "model.keras"),
                             np.stack([decode_image(f, 32) for f in files]), views=TINY_VIEWS)
    # graph-compiled serving vs the eager training-side call: the same numbers up to float32 rounding
    np.testing.assert_allclose(out["probability"], expected, rtol=0, atol=1e-6)
    assert out["probability"].std() > 0  # different images, different answers
    assert (out["label"] == np.where(out["probability"] >= 0.5, "PNEUMONIA", "NORMAL")).all()
    assert (out["threshold"] == 0.5).all()
    with pytest.raises(RequestError, match=r"no column 'image' \(got \['img'\]\)"):
        model.predict(None, pd.DataFrame({"img": [b64(files[0])]}))


@pytest.fixture(scope="module")
def scoring_app(tiny_model_dir: Path):
    """MLflow's own scoring app in this process (no port), on the tiny pyfunc."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc.scoring_server import init

    return TestClient(init(mlflow.pyfunc.load_model(str(tiny_model_dir / "pyfunc"))))


@pytest.mark.parametrize(("name", "body", "patterns"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_scoring_app_answers_bad_requests_with_400(scoring_app, name: str, body, patterns: list[str]) -> None:
    def post(payload: object) -> tuple[int, str]:
        r = scoring_app.post("/invocations", json=payload)
        return r.status_code, r.text

    check_bad_request(post, body(GOOD_IMAGE), patterns)
    status, text = post(split_body([GOOD_IMAGE]))
    assert status == 200 and len(json.loads(text)["predictions"]) == 1


# ---------------------------------------------------------------- unit: the client


def test_find_images_walks_folders_by_suffix(tmp_path: Path) -> None:
    for name in ("b/x.PNG", "a.jpeg", "b/c/y.jpg", "notes.txt", "b/z.dcm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path])] == ["a.jpeg", "b/c/y.jpg", "b/x.PNG"]
    assert find_images([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]  # a named file is taken as is
    with pytest.raises(FileNotFoundError):
        find_images([tmp_path / "missing"])


def test_invocations_url() -> None:
    assert invocations_url("http://h:5000") == "http://h:5000/invocations"
    assert invocations_url("http://h:5000/invocations/") == "http://h:5000/invocations"


def test_score_files_reports_bad_files_and_rescores_the_rest(tmp_path: Path) -> None:
    files = []
    for name, content in [("a.png", b"good-a"), ("b.png", b"bad"), ("c.png", b"good-c"), ("d.png", b"good-d")]:
        (tmp_path / name).write_bytes(content)
        files.append(tmp_path / name)
    files.append(tmp_path / "gone.png")  # unreadable
    calls = []

    def fake_predict(images: list[str]) -> list[dict]:
        calls.append(len(images))
        bad = [{"row": i, "error": "not a decodable image"} for i, im in enumerate(images) if im == b64(b"bad")]
        if bad:
            raise BadRows("bad rows", bad)
        return [{"probability": len(base64.b64decode(im)) / 10, "label": "NORMAL", "threshold": 0.5} for im in images]

    rows = score_files(files, fake_predict, batch_size=3)
    assert calls == [3, 2, 1]  # batch 1 rejected whole, resent without b.png; batch 2 holds d.png only
    by_name = {Path(r["path"]).name: r for r in rows}
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png", "c.png", "d.png", "gone.png"]
    assert by_name["a.png"]["probability"] == 0.6 and by_name["a.png"]["error"] is None
    assert by_name["b.png"]["error"] == "not a decodable image" and by_name["b.png"]["probability"] is None
    assert by_name["gone.png"]["error"].startswith("cannot read file")
    table = format_table(rows).splitlines()
    assert table[0].split() == ["path", "probability", "label", "threshold", "error"]
    assert "0.6000" in table[1] and table[2].endswith("not a decodable image")


# ---------------------------------------------------------------- integration: a real server on the smoke model


@pytest.fixture(scope="module")
def server(smoke_flow: FlowRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow models serve -m models:/cxr-pneumonia@champion --env-manager local` on a free port; killed after."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    proc, url = start_model_server(MODEL_URI, log, env=smoke_flow.env, cwd=smoke_flow.cwd, timeout=240)
    try:
        yield url
    finally:
        stop_model_server(proc)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/ping", timeout=2)  # really gone


def post_json(url: str, body: object) -> tuple[int, str]:
    r = requests.post(f"{url}/invocations", json=body, timeout=120)
    return r.status_code, r.text


def served(url: str, images: list[str], inputs_format: bool = False) -> pd.DataFrame:
    body = {"inputs": {INPUT_COLUMN: images}} if inputs_format else split_body(images)
    status, text = post_json(url, body)
    assert status == 200, text[:1000]
    return pd.DataFrame(json.loads(text)["predictions"])


@pytest.fixture(scope="module")
def local_model(smoke_flow: FlowRun):
    """The same registered model loaded in this process, as `cxr predict` does without --url."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", smoke_flow.tracking_uri)
        yield mlflow.pyfunc.load_model(MODEL_URI)


@pytest.fixture(scope="module")
def xray_files(real_subset: Path) -> list[Path]:
    """Three real test images per class."""
    return [p for cls in ("NORMAL", "PNEUMONIA") for p in sorted((real_subset / "test" / cls).glob("*.jpeg"))[:3]]


@pytest.mark.integration
def test_served_answers_equal_in_process_predictions(server: str, local_model, smoke_flow: FlowRun,
                                                     xray_files: list[Path]) -> None:
    from cxr_model.inference import predict_proba
    from cxr_model.model import ensemble_members
    from cxr_model.preprocess import decode_image

    jpegs = [p.read_bytes() for p in xray_files]
    variants = {
        "jpeg": jpegs,
        "png16": [as_16bit_png(j) for j in jpegs],
        "rgba_large": [as_large_rgba_png(j) for j in jpegs[:2]],
        "gray_fullsize_jpeg": [jpeg(Image.open(io.BytesIO(j)).convert("L").resize((2000, 1600))) for j in jpegs[:2]],
    }
    assert Image.open(io.BytesIO(variants["png16"][0])).mode.startswith("I;16")
    assert Image.open(io.BytesIO(variants["rgba_large"][0])).mode == "RGBA"
    # The threshold the flow chose on validation for the version being served (test_flow may have registered a
    # second version and moved `champion` to it, so read the registry rather than the first run's result).
    client = MlflowClient(smoke_flow.tracking_uri)
    champion = client.get_model_version_by_alias("cxr-pneumonia", "champion")
    threshold = client.get_run(champion.run_id).data.metrics["val/final_threshold"]
    python_model = local_model.unwrap_python_model().classifier
    # served with the test-time views the threshold was chosen with
    assert python_model.views == TTA_VIEWS[client.get_run(champion.run_id).data.params["cfg/tta"]]
    # ... and it is the ensemble that run saved, one sub-model per averaged epoch of each trained member
    kept = [m.split(",") for m in client.get_run(champion.run_id).data.params["train/snapshot_epochs"].split(";")]
    members = ensemble_members(python_model.model)
    assert len(kept) == 2 and len(members) == sum(map(len, kept))  # smoke: two trained members
    # member 2's first sub-model comes after member 1's epochs: another seed, so other weights from the first layer on
    assert not np.allclose(members[0].get_weights()[0], members[len(kept[0])].get_weights()[0])
    results = {}
    for name, files in variants.items():
        images = [b64(f) for f in files]
        out = served(server, images)
        results[name] = out
        # the server and the pyfunc in this process: the same code, the same numbers (to float32 rounding, as
        # thread settings made by other tests in this process may change the order of a sum)
        in_process = local_model.predict(pd.DataFrame({INPUT_COLUMN: images}))
        pd.testing.assert_frame_equal(out, in_process, check_exact=False, rtol=0, atol=1e-6)
        # ... and the training-side path: decode_image + predict_proba on the Keras model
        expected = predict_proba(python_model.model, np.stack([decode_image(f, python_model.image_size)
                                                                for f in files]), views=python_model.views)
        np.testing.assert_allclose(out["probability"], expected, rtol=0, atol=1e-6, err_msg=name)
        assert (out["threshold"] == threshold).all()
        assert (out["label"] == np.where(out["probability"] >= threshold, "PNEUMONIA", "NORMAL")).all()
    assert results["jpeg"]["probability"].nunique() == len(jpegs)
    # a 16-bit PNG of the same picture decodes to the same pixels, so it gets the same answer
    np.testing.assert_allclose(results["png16"]["probability"], results["jpeg"]["probability"], rtol=0, atol=1e-6)
    # both request formats
    pd.testing.assert_frame_equal(served(server, [b64(j) for j in jpegs], inputs_format=True), results["jpeg"])
    status, text = post_json(server, {"inputs": [b64(j) for j in jpegs[:2]]})
    assert status == 200
    # another batch size may pick other CPU kernels: equal up to float32 rounding, not bit for bit
    np.testing.assert_allclose([p["probability"] for p in json.loads(text)["predictions"]],
                               results["jpeg"]["probability"][:2], rtol=0, atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize(("name", "body", "patterns"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_server_answers_bad_requests_with_400_and_keeps_serving(server: str, xray_files: list[Path], name: str,
                                                                body, patterns: list[str]) -> None:
    good = b64(xray_files[0].read_bytes())
    baseline = served(server, [good])
    answer = check_bad_request(lambda payload: post_json(server, payload), body(good), patterns)
    if name == "one-bad-row-in-batch":
        assert [e["row"] for e in answer["errors"]] == [1, 3]
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200
    pd.testing.assert_frame_equal(served(server, [good]), baseline)


@pytest.mark.integration
def test_server_rejects_a_real_decompression_bomb_and_garbage_bodies(server: str, xray_files: list[Path]) -> None:
    data = png_bomb(20_000)  # 400M pixels in ~50 kB
    assert len(data) < 100_000
    check_bad_request(lambda payload: post_json(server, payload), split_body([b64(data)]),
                      ["row 0", "over the pixel limit"])
    for raw, content_type in [(b"{not json", "application/json"), (b"\xff\xfe", "application/json"),
                              (b'{"unknown_key": []}', "application/json")]:
        r = requests.post(f"{server}/invocations", data=raw, headers={"Content-Type": content_type}, timeout=30)
        assert r.status_code == 400, r.text[:500]
    assert served(server, [b64(xray_files[0].read_bytes())]).shape == (1, 3)


@pytest.mark.integration
def test_cli_predict_over_http_and_in_process_agree(server: str, smoke_flow: FlowRun, xray_files: list[Path],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from cxr_pneumonia.cli import build_parser

    folder = tmp_path / "scans"
    (folder / "more").mkdir(parents=True)
    for p in xray_files[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "more" / "scan16.png").write_bytes(as_16bit_png(xray_files[3].read_bytes()))
    (folder / "more" / "broken.jpg").write_bytes(xray_files[4].read_bytes()[:500])
    expected = served(server, [b64(p.read_bytes()) for p in xray_files[:4]])["probability"]

    def cxr_predict(*argv: str) -> tuple[int, pd.DataFrame, str]:
        args = build_parser().parse_args(["predict", str(folder), *argv])
        code = args.func(args)
        out = capsys.readouterr().out
        return code, pd.read_csv(tmp_path / "out.csv"), out

    code, http_rows, table = cxr_predict("--url", server, "--csv", str(tmp_path / "out.csv"))
    assert code == 1  # one file could not be scored
    assert [Path(p).name for p in http_rows["path"]] == [p.name for p in xray_files[:3]] + ["broken.jpg",
                                                                                            "scan16.png"]
    broken = http_rows.set_index(http_rows["path"].map(lambda p: Path(p).name)).loc["broken.jpg"]
    assert "truncated" in broken["error"] and pd.isna(broken["probability"])
    good = http_rows.dropna(subset=["probability"])
    np.testing.assert_allclose(good["probability"], expected, rtol=0, atol=1e-6)
    assert "broken.jpg" in table and "probability" in table.splitlines()[0]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", smoke_flow.tracking_uri)
    code, local_rows, _ = cxr_predict("--csv", str(tmp_path / "out.csv"))  # default --model-uri
    assert code == 1
    pd.testing.assert_frame_equal(local_rows, http_rows)


def test_score_files_keeps_what_was_scored_when_the_server_fails_midway(tmp_path: Path) -> None:
    """A server that dies after the first batch: batch 1 keeps its scores, the rest say why they have none."""
    from cxr_pneumonia.predict import PredictError

    files = []
    for n in range(5):
        (tmp_path / f"{n}.png").write_bytes(b"x" * (n + 1))
        files.append(tmp_path / f"{n}.png")
    calls = []

    def dies_after_one_batch(images: list[str]) -> list[dict]:
        calls.append(len(images))
        if len(calls) > 1:
            raise PredictError("cannot reach http://h/invocations: connection refused")
        return [{"probability": 0.5, "label": "PNEUMONIA", "threshold": 0.4} for _ in images]

    rows = score_files(files, dies_after_one_batch, batch_size=2)
    assert calls == [2, 2]  # no retry storm: the third batch is not sent
    assert [r["probability"] for r in rows] == [0.5, 0.5, None, None, None]
    assert all(r["error"] == "not scored: cannot reach http://h/invocations: connection refused" for r in rows[2:])
    with pytest.raises(PredictError, match="at least 1"):
        score_files(files, dies_after_one_batch, batch_size=0)


def test_cli_predict_exit_status_when_the_server_is_gone(tmp_path: Path, capsys) -> None:
    import socket

    from cxr_pneumonia.cli import build_parser

    (tmp_path / "a.png").write_bytes(b"x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = build_parser().parse_args(["predict", str(tmp_path), "--url", f"http://127.0.0.1:{port}", "--timeout", "5"])
    assert args.func(args) == 2  # nothing could be scored
    assert "cannot reach" in capsys.readouterr().err
    args = build_parser().parse_args(["predict", str(tmp_path), "--url", "http://127.0.0.1:1", "--batch-size", "0"])
    assert args.func(args) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_cli_predict_checks_the_csv_target_before_scoring_and_prints_before_writing(tmp_path: Path, capsys,
                                                                                     monkeypatch) -> None:
    from cxr_pneumonia import predict as predict_cli
    from cxr_pneumonia.cli import build_parser

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "empty.png").write_bytes(b"")
    sent = []

    def fake_server(url, timeout):
        def predict(images):
            sent.extend(images)
            return [{"probability": 0.75, "label": "PNEUMONIA", "threshold": 0.5} for _ in images]
        return predict

    monkeypatch.setattr(predict_cli, "http_predictor", fake_server)
    for target, reason in [(tmp_path / "no-such-folder" / "out.csv", "does not exist"), (tmp_path, "is a folder")]:
        args = build_parser().parse_args(["predict", str(tmp_path), "--url", "http://h", "--csv", str(target)])
        assert args.func(args) == 2 and reason in capsys.readouterr().err
    assert sent == []  # refused before anything was scored

    def full_disk(rows, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predict_cli, "write_csv", full_disk)
    args = build_parser().parse_args(["predict", str(tmp_path / "a.png"), "--url", "http://h", "--csv",
                                      str(tmp_path / "out.csv")])
    assert args.func(args) == 1
    out, err = capsys.readouterr()
    assert "0.7500" in out and "PNEUMONIA" in out  # the score is printed though the CSV could not be written
    assert "cannot write --csv" in err and "No space left" in err
    # an empty file is named as one and never sent
    monkeypatch.undo()
    monkeypatch.setattr(predict_cli, "http_predictor", fake_server)
    sent.clear()
    args = build_parser().parse_args(["predict", str(tmp_path), "--url", "http://h"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "empty file (0 bytes)" in out and len(sent) == 1


def test_cli_predict_in_process_fails_at_once_when_the_tracking_server_does_not_answer(tmp_path: Path, capsys,
                                                                                      monkeypatch) -> None:
    import socket

    from cxr_pneumonia.cli import build_parser

    (tmp_path / "a.png").write_bytes(b"x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    args = build_parser().parse_args(["predict", str(tmp_path), "--model-uri", "models:/cxr-pneumonia@champion"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "cannot load models:/cxr-pneumonia@champion" in err and "does not answer" in err


def test_a_score_at_the_threshold_is_pneumonia_when_served() -> None:
    """`p >= threshold`, as evaluation calls it (cxr_model.evaluate.called_pneumonia)."""
    model = ServedClassifier.__new__(ServedClassifier)  # the scoring without a Keras model behind it
    model.threshold, model.image_size = 0.5, 16
    model.forward = lambda images: np.full(len(images), 0.5, np.float32)
    out = model.predict(pd.DataFrame({INPUT_COLUMN: [GOOD_IMAGE]}))
    assert out["label"].tolist() == ["PNEUMONIA"]
