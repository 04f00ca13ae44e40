"""The search service's domain: encoders, projectors and a gallery loaded once; a query in, hits out.

Three ways in, each a *route* (a query encoder, an optional projector, and the gallery space it
lands in):

  image   an uploaded photo, embedded by the gallery's own encoder; compared in the native space.
  sketch  an uploaded or drawn sketch, embedded by the sketch encoder and mapped by a sketch ->
          image projector into the native space.
  text    a text, embedded by the text encoder; compared against the gallery projected ONCE (at
          start) through an image -> caption projector into caption space. The projector runs
          on the gallery, not on the query: one projector serves image -> text and text -> image.

The web layer (projection/search/app.py) only parses requests and renders; everything here is
plain numpy/torch, usable from Python and tests without a server.
"""

from __future__ import annotations

import io
import tempfile
from contextlib import contextmanager
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from encoders.store import EmbeddingStore
from projection.search.gallery import Gallery
from projection.search.index import ANN_MIN_ROWS

MODES = ("image", "sketch", "text")
MAX_UPLOAD_BYTES = 20 * 2**20


def resolve_spec(value: str | None, what: str) -> str | None:
    """An encoder spec, or the path of a store whose recorded ``encoder_spec`` is meant."""
    if value is None:
        return None
    if value.endswith(".h5") or Path(value).is_file():
        spec = EmbeddingStore(value).attrs.get("encoder_spec")
        if not spec:
            raise ValueError(f"{what}: store {value} records no encoder_spec; pass the encoder spec itself")
        return str(spec)
    return value


class QueryEncoder:
    """One frozen encoder (+ an optional projector into the gallery space), loaded once."""

    def __init__(self, spec: str, projector_dir: str | Path | None = None):
        from encoders.factory import load_encoder

        self.encoder = load_encoder(spec)
        self.spec = str(self.encoder.spec)
        self.projector = None
        self.projector_dir = str(projector_dir) if projector_dir else None
        self.dim = self.encoder.dim
        if projector_dir is not None:
            from projection.align.projector import load_projector

            self.projector = load_projector(projector_dir).eval()
            if self.projector.cfg.d_in != self.encoder.dim:
                raise ValueError(f"projector {projector_dir} expects {self.projector.cfg.d_in}-dim inputs but "
                                 f"encoder {self.spec} gives {self.encoder.dim}; was it trained on this encoder?")
            self.dim = self.projector.cfg.d_out

    @property
    def tower(self) -> str:
        return self.encoder.spec.tower

    def embed(self, item: str) -> np.ndarray:
        """(D,) float32 in the route's space, from an image path or a text."""
        import torch

        from encoders.frozen import BadInput

        try:
            with torch.inference_mode():
                x = self.encoder.encode_items([item]).float()
                if self.projector is not None:
                    x = self.projector(x.to(next(self.projector.parameters()).dtype)).float()
        except BadInput as exc:
            raise ValueError(f"cannot embed the query with {self.spec}: {exc}") from None
        return x.numpy()[0].astype(np.float32)


