"""Object-level k-NN (O-KNN, paper §5.3).

Each ground-truth box of a COCO-format dataset becomes one object feature: the image resized to
S x S as the CPU loader resizes the training views (aspect not kept; area averaging where it shrinks
by more than 1.5, so a 640 px COCO image does not alias at 224), the backbone's C5 map (stride 32), RoIAlign 7x7
on the box, average pool, L2 normalisation. A memory bank is built from the train split (at most N
objects per image, picked so that the classes stay balanced); every val object is classified by a
weighted vote of its k nearest bank objects (cosine similarity, weight exp(sim / T)); top-1 and
top-5 accuracy are reported in percent, with the share of the val features' variance that the
objects' centres explain (:func:`position_share`): how much the features say where an object is.

    python -m d3ssl.eval.oknn --ckpt RUN_DIR_OR_FILE --data COCO_DIR [--arch resnet50]
    python -m d3ssl.eval.oknn --random-init --arch resnet18 --data COCO_DIR
"""
from __future__ import annotations

import argparse
import contextlib
import io
import glob
import json
import math
import os
import re
import warnings
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from d3ssl import ops
from d3ssl.cli import (ArgumentParser, check_device, check_image_size, finite_or_none, number, positive_int,
                       torch_load_problem)
from d3ssl.data.batch import IMAGENET_MEAN, IMAGENET_STD
from d3ssl.data.cpu_loader import resize_square

from .probe import annotated_size, read_annotated_rgb

ROI_SIZE = 7          # RoIAlign output side on C5 (paper)
C5_STRIDE = 32
DEFAULT_OBJECTS_PER_IMAGE = 3   # N of the bank; the paper does not state its value


# ----------------------------------------------------------------------------------------- data
def resolve_split(data_root: str, split: str) -> tuple[str, str]:
    """(annotation json, image folder) of `split` in a COCO-format folder.

    Accepts root/annotations/instances_<split>.json with images in root/<split>/ (the synthetic
    set, custom sets) and COCO 2017's names (split "train" also finds instances_train2017.json and
    train2017/), mixed as the training loader accepts them (datasets.open_dataset), or images/<name>/.
    """
    if os.path.isfile(data_root):  # (an instances JSON, which training takes, names one split only)
        root = os.path.dirname(os.path.dirname(os.path.abspath(data_root)))
        raise FileNotFoundError(f"{data_root!r} is a file: give the COCO-format folder that holds both splits' "
                                f"annotations/ and images (here perhaps {root!r})")
    names = [split] + ([split + "2017"] if not split.endswith("2017") else [])
    for name in names:
        ann = os.path.join(data_root, "annotations", f"instances_{name}.json")
        if os.path.isfile(ann):
            folders = [os.path.join(data_root, n) for n in dict.fromkeys([name] + names)]
            folders.append(os.path.join(data_root, "images", name))
            for images in folders:
                if os.path.isdir(images):
                    return ann, images
            raise FileNotFoundError(f"found {ann} but no image folder "
                                    f"({' or '.join(os.path.basename(f) + '/' for f in folders[:-1])})")
    raise FileNotFoundError(
        f"no COCO-format split {split!r} in {data_root!r}: expected "
        f"{os.path.join(data_root, 'annotations', f'instances_{split}.json')} and the folder "
        f"{os.path.join(data_root, split)}")


def check_splits(data_root: str, train_split: str, val_split: str):
    """Checks O-KNN's bank split and query split before any feature is extracted: resolve_split's
    FileNotFoundError for the first missing from `data_root`, ValueError when both are one
    annotation file (every query would find itself in the bank)."""
    bank, queries = (resolve_split(data_root, split)[0] for split in (train_split, val_split))
    if os.path.realpath(bank) == os.path.realpath(queries):
        raise ValueError(f"the bank split {train_split!r} and the query split {val_split!r} are the same "
                         f"annotations ({bank}): every query would find itself in the bank")


class SplitsOverlap(ValueError):
    """An image file is in both O-KNN splits."""


