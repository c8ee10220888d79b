"""The NVIDIA DALI loader backend: decode and build the D3SSL views in a DALI graph, hand out a Batch.

Data flow::

    parallel external_source  (Python workers: read bytes, check them, run the view sampler)
      │  encoded bytes; crop window of view 2, flips, colour parameters (one packed vector);
      │  blur taps; padded boxes and image ids (packed, passed through to the Batch)
      ▼
    decode once ─┬─ resize whole image to S×S ──────── colour ─ flip+normalise ─▶ view1
                 └─ resize crop window to S×S ─ colour ─┬────── flip+normalise ─▶ view2
                                                         └ 2×2 mean ─ flip+normalise ─▶ view2_small

The graph (:func:`d3ssl_views`) is one function under ``@pipeline_def`` whose ``device`` is a
parameter: ``"gpu"`` decodes with ``device="mixed"`` and runs everything after on the GPU; ``"cpu"`` is
DALI's CPU-only mode (``device_id=None``). No Python operator runs in the graph.

Batches, order, sharding and draws are the CPU loader's. The source reproduces its batches
(:class:`~d3ssl.data.cpu_loader.EpochBatchSampler`: permutation from (seed, epoch), rank r takes every
world_size-th index, ``drop_last`` as documented there) and, per sample, its random draws in its order
(``sample_seed(seed, epoch, index)`` → view sampler → colour draw of view 1 → of view 2). So for the
same seed both backends cut the same windows, flip the same way, return the same boxes and image ids
and draw the same colour parameters; a sample's views depend on nothing but (seed, epoch, index), not
on workers, ranks or where a run was resumed. The colour operators are DALI's: brightness,
saturation, grayscale, blur and solarize give the CPU loader's pixels up to rounding; DALI's contrast
pivots on mid-gray rather than the image mean, its hue turns in YIQ rather than HSV, and it applies
the jitter in one fixed order, so those are the same augmentation, not the same pixels.

The views reach torch without a copy: the pipeline runs DALI's dynamic executor, which hands each
batch's output buffers over rather than recycling them, and torch takes them through DLPack (as
DALI's own PyTorch iterator does), so a Batch stays valid however long it is kept.

Speed of the CPU-only mode: it exists to test the graph and to run without a GPU, not to replace the
CPU loader. Per 640x480 JPEG, one thread, DALI decodes as fast as OpenCV (~1.2 ms), but its
antialiased resize costs ~1.4 ms per view against ~0.3 ms for the CPU loader's OpenCV halving, and
its colour twist ~0.7 ms per view plus ~0.35 ms to convert the result back to uint8 (DALI's float to
uint8 conversion is slow in every operator; the twist writing uint8 itself is slower still), so the
graph costs 1.5 to 1.7 times the CPU loader's work per image (benchmarks/RESULTS.md). No choice of
DALI operators closes that: its CPU linear resize costs ~0.85 ms for a 224x224 output even at scale 1,
and the other ways to shrink (no antialiasing, a 2x2 halving first, warp_affine, tensor_resize,
float output) cost as much or more; so do the other ways to apply the colour twist (coord_transform,
hsv + brightness_contrast, float throughout with a clamp).

The last partial batch, epochs: a DALI epoch is one pass of the source, which raises StopIteration
after this rank's last batch (which may be short without drop_last: DALI takes variable batch sizes).
Iterating the loader runs one epoch and resets the pipeline for the next one.

Image sizes are needed by the sampler before decoding; they come from the file header
(:func:`probe_image`: JPEG SOF + EXIF orientation, PNG IHDR, OpenCV for other formats), microseconds
per file, which also checks that the bytes are complete. DALI's ``fn.peek_image_shape`` runs inside
the graph, after the source has already had to choose the crop, so it cannot serve here.

Unreadable files: one that fails the check is replaced by the next image of the dataset, as in the
CPU loader (counted in ``skipped_keys``, with a warning). One that passes the check but fails in
DALI's decoder (a damaged Huffman table, say) makes DALI fail the whole batch: the loader skips that
batch with a counted warning (``failed_batches``) and restarts the pipeline after it; ``check="decode"``
trial-decodes every file at 1/8 scale in the source workers to turn those into replacements too.

DALI is an optional dependency (``pip install -e .[dali]``): this module imports without it, and only
building a DALI loader raises :class:`DaliUnavailable`, which says how to install it and to use the
CPU backend otherwise. Nothing else in d3ssl imports DALI.
"""
from __future__ import annotations

