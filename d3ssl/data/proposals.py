"""Unsupervised region proposals: selective search over a dataset, and the store that holds them.

Generation (``python -m d3ssl.data.proposals --images DIR --out FILE``, or :func:`generate_proposals`)
runs OpenCV-contrib selective search in fast mode on a copy of each image downscaled to ``max_side``
pixels, scales the boxes back to the original pixels, removes duplicates and applies SoCo's filter:

    w, h >= min_size (32 px),   1/3 <= w/h <= 3,   0.3 <= sqrt(w*h / (W*H)) <= 0.8

with fallbacks so every image keeps at least one box: if nothing passes, the scale rule is dropped,
then the aspect rule, and finally the whole image is the one box. At most ``max_boxes`` boxes are
kept per image (a fixed pseudo-random subset, seeded by the image key, so the result does not depend
on the order images are processed in). Images run in parallel over all cores, in chunks; each
finished chunk is written to ``FILE.partial/`` so a killed run started again continues where it
stopped and produces the same store as an uninterrupted one. An image that cannot be read is reported
and gets the whole-image box (its status is recorded in the store).

Store format (one file, little-endian, never pickled)::

    b"D3SSLPS1" | uint64 header length | JSON header | sections, each 64-byte aligned:
      offsets  int64   [N+1]   boxes of image i are rows offsets[i]:offsets[i+1]
      boxes    float32 [M,4]   x1,y1,x2,y2 in original image pixels
      sizes    int32   [N,2]   width, height of the image (0,0 if unreadable and unknown)
      status   uint8   [N]     0 = ok, 1 = unreadable (whole-image box)
      key_offsets int64 [N+1], keys utf-8 bytes (relative image paths, as ImageDataset.key)

Reading (:class:`ProposalStore`) memory-maps the arrays; ``boxes(i)`` is O(1).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from ..cli import ArgumentParser, check_output_file, positive_int

MAGIC = b"D3SSLPS1"
ALIGN = 64
STATUS_OK, STATUS_UNREADABLE = 0, 1
# Keys are file paths: on POSIX a file name need not be UTF-8, and Python keeps its other bytes as
# surrogates, which this error handler writes back as the same bytes.
KEY_ERRORS = "surrogateescape"
STORE_SUFFIX = ".proposals"


# ---------------------------------------------------------------------------------------------------
# the store

def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_store(path: str, keys: list[str], boxes: list[np.ndarray], sizes: np.ndarray,
                status: np.ndarray, params: dict | None = None) -> None:
    """Writes a store atomically (temporary file, then rename). boxes[i]: float32 [n_i,4]."""
    if not (len(keys) == len(boxes) == len(sizes) == len(status)):
        raise ValueError("write_store: keys, boxes, sizes and status must have the same length")
    counts = np.array([len(b) for b in boxes], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    all_boxes = (np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes])
                 if boxes else np.zeros((0, 4), np.float32))
    key_bytes = [k.encode("utf-8", KEY_ERRORS) for k in keys]
    key_offsets = np.concatenate([[0], np.cumsum([len(k) for k in key_bytes])]).astype(np.int64)
    arrays = {
        "offsets": offsets, "boxes": all_boxes.astype("<f4"), "sizes": np.asarray(sizes, "<i4").reshape(-1, 2),
        "status": np.asarray(status, np.uint8), "key_offsets": key_offsets,
        "keys": np.frombuffer(b"".join(key_bytes), np.uint8),
    }
    sections, pos = {}, 0
    for name, a in arrays.items():
        sections[name] = {"start": pos, "dtype": a.dtype.str, "shape": list(a.shape)}
        pos = _align(pos + a.nbytes)
    header = json.dumps({"version": 1, "num_images": len(keys), "num_boxes": int(len(all_boxes)),
                         "sections": sections, "params": params or {}}).encode()
    data_start = _align(len(MAGIC) + 8 + len(header))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + np.uint64(len(header)).tobytes() + header)
        for name, a in arrays.items():
            f.seek(data_start + sections[name]["start"])
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(data_start + pos)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ProposalStore:
    """Read access to a proposals store; arrays are memory-mapped, ``boxes(i)`` is O(1).

    Attributes: ``keys`` (list of image keys), ``params`` (generation settings), ``num_boxes``."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"proposals store {path!r} does not exist; create it with "
                                    "`python -m d3ssl.data.proposals --images DIR --out FILE`")
        self.path = path
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise ValueError(f"{path!r} is not a d3ssl proposals store (bad magic {magic!r})")
            hlen = int(np.frombuffer(f.read(8), np.uint64)[0])
            header = json.loads(f.read(hlen))
        data_start = _align(len(MAGIC) + 8 + hlen)
        self.params = header.get("params", {})
        self.num_boxes = header["num_boxes"]
        arr = {}
        for name, s in header["sections"].items():
            shape = tuple(s["shape"])
            if int(np.prod(shape)) == 0:
                arr[name] = np.zeros(shape, np.dtype(s["dtype"]))
            else:
                arr[name] = np.memmap(path, dtype=np.dtype(s["dtype"]), mode="r",
                                      offset=data_start + s["start"], shape=shape)
        self._offsets, self._boxes = arr["offsets"], arr["boxes"]
        self._sizes, self._status = arr["sizes"], arr["status"]
        raw, ko = bytes(arr["keys"]), arr["key_offsets"]
        self.keys = [raw[ko[i]:ko[i + 1]].decode("utf-8", KEY_ERRORS) for i in range(header["num_images"])]
        self._index = None

    def __getstate__(self):          # loader workers reopen the file instead of pickling the maps
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __len__(self) -> int:
        return len(self.keys)

    def boxes(self, i: int) -> np.ndarray:
        """float32 [N,4] x1,y1,x2,y2 in pixels of the original image (N >= 1). Read-only view."""
        return self._boxes[self._offsets[i]:self._offsets[i + 1]]

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of image i in pixels as seen when the proposals were made."""
        w, h = self._sizes[i]
        return int(w), int(h)

    def status(self, i: int) -> int:
        return int(self._status[i])

    def index_of(self, key: str) -> int:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index[key]

    def check_matches(self, dataset) -> None:
        """Raises ValueError unless the store has exactly the dataset's images, in the same order."""
        n = len(dataset)
        if n != len(self.keys):
            raise ValueError(f"proposals store {self.path!r} has {len(self.keys)} images but the dataset "
                             f"has {n}: regenerate it with `python -m d3ssl.data.proposals` for this dataset")
        for i in range(n):
            if dataset.key(i) != self.keys[i]:
                raise ValueError(f"proposals store {self.path!r} does not match the dataset: image {i} is "
                                 f"{dataset.key(i)!r} in the dataset but {self.keys[i]!r} in the store; "
                                 "regenerate the store for this dataset")

    def readable_again(self, dataset, budget_s: float = 2.0) -> tuple[str | None, int, int]:
        """(key, checked, unreadable): an image that was unreadable when the store was made, so has
        the whole-image box in it, but decodes now (None: none found), how many such images were
        checked, in order, for at most about `budget_s` seconds, and how many there are. A store with
        one should be made again: its boxes for them are not proposals."""
        from .datasets import ImageDecodeError, decode_image
        unreadable = np.flatnonzero(np.asarray(self._status) == STATUS_UNREADABLE)
        t0, checked = time.perf_counter(), 0
        for i in unreadable:
            if checked and time.perf_counter() - t0 > budget_s:
                break
            checked += 1
            try:
                decode_image(dataset.read_bytes(int(i)))
            except (ImageDecodeError, OSError):
                continue
            return self.keys[int(i)], checked, len(unreadable)
        return None, checked, len(unreadable)

    def __repr__(self):
        return f"ProposalStore({self.path!r}, {len(self)} images, {self.num_boxes} boxes)"