def check_disjoint(bank_records, query_records, train_split: str, val_split: str):
    """SplitsOverlap (a ValueError) when an image file is in both O-KNN splits (as two annotation
    files that list the same images would have it): its objects would find themselves in the bank."""
    bank_files = {os.path.realpath(r[0]) for r in bank_records}
    shared = sorted({os.path.realpath(r[0]) for r in query_records} & bank_files)
    if shared:
        raise SplitsOverlap(f"{len(shared)} image file(s) are in both the bank split {train_split!r} and the "
                         f"query split {val_split!r} (e.g. {shared[0]}): their objects would find "
                         "themselves in the bank")


def load_objects(data_root: str, split: str, max_objects_per_image: int | None = None,
                 max_images: int | None = None, min_box_size: float = 1.0):
    """Object annotations of a split, per image.

    Args:
        max_objects_per_image: keep at most this many objects per image (None: all). Images are
            visited in id order and each keeps the objects whose classes are rarest in the
            selection so far (larger objects first among equals): this evens out the classes as far
            as each image's objects allow, without balancing the whole selection.
        max_images: use only the first images (by id) of the split.
        min_box_size: drop boxes narrower or shorter than this (pixels); crowd boxes are dropped.
    Returns:
        list of (image path, boxes float32 [n,4] x1,y1,x2,y2 pixels, labels int64 [n],
        (width, height) as annotated, or None when the file gives none); images without objects
        are left out.
    """
    from pycocotools.coco import COCO  # import here: slow, and only evaluation needs it

    if max_objects_per_image is not None and max_objects_per_image <= 0:
        raise ValueError(f"max_objects_per_image must be a positive int or None, got {max_objects_per_image}")
    ann_file, image_dir = resolve_split(data_root, split)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(ann_file)
    counts: Counter = Counter()
    records = []
    image_ids = sorted(coco.getImgIds())
    if max_images is not None:
        image_ids = image_ids[:max_images]
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        # (iscrowd is optional in COCO-format files: a missing one means not a crowd)
        anns = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)
                and a["bbox"][2] >= min_box_size and a["bbox"][3] >= min_box_size]
        if max_objects_per_image is not None:
            remaining, anns = anns, []
            while remaining and len(anns) < max_objects_per_image:
                # counts change with every pick, so choose one at a time
                a = min(remaining, key=lambda b: (counts[b["category_id"]],
                                                  -b["bbox"][2] * b["bbox"][3], b["id"]))
                remaining.remove(a)
                anns.append(a)
                counts[a["category_id"]] += 1
        if not anns:
            continue
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
        labels = np.array([a["category_id"] for a in anns], np.int64)
        records.append((os.path.join(image_dir, info["file_name"]), boxes, labels, annotated_size(info)))
    return records


class ObjectImages(torch.utils.data.Dataset):
    """Images resized to image_size x image_size, ImageNet-normalised, with their boxes scaled.

    Item: (image float32 [3,S,S], boxes float32 [n,4] in S-px, labels int64 [n]).
    ``image_hook(records, i, image, boxes) -> image``, when given, edits each image (uint8 RGB
    [H,W,3] at its own size, boxes in its pixels) before the resize (disturbed O-KNN uses it).
    Images are read as :func:`~d3ssl.eval.probe.read_annotated_rgb` says, so that the boxes land
    on their objects also when the file's EXIF orientation or size differs from the annotations'.
    """

    def __init__(self, records, image_size: int = 224, image_hook=None):
        self.records = records
        self.image_size = int(image_size)
        self.image_hook = image_hook
        self.mean = np.array(IMAGENET_MEAN, np.float32) * 255
        self.std = np.array(IMAGENET_STD, np.float32) * 255

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        path, boxes, labels, size = self.records[i]
        img, (sx, sy) = read_annotated_rgb(path, size)
        if (sx, sy) != (1.0, 1.0):
            boxes = boxes * np.array([sx, sy, sx, sy], np.float32)
        h, w = img.shape[:2]
        s = self.image_size
        if self.image_hook is not None:
            img = self.image_hook(self.records, i, img, boxes)
        img = resize_square(img, s)
        img = (img.astype(np.float32) - self.mean) / self.std
        scale = np.array([s / w, s / h, s / w, s / h], np.float32)
        return (torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(boxes * scale),
                torch.from_numpy(labels))