import os
import struct
import warnings
import weakref

import numpy as np
import torch

from .batch import IMAGENET_MEAN, IMAGENET_STD, Batch
from .colour import ColourConfig, ColourParams, sample_colour
from .cpu_loader import MAX_REPLACEMENTS, EpochBatchSampler, warn_skipped
from .datasets import UnreadableData
from .stopping import defer_stop_signals
from .views import ViewConfig, sample_seed, sample_views

try:
    from nvidia.dali import fn, pipeline_def, types
    _DALI_IMPORT_ERROR = None
except ImportError as _e:  # DALI is optional: only this backend needs it
    fn = types = None
    _DALI_IMPORT_ERROR = _e

    def pipeline_def(*args, **kwargs):
        def wrap(f):
            def missing(*a, **k):
                require_dali()
            return missing
        return wrap(args[0]) if args and callable(args[0]) else wrap


class DaliUnavailable(ImportError):
    pass


def dali_available() -> bool:
    return _DALI_IMPORT_ERROR is None


def cuda_driver_initialized() -> bool:
    """Whether the CUDA driver is initialised in this process (DALI's own test before it forks)."""
    try:
        from nvidia.dali import backend
        return bool(backend.IsDriverInitialized())
    except (ImportError, AttributeError):
        return torch.cuda.is_initialized()


def require_dali():
    """Raises DaliUnavailable (with the fix) when NVIDIA DALI cannot be imported."""
    if _DALI_IMPORT_ERROR is not None:
        raise DaliUnavailable(
            "the 'dali' loader backend needs NVIDIA DALI, which could not be imported "
            f"({_DALI_IMPORT_ERROR}). Install it with `pip install -e .[dali]` (or "
            "`pip install nvidia-dali-cuda130`), or use the CPU loader instead (backend='cpu', "
            "--backend cpu).")


