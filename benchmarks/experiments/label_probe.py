"""Experiment: what can a ResNet-C4 learn of a dataset's classes *with labels* in a short budget?

Trains the backbone from random weights with the ground-truth classes (images resized to a square
of --size px, random horizontal flips; each object's feature is RoIAlign on C4 -> res5 -> average
pool, as in training, then a linear classifier; SGD with a one-cycle schedule), then reports the
classifier's accuracy on the train and val objects and the backbone's O-KNN. It bounds what the
self-supervised main job can show on the same data and resolution: a view size at which even
labels do not generalise to the val objects cannot give O-KNN gains either.

  python benchmarks/experiments/label_probe.py [--data DIR] [--size 64] [--steps 300] [--oknn-size 128]

Without --data it uses the main job's synthetic set (generated on first use, like the trainer).
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from d3ssl.eval.oknn import ObjectImages, _collate, evaluate_oknn, load_objects  # noqa: E402
from d3ssl.model.resnet_c4 import C4_STRIDE, ResNetC4  # noqa: E402
from d3ssl.ops import as_rois  # noqa: E402


def _features(net, images, boxes, size):
    """Object features as in training: RoIAlign on C4 (output ~size/16) -> res5 -> average pool."""
    return net.pool_rois(net.c4(images), as_rois(boxes, images), max(size // C4_STRIDE, 1))


def _loader(data, split, size, shuffle, seed=0):
    records = load_objects(data, split)
    if not records:
        raise ValueError(f"split {split!r} of {data!r} has no objects")
    # (a split of fewer than 32 images trains on batches of all of them)
    return torch.utils.data.DataLoader(ObjectImages(records, size), batch_size=min(32, len(records)),
                                       shuffle=shuffle, collate_fn=_collate, drop_last=shuffle,
                                       generator=torch.Generator().manual_seed(seed))


def accuracy(net, head, loader, size):
    """Share of the loader's objects whose class the classifier gets right (net in eval mode)."""
    net.eval()
    right = total = 0
    with torch.no_grad():
        for images, boxes, labels in loader:
            pred = head(_features(net, images, boxes, size)).argmax(1)
            right += int((pred == labels).sum())
            total += len(labels)
    return right / max(total, 1)


def train_with_labels(data, size=64, steps=300, arch="resnet18", lr=0.1, seed=0, log=print):
    """Returns (backbone, classifier) after `steps` SGD steps of batch 32 on the train objects."""
    torch.manual_seed(seed)
    loader = _loader(data, "train", size, shuffle=True, seed=seed)
    num_classes = int(max(int(r[2].max()) for r in loader.dataset.records)) + 1
    net = ResNetC4(arch)
    head = torch.nn.Linear(net.out_channels, num_classes)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    step, start = 0, time.time()
    net.train()
    while step < steps:
        for images, boxes, labels in loader:
            if torch.rand(()) < 0.5:   # horizontal flip of the whole batch
                images = images.flip(3)
                boxes = [torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], 1) for b in boxes]
            loss = F.cross_entropy(head(_features(net, images, boxes, size)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                log(f"step {step}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f} s")
            if step >= steps:
                break
    return net, head


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", help="COCO-format folder with train and val splits (default: the main "
                                   "job's synthetic set)")
    ap.add_argument("--size", type=int, default=64, help="square side of the training images (px)")
    ap.add_argument("--steps", type=int, default=300, help="SGD steps of batch 32")
    ap.add_argument("--oknn-size", type=int, default=128, help="O-KNN image side (px), as the main job")
    ap.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.size < C4_STRIDE or a.steps < 1 or a.oknn_size < 32:
        ap.error("--size must be >= 16, --steps >= 1 and --oknn-size >= 32")
    data = a.data
    if data is None:
        from train.config import make_config
        data = make_config("default").data.ensure_synthetic()
    net, head = train_with_labels(data, a.size, a.steps, a.arch, seed=a.seed)
    for split in ("train", "val"):
        print(f"classifier accuracy, {split} objects: "
              f"{100 * accuracy(net, head, _loader(data, split, a.size, False), a.size):.1f} %")
    res = evaluate_oknn(net, data, image_size=a.oknn_size)
    print(f"O-KNN at {a.oknn_size} px: top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f} "
          f"({res['num_queries']} queries, bank {res['bank_size']})")


if __name__ == "__main__":
    main()