class _NoBar:
    """Stands in for a progress bar that is off."""
    def update(self, n=1):
        pass

    def close(self):
        pass


def _collate(items):
    images, boxes, labels = zip(*items)
    return torch.stack(images), list(boxes), torch.cat(labels)


# ------------------------------------------------------------------------------------- features
@torch.no_grad()
def object_features(backbone, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """images [B,3,S,S], boxes list of B float [n_b,4] (S-px) -> unit features [sum n_b, C5]:
    C5 -> RoIAlign 7x7 (aligned, stride 32) -> average pool -> L2 normalisation."""
    c5 = backbone.c5(images)
    rois = ops.as_rois(boxes, c5).to(torch.float64 if c5.dtype == torch.float64 else torch.float32)
    regions = ops.roi_align(c5, rois, ROI_SIZE, spatial_scale=1.0 / C5_STRIDE,
                            sampling_ratio=-1, aligned=True)
    return F.normalize(regions.float().mean(dim=(2, 3)), dim=1)


def extract_object_features(backbone, dataset: str, split: str, max_objects_per_image: int | None = None,
                            image_size: int = 224, device="cpu", batch_size: int = 32,
                            num_workers: int = 0, max_images: int | None = None, image_hook=None,
                            records=None, progress: bool = False):
    """Object features of a COCO-format split.

    Args:
        backbone: a ResNetC4 (anything with ``c5(images)``); run in eval mode, then restored.
        dataset: COCO-format folder (see resolve_split).
        split: "train", "val", ...
        max_objects_per_image: N of the bank (class-balanced pick), None for all objects.
        image_size: side S the images are resized to (pixels).
        device: where the backbone runs; bf16 autocast on CUDA.
        image_hook: optional image edit applied before the resize (see ObjectImages).
        records: the split's load_objects() output when the caller already has it (then
            `dataset`, `split`, `max_objects_per_image` and `max_images` only name it); the features
            follow its order, image by image and box by box.
        progress: a progress bar over the split's images (on stderr).
    Returns:
        (features float32 [N,C5] unit rows on the CPU, labels int64 [N] category ids).
    """
    if records is None:
        records = load_objects(dataset, split, max_objects_per_image, max_images=max_images)
    if not records:
        raise ValueError(f"split {split!r} of {dataset!r} has no usable objects")
    loader = torch.utils.data.DataLoader(ObjectImages(records, image_size, image_hook), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate)
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    if progress:  # (imported here: the library's ops do not need tqdm)
        from tqdm.auto import tqdm
        bar = tqdm(total=len(records), desc=f"O-KNN features, {split}", unit="img", leave=False)
    else:
        bar = _NoBar()
    try:
        for images, boxes, lab in loader:
            bar.update(len(images))
            images = images.to(device, memory_format=torch.channels_last)
            boxes = [b.to(device) for b in boxes]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                feats.append(object_features(backbone, images, boxes).cpu())
            labels.append(lab)
    finally:
        bar.close()
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


# ------------------------------------------------------------------------------------------ k-NN
@torch.no_grad()
def o_knn(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor,
          query_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
          chunk_size: int = 1024) -> dict[str, float]:
    """Weighted k-NN classification (InstDisc / DINO style).

    Args:
        bank_feats [N,D], query_feats [M,D]: unit rows (cosine similarity = dot product).
        bank_labels [N], query_labels [M]: integer labels (any ids).
        k: neighbours (min(k, N) used). temperature: T of the vote weight exp(sim / T).
    Returns:
        {"top1", "top5"} accuracy in percent: a query is right at top-n when its label is among
        the n classes with the largest summed weight over its k nearest bank features (classes
        without a vote never count, even when fewer than n classes got one). Both are NaN, with a
        warning, when a feature is not finite (a diverged network): no score is right then.
    """
    if bank_feats.dim() != 2 or query_feats.dim() != 2 or bank_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"bank_feats [N,D] and query_feats [M,D] must share D, got "
                         f"{tuple(bank_feats.shape)} and {tuple(query_feats.shape)}")
    if bank_labels.shape != bank_feats.shape[:1] or query_labels.shape != query_feats.shape[:1]:
        raise ValueError("bank_labels / query_labels must be [N] / [M], one label per feature row")
    if len(bank_feats) == 0 or len(query_feats) == 0:
        raise ValueError("o_knn needs a non-empty bank and at least one query")
    if k <= 0 or not temperature > 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if not (torch.isfinite(bank_feats).all() and torch.isfinite(query_feats).all()):
        warnings.warn("O-KNN: some object features are not finite (NaN or inf); top-1 and top-5 are "
                      "reported as NaN", RuntimeWarning)
        return {"top1": float("nan"), "top5": float("nan")}
    classes = torch.unique(torch.cat([bank_labels, query_labels]))
    bank_y = torch.searchsorted(classes, bank_labels.contiguous())
    query_y = torch.searchsorted(classes, query_labels.contiguous())
    k = min(k, len(bank_feats))
    bank = bank_feats.float()
    correct1 = correct5 = 0
    for start in range(0, len(query_feats), chunk_size):
        q = query_feats[start:start + chunk_size].float()
        sim, idx = (q @ bank.t()).topk(k, dim=1)
        # exp(sim / T), divided by each query's largest (the ranking is the same): stays finite
        # and above 0 for the nearest neighbours however small T is
        weights = ((sim.double() - sim[:, :1].double()) / temperature).exp()
        votes = torch.zeros(len(q), len(classes), dtype=torch.float64)
        votes.scatter_add_(1, bank_y[idx], weights)
        voters = torch.zeros(len(q), len(classes), dtype=torch.long)
        voters.scatter_add_(1, bank_y[idx], torch.ones_like(idx))
        # a class no neighbour voted for is never a guess, and ranks below every voted class even
        # where a far neighbour's weight rounds to 0 (tiny temperatures)
        votes.masked_fill_(voters == 0, -math.inf)
        ranked = votes.argsort(dim=1, descending=True, stable=True)
        y = query_y[start:start + chunk_size].unsqueeze(1)
        voted = voters.gather(1, y)[:, 0] > 0
        correct1 += ((ranked[:, :1] == y).any(dim=1) & voted).sum().item()
        correct5 += ((ranked[:, :5] == y).any(dim=1) & voted).sum().item()
    n = len(query_feats)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