def project_rows(projector_dir: str | Path):
    """(B, D_in) numpy -> (B, D_out) numpy through a saved projector; (function, D_out)."""
    import torch

    from projection.align.projector import load_projector

    proj = load_projector(projector_dir).eval()
    dtype = next(proj.parameters()).dtype

    def project(block: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = []
            for s in range(0, len(block), 8192):
                out.append(proj(torch.from_numpy(np.ascontiguousarray(block[s:s + 8192])).to(dtype)).float().numpy())
            return np.concatenate(out)
    return project, proj.cfg, proj


@dataclass
class Route:
    mode: str
    encoder: QueryEncoder
    space: str  # gallery space compared in


@dataclass
class SearchService:
    """A gallery and its routes; ``query(mode, ...)`` answers one search. Thread-safe (one query at a time:
    the encoders' torch threads already use every core)."""

    gallery: Gallery
    routes: dict[str, Route]
    load_s: float = 0.0
    # torch intra-op threads while a query is embedded. One: a single small image or text gains little
    # from more, and more stall when the cores are busy (measured on the loaded 2-core machine, Lite0 at
    # 64 px / MiniLM: 1,159 / 906 ms a query at 2 threads, 75 / 75 ms at 1). Restored after each query.
    threads: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def info(self) -> dict:
        return {"gallery": str(self.gallery.store.path), "rows": len(self.gallery), "dim": self.gallery.store.dim,
                "encoder": self.gallery.store.attrs.get("encoder_spec"), "load_s": round(self.load_s, 2),
                "files": sum(f is not None for f in self.gallery.files),
                "spaces": {n: {"dim": s.dim, "method": s.method} for n, s in self.gallery.spaces.items()},
                "modes": {m: {"encoder": r.encoder.spec, "projector": r.encoder.projector_dir, "space": r.space}
                          for m, r in self.routes.items()}}

    def query(self, mode: str, *, text: str | None = None, image: bytes | None = None, k: int = 10) -> dict:
        """One search: ``text`` for mode 'text', ``image`` (encoded file bytes) for 'image' / 'sketch'."""
        if mode not in self.routes:
            have = ", ".join(self.routes) or "none"
            raise ValueError(f"mode {mode!r} is not served (served: {have}); "
                             + ("start the service with a text projector for text queries" if mode == "text" else
                                "start it with a sketch projector for sketches" if mode == "sketch" else ""))
        route = self.routes[mode]
        t0 = time.perf_counter()
        with self._lock, _torch_threads(self.threads):
            if mode == "text":
                if not text or not text.strip():
                    raise ValueError("empty text query")
                vec = route.encoder.embed(text.strip())
            else:
                if not image:
                    raise ValueError(f"mode {mode!r} needs an image (an upload, or a drawn sketch)")
                vec = self._embed_image(route.encoder, image)
            embed_s = time.perf_counter() - t0
            hits = self.gallery.search(vec, k=k, space=route.space)
        took = time.perf_counter() - t0
        return {"mode": mode, "k": k, "took_ms": round(1000 * took, 2), "embed_ms": round(1000 * embed_s, 2),
                "space": route.space, "method": self.gallery.spaces[route.space].method,
                "results": [{"rank": h.rank, "id": h.id, "score": round(h.score, 6), "row": h.row,
                             "has_file": self.gallery.files[h.row] is not None} for h in hits]}

    @staticmethod
    def _embed_image(encoder: QueryEncoder, data: bytes) -> np.ndarray:
        """Decode the upload (one clear line if it is not an image), then embed it from a temp PNG."""
        from PIL import Image, UnidentifiedImageError

        if len(data) > MAX_UPLOAD_BYTES:
            raise ValueError(f"the upload is {len(data) / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"the upload is not a readable image ({len(data)} bytes): {exc}") from None
        with tempfile.TemporaryDirectory(prefix="xmodal-query-") as tmp:
            path = Path(tmp) / "query.png"
            img.convert("RGB").save(path)
            return encoder.embed(str(path))


@contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_service(gallery_store: str | Path, *, image_encoder: str | None = None,
                 sketch_projector: str | Path | None = None, sketch_encoder: str | None = None,
                 text_projector: str | Path | None = None, text_encoder: str | None = None,
                 ann_min_rows: int = ANN_MIN_ROWS) -> SearchService:
    """Load the gallery, the encoders and the projectors once; the routes the arguments make possible.

    Encoder arguments take a spec or a store path (its recorded ``encoder_spec``). ``image_encoder``
    and ``sketch_encoder`` default to the gallery's encoder (the demo embeds sketches with the image
    encoder); ``text_encoder`` is required with ``text_projector``.
    """
    t0 = time.perf_counter()
    gallery = Gallery(gallery_store, ann_min_rows=ann_min_rows)
    own = gallery.store.attrs.get("encoder_spec")
    routes: dict[str, Route] = {}
    image_spec = resolve_spec(image_encoder, "image encoder") or own
    if image_spec:
        routes["image"] = Route("image", QueryEncoder(image_spec), "native")
        _check_dim(routes["image"], gallery.store.dim, "image encoder")
    if sketch_projector is not None:
        spec = resolve_spec(sketch_encoder, "sketch encoder") or own
        if not spec:
            raise ValueError("a sketch projector needs a sketch encoder: the gallery store records none")
        routes["sketch"] = Route("sketch", QueryEncoder(spec, sketch_projector), "native")
        _check_dim(routes["sketch"], gallery.store.dim, f"sketch projector {sketch_projector}")
    if text_projector is not None:
        spec = resolve_spec(text_encoder, "text encoder")
        if not spec:
            raise ValueError("a text projector (image -> caption) needs --text-encoder: the caption space's encoder "
                             "spec, or the caption store it was trained against")
        project, cfg, _ = project_rows(text_projector)
        if cfg.d_in != gallery.store.dim:
            raise ValueError(f"text projector {text_projector} maps {cfg.d_in}-dim inputs but the gallery "
                             f"{gallery.store.path} holds {gallery.store.dim}-dim rows; it must be an image -> caption "
                             "projector trained on this gallery's encoder")
        gallery.add_projected("caption", project, cfg.d_out)
        routes["text"] = Route("text", QueryEncoder(spec), "caption")
        _check_dim(routes["text"], cfg.d_out, f"text encoder {spec}")
    return SearchService(gallery, routes, load_s=time.perf_counter() - t0)


def _check_dim(route: Route, want: int, what: str) -> None:
    if route.encoder.dim != want:
        raise ValueError(f"{what} gives {route.encoder.dim}-dim vectors but the space it searches "
                         f"({route.space}) has {want} dims")