# ---------------------------------------------------------------------------------------------------
# selective search and SoCo's filter

@dataclass
class ProposalConfig:
    """Settings of proposal generation (defaults: SoCo's filter; max_side chosen by recall vs speed)."""
    max_side: int = 256        # selective search runs on a copy whose longer side is this (px)
    min_size: float = 32.0     # minimum box width and height, original pixels
    max_aspect: float = 3.0    # 1/max_aspect <= w/h <= max_aspect
    min_scale: float = 0.3     # min_scale <= sqrt(wh / WH) <= max_scale
    max_scale: float = 0.8
    max_boxes: int = 100       # cap per image (a fixed pseudo-random subset above it)
    mode: str = "fast"         # selective search strategy: "fast" or "quality"


def filter_boxes(boxes: np.ndarray, width: int, height: int, cfg: ProposalConfig) -> tuple[np.ndarray, int]:
    """SoCo's filter with fallbacks. boxes: float [N,4] x1,y1,x2,y2 original pixels.

    Returns (kept boxes [M>=1,4], level): level 0 = all rules, 1 = without the scale rule,
    2 = size rule only, 3 = nothing passed, the whole image."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    size_ok = (w >= cfg.min_size) & (h >= cfg.min_size)
    ratio = w / np.maximum(h, 1e-6)
    ratio_ok = (ratio >= 1 / cfg.max_aspect) & (ratio <= cfg.max_aspect)
    scale = np.sqrt(w * h / max(width * height, 1))
    scale_ok = (scale >= cfg.min_scale) & (scale <= cfg.max_scale)
    for level, keep in enumerate((size_ok & ratio_ok & scale_ok, size_ok & ratio_ok, size_ok)):
        if keep.any():
            return boxes[keep], level
    return np.array([[0, 0, width, height]], np.float32), 3


def selective_search(image_bgr: np.ndarray, max_side: int = 256, mode: str = "fast") -> np.ndarray:
    """Selective search on a copy downscaled to `max_side`; float32 [N,4] x1,y1,x2,y2 in the pixels of
    `image_bgr`, deduplicated, in a canonical (sorted) order. OpenCV ranks the boxes with an
    unseeded random number, so its output order is not reproducible; the set of boxes is."""
    import cv2
    h, w = image_bgr.shape[:2]
    f = min(1.0, max_side / max(h, w))
    small = image_bgr
    if f < 1.0:
        small = cv2.resize(image_bgr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(small)
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality()
    else:
        raise ValueError(f"mode must be 'fast' or 'quality', got {mode!r}")
    rects = np.asarray(ss.process(), np.int64).reshape(-1, 4)
    rects = np.unique(rects, axis=0)                      # dedup + canonical order
    sx, sy = w / small.shape[1], h / small.shape[0]
    boxes = np.empty((len(rects), 4), np.float32)
    boxes[:, 0] = rects[:, 0] * sx
    boxes[:, 1] = rects[:, 1] * sy
    boxes[:, 2] = np.minimum((rects[:, 0] + rects[:, 2]) * sx, w)
    boxes[:, 3] = np.minimum((rects[:, 1] + rects[:, 3]) * sy, h)
    return boxes


def proposals_for_image(image_bgr: np.ndarray, key: str, cfg: ProposalConfig) -> np.ndarray:
    """Selective search + filter + cap for one decoded image: float32 [N>=1,4] original pixels."""
    h, w = image_bgr.shape[:2]
    boxes, _ = filter_boxes(selective_search(image_bgr, cfg.max_side, cfg.mode), w, h, cfg)
    if len(boxes) > cfg.max_boxes:
        rng = np.random.default_rng(zlib.crc32(key.encode("utf-8", KEY_ERRORS)))
        boxes = boxes[np.sort(rng.choice(len(boxes), cfg.max_boxes, replace=False))]
    return boxes


# ---------------------------------------------------------------------------------------------------
# generation over a dataset: chunks in parallel, journaled for resume

def _decode_bgr(path: str):
    from .datasets import decode_image
    with open(path, "rb") as f:
        return decode_image(f.read(), bgr=True)


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header alone (a truncated file often still has one), else (0, 0)."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001
        return 0, 0


def _chunk_path(partial: str, c: int) -> str:
    return os.path.join(partial, f"chunk_{c:07d}.bin")


def _serial_opencv():
    """A pool worker's OpenCV runs one thread (as many workers as cores run at once). Forked workers
    inherit it from the parent instead (generate_proposals sets it there): calling
    cv2.setNumThreads in a forked child whose parent had started OpenCV's thread pool can hang."""
    import cv2
    cv2.setNumThreads(1)
    _leave_ctrl_c_to_the_parent()