class CorruptImage(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------
# Image header probe: size before decoding, and a cheap completeness check
# ---------------------------------------------------------------------------------------------------

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _exif_orientation(tiff: bytes) -> int:
    """EXIF orientation tag (1..8) of a TIFF-structured APP1 payload; 1 when absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    e = "<" if tiff[:2] == b"II" else ">"
    ifd = struct.unpack(e + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    count = struct.unpack(e + "H", tiff[ifd:ifd + 2])[0]
    for k in range(count):
        at = ifd + 2 + 12 * k
        if at + 12 > len(tiff):
            break
        tag, typ = struct.unpack(e + "HH", tiff[at:at + 4])
        if tag == 0x0112 and typ == 3:
            value = struct.unpack(e + "H", tiff[at + 8:at + 10])[0]
            return value if 1 <= value <= 8 else 1
    return 1


def _probe_jpeg(b: bytes) -> tuple[int, int]:
    i, n = 2, len(b)
    size = None
    orientation = 1
    while i + 4 <= n:
        if b[i] != 0xFF:
            raise CorruptImage(f"JPEG marker expected at byte {i}")
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        length = (b[i + 2] << 8) | b[i + 3]
        if length < 2 or i + 2 + length > n:
            raise CorruptImage(f"JPEG segment 0x{m:02X} at byte {i} runs past the end of the file")
        seg = b[i + 4:i + 2 + length]
        if m == 0xE1 and seg[:6] == b"Exif\0\0":
            orientation = _exif_orientation(seg[6:])
        elif m in _JPEG_SOF and len(seg) >= 5:
            h, w = (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4]
            size = (w, h)
        elif m == 0xDA:  # start of scan: the entropy-coded data follows
            if size is None or size[0] == 0 or size[1] == 0:
                raise CorruptImage("JPEG has no usable frame header (SOF) before its scan")
            # Inside entropy-coded data 0xFF is always stuffed (FF00) or a restart marker, so an
            # end-of-image marker after the scan header means the file was not cut short.
            if b.rfind(b"\xff\xd9", i + 2 + length) < 0:
                raise CorruptImage("JPEG is truncated (no end-of-image marker after the scan)")
            w, h = size
            return (h, w) if orientation >= 5 else (w, h)  # 5..8 transpose the image
        i += 2 + length
    raise CorruptImage("JPEG ends before its scan data")


def _worker_gave_up(error: BaseException) -> str | None:
    """The message of an UnreadableData raised in a DALI source worker, which DALI passes on as a
    plain Exception holding the worker's traceback as text; None for any other error."""
    tag = UnreadableData.__name__ + ": "
    lines = [line for line in str(error).splitlines() if tag in line]
    return lines[-1].split(tag, 1)[1].strip() if lines else None


def probe_image(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels of an encoded image as decoded (EXIF orientation applied).

    JPEG and PNG are parsed from the header (microseconds) and checked for completeness (JPEG: an
    end-of-image marker after the scan; PNG: the IEND chunk); other formats are decoded with OpenCV.
    Raises CorruptImage when the bytes are not a complete image."""
    if len(data) < 16:
        raise CorruptImage(f"only {len(data)} bytes")
    if data[:2] == b"\xff\xd8":
        return _probe_jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if data[12:16] != b"IHDR" or b"IEND" not in data[33:]:   # (bytes may follow IEND)
            raise CorruptImage("PNG is truncated or has no IHDR chunk")
        w, h = struct.unpack(">II", data[16:24])
        if w == 0 or h == 0:
            raise CorruptImage("PNG has a zero size")
        return w, h
    import cv2
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise CorruptImage("OpenCV cannot decode it")
    return img.shape[1], img.shape[0]


# ---------------------------------------------------------------------------------------------------
# Colour augmentation: the CPU loader's draws (d3ssl.data.colour), as DALI operator arguments
# ---------------------------------------------------------------------------------------------------

def colour_twist(p: ColourParams) -> np.ndarray | None:
    """float32 [4] arguments of DALI's colour twist (brightness, contrast, saturation factors, hue in
    degrees) for a colour draw, or None when the draw leaves the colours alone.

    Grayscale is folded in as saturation 0: DALI desaturates to the same ITU-R 601 luma as the CPU
    loader's grayscale, and the brightness and contrast it applies after keep a gray image gray. DALI
    applies the four in one fixed pass (the CPU loader in the draw's random order), its hue rotates in
    YIQ rather than HSV and its contrast pivots on mid-gray rather than the image mean: the same
    distribution of augmentations, not the same pixels."""
    if not (p.jitter or p.grayscale):
        return None
    saturation = 0.0 if p.grayscale else p.saturation
    return np.array([p.brightness, p.contrast, saturation, p.hue * 360.0], np.float32)


# ---------------------------------------------------------------------------------------------------
# The parallel source: runs in DALI's Python workers
# ---------------------------------------------------------------------------------------------------

_OUTPUTS = ("encoded", "params", "kernel1", "kernel2", "meta")
# Per-sample numbers travel packed: DALI's main thread spends tens of microseconds per array and sample
# taking the source's batches in, which at 19 separate outputs cost as much as a resize.
# params float32 [20]: where each number sits (crop window in HW order, image pixels; flags 0/1;
# twist = colour_twist(), brightness/contrast/saturation factors and hue in degrees)
_P = dict(crop_start=slice(0, 2), crop_end=slice(2, 4), flip1=4, flip2=5, colour1=6, blur1=7, solarize1=8,
          colour2=9, blur2=10, solarize2=11, twist1=slice(12, 16), twist2=slice(16, 20))
_NUM_PARAMS = 20
_NO_TWIST = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
_NO_BLUR = np.ones((1, 1), np.float32)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """float32 [1,k] normalised Gaussian taps for `sigma` (pixels), k as OpenCV chooses it for uint8
    images (round(6σ+1), odd): the CPU loader's cv2.GaussianBlur(img, (0, 0), σ)."""
    k = int(round(sigma * 6 + 1)) | 1
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2
    taps = np.exp(-x * x / (2 * sigma * sigma))
    return (taps / taps.sum()).astype(np.float32).reshape(1, k)


class ViewSource:
    """Picklable batch source for ``fn.external_source(parallel=True, batch=True, batch_info=True)``.

    Called with DALI's BatchInfo (iteration, epoch_idx), it returns one list per output of
    :data:`_OUTPUTS` for this rank's batch: the batches are the CPU loader's
    (:class:`~d3ssl.data.cpu_loader.EpochBatchSampler`: same order, sharding and drop_last), and so
    are the draws of every sample. Each file is read and checked (:func:`probe_image`, or a trial
    decode with `check`="decode"); one that fails is replaced, as in the CPU loader, by the next
    image of the dataset (index + 1, wrapping), whose index is then the row's image_id; the training
    process sees the substitution in image_id and warns. Raises StopIteration at the end of the
    epoch; DALI numbers its epochs from 0 at each build, so `start_epoch` is added to them."""

    def __init__(self, dataset, store, view_cfg: ViewConfig, colour_cfg: ColourConfig,
                 sampler: EpochBatchSampler, seed: int, start_epoch: int, check: str = "header",
                 start_batch: int = 0):
        if check not in ("header", "decode"):
            raise ValueError(f"check must be 'header' or 'decode', got {check!r}")
        self.dataset, self.store, self.view_cfg, self.colour_cfg = dataset, store, view_cfg, colour_cfg
        self.sampler, self.seed, self.start_epoch, self.check = sampler, seed, start_epoch, check
        self.start_batch = start_batch   # first epoch only: resume after a batch DALI could not process
        self._epoch, self._batches = None, None
        self._owner = os.getpid()        # the training process; DALI's workers are others

    def batches(self, epoch: int) -> list[list[int]]:
        if self._epoch != epoch:
            self.sampler.set_epoch(epoch)
            self._batches = [[i for i, _ in batch] for batch in self.sampler]
            self._epoch = epoch
        return self._batches

    def _read(self, index: int):
        """(bytes, width, height) of image `index`, or None when the file is unusable."""
        try:
            data = self.dataset.read_bytes(index)
            w, h = probe_image(data)
            if self.check == "decode":
                import cv2
                if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_8) is None:
                    raise CorruptImage("OpenCV cannot decode it")
        except (OSError, CorruptImage):
            return None
        return data, w, h

    def sample(self, epoch: int, index: int):
        """One row of outputs for dataset image `index` (or the first usable image after it)."""
        index = requested = int(index)
        n = len(self.dataset)
        for _ in range(min(MAX_REPLACEMENTS, n)):
            got = self._read(index)
            if got is not None:
                break
            index = (index + 1) % n
        else:
            raise UnreadableData(f"{min(MAX_REPLACEMENTS, n)} unreadable images in a row (last: "
                               f"{self.dataset.key(index)!r}): is the dataset path right?")
        data, w, h = got
        props = np.asarray(self.store.boxes(index), np.float32)
        sw, sh = self.store.size(index)
        if (sw, sh) != (w, h) and sw > 0 and sh > 0:  # store made from a differently sized copy
            props = props * np.array([w / sw, h / sh, w / sw, h / sh], np.float32)
        # the CPU loader's draws, in its order: geometry, then colour of view 1, then of view 2 (a
        # replacement, as there, with the requested slot's seed)
        rng = np.random.default_rng(sample_seed(self.seed, epoch, requested))
        vp = sample_views(w, h, props, rng, self.view_cfg)
        size = self.view_cfg.size
        c1, c2 = sample_colour(rng, self.colour_cfg, 0, size), sample_colour(rng, self.colour_cfg, 1, size)
        twist1, twist2 = colour_twist(c1), colour_twist(c2)
        x0, y0, cw, ch = (float(v) for v in vp.crop)

        def kernel(sigma):
            return gaussian_kernel(sigma) if sigma > 0 else _NO_BLUR

        params = np.zeros(_NUM_PARAMS, np.float32)
        params[_P["crop_start"]] = y0, x0                       # HW order, as the image
        params[_P["crop_end"]] = y0 + ch, x0 + cw
        params[[_P["flip1"], _P["flip2"]]] = vp.flip1, vp.flip2
        params[[_P["colour1"], _P["blur1"], _P["solarize1"]]] = twist1 is not None, c1.blur_sigma > 0, c1.solarize
        params[[_P["colour2"], _P["blur2"], _P["solarize2"]]] = twist2 is not None, c2.blur_sigma > 0, c2.solarize
        params[_P["twist1"]] = _NO_TWIST if twist1 is None else twist1
        params[_P["twist2"]] = _NO_TWIST if twist2 is None else twist2
        # what the graph passes through to the Batch: boxes1, boxes2 [K,4], valid [K], image index
        meta = np.concatenate([vp.boxes1.ravel(), vp.boxes2.ravel(), vp.valid, [index]]).astype(np.float64)
        return (np.frombuffer(data, np.uint8), params, kernel(c1.blur_sigma), kernel(c2.blur_sigma), meta)

    def __call__(self, info):
        if os.getpid() != self._owner:  # in one of DALI's source workers (fork or spawn)
            defer_stop_signals()
            self._owner = os.getpid()
        epoch = self.start_epoch + info.epoch_idx
        batches = self.batches(epoch)
        b = info.iteration + (self.start_batch if info.epoch_idx == 0 else 0)
        if b >= len(batches):
            raise StopIteration
        rows = [self.sample(epoch, i) for i in batches[b]]
        return [list(col) for col in zip(*rows)]


# ---------------------------------------------------------------------------------------------------
# The DALI graph
# ---------------------------------------------------------------------------------------------------

def _colour(view, colour, twist, blur, kernel, solarize, device, threshold):
    """SoCo's colour augmentation on a uint8 HWC view; per-sample parameters come from the source.

    DALI conditionals run each operator only on the samples whose flag is set. The blur is two 1-D
    passes of fn.filter with the source's taps: the same Gaussian as fn.gaussian_blur, several times
    cheaper on the CPU. Solarize is a lookup table."""
    if colour:
        # float out, then a saturating cast: the same pixels, ~25% cheaper on the CPU than letting
        # the twist write uint8 itself
        view = fn.cast(fn.color_twist(view, brightness=twist[0], contrast=twist[1], saturation=twist[2],
                                      hue=twist[3], dtype=types.FLOAT), dtype=types.UINT8)
    if blur:
        horizontal = kernel if device == "cpu" else kernel.gpu()
        vertical = fn.transpose(kernel, perm=[1, 0])
        vertical = vertical if device == "cpu" else vertical.gpu()
        view = fn.filter(fn.filter(view, vertical, border="reflect_101"), horizontal, border="reflect_101")
    if solarize:
        view = fn.lookup_table(view, keys=list(range(256)),
                               values=[float(255 - v if v >= threshold else v) for v in range(256)],
                               dtype=types.UINT8)
    return view


# The graph's stages in order; a graph cut after one of them (`upto`) is for profiling
# (benchmarks/breakdown.py --what dali): each cut's outputs are that stage's results.
GRAPH_STAGES = ("source", "decode", "resize", "colour", "normalise")


@pipeline_def(enable_conditionals=True)
def d3ssl_views(source, device: str = "gpu", size: int = 224, antialias: bool = True,
                solarize_threshold: int = 128, out_dtype=None, upto: str = "normalise"):
    """The D3SSL view graph. `device`: "gpu" (decode on device="mixed", the rest on the GPU) or "cpu"
    (the same graph in DALI's CPU-only mode; build the pipeline with device_id=None).

    Outputs (B = batch, S = `size`): view1 [B,S,S,3], view2 [B,S,S,3], view2_small [B,S/2,S/2,3]
    (HWC, normalised, `out_dtype`) and meta float64 [B,9K+1], the source's boxes1 [K,4], boxes2 [K,4],
    box_valid [K] and image index per sample, packed (the loader unpacks them).

    `upto` (one of :data:`GRAPH_STAGES`) cuts the graph after that stage, for profiling: "source"
    returns the source's arrays, "decode" the decoded images, "resize" the three uint8 views before
    their colour augmentation, "colour" after it; "normalise" (default) is the whole graph."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if upto not in GRAPH_STAGES:
        raise ValueError(f"upto must be one of {GRAPH_STAGES}, got {upto!r}")
    outputs = fn.external_source(source=source, num_outputs=len(_OUTPUTS), batch=True, batch_info=True,
                                 parallel=True)
    return _views_graph(dict(zip(_OUTPUTS, outputs)), device, size, antialias=antialias,
                        solarize_threshold=solarize_threshold, out_dtype=out_dtype, upto=upto)


def _views_graph(src: dict, device: str, size: int, antialias: bool = True, solarize_threshold: int = 128,
                 out_dtype=None, upto: str = "normalise"):
    """The body of :func:`d3ssl_views` on the source's outputs (`src`: name in :data:`_OUTPUTS` ->
    DataNode); returns the graph's outputs (those of stage `upto`)."""
    encoded, params, kernel1, kernel2, meta = (src[k] for k in _OUTPUTS)
    if upto == "source":
        return encoded, params, kernel1, kernel2, meta

    def flag(name):  # a 0/1 entry of params as the boolean a DALI conditional takes
        return fn.cast(params[_P[name]], dtype=types.BOOL)

    def twist(name):
        t = _P[name].start
        return [params[t + k] for k in range(4)]

    crop_start, crop_end = params[_P["crop_start"]], params[_P["crop_end"]]
    flip1, flip2 = (fn.cast(params[_P[k]], dtype=types.INT32) for k in ("flip1", "flip2"))
    colour1, blur1, solarize1 = flag("colour1"), flag("blur1"), flag("solarize1")
    colour2, blur2, solarize2 = flag("colour2"), flag("blur2"), flag("solarize2")
    twist1, twist2 = twist("twist1"), twist("twist2")
    # Decode once; every view is a resize of this one image.
    image = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    if upto == "decode":
        return image, meta
    # View 1: the whole image, aspect not kept (SoCo). View 2: the sampler's crop window.
    view1 = fn.resize(image, size=(size, size), antialias=antialias)
    view2 = fn.resize(image, size=(size, size), roi_start=crop_start, roi_end=crop_end,
                      antialias=antialias)
    if upto == "resize":
        return view1, view2, fn.resize(view2, size=(size // 2, size // 2), antialias=False), meta
    view1 = _colour(view1, colour1, twist1, blur1, kernel1, solarize1, device, solarize_threshold)
    view2 = _colour(view2, colour2, twist2, blur2, kernel2, solarize2, device, solarize_threshold)
    # Exactly half of view 2: DALI's linear filter without its antialiasing widening averages each
    # 2x2 block, which is the CPU loader's INTER_AREA at this factor (and cheaper than antialiasing).
    view2_small = fn.resize(view2, size=(size // 2, size // 2), antialias=False)
    if upto == "colour":
        return view1, view2, view2_small, meta
    out_dtype = types.FLOAT if out_dtype is None else out_dtype
    mean = [255.0 * m for m in IMAGENET_MEAN]
    std = [255.0 * s for s in IMAGENET_STD]

    def finish(view, flip):  # flip (mirror), normalise and cast in one pass; stays HWC
        return fn.crop_mirror_normalize(view, mirror=flip, mean=mean, std=std, dtype=out_dtype,
                                        output_layout="HWC")

    return finish(view1, flip1), finish(view2, flip2), finish(view2_small, flip2), meta


# ---------------------------------------------------------------------------------------------------
# The loader: DALI outputs -> Batch
# ---------------------------------------------------------------------------------------------------

_LIVE_LOADERS: "weakref.WeakSet[DaliLoader]" = weakref.WeakSet()


def close_all_loaders():
    """Stops the pipeline (threads and source workers) of every DALI loader of this process.

    Forking a process while DALI's threads run can deadlock the child (it inherits locks held by
    threads that do not exist in it): call this before starting fork-based workers after DALI was
    used in the same process. A closed loader rebuilds its pipeline when iterated again."""
    for loader in list(_LIVE_LOADERS):
        loader.close()


class DaliLoader:
    """Iterable of :class:`~d3ssl.data.batch.Batch` built by the DALI graph; see :func:`make_dali_loader`.

    ``set_epoch(e)`` chooses the epoch (order, shard and every random draw); iterating runs one epoch
    and then moves to the next, so the pipeline (and its workers) is built once and reset between
    epochs as long as epochs are consecutive. Stopping an epoch early, or jumping to another epoch,
    rebuilds it. ``skipped`` / ``skipped_keys``: unreadable files replaced so far."""

    def __init__(self, dataset, store, *, batch_size: int, workers: int, view_cfg: ViewConfig,
                 colour_cfg: ColourConfig, seed: int, rank: int, world_size: int, drop_last: bool,
                 shuffle: bool, device, dtype: torch.dtype | None, threads: int | None, prefetch: int,
                 antialias: bool, check: str, start_method: str | None):
        self.dataset, self.store, self.view_cfg, self.colour_cfg = dataset, store, view_cfg, colour_cfg
        self.sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world_size, drop_last, shuffle)
        self.batch_size, self.workers, self.seed, self.check = batch_size, workers, seed, check
        self.device = torch.device(device)
        self.dali_device = "gpu" if self.device.type == "cuda" else "cpu"
        if dtype is None:
            dtype = torch.float16 if self.dali_device == "gpu" else torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.threads = threads or max(1, workers)
        self.prefetch, self.antialias = prefetch, antialias
        self.start_method = start_method  # None: chosen when the pipeline is built (_start_method)
        self.skipped_keys: list[str] = []
        self.failed_batches = 0
        self._pipe = None
        _LIVE_LOADERS.add(self)
        self._pipe_epoch = None  # the epoch the built pipeline runs next without a rebuild

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def skipped(self) -> int:
        return len(self.skipped_keys)

    def set_epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def _build(self, start_batch: int = 0):
        self.close()
        self._pipe, self._pipe_epoch = self.pipeline(start_batch), self.epoch

    def pipeline(self, start_batch: int = 0, upto: str = "normalise"):
        """A built DALI pipeline of this loader's graph for its current epoch, from batch
        `start_batch` on; `upto` cuts it after one of :data:`GRAPH_STAGES` (profiling). Iterating the
        loader builds its own; this one is the caller's to run and drop."""
        source = ViewSource(self.dataset, self.store, self.view_cfg, self.colour_cfg,
                            EpochBatchSampler(**{k: getattr(self.sampler, k) for k in (
                                "n", "batch_size", "seed", "rank", "world_size", "drop_last", "shuffle")}),
                            self.seed, start_epoch=self.epoch, check=self.check, start_batch=start_batch)
        # DALI has no bfloat16: the graph emits float16 and torch casts
        out_dtype = types.FLOAT if self.dtype == torch.float32 else types.FLOAT16
        device_id = None
        if self.dali_device == "gpu":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = d3ssl_views(source, device=self.dali_device, size=self.view_cfg.size,
                           antialias=self.antialias, solarize_threshold=self.colour_cfg.solarize_threshold,
                           out_dtype=out_dtype, batch_size=self.batch_size, num_threads=self.threads,
                           device_id=device_id, py_num_workers=max(1, self.workers),
                           py_start_method=self._start_method(), prefetch_queue_depth=self.prefetch,
                           seed=self.seed, exec_dynamic=True,  # outputs are not recycled: _to_batch
                           upto=upto)
        with warnings.catch_warnings():  # a cut graph leaves some of the source's outputs unused
            warnings.filterwarnings("ignore", message=".*outputs at the indices.*are not used")
            pipe.build()
        return pipe

    def _start_method(self) -> str:
        """fork is cheap, but DALI refuses it (rightly) once the CUDA driver is initialised in this
        process: by its own GPU graph, a CUDA tensor, or only a query of the devices, made before the
        CPU graph is built. spawn then starts fresh interpreters that import this module."""
        if self.start_method is not None:
            return self.start_method
        return "spawn" if self.dali_device == "gpu" or cuda_driver_initialized() else "fork"

    def close(self):
        """Stops the DALI pipeline and its Python workers."""
        pipe, self._pipe, self._pipe_epoch = self._pipe, None, None
        del pipe

    def __del__(self):
        self.close()

    def __iter__(self):
        require_dali()
        epoch = self.epoch
        if self._pipe is None or self._pipe_epoch != epoch:
            self._build()
        self._pipe_epoch = None  # mid-epoch: if the caller stops early, the next epoch rebuilds
        batches = [[i for i, _ in batch] for batch in self.sampler]
        done, failures = 0, 0
        while done < len(batches):
            try:
                outputs = self._pipe.run()
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001
                given_up = _worker_gave_up(e)
                if given_up is not None:   # the source gave up on the data: as the CPU loader says it
                    raise UnreadableData(given_up) from None
                if not isinstance(e, RuntimeError):
                    raise
                # DALI could not process the next batch: a file passed the header check but not the
                # decoder (check="decode" catches more of these earlier). Skip that batch, not the run.
                failures += 1
                if failures > MAX_REPLACEMENTS:
                    raise UnreadableData(f"DALI failed on {failures} batches in a row; last error: {e}") from e
                keys = [self.dataset.key(i) for i in batches[done]]
                self.failed_batches += 1
                warnings.warn(f"DALI could not process batch {done} of epoch {epoch} ({len(keys)} images, "
                              f"{keys[:3]}...); skipped it ({self.failed_batches} batch(es) skipped this "
                              f"run). DALI said: {str(e).strip().splitlines()[-1][:300]}", RuntimeWarning)
                done += 1
                self._build(start_batch=done)   # a failed DALI pipeline cannot run on: restart after it
                self._pipe_epoch = None          # (mid-epoch, as above)
                continue
            failures = 0
            yield self._to_batch(outputs, batches[done])
            done += 1
        if done < len(batches) or self._pipe is None:
            return
        try:  # the source has no batch left: DALI ends the epoch
            self._pipe.run()
            raise RuntimeError("DALI loader: the pipeline produced more batches than the epoch has")
        except StopIteration:
            pass
        self._pipe.reset()
        self.sampler.set_epoch(epoch + 1)
        self._pipe_epoch = epoch + 1

    def _to_batch(self, outputs, expected: list[int]) -> Batch:
        view1, view2, view2_small, meta = outputs
        meta = np.array(meta.as_tensor())                      # [B, 9K+1] float64, see ViewSource.sample
        k = self.view_cfg.num_boxes
        ids = torch.from_numpy(meta[:, -1].astype(np.int64))
        replaced = [i for i, got in zip(expected, ids.tolist()) if i != got]
        if replaced:
            warn_skipped(self, [self.dataset.key(i) for i in replaced])

        def view(tl):
            # Zero copy: DALI's dynamic executor (the default; see _build) hands each batch's output
            # buffers over instead of recycling them, so torch can own them through DLPack, on the
            # training device's current stream, as DALI's own PyTorch iterator does. DALI writes
            # NHWC; the NCHW permutation of that memory is a channels_last tensor.
            with self.device:
                nhwc = torch.from_dlpack(tl.as_tensor())
            v = nhwc.permute(0, 3, 1, 2)
            return v if v.dtype == self.dtype else v.to(self.dtype)  # .to keeps channels_last

        # The per-sample numbers travel as one array: one pinned host-to-device copy (a copy from
        # pageable memory would first wait for everything queued on the stream), split on the device.
        m = torch.from_numpy(meta)
        if self.device.type == "cuda":
            m = m.pin_memory().to(self.device, non_blocking=True)
        b = m.shape[0]
        return Batch(view1=view(view1), view2=view(view2), view2_small=view(view2_small),
                     boxes1=m[:, :4 * k].reshape(b, k, 4).to(torch.float32),
                     boxes2=m[:, 4 * k:8 * k].reshape(b, k, 4).to(torch.float32),
                     box_valid=m[:, 8 * k:9 * k] != 0,
                     image_id=m[:, -1].to(torch.int64))


def make_dali_loader(dataset, store, *, batch_size: int = 64, workers: int = 4,
                     view_cfg: ViewConfig | None = None, colour_cfg: ColourConfig | None = None,
                     seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                     shuffle: bool = True, device=None, dtype: torch.dtype | None = None,
                     threads: int | None = None, prefetch: int = 2, antialias: bool = True,
                     check: str = "header", start_method: str | None = None) -> DaliLoader:
    """The DALI backend of :func:`d3ssl.data.loader.make_loader`: an iterable of Batch with
    ``set_epoch(epoch)`` and ``len()`` (batches per epoch on this rank).

    dataset, store  an ImageDataset and the ProposalStore of its proposals (image pixels)
    batch_size      samples per batch on this rank; order, sharding by rank/world_size and drop_last
                    are the CPU loader's (:class:`~d3ssl.data.cpu_loader.EpochBatchSampler`): with
                    drop_last (default, what DDP needs) the N mod world_size remainder and each rank's
                    partial batch are left out; without it every sample comes exactly once per epoch
                    and the last batch may be short
    workers         Python workers of the parallel source (read, check, sample) and, unless `threads`
                    is given, DALI's own threads (decode, resize, colour)
    view_cfg        ViewConfig of the view sampler (size S, crop scale/ratio, K boxes, flips)
    colour_cfg      ColourConfig (SoCo's recipe); ``ColourConfig(enabled=False)`` turns it off
    device          "cuda[:i]": DALI's GPU graph, views float16 (or `dtype` bfloat16) on that GPU;
                    "cpu": DALI's CPU-only mode, views float32; None: cuda when a GPU is visible
    prefetch        batches DALI prepares ahead (its prefetch_queue_depth)
    antialias       low-pass filter when shrinking (as the CPU loader's area resize); False is faster
    check           "header": files are checked from their header and end markers (microseconds);
                    "decode": also trial-decoded at 1/8 scale with OpenCV in the source workers
    start_method    of the source workers: "fork" or "spawn"; None (default): fork for the CPU graph
                    in a process where CUDA is not initialised, else spawn (forking a process that
                    has initialised CUDA is unsafe, and DALI refuses it)

    Raises DaliUnavailable, saying how to install DALI, when it is not installed."""
    require_dali()
    view_cfg = view_cfg or ViewConfig()
    colour_cfg = colour_cfg or ColourConfig()
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    if start_method not in (None, "fork", "spawn"):
        raise ValueError(f"start_method must be 'fork', 'spawn' or None, got {start_method!r}")
    if len(dataset) == 0:
        raise ValueError("make_dali_loader: the dataset is empty")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} was asked for but no GPU is visible; use device='cpu' for "
                         "DALI's CPU-only mode")
    return DaliLoader(dataset, store, batch_size=batch_size, workers=workers, view_cfg=view_cfg,
                      colour_cfg=colour_cfg, seed=seed, rank=rank, world_size=world_size,
                      drop_last=drop_last, shuffle=shuffle, device=device, dtype=dtype, threads=threads,
                      prefetch=prefetch, antialias=antialias, check=check, start_method=start_method)
