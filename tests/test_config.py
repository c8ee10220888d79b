"""The training config: presets, command-line overrides of every field, JSON round trips, --help."""
import dataclasses
import json

import pytest

from train import config as C


def test_every_leaf_field_has_a_command_line_option():
    parser = C.build_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    names = [n for n, _, _ in C.leaf_fields(C.TrainConfig()) if n != "preset"]
    assert len(names) > 30
    missing = [n for n in names if f"--{n}" not in options]
    assert not missing, missing


def test_every_field_option_says_what_it_does():
    """--help explains each field: its metadata help or, for the method configs, its source comment."""
    parser = C.build_parser()
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    undocumented = [n for n, _, tp in C.leaf_fields(C.TrainConfig())
                    if n != "preset" and helps[f"--{n}"].startswith(C._type_name(tp))]
    assert not undocumented, undocumented
    assert helps["--colour.hue"].startswith("shift ~ U(-h, h) of the hue circle; float")
    assert helps["--region.dp_boxes"].startswith("Boxes pasted into x3, per image")    # comment block above
    assert helps["--run.epochs"].startswith("training length in epochs")             # metadata help


def test_source_comments():
    @dataclasses.dataclass
    class Demo:
        a: int = 1              # trailing comment
        # a block of
        # two lines
        b: float = 2.0
        c: str = "x#y"
        d: tuple = (1, 2)       # tuple; with = inside: x = y
    assert C.source_comments(Demo) == {"a": "trailing comment", "b": "a block of two lines",
                                       "d": "tuple; with = inside: x = y"}


