"""Serving latency and throughput: `mlflow models serve` over HTTP next to the same pyfunc in this process.

    .venv/bin/python benchmarks/serving.py                      # an untrained default-size convnet
    MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db .venv/bin/python benchmarks/serving.py \\
        --model-uri models:/cxr-pneumonia@champion                # a trained, registered one

Without --model-uri the script logs and registers an untrained convnet (default ConvNetConfig at 128 px, so that
runs compare with the recorded ones; --image-size 96 for the default profile's input) in a temporary
MLflow store, the way the flow's register task does; weights do not change the timing.
Images are real test-split JPEGs (224x224 in this dataset); the full-size case is one of
them upscaled to a 2000x1600 grayscale JPEG, the size of a scanner export.

Each case calls the in-process pyfunc and the server alternately, so both see the same machine load. Times are
wall time at the caller, from base64 strings in hand to parsed predictions. HTTP goes through a keep-alive
`http.client` connection and, for single images, also through a `requests.Session`. Prints Markdown tables and
writes benchmarks/results/serving.json (`--out`).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cxr_pneumonia.model_server import start_model_server, stop_model_server

REPO = Path(__file__).resolve().parents[1]
MODEL_URI = "models:/cxr-pneumonia@champion"

Predict = Callable[[list[str]], object]


def data_dir(given: Path | None) -> Path:
    for candidate in (given, os.environ.get("CXR_DATA_DIR"), REPO.parent / "shared" / "data" / "chest_xray"):
        if candidate and (Path(candidate) / "test").is_dir():
            return Path(candidate)
    sys.exit("dataset not found: pass --data-dir or set CXR_DATA_DIR")


def load_images(root: Path, count: int) -> tuple[list[str], str]:
    """`count` real test JPEGs as base64 (both classes), and one upscaled to a 2000x1600 grayscale JPEG."""
    from PIL import Image

    files = sorted((root / "test" / "NORMAL").glob("*.jpeg"))[: count // 2]
    files += sorted((root / "test" / "PNEUMONIA").glob("*.jpeg"))[: count - len(files)]
    full = Image.open(files[0]).convert("L").resize((2000, 1600), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    full.save(buf, "JPEG", quality=90)
    encode = base64.b64encode
    return [encode(f.read_bytes()).decode("ascii") for f in files], encode(buf.getvalue()).decode("ascii")


def register_untrained_model(workdir: Path, image_size: int, example: str) -> str:
    """Log and register an untrained convnet as the flow's register task does; returns the tracking URI."""
    import mlflow
    import pandas as pd

    from cxr_model.model import ConvNetConfig, build_convnet
    from cxr_model.serving import INPUT_COLUMN
    from cxr_pneumonia.tasks.packaging import log_served_model

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("serving-benchmark")
    build_convnet(ConvNetConfig(image_size=image_size)).save(workdir / "model.keras")
    (workdir / "meta.json").write_text(json.dumps({"threshold": 0.5, "image_size": image_size}))
    with mlflow.start_run():
        info = log_served_model(workdir / "model.keras", workdir / "meta.json",
                                pd.DataFrame({INPUT_COLUMN: [example]}), registered_model_name="cxr-pneumonia")
    mlflow.MlflowClient().set_registered_model_alias("cxr-pneumonia", "champion", info.registered_model_version)
    return tracking_uri


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 5) -> dict[str, np.ndarray]:
    """Wall seconds per call, the callables taking turns so machine noise hits them alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: np.empty(repeats) for name in calls}
    for i in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name][i] = time.perf_counter() - start
    return times


def request_body(images: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[im] for im in images]}}).encode()


def stdlib_client(url: str) -> Predict:
    """POST /invocations over one keep-alive `http.client` connection."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def predict(images: list[str]) -> object:
        conn.request("POST", "/invocations", body=request_body(images), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:300]!r}")
        return json.loads(body)["predictions"]

    return predict


def requests_client(url: str) -> Predict:
    """POST /invocations through a `requests.Session`, as the README's Python example does."""
    import requests

    session = requests.Session()

    def predict(images: list[str]) -> object:
        r = session.post(f"{url}/invocations", data=request_body(images),
                         headers={"Content-Type": "application/json"}, timeout=120)
        r.raise_for_status()
        return r.json()["predictions"]

    return predict


def percentiles(seconds: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(seconds, 50) * 1000), float(np.percentile(seconds, 95) * 1000)


def latency_ms(cases: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, dict[str, float]]]:
    """{case: {path: {"p50": ms, "p95": ms}}}."""
    return {label: {path: dict(zip(("p50", "p95"), percentiles(s), strict=True)) for path, s in t.items()}
            for label, t in cases.items()}