def position_share(features: torch.Tensor, centres: torch.Tensor) -> float:
    """Fraction of the variance of `features` [N,D] that a linear function of the object centres
    `centres` [N,2] (x, y as fractions of the image side) explains: ||P X||^2 / ||X||^2 for the
    centred features X and P the projection onto the centred centres' span. 0 when the features do
    not depend on where the object is, 1 when they are a linear function of it. A network whose
    object features are mostly position classifies objects by where they are, not what they are."""
    if features.dim() != 2 or centres.shape != (len(features), 2):
        raise ValueError(f"features [N,D] and centres [N,2] expected, got {tuple(features.shape)} and "
                         f"{tuple(centres.shape)}")
    if len(features) < 3:
        raise ValueError("position_share needs at least 3 objects")
    x = features.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("nan")                 # non-finite features: no share to report
    x = x - x.mean(0)
    c = centres.detach().double().cpu()
    c = c - c.mean(0)
    total = x.pow(2).sum()
    if total == 0:
        return 0.0
    # least squares x ~ c @ coef through the pseudo-inverse: defined also when all centres share
    # an x or a y (rank-deficient c)
    fitted = c @ (torch.linalg.pinv(c) @ x)
    return float(fitted.pow(2).sum() / total)


def object_centres(records) -> torch.Tensor:
    """float64 [N,2]: box centres of load_objects() records as fractions of their image's width and
    height, in the order extract_object_features returns the objects. A record without an
    annotated size takes the file's stored size (read_annotated_rgb's image then)."""
    from .probe import stored_size
    out = []
    for path, boxes, _, size in records:
        w, h = size if size is not None else stored_size(path)
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        out.append(np.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h], 1))
    return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0, 2, dtype=torch.float64)


