"""Decode and resize each image once per data version; every trial and epoch reads the cached array."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_model.preprocess import DECODER_VERSION, decode_file


def content_digest(manifest: pd.DataFrame) -> str:
    """Digest of the image contents alone (not of labels or splits), so re-splitting reuses the cache."""
    h = hashlib.sha256()
    for sha in sorted(manifest["sha256"].unique()):
        h.update(sha.encode())
    return h.hexdigest()[:16]


class DecodedImages:
    """Decoded (S, S, 1) uint8 images of one data version, looked up by content hash."""

    def __init__(self, keys: list[str], images: np.ndarray):
        self.images = images  # (U, S, S, 1), memory-mapped from the cache file
        self.position = {k: i for i, k in enumerate(keys)}

    def take(self, frame: pd.DataFrame) -> np.ndarray:
        """(N, S, S, 1) uint8 for the rows of `frame` (any subset of the cached manifest), in order."""
        return np.asarray(self.images[[self.position[s] for s in frame["sha256"]]])


def _decode_with_progress(paths: list[str], size: int, every_s: float = 10.0):
    """Decode each file, printing a line with the count and elapsed time every `every_s` seconds and at the end
    (a cold cache of the whole dataset takes minutes on 2 cores)."""
    started = last = time.monotonic()
    for i, path in enumerate(paths, start=1):
        yield decode_file(path, size)
        now = time.monotonic()
        if now - last >= every_s or i == len(paths):
            print(f"Decoded {i} of {len(paths)} images at {size} px ({now - started:.0f} s)")
            last = now


def decoded_images(manifest: pd.DataFrame, size: int, cache_dir: str | Path) -> DecodedImages:
    """Open the cache of `manifest` at `size`, decoding every image first on a cache miss.

    Keyed by the images' contents, the size and `DECODER_VERSION`, so a decoder change never reads old arrays.
    """
    stem = Path(cache_dir) / f"{content_digest(manifest)}-{size}-d{DECODER_VERSION}"
    array_path, keys_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if not (array_path.exists() and keys_path.exists()):
        unique = manifest.drop_duplicates("sha256").sort_values("sha256")
        images = np.stack(list(_decode_with_progress(unique["path"].tolist(), size)))  # (U, S, S, 1)
        array_path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash never leaves a half-written cache that looks complete.
        # Both files, so that two processes filling the same cache at once (workers on a shared work folder)
        # each replace a whole file and a reader never sees a half-written one.
        # unique per writer, not per pid: processes in separate containers sharing the folder are all pid 1
        unique_name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp = array_path.with_suffix(f".tmp{unique_name}.npy")
        np.save(tmp, images)
        tmp_keys = keys_path.with_suffix(f".tmp{unique_name}.json")
        tmp_keys.write_text(json.dumps(unique["sha256"].tolist()))
        os.replace(tmp_keys, keys_path)
        os.replace(tmp, array_path)
    return DecodedImages(json.loads(keys_path.read_text()), np.load(array_path, mmap_mode="r"))
