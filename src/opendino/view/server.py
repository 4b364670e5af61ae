"""The local feature viewer behind ``opendino view``: a FastAPI app over one backbone (and, for a text-aligned
run, its text tower), serving a plain HTML / JS page from ``static/``.

The page asks for an image's features once per (image, layer, resolution); they stay in a small LRU cache on
the server, so a click only costs a ``[h*w, D] @ [D]`` product and the JSON of ``h*w`` numbers. Images come
from an upload (the raw file as the request body, capped in bytes and pixels) or by name from the
``--images`` folder; only the names the folder listed at start are ever read, so no request can reach
another file. Errors answer ``{"error": message}`` with a 4xx status, are logged, and leave the server up.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel
from torch import Tensor, nn

from opendino.data.sources import ChannelMismatchError, decode_image, list_images
from opendino.eval.features import eval_transform
from opendino.eval.visualize import pca_rgb, shown_input
from opendino.models.registry import input_channels

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("opendino.view")


class ViewerError(Exception):
    """A request the viewer refuses: ``status`` (400, 404, 413) and a message for the page and the log."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ViewerLimits:
    """What one request may ask for: upload size in bytes and pixels, the largest input resolution, and how
    many images' features (and uploads) the caches keep."""

    max_upload_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    max_resolution: int = 1024
    cached_features: int = 32
    cached_uploads: int = 16

    def check(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_resolution", "cached_features", "cached_uploads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")


@dataclass
class PatchFeatures:
    """One image's features at one layer and resolution: normalised patch rows ``[h*w, D]`` and the pictures."""

    h: int
    w: int
    rows: Tensor
    image_png: str
    pca_png: str


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class FeatureViewer:
    """The model, the image sources and the caches; the HTTP layer (``create_app``) only translates."""

    def __init__(
        self,
        model: nn.Module,
        mean,
        std,
        *,
        name: str,
        resolution: int = 224,
        images: str | Path | None = None,
        text_model: nn.Module | None = None,
        limits: ViewerLimits | None = None,
        device: str = "cpu",
    ) -> None:
        self.limits = limits or ViewerLimits()
        self.limits.check()
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.text_model = text_model.eval().to(self.device) if text_model is not None else None
        self.mean, self.std, self.name = tuple(mean), tuple(std), name
        self.stride = int(model.feature_stride)
        self.channels = input_channels(model)
        self.layers = int(model.n_blocks)
        self.layer_kind = "block" if hasattr(model, "blocks") else "stage"
        self.resolution = self.check_resolution(resolution)
        self.folder: dict[str, Path] = {}
        if images is not None:
            root = Path(images)
            base = root if root.is_dir() else root.parent
            self.folder = {p.relative_to(base).as_posix(): p.resolve() for p in list_images(root)}
        self._uploads: OrderedDict[str, bytes] = OrderedDict()
        self._features: OrderedDict[tuple, PatchFeatures] = OrderedDict()
        self._text_patches: OrderedDict[tuple, Tensor] = OrderedDict()
        self._lock = threading.Lock()  # one forward at a time; the caches are shared between request threads

    @classmethod
    def from_source(
        cls, source: str, weights: str | None = None, say: Callable[[str], None] | None = None, **kwargs
    ) -> FeatureViewer:
        """The viewer of a run folder (with its text tower, if it has one), a checkpoint file or a registered
        name (``weights``: its checkpoint; without, random weights, said through ``say``)."""
        from opendino.eval.suite import resolve_model
        from opendino.models.checkpoint import CheckpointError
        from opendino.models.text import load_text_model

        model, info = resolve_model(source, weights, say)
        text_model = None
        if Path(source).is_dir():
            try:
                text_model = load_text_model(source)
            except CheckpointError:
                text_model = None  # a plain backbone's run: no words to type
        name = str(source) if Path(source).exists() else f"{source} (random weights)"
        kwargs["resolution"] = kwargs.get("resolution") or info["resolution"]
        return cls(model, info["mean"], info["std"], name=name, text_model=text_model, **kwargs)

    # -- what the page asks -------------------------------------------------------------------------------
    def info(self) -> dict:
        from matplotlib import colormaps

        colours = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(int)
        return {
            "model": self.name,
            "layers": [
                f"{self.layer_kind} {i + 1}" + (" (last)" if i == self.layers - 1 else "") for i in range(self.layers)
            ],
            "layer": self.layers - 1,
            "resolution": self.resolution,
            "stride": self.stride,
            "max_resolution": self.limits.max_resolution,
            "max_upload_mb": self.limits.max_upload_bytes / (1 << 20),
            "images": sorted(self.folder),
            "text": self.text_model is not None,
            "colormap": colours.tolist(),
        }

    def check_resolution(self, resolution: int | None) -> int:
        if resolution is None:
            return self.resolution
        if resolution % self.stride or not self.stride <= resolution <= self.limits.max_resolution:
            raise ViewerError(
                f"resolution {resolution}: give a multiple of the model's stride {self.stride} between "
                f"{self.stride} and {self.limits.max_resolution}"
            )
        return int(resolution)

    def check_layer(self, layer: int | None) -> int:
        if layer is None:
            return self.layers - 1
        if not 0 <= layer < self.layers:
            raise ViewerError(
                f"layer {layer}: give 0 to {self.layers - 1} ({self.layer_kind}s 1 to {self.layers}, counted from 0)"
            )
        return int(layer)

    def add_upload(self, data: bytes) -> str:
        """Checks an uploaded file (not empty, an image, within the pixel limit) and returns its id."""
        if not data:
            raise ViewerError("the upload is empty: choose an image file")
        if len(data) > self.limits.max_upload_bytes:
            raise ViewerError(self.too_large(len(data)), 413)
        self._decode(data, "the upload")
        key = "upload:" + hashlib.sha1(data).hexdigest()[:16]
        with self._lock:
            self._uploads[key] = data
            self._uploads.move_to_end(key)
            while len(self._uploads) > self.limits.cached_uploads:
                self._uploads.popitem(last=False)
        return key

    def features(self, image: str, layer: int | None = None, resolution: int | None = None) -> PatchFeatures:
        """An image's patch features (cached): ``image`` is an upload id or a name of the ``--images`` folder."""
        layer, resolution = self.check_layer(layer), self.check_resolution(resolution)
        key = (image, layer, resolution)
        with self._lock:
            if key in self._features:
                self._features.move_to_end(key)
                return self._features[key]
        decoded = self._image(image)
        with self._lock, torch.inference_mode():
            batch = eval_transform(resolution, self.mean, self.std)(decoded)[None].to(self.device)
            (grid,) = self.model.get_intermediate_layers(batch, n=[layer], reshape=True, norm=True)
            grid = grid[0].float().cpu()  # [D, h, w]
            d, h, w = grid.shape
            rows = F.normalize(grid.flatten(1).T, dim=-1)
            shown = shown_input(decoded, resolution).permute(1, 2, 0).numpy()
            entry = PatchFeatures(h, w, rows, _png(shown), _png(pca_rgb(grid.permute(1, 2, 0))))
            self._features[key] = entry
            while len(self._features) > self.limits.cached_features:
                self._features.popitem(last=False)
        return entry

    def similarity(self, features: PatchFeatures, row: int, col: int, other: PatchFeatures | None = None) -> dict:
        """Cosine similarity of patch (row, col) with every patch of its image (and of ``other``)."""
        if not (0 <= row < features.h and 0 <= col < features.w):
            raise ViewerError(f"patch ({row}, {col}) is outside the {features.h} x {features.w} patch grid")
        query = features.rows[row * features.w + col]
        answer = {"row": row, "col": col, **_grid_values(features.rows @ query, features.h, features.w)}
        if other is not None:
            values = other.rows @ query
            best = int(values.argmax())
            answer["other"] = {**_grid_values(values, other.h, other.w), "best": [best // other.w, best % other.w]}
        return answer

    def text_similarity(self, image: str, text: str, resolution: int | None = None) -> dict:
        """Each patch's similarity to ``text`` in the text-aligned model's space (the open-vocabulary view)."""
        if self.text_model is None:
            raise ViewerError("this model has no text tower: view a run of the text recipe to type words")
        text = text.strip()
        if not text:
            raise ViewerError("type some words to compare the patches with")
        resolution = self.check_resolution(resolution)
        key = (image, resolution)
        with self._lock:
            patches = self._text_patches.get(key)
        if patches is None:
            decoded = self._image(image)
            with self._lock, torch.inference_mode():
                batch = eval_transform(resolution, self.mean, self.std)(decoded)[None].to(self.device)
                patches = self.text_model.encode_image_dense(batch)[1][0].float().cpu()  # [h, w, E/2]
                self._text_patches[key] = patches
                while len(self._text_patches) > self.limits.cached_features:
                    self._text_patches.popitem(last=False)
        with self._lock, torch.inference_mode():
            embedded = self.text_model.encode_text([text]).float().cpu()
        h, w, _ = patches.shape
        values = self.text_model.patch_text_similarity(patches, embedded)[..., 0]
        return {"text": text, **_grid_values(values.flatten(), h, w)}

    def image_file(self, name: str) -> Path:
        """The file of a listed image; any other name (``..``, an absolute path, a typo) is not found."""
        path = self.folder.get(name)
        if path is None:
            raise ViewerError(f"no image named {name!r} in the viewer's --images folder", 404)
        return path

    # -- helpers ------------------------------------------------------------------------------------------
    def too_large(self, size: int) -> str:
        return (
            f"the upload is {size / (1 << 20):.3g} MB; the limit is {self.limits.max_upload_bytes / (1 << 20):.3g} MB"
        )

    def _image(self, image: str) -> Tensor:
        with self._lock:
            data = self._uploads.get(image)
        if data is None:
            if image.startswith("upload:"):
                raise ViewerError(f"upload {image} is no longer cached: open the image again", 404)
            data = self.image_file(image).read_bytes()
        return self._decode(data, image)

    def _decode(self, data: bytes, what: str) -> Tensor:
        try:  # the pixel count from the header, before decoding a possible decompression bomb
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except (OSError, Image.DecompressionBombError, ValueError):
            width = height = 0  # not a PIL format (arrays, some TIFFs): decode_image tells
        if width * height > self.limits.max_pixels:
            raise ViewerError(
                f"{what} is {width} x {height} pixels ({width * height / 1e6:.3g} megapixels); the limit is "
                f"{self.limits.max_pixels / 1e6:.3g} megapixels",
                413,
            )
        try:
            decoded = decode_image(data, channels=self.channels)
        except ChannelMismatchError as e:
            raise ViewerError(f"{what}: {e}") from None
        if decoded is None:
            raise ViewerError(f"{what} is not an image this viewer can read (JPEG, PNG, WebP, BMP, TIFF, .npy)")
        return decoded


def _grid_values(values: Tensor, h: int, w: int) -> dict:
    return {"h": h, "w": w, "values": [float(v) for v in values.tolist()]}


# -- HTTP -----------------------------------------------------------------------------------------------------
class FeaturesRequest(BaseModel):
    image: str
    layer: int | None = None
    resolution: int | None = None


class SimilarityRequest(FeaturesRequest):
    row: int
    col: int
    other: str | None = None


class TextRequest(BaseModel):
    image: str
    text: str
    resolution: int | None = None


def create_app(viewer: FeatureViewer):
    """The FastAPI app: the page, ``/api/info``, ``/api/images/{name}``, ``/api/upload``, ``/api/features``,
    ``/api/similarity`` and ``/api/text``."""
    app = FastAPI(title="OpenDINO feature viewer", docs_url=None, redoc_url=None)

    @app.exception_handler(ViewerError)
    async def refused(request: Request, error: ViewerError):
        log.warning("%s %s refused (%d): %s", request.method, request.url.path, error.status, error)
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in error.errors())
        log.warning("%s %s refused (400): %s", request.method, request.url.path, where)
        return JSONResponse({"error": f"bad request: {where}"}, status_code=400)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/app.js", include_in_schema=False)
    def script():
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    @app.get("/api/info")
    def info():
        return viewer.info()

    @app.get("/api/images/{name:path}")
    def image(name: str):
        return FileResponse(viewer.image_file(name))

    @app.post("/api/upload")
    async def upload(request: Request):
        limit = viewer.limits.max_upload_bytes
        data, size = bytearray(), 0
        # Read to the end even past the limit (keeping nothing more): a reply sent while the client is still
        # sending resets the connection, and the page would show a network error instead of the reason.
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                data += chunk
        if size > limit:
            raise ViewerError(viewer.too_large(size), 413)
        return {"image": await run_in_threadpool(viewer.add_upload, bytes(data))}

    @app.post("/api/features")
    def features(request: FeaturesRequest):
        entry = viewer.features(request.image, request.layer, request.resolution)
        return {"image": request.image, "h": entry.h, "w": entry.w, "picture": entry.image_png, "pca": entry.pca_png}

    @app.post("/api/similarity")
    def similarity(request: SimilarityRequest):
        first = viewer.features(request.image, request.layer, request.resolution)
        other = viewer.features(request.other, request.layer, request.resolution) if request.other else None
        return viewer.similarity(first, request.row, request.col, other)

    @app.post("/api/text")
    def text(request: TextRequest):
        return viewer.text_similarity(request.image, request.text, request.resolution)

    return app


def _server(app):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one, read back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror} (try --port 0 for a free port)") from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(viewer: FeatureViewer, host: str = "127.0.0.1", port: int = 8000, say: Callable[[str], None] = print):
    """Serves until interrupted."""
    sock = bind(host, port)
    say(f"serving {url_of(sock)}  (Ctrl-C stops)")
    _server(create_app(viewer)).run(sockets=[sock])


@contextmanager
def running(viewer: FeatureViewer, host: str = "127.0.0.1") -> Iterator[str]:
    """The viewer served from a background thread on a free port, for tests and benchmarks: yields its URL."""
    sock = bind(host, 0)
    server = _server(create_app(viewer))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the viewer's server did not start")
            threading.Event().wait(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