def _leave_ctrl_c_to_the_parent():
    """A pool worker ignores SIGINT: a Ctrl-C reaches the whole process group, and the parent, which
    ends the pool and says what was kept, is the one to act on it (each worker would otherwise print
    its own KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_chunk(job):
    import cv2

    from .datasets import ImageDecodeError
    c, items, cfg, partial = job
    keys, boxes, sizes, status, failures = [], [], [], [], []
    for key, path, hint in items:
        try:
            img = _decode_bgr(path)
            h, w = img.shape[:2]
            b = proposals_for_image(img, key, cfg)
            st = STATUS_OK
        except (ImageDecodeError, OSError, cv2.error) as e:  # an unreadable file (or one selective
            # search cannot take): report, whole-image box, go on; anything else is a bug and stops
            w, h = hint or _header_size(path)
            b = np.array([[0, 0, w, h]], np.float32)
            st = STATUS_UNREADABLE
            failures.append(f"{key}: {type(e).__name__}: {e}")
        keys.append(key)
        boxes.append(b)
        sizes.append((w, h))
        status.append(st)
    write_store(_chunk_path(partial, c), keys, boxes, np.array(sizes, np.int32).reshape(-1, 2),
                np.array(status, np.uint8))
    return c, len(items), failures


def default_store_path(dataset) -> str:
    """Where the trainer looks for (and creates) a dataset's proposals: next to its images,
    ``<image root>.proposals`` (e.g. ``coco/train2017.proposals``)."""
    root = getattr(dataset, "root", None)
    if root is None:
        raise ValueError("default_store_path needs a dataset with a `root` folder; pass a store path")
    return os.path.normpath(root) + STORE_SUFFIX


# Unreadable images named one by one in warnings while proposals are generated; the rest are counted.
LISTED_FAILURES = 3


def generate_proposals(dataset, out_path: str, max_side: int = ProposalConfig.max_side,
                       workers: int | None = None, chunk_size: int = 32,
                       cfg: ProposalConfig | None = None, progress: bool = True,
                       stop_after_chunks: int | None = None) -> ProposalStore | None:
    """Runs selective search over every image of `dataset` and writes the store to `out_path`.

    Args:
        max_side: longer side (px) of the copy selective search runs on (overrides cfg.max_side).
        workers: processes (default: all cores).
        chunk_size: images per journaled chunk; a killed run loses at most the chunks in flight.
        stop_after_chunks: stop after this many new chunks (a deliberate interruption; returns None).

    Returns the opened store. Unreadable images are reported with warnings.warn and get the
    whole-image box (size from the annotations, else from the file header, else 0x0)."""
    import cv2
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(
            f"selective search needs OpenCV's contrib modules (cv2.ximgproc), which the installed OpenCV "
            f"{cv2.__version__} lacks: `pip install opencv-contrib-python-headless` (uninstall any other "
            "opencv-python* package first: they share the cv2 module)")
    cfg = cfg or ProposalConfig()
    cfg = ProposalConfig(**{**asdict(cfg), "max_side": int(max_side)})
    if cfg.max_side < 16:
        raise ValueError(f"max_side must be >= 16 pixels, got {cfg.max_side}")
    n = len(dataset)
    if n == 0:
        raise ValueError("generate_proposals: the dataset is empty")
    keys = [dataset.key(i) for i in range(n)]
    fingerprint = hashlib.sha256("\n".join(keys).encode("utf-8", KEY_ERRORS)).hexdigest()
    manifest = {"fingerprint": fingerprint, "num_images": n, "chunk_size": chunk_size, "config": asdict(cfg)}
    partial = out_path + ".partial"
    man_path = os.path.join(partial, "manifest.json")
    if os.path.isdir(partial):
        try:
            with open(man_path) as f:
                same = json.load(f) == manifest
        except (OSError, ValueError):
            same = False
        if not same:
            warnings.warn(f"{partial!r} belongs to a different dataset or settings; starting over")
            shutil.rmtree(partial)
    if not os.path.isdir(partial):
        os.makedirs(partial)
        with open(man_path + ".tmp", "w") as f:
            json.dump(manifest, f)
        os.replace(man_path + ".tmp", man_path)

    num_chunks = (n + chunk_size - 1) // chunk_size
    done = {c for c in range(num_chunks) if os.path.isfile(_chunk_path(partial, c))}
    size_hint = getattr(dataset, "size_hint", lambda i: None)
    jobs = [(c, [(keys[i], dataset.path(i), size_hint(i)) for i in range(c * chunk_size, min(n, (c + 1) * chunk_size))],
             cfg, partial) for c in range(num_chunks) if c not in done]
    if stop_after_chunks is not None:
        jobs = jobs[:stop_after_chunks]
    done_images = sum(min(n, (c + 1) * chunk_size) - c * chunk_size for c in done)
    from tqdm import tqdm
    bar = tqdm(total=n, initial=done_images, unit="img", desc="selective search", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)
    failures = []
    workers = max(1, workers or os.cpu_count() or 1)
    pool = None
    opencv_threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)  # (restored below) inherited by forked workers; see _serial_opencv
        if workers == 1 or len(jobs) <= 1:
            results = map(_run_chunk, jobs)
        else:
            spawn = sys.platform == "darwin"
            pool = mp.get_context("spawn" if spawn else "fork").Pool(
                workers, initializer=_serial_opencv if spawn else _leave_ctrl_c_to_the_parent)
            results = pool.imap_unordered(_run_chunk, jobs)
        for _c, count, fails in results:
            bar.update(count)
            for msg in fails:
                failures.append(msg)
                if len(failures) <= LISTED_FAILURES:
                    warnings.warn(f"unreadable image, using the whole-image box: {msg}")
        if pool:
            pool.close()
            pool.join()
    finally:
        bar.close()
        if pool:
            pool.terminate()
        cv2.setNumThreads(opencv_threads)
    if stop_after_chunks is not None and len(done) + len(jobs) < num_chunks:
        return None
    # merge the chunks, in order, into the final store
    all_boxes, sizes, status = [], [], []
    for c in range(num_chunks):
        part = ProposalStore(_chunk_path(partial, c))
        all_boxes += [np.array(part.boxes(i)) for i in range(len(part))]
        sizes.append(np.array(part._sizes))
        status.append(np.array(part._status))
    write_store(out_path, keys, all_boxes, np.concatenate(sizes), np.concatenate(status),
                params={**asdict(cfg), "unreadable": int(sum((s != 0).sum() for s in status))})
    shutil.rmtree(partial, ignore_errors=True)
    if len(failures) > LISTED_FAILURES:
        warnings.warn(f"{len(failures) - LISTED_FAILURES} more unreadable image(s) (not listed one by one) "
                      "got the whole-image box")
    if failures and progress:
        print(f"{len(failures)} unreadable image(s) got the whole-image box (fixed, they get proposals "
              f"once {out_path} is deleted and made again)", file=sys.stderr)
    return ProposalStore(out_path)


def ensure_proposals(dataset, path: str | None = None, **generate_kw) -> ProposalStore:
    """The dataset's proposals store at `path` (default: :func:`default_store_path`), generated first
    when missing (``generate_kw`` go to :func:`generate_proposals`); refuses a store of other images."""
    path = path or default_store_path(dataset)
    if not os.path.isfile(path):
        generate_proposals(dataset, path, **generate_kw)
    store = ProposalStore(path)
    store.check_matches(dataset)
    return store


def main(argv=None):
    p = ArgumentParser(prog="python -m d3ssl.data.proposals",
                       description="Selective-search proposals for a dataset (resumable).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="a folder of images (recursive)")
    src.add_argument("--coco", metavar="JSON", help="a COCO instances JSON")
    p.add_argument("--image-root", metavar="DIR", help="images of --coco (default: found from the JSON path)")
    p.add_argument("--out", metavar="FILE", help="store path (default: <image folder>.proposals)")
    p.add_argument("--max-side", type=positive_int, default=ProposalConfig.max_side,
                   help=f"longer side of the copy selective search runs on (default {ProposalConfig.max_side})")
    p.add_argument("--max-boxes", type=positive_int, default=ProposalConfig.max_boxes,
                   help=f"cap on boxes per image (default {ProposalConfig.max_boxes})")
    p.add_argument("--mode", choices=["fast", "quality"], default="fast",
                   help="OpenCV's selective search strategy: fast (default, as SoCo) or quality (slower, more boxes)")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    p.add_argument("--chunk-size", type=positive_int, default=32, help="images per journaled chunk (default 32)")
    args = p.parse_args(argv)
    if args.images and not os.path.isdir(args.images):
        p.error(f"--images {args.images!r} is not a folder" if os.path.exists(args.images)
                else f"--images {args.images!r} does not exist")
    if args.images and args.image_root:
        p.error("--image-root goes with --coco (the images of its JSON); --images already names them")
    check_output_file(p, "--out", args.out)
    from .datasets import CocoDataset, ImageFolder, open_dataset
    t0 = time.time()
    out = args.out
    try:
        if args.images:
            dataset = ImageFolder(args.images)
        elif args.image_root:
            dataset = CocoDataset(args.image_root, args.coco)
        else:
            dataset = open_dataset(args.coco)
        out = args.out or default_store_path(dataset)
        cfg = ProposalConfig(max_boxes=args.max_boxes, mode=args.mode)
        store = generate_proposals(dataset, out, max_side=args.max_side, workers=args.workers,
                                   chunk_size=args.chunk_size, cfg=cfg)
    except (ValueError, OSError, ImportError) as e:  # the data or the OpenCV build: one line
        p.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:
        kept = f"{out}.partial/" if out else "the store's .partial/ folder"
        p.exit(130, f"\ninterrupted: the chunks done so far are kept in {kept}; the same command goes on "
                    "from them\n")
    print(f"wrote {out}: {len(store)} images, {store.num_boxes} boxes "
          f"({store.num_boxes / len(store):.1f} per image) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