def test_help_documents_presets_and_fields(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for preset in C.PRESETS:
        assert preset in out
    for name in ("--optim.lr_per_256", "--model.arch", "--view.size", "--region.prc", "--run.epochs",
                 "--data.batch_size", "--resume", "--dali", "--compile", "--data", "--set"):
        assert name in out, name


def test_overrides_are_typed_and_applied_in_order():
    preset, overrides, resume = C.parse_args([
        "--preset", "coco", "--optim.lr_per_256", "0.5", "--set", "model.arch=resnet18",
        "--set", "run.max_steps=7", "--run.channels_last", "false", "--data.synthetic_size", "64,80",
        "--data", "/some/coco", "--dali", "--compile", "--resume", "auto"])
    assert preset == "coco" and resume == "auto"
    cfg = C.make_config(preset, overrides)
    assert cfg.optim.lr_per_256 == 0.5 and isinstance(cfg.optim.lr_per_256, float)
    assert cfg.model.arch == "resnet18"
    assert cfg.run.max_steps == 7 and isinstance(cfg.run.max_steps, int)
    assert cfg.run.channels_last is False
    assert cfg.data.synthetic_size == (64, 80)
    assert cfg.data.path == "/some/coco" and cfg.data.backend == "dali" and cfg.run.compile is True
    # The preset's own values stay where not overridden.
    assert cfg.view.size == C.PRESETS["coco"]["view.size"] and cfg.run.epochs == 800
    # Optional fields accept none.
    cfg2 = C.make_config("default", {"run.max_steps": "none"})
    assert cfg2.run.max_steps is None


@pytest.mark.parametrize("argv, field, want", [
    (["--set", "run.epochs=5", "--run.epochs", "10"], "run.epochs", 10.0),
    (["--run.epochs", "10", "--set", "run.epochs=5"], "run.epochs", 5.0),
    (["--data.path", "/b", "--data", "/a"], "data.path", "/a"),
    (["--data", "/a", "--data.path", "/b"], "data.path", "/b"),
    (["--run.compile", "false", "--compile"], "run.compile", True),
    (["--compile", "--run.compile", "false"], "run.compile", False),
    (["--dali", "--set", "data.backend=cpu"], "data.backend", "cpu"),
])
def test_the_last_setting_of_a_field_wins_whatever_its_form(argv, field, want):
    """--FIELD, --set and the aliases were applied in a fixed order of kinds, whatever the order given."""
    preset, overrides, _ = C.parse_args(argv)
    assert C.get_field(C.make_config("default", overrides), field) == want


def test_set_preset_is_refused_for_what_it_would_not_do(capsys):
    with pytest.raises(SystemExit):
        C.parse_args(["--set", "preset=coco"])
    assert "use --preset NAME" in capsys.readouterr().err


def test_one_region_per_step_is_refused():
    """Training-mode BatchNorm in res5 and the heads needs two regions (it failed deep in torch)."""
    with pytest.raises(ValueError, match="data.batch_size x view.num_boxes must be >= 2"):
        C.make_config("default", {"data.batch_size": "1", "view.num_boxes": "1"})
    assert C.make_config("default", {"data.batch_size": "1", "view.num_boxes": "2"}).data.batch_size == 1


def test_fields_the_method_does_not_read_are_named():
    soco, d3ssl = C.make_config("soco"), C.make_config("default")
    names = ["region.prc", "model.temperature", "soco_aug.cutout_p", "optim.lr_per_256", "model.queue_size"]
    assert C.ignored_fields(soco, names) == ["region.prc", "model.temperature", "model.queue_size"]
    assert C.ignored_fields(d3ssl, names) == ["soco_aug.cutout_p"]
    assert all(C.ignored_fields(soco, [f]) == [f] for f in ("model.use_dp", "model.teacher_view1"))


def test_presets_are_small_overrides_of_the_dataclass():
    base = C.TrainConfig()
    for name, overrides in C.PRESETS.items():
        cfg = C.make_config(name)
        assert cfg.preset == name
        changed = [n for n, _, _ in C.leaf_fields(base)
                   if n != "preset" and C.get_field(cfg, n) != C.get_field(base, n)]
        assert set(changed) <= set(overrides), (name, set(changed) - set(overrides))
        assert len(overrides) < 25
    assert C.make_config("soco").model.method == "soco"
    assert C.make_config("default").model.method == "d3ssl"
    coco = C.make_config("coco")
    assert coco.model.arch == "resnet50" and coco.view.size == 224 and coco.run.epochs == 800
    assert coco.optim.lr_per_256 == 1.0 and coco.optim.warmup_epochs == 10
    for name, field in (("no_prc", "region.prc"), ("no_prm", "region.prm"), ("no_rbj", "region.rbj"),
                        ("no_dp", "model.use_dp")):
        assert C.get_field(C.make_config(name), field) is False
        assert C.get_field(C.make_config("default"), field) is True


@pytest.mark.parametrize("argv, match", [
    (["--set", "optim.no_such=1"], "unknown config field 'optim.no_such'"),
    (["--set", "optim=1"], "unknown config field 'optim'"),
    (["--optim.accum_steps", "two"], "optim.accum_steps: cannot read 'two' as int"),
    (["--run.compile", "maybe"], "run.compile: cannot read 'maybe' as bool"),
    (["--data.synthetic_size", "1,2,3"], "data.synthetic_size: cannot read"),
    # values of the right type that a section's own checks refuse, caught when the config is made
    (["--view.size", "3"], "ViewConfig.size must be an even number"),
    (["--set", "model.arch=vgg16"], "ModelConfig.arch must be one of"),
    (["--region.dp_boxes", "-1"], "RegionConfig.dp_boxes must be an int >= 0"),
    (["--run.oknn_random_draws", "0"], "run.oknn_random_draws must be >= 1"),
])
def test_bad_overrides_name_the_field(argv, match):
    preset, overrides, _ = C.parse_args(argv)
    with pytest.raises(ValueError, match=match):
        C.make_config(preset or "default", overrides)


def test_json_with_a_bad_value_is_refused(tmp_path):
    d = C.to_dict(C.make_config("default"))
    d["view"]["crop_scale"] = [0.9, 0.2]
    with pytest.raises(ValueError, match="ViewConfig.crop_scale"):
        C.from_dict(d)


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        C.parse_args(["--preset", "imagenet"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset 'imagenet'"):
        C.make_config("imagenet")


def test_json_round_trip(tmp_path):
    cfg = C.make_config("no_rbj", {"optim.accum_steps": "3", "data.synthetic_size": "40,50",
                                   "run.name": "x"})
    path = tmp_path / "config.json"
    C.save_json(cfg, path)
    json.loads(path.read_text())  # plain JSON
    back = C.load_json(path)
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    with pytest.raises(ValueError, match="unknown config field 'optim.nope'"):
        C.from_dict({"optim": {"nope": 1}})


def test_parse_value_generic_types():
    @dataclasses.dataclass
    class Leaf:
        f: float = 1.0
        t: tuple[float, float] = (0.2, 0.5)
        v: tuple[int, ...] = (1,)
        s: str | None = None

    @dataclasses.dataclass
    class Root:
        leaf: Leaf = dataclasses.field(default_factory=Leaf)
    r = Root()
    C.apply_overrides(r, {"leaf.f": "2e-3", "leaf.t": "(0.1, 0.4)", "leaf.v": "3,4,5", "leaf.s": "abc"})
    assert r.leaf == Leaf(2e-3, (0.1, 0.4), (3, 4, 5), "abc")
    C.set_field(r, "leaf.s", "none")
    assert r.leaf.s is None


@pytest.mark.parametrize("override, message", [
    ("run.oknn_k=0", "run.oknn_k must be >= 1"),
    ("run.oknn_temperature=0", "run.oknn_temperature must be > 0"),
    ("run.oknn_image_size=16", "run.oknn_image_size must be >= 32"),
    ("run.log_every=0", "run.log_every must be >= 1"),
    ("run.ckpt_every=0", "run.ckpt_every must be >= 1"),
    ("run.threads=0", "run.threads must be >= 1"),
    ("run.max_steps=-1", "run.max_steps must be >= 0"),
    ("run.keep_ckpts=-1", "run.keep_ckpts must be >= 0"),
    ("run.amp=fp8", "run.amp must be"),
    ("run.device=tpu", "run.device must be"),
    ("data.workers=-1", "data.workers must be >= 0"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("optim.lr_per_256=nan", "optim.lr_per_256 must be > 0"),
    ("optim.momentum=1", "optim.momentum must be in"),
    ("region.prc_scale=0.5", "takes 2 comma-separated values"),
    ("region.prm_ratio=1.5,0.5", "min must not exceed max"),
    ("data.synthetic_size=300,200", "min must not exceed max"),
    ("region.rbj_p=1.5", "probability"),
    ("colour.blur_p=1.0,1.5", "probability"),
    ("region.fill=inf", "must be finite"),
    ("run.epochs=0.5", "optim.warmup_epochs .* is longer than run.epochs"),
    ("data.synthetic_val=0", "data.synthetic_val must be >= 1 with run.oknn on"),
])
def test_bad_values_are_refused_naming_the_field(override, message):
    name, value = override.split("=")
    with pytest.raises(ValueError, match=message):
        C.make_config("default", {name: value})


def test_values_at_the_limits_are_accepted():
    # 0 keeps its meaning where it had one: keep every checkpoint, no step limit, all cores
    cfg = C.make_config("default", {"run.keep_ckpts": "0", "run.max_steps": "0", "data.proposal_workers": "0"})
    assert cfg.run.keep_ckpts == 0 and cfg.run.max_steps == 0 and cfg.data.proposal_workers == 0
    cfg = C.make_config("default", {"run.max_steps": "none", "run.threads": "1", "data.workers": "0",
                                    "region.rbj_p": "1", "colour.blur_p": "0,0", "region.prc_scale": "0.3,0.3",
                                    "optim.warmup_epochs": "15", "run.epochs": "15", "run.device": "cuda:1"})
    assert cfg.run.max_steps is None and cfg.region.prc_scale == (0.3, 0.3) and cfg.run.device == "cuda:1"


def test_help_shows_the_chosen_presets_values(capsys):
    for preset, queue in (("default", "256"), ("coco", "65536")):
        with pytest.raises(SystemExit):
            C.parse_args(["--preset", preset, "--help"] if preset != "default" else ["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert f"--model.queue_size V negatives" in out and f"{preset} preset: {queue}" in out, preset


def test_print_config_prints_what_the_command_line_gives(capsys):
    from train import run as trainer
    trainer.main(["--preset", "coco", "--set", "run.epochs=20", "--data", "/somewhere", "--print-config"])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "coco" and cfg["model"]["arch"] == "resnet50" and cfg["run"]["epochs"] == 20
    assert cfg["data"]["path"] == "/somewhere"


def test_a_saved_config_that_the_checks_refuse_can_be_overridden_on_resume():
    """A run's saved config is checked only with the resuming command line's changes applied, so a
    value an older version accepted can be replaced there."""
    saved = C.to_dict(C.make_config("default"))
    saved["run"]["log_every"] = 0
    with pytest.raises(ValueError, match="run.log_every must be >= 1"):
        C.from_dict(saved)
    cfg = C.apply_overrides(C.from_dict(saved, check=False), {"run.log_every": "5"})
    assert cfg.run.log_every == 5