def evaluate_oknn(backbone, data_root: str, train_split: str = "train", val_split: str = "val",
                  max_objects_per_image: int = DEFAULT_OBJECTS_PER_IMAGE, k: int = 20,
                  temperature: float = 0.07, image_size: int = 224, device="cpu", batch_size: int = 32,
                  num_workers: int = 0, max_train_images: int | None = None,
                  max_val_images: int | None = None, image_hook=None, hook_bank: bool = True,
                  progress: bool = False) -> dict:
    """O-KNN of a backbone: a class-balanced bank from `train_split` (at most
    max_objects_per_image per image), every object of `val_split` as a query.

    image_hook (see ObjectImages) edits the images of the queries and, with `hook_bank` (default),
    those of the bank too. `progress`: progress bars over each split's images.
    Returns {"top1", "top5" (percent), "bank_size", "num_queries", "position_share" (of the val
    features, see :func:`position_share`; left out with fewer than 3 queries)}.
    """
    check_splits(data_root, train_split, val_split)
    bank_records = load_objects(data_root, train_split, max_objects_per_image, max_images=max_train_images)
    val_records = load_objects(data_root, val_split, None, max_images=max_val_images)
    check_disjoint(bank_records, val_records, train_split, val_split)
    bank_x, bank_y = extract_object_features(backbone, data_root, train_split, max_objects_per_image,
                                             image_size, device, batch_size, num_workers, max_train_images,
                                             image_hook if hook_bank else None, records=bank_records,
                                             progress=progress)
    val_x, val_y = extract_object_features(backbone, data_root, val_split, None, image_size, device,
                                           batch_size, num_workers, max_val_images, image_hook,
                                           records=val_records, progress=progress)
    out = o_knn(bank_x, bank_y, val_x, val_y, k=k, temperature=temperature)
    out.update(bank_size=len(bank_x), num_queries=len(val_x))
    if len(val_x) >= 3:
        out["position_share"] = position_share(val_x, object_centres(val_records))
    return out


# ------------------------------------------------------------------------------------ checkpoint
def _checkpoint_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        found = [f for pattern in ("*.pt", "*.pth", "checkpoints/*.pt", "checkpoints/*.pth")
                 for f in glob.glob(os.path.join(path, pattern))]
        if found:  # the trainer's step_<N>.pt: highest step; other names: newest
            def order(f):
                m = re.match(r"^step_(\d+)\.pth?$", os.path.basename(f))
                return (1, int(m.group(1)), 0.0) if m else (0, 0, os.path.getmtime(f))
            return max(found, key=order)
    raise FileNotFoundError(f"--ckpt {path!r} is neither a checkpoint file nor a run folder holding "
                            f"*.pt / *.pth files (directly or in checkpoints/)")


def load_backbone(ckpt: str | None, arch: str | None = None, map_location="cpu"):
    """The student backbone (ResNetC4) of a training checkpoint, or a random one when ckpt is None.

    The checkpoint is a dict (loaded with weights_only=True) with "model" (the method's
    state_dict; "module." / "_orig_mod." prefixes are ignored) and "config" (a dict whose "model"
    entry holds ModelConfig fields, used for the arch unless `arch` is given).
    Returns (backbone, arch, checkpoint path or None).
    """
    from d3ssl.model import ResNetC4

    if ckpt is None:
        return ResNetC4(arch or "resnet50"), arch or "resnet50", None
    path = _checkpoint_file(ckpt)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for foreign or torn files)
        raise ValueError(f"{path}: {torch_load_problem(path, e)}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a d3ssl training checkpoint (no 'model' entry)")
    model_cfg = (state.get("config") or {}).get("model") or {}
    recorded = model_cfg.get("arch")
    if arch is not None and recorded is not None and arch != recorded:
        raise ValueError(f"{path} holds a {recorded} backbone, but {arch} was asked for; leave the "
                         "arch out to use the checkpoint's own")
    arch = arch or recorded or "resnet50"
    prefix = "online_backbone."
    weights = {}
    for key, value in state["model"].items():
        for junk in ("module.", "_orig_mod."):
            key = key.replace(junk, "")
        if key.startswith(prefix):
            weights[key[len(prefix):]] = value
    if not weights:
        raise ValueError(f"{path} holds no '{prefix}*' weights; is it a d3ssl method checkpoint?")
    backbone = ResNetC4(arch)
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as e:  # missing keys / shape mismatches: a wall of text; keep its first lines
        lines = str(e).strip().splitlines()
        raise ValueError(f"{path} does not hold a {arch} backbone: {' '.join(lines[:2])[:300]}...") from None
    return backbone, arch, path