def latency_table(latency: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| request | in-process p50 / p95 (ms) | HTTP p50 / p95 (ms) | HTTP (requests) p50 / p95 (ms) "
             "| HTTP / in-process, p50 |", "|---|---:|---:|---:|---:|"]
    for label, t in latency.items():
        local, http = t["in-process"], t["http"]
        rq = "{p50:.1f} / {p95:.1f}".format(**t["requests"]) if "requests" in t else "-"
        lines.append(f"| {label} | {local['p50']:.1f} / {local['p95']:.1f} | {http['p50']:.1f} / {http['p95']:.1f} "
                     f"| {rq} | {http['p50'] / local['p50']:.2f}x |")
    return "\n".join(lines)


def images_per_second(batch_size: int, t: dict[str, np.ndarray]) -> dict[str, float]:
    return {path: float(batch_size / np.median(s)) for path, s in t.items()}


def throughput_table(batch_size: int, ips: dict[str, float]) -> str:
    local, http = ips["in-process"], ips["http"]
    return "\n".join([
        "| batch | in-process images/s | HTTP images/s | HTTP / in-process |", "|---|---:|---:|---:|",
        f"| {batch_size} x 224x224 JPEG per request | {local:.0f} | {http:.0f} | {http / local:.2f}x |",
    ])


def breakdown_ms(python_model, images: list[str], full_size: str, batch_size: int) -> dict[str, float]:
    """Where the in-process time goes: decoding and the compiled forward pass, p50 ms."""
    from cxr_model.serving import decode_request_rows

    size = python_model.image_size
    batch = decode_request_rows([images[i % len(images)] for i in range(batch_size)], size)
    parts = {
        "decode one 224x224 JPEG (base64 -> model input)": lambda: decode_request_rows(images[:1], size),
        "decode one 2000x1600 grayscale JPEG": lambda: decode_request_rows([full_size], size),
        "forward pass, 1 image": lambda: python_model.forward(batch[:1]),
        f"forward pass, {batch_size} images": lambda: python_model.forward(batch),
    }
    return {name: float(np.median(t) * 1000) for name, t in interleaved(parts, repeats=50).items()}


def breakdown_table(steps: dict[str, float]) -> str:
    lines = ["| step (in-process) | p50 (ms) |", "|---|---:|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in steps.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="a registered model (default: register an untrained one in a temp store)")
    parser.add_argument("--image-size", type=int, default=128, help="input side of the untrained model (default 128)")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--requests", type=int, default=300, help="timed single-image calls per case and path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--out", default="serving.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    images, full_size = load_images(data_dir(args.data_dir), 32)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        if args.model_uri:
            model_uri, tracking_uri = args.model_uri, os.environ.get("MLFLOW_TRACKING_URI", "")
        else:
            model_uri, tracking_uri = MODEL_URI, register_untrained_model(Path(tmp), args.image_size, images[0])
        import mlflow
        import pandas as pd

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        model = mlflow.pyfunc.load_model(model_uri)

        def local(ims: list[str]) -> object:
            return model.predict(pd.DataFrame({"image": ims}))

        env = {**os.environ, **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})}
        proc, url = start_model_server(model_uri, Path(tmp) / "serve.log", env=env)
        try:
            http, via_requests = stdlib_client(url), requests_client(url)
            turn = iter(range(10**9))

            def one(predict: Predict) -> Callable[[], object]:
                return lambda: predict([images[next(turn) % len(images)]])

            batch = [images[i % len(images)] for i in range(args.batch_size)]
            cases = {
                "1 x 224x224 JPEG": interleaved(
                    {"in-process": one(local), "http": one(http), "requests": one(via_requests)}, args.requests),
                "1 x 2000x1600 grayscale JPEG": interleaved(
                    {"in-process": lambda: local([full_size]), "http": lambda: http([full_size])},
                    max(args.requests // 3, 20)),
            }
            batches = interleaved({"in-process": lambda: local(batch), "http": lambda: http(batch)}, args.batches, 2)
        finally:
            stop_model_server(proc)

    classifier = model.unwrap_python_model().classifier
    size = classifier.image_size
    result = dict(model=args.model_uri or "untrained default ConvNetConfig", image_size=size, cpus=os.cpu_count(),
                  requests=args.requests, batch_size=args.batch_size, latency_ms=latency_ms(cases),
                  batch_images_per_second=images_per_second(args.batch_size, batches),
                  steps_ms=breakdown_ms(classifier, images, full_size, args.batch_size))
    print(f"model: {model_uri}{'' if args.model_uri else ' (untrained, default ConvNetConfig)'}, input {size}x{size}; "
          f"{os.cpu_count()} CPU cores; {args.requests} single-image calls per path\n")
    print(latency_table(result["latency_ms"]), end="\n\n")
    print(throughput_table(args.batch_size, result["batch_images_per_second"]), end="\n\n")
    print(breakdown_table(result["steps_ms"]))
    out = REPO / "benchmarks" / "results" / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    from errors import run_main

    run_main(main)
