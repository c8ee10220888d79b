"""benchmarks/experiments/label_probe.py: the supervised bound on what the main job can show."""
import torch

from benchmarks.experiments import label_probe
from d3ssl.data.synthetic import ensure_synthetic
from d3ssl.eval.oknn import load_objects


def _data(tmp_path):
    return ensure_synthetic(root=str(tmp_path), seed=0, num_train=12, num_val=6, image_size=(64, 80),
                            objects=(1, 2), workers=1)


def test_accuracy_counts_objects(tmp_path):
    """A classifier that always answers class c is right exactly for the objects of class c."""
    data = _data(tmp_path)
    net = label_probe.ResNetC4("resnet18")
    labels = torch.cat([torch.from_numpy(r[2]) for r in load_objects(data, "val")])
    c = int(torch.mode(labels).values)
    head = torch.nn.Linear(net.out_channels, 13)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[c] = 1.0
    got = label_probe.accuracy(net, head, label_probe._loader(data, "val", 64, False), 64)
    assert got == (labels == c).float().mean().item()


def test_training_fits_the_labels(tmp_path):
    """A few dozen steps on a dozen images must fit their objects' classes better than chance."""
    data = _data(tmp_path)
    net, head = label_probe.train_with_labels(data, size=64, steps=40, lr=0.05, log=lambda *_: None)
    acc = label_probe.accuracy(net, head, label_probe._loader(data, "train", 64, False), 64)
    assert acc > 0.5, acc


def test_main_prints_the_three_figures(tmp_path, capsys):
    label_probe.main(["--data", _data(tmp_path), "--size", "64", "--steps", "2", "--oknn-size", "64"])
    out = capsys.readouterr().out
    assert "accuracy, train objects" in out and "accuracy, val objects" in out and "O-KNN at 64 px" in out