def main(argv=None):
    p = ArgumentParser(prog="python -m d3ssl.eval.oknn", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="training checkpoint file, or a run folder "
                                    "(its latest checkpoints/step_<N>.pt)")
    src.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised network")
    p.add_argument("--data", required=True, help=(
        "COCO-format folder: annotations/instances_<split>.json (or <split>2017) and <split>/ images"))
    p.add_argument("--arch", choices=("resnet50", "resnet18"), default=None,
                   help="backbone (default: the checkpoint's, or resnet50 with --random-init)")
    p.add_argument("--train-split", default="train", help="split of the bank (default: train)")
    p.add_argument("--val-split", default="val", help="split of the queries (default: val)")
    p.add_argument("--objects-per-image", type=positive_int, default=DEFAULT_OBJECTS_PER_IMAGE,
                   help=f"N: at most this many bank objects per train image, class-balanced "
                        f"(default: {DEFAULT_OBJECTS_PER_IMAGE})")
    p.add_argument("--k", type=positive_int, default=20, help="neighbours in the vote (default: 20)")
    p.add_argument("--temperature", type=float, default=0.07,
                   help="vote weights exp(similarity / T) (default: 0.07)")
    p.add_argument("--image-size", type=positive_int, default=224,
                   help="images are resized to this square side in px (default: 224)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default: 32)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0, in this process)")
    p.add_argument("--max-train-images", type=positive_int, default=None, help="use at most this many bank images")
    p.add_argument("--max-val-images", type=positive_int, default=None, help="use at most this many query images")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when a GPU is visible)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if not a.temperature > 0:
        p.error(f"--temperature must be > 0, got {a.temperature}")
    check_image_size(p, "--image-size", a.image_size)
    if a.workers < 0:
        p.error(f"--workers must be >= 0, got {a.workers}")
    device = torch.device(check_device(p, "--device", a.device))
    torch.manual_seed(a.seed)
    try:
        backbone, arch, path = load_backbone(None if a.random_init else a.ckpt, a.arch)
        check_splits(a.data, a.train_split, a.val_split)  # before any feature is extracted
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"error: {e}\n")
    backbone = backbone.to(device, memory_format=torch.channels_last)
    try:  # (the splits' overlap is known once their annotations are read, before any feature)
        res = evaluate_oknn(backbone, a.data, a.train_split, a.val_split, a.objects_per_image, a.k,
                            a.temperature, a.image_size, device, a.batch_size, a.workers,
                            a.max_train_images, a.max_val_images, progress=not a.no_progress)
    except SplitsOverlap as e:
        p.exit(2, f"error: {e}\n")
    res.update(arch=arch, checkpoint=path or "random-init")
    if a.json:
        print(json.dumps(finite_or_none(res)))
    else:
        print(f"O-KNN {res['checkpoint']} ({arch}): top-1 {number(res['top1'])}%  top-5 {number(res['top5'])}%  "
              f"(bank {res['bank_size']}, queries {res['num_queries']})"
              + (f"; position explains {number(100 * res['position_share'], '.0f')}% of the object "
                 "features' variance" if "position_share" in res else "")
              + ("\nThe features are not finite: the network's weights are (a diverged training?)"
                 if not math.isfinite(res["top1"]) else ""))
    return res


if __name__ == "__main__":
    main()
