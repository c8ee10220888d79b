"""Train D3SSL (or the SoCo baseline): ``python -m train.run [--preset NAME] [--FIELD VALUE ...]``.

With no arguments this is the main job: it generates the embedded synthetic set and its proposals
if they are missing, trains the ``default`` preset on whatever device is there, evaluates O-KNN for
the trained network and for the same network at random initialisation, and leaves a run folder:

    runs/<name>/config.json  log.jsonl  tensorboard/  checkpoints/step_*.pt  loss_lr.png  oknn.json

Under ``torchrun --nproc_per_node N -m train.run ...`` it trains with DDP (NCCL on GPUs, gloo on CPUs),
SyncBatchNorm and a loader sharded by rank; only rank 0 writes files.

The loop reads top to bottom: config -> device -> data -> model -> optimiser -> resume -> steps ->
final checkpoint -> O-KNN. Every step: lr and EMA momentum from pure schedule functions, then
train/step.py's TrainStep: region stage, forward/backward over `accum_steps` micro-batches, a skip if
the loss is not finite anywhere, LARS step, teacher EMA update (ordered so that the GPU never waits
for the host; the throughput benchmark times the same code).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from d3ssl.cli import file_in_the_way, finite_or_none, number
from d3ssl.data.stopping import (SignalWatcher, announce_stop, clear_stop, interrupted_twice, new_stop_flag,
                                 reset_interrupts)
from train import checkpoint as ckpt
from train.step import TrainStep, loader_options
from train.config import (PRESET_WANTS_DATA, PRESETS, TrainConfig, from_dict, get_field, ignored_fields,
                          load_json, make_config, parse_args, save_json, to_dict, apply_overrides)
from train.logging import NullLogger, RunLogger, plot_loss_lr


class TrainingError(RuntimeError):
    """A run stopped for a reason the user has to act on (the message says what)."""


class DataError(TrainingError):
    """The loader gave up on the data (too many unreadable images in a row: a wrong dataset path)."""


# fp16: steps whose gradients overflow are GradScaler's calibration (each halves its scale), so they
# do not count against run.max_bad_steps. 64 in a row take its initial scale of 2^16 to 2^-48, where
# gradients that fit in fp16 cannot overflow: they are infinite at any scale, and the run stops.
MAX_OVERFLOWS_IN_A_ROW = 64


def _loader_failure(e: Exception) -> DataError:
    """A DataError saying why the loader gave up: a worker's exception arrives with its traceback
    as text, whose last line is the error itself."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return DataError(f"data: the loader failed: {lines[-1] if lines else type(e).__name__}")


# ----------------------------------------------------------------------------- setup helpers

def setup_distributed(cfg: TrainConfig):
    """Returns (rank, world_size, local_rank, device). Initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("run.device=cuda was asked for but no GPU is visible to torch; "
                            "use --run.device cpu (or auto)")
    if want.startswith("cuda"):
        import d3ssl
        if not d3ssl.cuda_kernels_available():
            raise TrainingError(
                "a GPU is visible but d3ssl's operator library was built without its CUDA kernels "
                f"(build info: {d3ssl.build_info() or 'none'}): rebuild it where a CUDA toolkit is found "
                "(`pip install --no-build-isolation -e .`, CUDA_HOME=... if it is not found), or train on "
                "the CPU with --run.device cpu")
    if want == "cuda":
        device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device(want)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local, device


def amp_dtype(cfg: TrainConfig, device: torch.device):
    """The autocast dtype of run.amp (checked by the config) on `device`; None: no autocast."""
    choice = cfg.run.amp
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[choice]


def make_scaler(device: torch.device, dtype) -> torch.amp.GradScaler:
    """The GradScaler of a run whose autocast dtype is `dtype`: enabled for fp16 only."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def configure_backends(cfg: TrainConfig, device: torch.device):
    """Process-wide settings of the GPU libraries for training on `device` (none on a CPU)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.run.cudnn_benchmark)


def seed_everything(seed: int):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_data(cfg: TrainConfig, rank: int, world: int):
    """(dataset, store, oknn_root(root)). Rank 0 generates what is missing; the others wait."""
    from d3ssl.data.datasets import open_dataset
    from d3ssl.data.proposals import ProposalStore, default_store_path, generate_proposals

    from d3ssl.cli import output_file_problem
    # checked now: a missing store is made there after minutes of selective search
    problem = cfg.data.proposals and output_file_problem("--proposals", cfg.data.proposals)
    if problem:
        raise TrainingError(problem)

    def make():
        if cfg.data.path:
            root = cfg.data.path
            if not os.path.exists(root):
                raise TrainingError(f"--data {root!r} does not exist (expected a COCO-format dataset "
                                    "root or an image folder)")
        else:
            if rank == 0:
                print("data: embedded synthetic set (generated on first use) ...", flush=True)
            root = cfg.data.ensure_synthetic()
            if rank == 0:
                print(f"data: {root}", flush=True)
        dataset = open_dataset(root, "train")
        store_path = cfg.data.proposals or default_store_path(dataset)
        if not os.path.isfile(store_path):
            if rank == 0:
                print(f"proposals: {store_path} is missing; running selective search over "
                      f"{len(dataset)} images ...", flush=True)
            generate_proposals(dataset, store_path, workers=cfg.data.proposal_workers)
        return root, dataset, store_path

    if rank == 0:
        root, dataset, store_path = make()
    if world > 1:
        dist.barrier()
    if rank != 0:
        root, dataset, store_path = make()  # everything exists now: only opens
    store = ProposalStore(store_path)
    if rank == 0:
        try:
            store.check_matches(dataset)
            again, _, unreadable = store.readable_again(dataset)
        except ValueError:  # (a store of other images: the loader's error to report)
            again = None
        if again:
            print(f"warning: {again!r} (one of the {unreadable} image(s) that were unreadable when "
                  f"{store_path} was made) reads now, but has the whole-image box there instead of "
                  f"proposals: delete {store_path} to make the store again", file=sys.stderr, flush=True)
    return dataset, store, oknn_root(root)


def oknn_root(root: str) -> tuple[str | None, str]:
    """(`root`, "") when O-KNN can run on it: COCO-format train and val splits with ground truth,
    under the names d3ssl.eval.oknn.resolve_split accepts (instances_val.json or
    instances_val2017.json, ...); else (None, why not)."""
    from d3ssl.eval.oknn import check_splits
    if not os.path.isdir(root):
        return None, f"--data {root!r} is not a COCO-format folder with train and val ground truth"
    try:
        check_splits(root, "train", "val")
    except (FileNotFoundError, ValueError) as e:  # (ValueError: both splits are one annotation file)
        return None, str(e)
    return root, ""


def make_data_loader(cfg: TrainConfig, dataset, store, rank, world, device):
    from d3ssl.data.loader import make_loader
    if cfg.data.backend == "dali":
        try:  # only d3ssl/data/dali.py imports DALI by name; this is an availability check
            importlib.import_module("nvidia.dali")
        except ImportError:
            raise TrainingError("--dali: NVIDIA DALI is not installed. Install it with "
                                "`pip install -e .[dali]` (or nvidia-dali-cuda130), or drop --dali to "
                                "use the CPU loader.") from None
        if device.type != "cuda" and rank == 0:
            print("note: --dali without a GPU runs DALI's CPU operators, slower here than the CPU loader "
                  "(README, Status)", file=sys.stderr, flush=True)
    try:
        return make_loader(dataset, store, backend=cfg.data.backend, batch_size=cfg.data.batch_size,
                           workers=cfg.data.workers, view_cfg=cfg.view, colour_cfg=cfg.colour,
                           seed=cfg.run.seed, rank=rank,
                           world_size=world, drop_last=True, device=device,
                           **loader_options(device, amp_dtype(cfg, device)))
    except (ImportError, NotImplementedError) as e:
        if cfg.data.backend == "dali":
            raise TrainingError(f"--dali: the DALI backend is not available ({e}). Install DALI with "
                                "`pip install -e .[dali]`, or drop --dali to use the CPU loader.") from e
        raise
    except ValueError as e:
        if "no full batch" in str(e):
            raise TrainingError(f"{e.args[0].split(';')[0]}: lower --data.batch_size") from None
        raise TrainingError(f"data: {e}") from None


def check_resumed_step_size(saved_shape: tuple[int, int], world: int, cfg: TrainConfig, master: bool):
    """Resuming a checkpoint whose run had `saved_shape` = (processes, images per optimiser step):
    the steps must stay the same size, as the learning rate, its schedule and the epoch that a step
    belongs to all follow from it. With another number of processes and the same step size the run
    goes on (the data are sharded anew from the next epoch on; the rest of the current one is drawn
    from the new shards, so within it some images may come twice and others not at all)."""
    saved_world, saved_images = saved_shape
    batch, accum = cfg.data.batch_size, cfg.optim.accum_steps
    images = batch * accum * world
    if images != saved_images:
        per_micro = world * batch
        hint = (f"--optim.accum_steps {saved_images // per_micro}" if saved_images % per_micro == 0 else
                f"--data.batch_size {saved_images // (world * accum)}" if saved_images % (world * accum) == 0
                else "as many images per step")
        raise TrainingError(
            f"--resume: the checkpoint's run took {saved_images} images per optimiser step "
            f"({saved_world} process(es)); this one would take {images} ({world} process(es) x "
            f"data.batch_size {batch} x optim.accum_steps {accum}). The learning rate, its schedule and the "
            f"epochs follow from that number: resume with {hint}.")
    if world != saved_world and master:
        print(f"warning: resuming on {world} process(es) a run of {saved_world}: the same {images} "
              "images per step, but if the checkpoint is inside an epoch, the rest of that epoch is "
              "drawn from the new shards (some of its images may come twice, others not at all)",
              file=sys.stderr, flush=True)


def new_run_name() -> str:
    """A fresh run folder's default name: the time, and a random suffix so that runs started in the
    same second (a job array) never share a folder."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _saved_method(run_dir: str) -> str | None:
    """model.method of the run in `run_dir` (its config.json), None when that cannot be read."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)["model"]["method"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_run_dir(cfg: TrainConfig, resume: str | None, explicit: dict | None = None) -> tuple[str, str | None]:
    """(run folder, checkpoint to resume from or None). Never reuses a non-empty folder silently.
    `--resume auto` without a name takes the newest run of the output folder, of the method that
    `explicit` (the command line's options with its preset's) asks for, if it asks for one."""
    out = cfg.run.out
    name = cfg.run.name
    if name is not None and (not name or name in (".", "..") or "/" in name or os.sep in name):
        raise TrainingError(f"--name {name!r}: give a folder name (no path): the run goes to --out/NAME")
    if resume and resume != "auto":
        if os.path.isdir(resume):
            run_dir = resume
            path = ckpt.latest_checkpoint(run_dir)
            if path is None:
                raise TrainingError(f"--resume {resume!r}: no checkpoints in {run_dir}/checkpoints")
        elif os.path.isfile(resume):
            path = resume
            parent = os.path.dirname(os.path.abspath(resume))
            if os.path.basename(parent) != "checkpoints":  # the run folder would be a guess
                raise TrainingError(f"--resume {resume!r}: a checkpoint file must sit in a run folder's "
                                    "checkpoints/ (the run continues in that folder); give the run "
                                    "folder, or copy the file into <run folder>/checkpoints/")
            run_dir = os.path.dirname(parent)
        else:
            raise TrainingError(f"--resume {resume!r}: no such file or folder (give `auto`, a run folder or a "
                                "checkpoint file)")
        return run_dir, path
    if resume == "auto":
        if cfg.run.name:
            run_dir = os.path.join(out, cfg.run.name)
        else:
            candidates = [os.path.join(out, d) for d in os.listdir(out)] if os.path.isdir(out) else []
            runs = [d for d in candidates if os.path.isfile(os.path.join(d, "config.json"))]
            method = (explicit or {}).get("model.method")
            # (a run keeps its method: a run of another one is no candidate)
            candidates = [d for d in runs if method is None or _saved_method(d) in (method, None)]
            run_dir = max(candidates, key=os.path.getmtime) if candidates else None
            if runs and run_dir != max(runs, key=os.path.getmtime):
                print(f"--resume auto: {'resuming ' + run_dir if run_dir else 'a new run'}, as the newer "
                      f"runs in {out} are not of model.method={method}", file=sys.stderr, flush=True)
            if run_dir is None:
                run_dir = os.path.join(out, new_run_name())
        return run_dir, ckpt.latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    run_dir = os.path.join(out, cfg.run.name or new_run_name())
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise TrainingError(f"run folder {run_dir} already exists and is not empty: pass --resume auto "
                            "to continue it, or choose another --name")
    return run_dir, None


def check_writable(run_dir: str):
    """Fails early, before the data are prepared, when the run folder could not be written: its
    parent is created if missing (the run folder itself only once the run starts)."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    target = run_dir if os.path.isdir(run_dir) else parent
    blocker = file_in_the_way(run_dir)
    if blocker:
        raise TrainingError(f"--out: {blocker} is a file, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"--out: cannot create {parent}: {e.strerror or e}") from None
    if not os.path.isdir(target) or not os.access(target, os.W_OK | os.X_OK):
        raise TrainingError(f"--out: {target} is not a writable folder")


def build_model(cfg: TrainConfig, num_images: int, device, world: int, seed: int | None = None):
    """The method (student, teacher, queue) on `device`, in channels_last, SyncBN under DDP; its
    initial weights are a function of `seed` (default: cfg.run.seed, as training's)."""
    from d3ssl.model import build_method
    torch.manual_seed(cfg.run.seed if seed is None else seed)
    # The queue never holds more region features than one pass over the data produces.
    model = build_method(cfg.model, max_queue=num_images * cfg.view.num_boxes)
    if world > 1 and cfg.model.sync_bn and device.type == "cuda":
        # (DDP supports SyncBatchNorm on GPUs only; on CPUs rank 0's BN statistics are broadcast.)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(cfg: TrainConfig, method, lr: float):
    """LARS over `method`'s trainable parameters with the config's settings (its lr is set per step)."""
    from d3ssl.model import LARS, param_groups_for_lars
    return LARS(param_groups_for_lars(method, cfg.optim.weight_decay), lr=lr, momentum=cfg.optim.momentum,
                weight_decay=cfg.optim.weight_decay, trust_coefficient=cfg.optim.trust_coefficient)


def make_region_stage(cfg: TrainConfig):
    """The method's region stage as `stage(batch, generator) -> RegionViews`, made once per loop.

    D3SSL's is a `RegionStage` (`region_stage` with the run's RegionConfig bound); SoCo's is
    `soco_stage` with the run's SocoAugConfig."""
    from d3ssl.augment.stage import RegionStage, soco_stage
    if cfg.model.method == "soco":
        return functools.partial(soco_stage, cfg=cfg.soco_aug)
    return RegionStage(cfg.region)


def state_checksum(model) -> dict:
    """{"params", "buffers"}: float64 sums of the parameters and of the floating buffers (teacher,
    queue, BN statistics); equal on every rank when the ranks are in sync."""
    def total(ts):
        return float(sum(t.double().sum() + t.double().abs().sum() * 1e-3 for t in ts))
    with torch.no_grad():
        return {"params": total(model.parameters()),
                "buffers": total(b for b in model.buffers() if b.is_floating_point())}


# ----------------------------------------------------------------------------- the main job

_CURRENT = {"run_dir": None, "phase": None}  # the run in progress (for main's message on Ctrl-C)


def train(cfg: TrainConfig, resume: str | None = None, explicit: dict | None = None,
          command_line: dict | None = None) -> dict:
    """Runs training (and O-KNN) for `cfg`; returns a summary dict. `explicit` are the command-line
    overrides with the preset's, re-applied on top of a resumed run's saved config; `command_line`
    those given as options alone (a note names those the run's method does not read)."""
    rank, world, local_rank, device = setup_distributed(cfg)
    master = rank == 0
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)

    # --- run folder, resume point, config --------------------------------------------------------
    run_dir, resume_path = resolve_run_dir(cfg, resume, explicit) if master else (None, None)
    if world > 1:
        shared = [run_dir, resume_path]
        dist.broadcast_object_list(shared, src=0)
        run_dir, resume_path = shared
    _CURRENT["run_dir"] = run_dir
    saved_shape = None  # (processes, images per step) of the run that wrote the checkpoint
    changed = []        # "field saved -> given" for the saved config's fields this command line changes
    if resume_path is not None or (resume and os.path.isfile(os.path.join(run_dir, "config.json"))):
        # Continue with the run's own config; only what was given on this command line changes it.
        # The saved values are checked together with this command line's, so that one of them that
        # the checks refuse (a config saved by an older version) can be overridden here.
        try:
            if resume_path:
                saved_state = ckpt.load_checkpoint(resume_path)
                saved = from_dict(saved_state["config"], check=False)
                if "world_size" in saved_state:  # (not in checkpoints written before 2026-11-28)
                    saved_shape = saved_state["world_size"], saved_state["images_per_step"]
                del saved_state
            else:
                saved = load_json(os.path.join(run_dir, "config.json"), check=False)
            overrides = {k: v for k, v in (explicit or {}).items() if k not in ("run.name", "run.out")}
            before = {k: get_field(saved, k) for k in overrides}
            cfg = apply_overrides(saved, overrides)
            changed = [f"{k} {before[k]!r} -> {get_field(cfg, k)!r}" for k in overrides
                       if get_field(cfg, k) != before[k]]
        except ValueError as e:
            raise TrainingError(f"--resume: the run's saved config with this command line's changes: {e} "
                                "(override a saved value with --FIELD VALUE)") from None
        except RuntimeError as e:  # a damaged or foreign checkpoint file
            raise TrainingError(f"--resume: {e}") from None
        # (before the step size's check, whose advice assumes the same model)
        another = [c for c in changed if c.split()[0] in ("model.method", "model.arch")]
        if another:
            raise TrainingError(
                f"--resume: {run_dir} is a run of model.method={before.get('model.method', cfg.model.method)!r}, "
                f"model.arch={before.get('model.arch', cfg.model.arch)!r}; this command line changes "
                f"{'; '.join(another)} (an option, or its --preset's): a run keeps its model. Resume it "
                "without that, or start a new run (--name)")
    if master:
        check_writable(run_dir)
        ignored = ignored_fields(cfg, command_line or {})   # (a resumed run's method, where it resumes)
        if ignored:
            print(f"note: model.method={cfg.model.method} does not read {', '.join(ignored)}: "
                  "they change nothing in this run", file=sys.stderr, flush=True)
    if saved_shape is not None:
        check_resumed_step_size(saved_shape, world, cfg, master)
    dtype = amp_dtype(cfg, device)
    configure_backends(cfg, device)
    seed_everything(cfg.run.seed + rank)

    # --- data -------------------------------------------------------------------------------------
    new_stop_flag()  # (before the loader starts its workers, which find the flag in their environment)
    # (before the run folder exists: a run that cannot start leaves no folder behind to block its
    # retry, or for --resume auto to pick up)
    try:
        dataset, store, oknn_data = prepare_data(cfg, rank, world)
    except (ValueError, OSError, ImportError) as e:  # unreadable, empty or mismatched data, proposals
        # store, or an OpenCV without selective search
        raise TrainingError(f"data (--data, --proposals): {e}") from None
    loader = make_data_loader(cfg, dataset, store, rank, world, device)
    accum = cfg.optim.accum_steps
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch < 1:
        raise TrainingError(f"one epoch gives {len(loader)} batches of {cfg.data.batch_size} per process, "
                            f"fewer than optim.accum_steps={accum}: lower data.batch_size or accum_steps")
    total_steps = max(1, math.ceil(cfg.run.epochs * steps_per_epoch))
    last_step = min(total_steps, cfg.run.max_steps) if cfg.run.max_steps else total_steps
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    images_per_step = cfg.data.batch_size * accum * world
    base_lr = cfg.optim.lr_per_256 * images_per_step / 256
    created_run_dir = master and not os.path.isdir(run_dir)  # by this invocation (removed if it fails to start)
    if master:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)

    # --- model and optimiser ------------------------------------------------------------------------
    from d3ssl.model import lr_schedule, momentum_schedule
    model = build_model(cfg, len(dataset), device, world)
    raw = model  # the method itself: update_teacher, online_backbone, state_dict
    if world > 1:
        # The queue is filled from all ranks by the method itself, so it is equal everywhere. BN
        # statistics: SyncBN keeps them equal on GPUs; on CPUs DDP broadcasts rank 0's each step.
        synced_bn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else "broadcast_buffers")  # (renamed in newer torch)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    **{sync_kw: not synced_bn})
    forward = torch.compile(model) if cfg.run.compile else model
    optimizer = make_optimizer(cfg, raw, base_lr)
    scaler = make_scaler(device, dtype)
    generator = torch.Generator(device=device)
    stage = make_region_stage(cfg)

    step, skipped_total, bad_in_a_row, overflows, overflows_in_a_row = 0, 0, 0, 0, 0
    if resume_path:
        state = ckpt.load_checkpoint(resume_path, map_location=device)
        try:
            raw.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            lines = [line.strip() for line in str(e).strip().splitlines()]
            what = (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0])[:200].rstrip(".")
            raise TrainingError(
                f"--resume: the checkpoint {resume_path} does not fit the model this command line builds "
                f"({what}). "
                + (f"Options changed from the run's config: {'; '.join(changed)}: resume without those "
                   "that shape the model or its queue, or start a new run (--name)." if changed else
                   "The checkpoint was written by another version of the model code.")) from None
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        step, skipped_total = state["step"], state["stats"].get("skipped", 0)
        bad_in_a_row = state["stats"].get("bad_in_a_row", 0)  # a streak of skips goes on counting
        overflows = state["stats"].get("overflows", 0)
        overflows_in_a_row = state["stats"].get("overflows_in_a_row", 0)
        if master:
            print(f"resumed from {resume_path} at step {step}", flush=True)
            if step >= last_step:
                print(f"note: the run is at its last step already ({last_step}: run.epochs {cfg.run.epochs:g}"
                      f"{f', run.max_steps {cfg.run.max_steps}' if cfg.run.max_steps else ''}): nothing to "
                      "train; a larger run.epochs or run.max_steps goes on", flush=True)
            folder, later = ckpt.set_aside_later(run_dir, step)
            if later:
                print(f"the run's checkpoints of later steps ({', '.join(map(str, later))}) were moved to "
                      f"{folder}: this run goes on from step {step}", flush=True)
    if master:
        # (written once the checkpoint is known to fit: a refused resume leaves the run as it was)
        save_json(cfg, os.path.join(run_dir, "config.json"))
        ckpt.remove_temporaries(run_dir)

    logger = RunLogger(run_dir, start_step=step) if master else NullLogger()
    logger.event("resume" if resume_path else "start", step=step, world_size=world, device=str(device),
                 total_steps=total_steps, steps_per_epoch=steps_per_epoch, base_lr=base_lr)

    def save(at_step):
        if not master:
            return
        state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                 "step": at_step, "epoch": at_step // steps_per_epoch,
                 "world_size": world, "images_per_step": images_per_step,
                 "rng": ckpt.rng_state(generator), "config": to_dict(cfg),
                 "stats": {"skipped": skipped_total, "bad_in_a_row": bad_in_a_row, "overflows": overflows,
                           "overflows_in_a_row": overflows_in_a_row}}
        ckpt.atomic_save(state, ckpt.checkpoint_path(run_dir, at_step))
        ckpt.prune_checkpoints(run_dir, cfg.run.keep_ckpts)

    # SIGTERM/SIGINT: finish the current step, save, exit. A second SIGINT interrupts at once. The
    # loader's workers, when signalled with this process, wait for it (d3ssl/data/stopping.py).
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        announce_stop()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    from d3ssl.data.datasets import UnreadableData

    def batches():
        """(epoch, batch) forever from `step`; a resumed run skips what its epoch already used."""
        epoch, skip = divmod(step * accum, steps_per_epoch * accum)
        while True:
            loader.set_epoch(epoch)
            try:
                for i, batch in enumerate(loader):
                    if i >= steps_per_epoch * accum:
                        break
                    if i >= skip:
                        yield epoch, batch
            except UnreadableData as e:  # (from a worker too: the DataLoader re-raises its type)
                raise _loader_failure(e) from e
            epoch, skip = epoch + 1, 0

    data = batches()
    train_step = TrainStep(method=raw, forward=forward, ddp=model if world > 1 else None,
                           optimizer=optimizer, scaler=scaler, stage=stage, generator=generator,
                           device=device, amp_dtype=dtype, accum=accum, world=world, rank=rank,
                           seed=cfg.run.seed, check_layout=cfg.run.channels_last)

    bar = None
    if master and cfg.run.progress:
        from tqdm import tqdm
        bar = tqdm(total=last_step, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t_last = time.perf_counter()
    model.train()

    # --- the loop (one step: train/step.py) ---------------------------------------------------------
    # Under DDP every rank must leave the loop after the same step: a rank stops only when the
    # all-reduced flag says some rank was signalled (a signal that lands after this rank's
    # all-reduce is passed on in the next step's). A single process stops on its own signal.
    stopping, first_step = False, step
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    watcher = SignalWatcher()  # (raises the workers' flag also during one long C++ call)
    try:
        while step < last_step and not stopping:
            lr = lr_schedule(step, total_steps, warmup_steps, base_lr, cfg.optim.final_lr,
                             cfg.optim.warmup_start_factor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            momentum = momentum_schedule(step, total_steps, cfg.model.base_momentum)
            # (The stop flag is read after the step's last forward, and whether to prepare the next
            # step's batch after its backward: a signal during the step counts for this step.)
            result = train_step(step, lambda: next(data), momentum,
                                signalled=lambda: stop["signal"] is not None,
                                prepare_next=lambda: step + 1 < last_step and stop["signal"] is None)
            loss_value, epoch = result.terms["loss"], result.epoch
            if result.any_stop and stop["signal"] is None:
                stop["signal"] = "SIGTERM (another rank)"
            stopping = result.any_stop if world > 1 else stop["signal"] is not None
            if result.skipped:
                bad_in_a_row += 1
                skipped_total += 1
                logger.event("nonfinite", step=step, loss=loss_value, in_a_row=bad_in_a_row)
                if bad_in_a_row >= cfg.run.max_bad_steps:
                    logger.close()
                    raise TrainingError(
                        f"stopped at step {step}: {bad_in_a_row} non-finite losses in a row (limit "
                        f"run.max_bad_steps={cfg.run.max_bad_steps}; {skipped_total} skipped in all). The "
                        f"training diverged: lower optim.lr_per_256 or lengthen optim.warmup_epochs, then "
                        f"resume from the newest checkpoint in {run_dir}/checkpoints.")
            else:
                bad_in_a_row = 0
            if result.overflow:
                # fp16: GradScaler's own calibration (it halved its scale), not counted as a
                # non-finite loss; only a streak that no scale explains stops the run.
                overflows += 1
                overflows_in_a_row += 1
                logger.event("overflow", step=step, loss=loss_value, scale=scaler.get_scale(),
                             in_a_row=overflows_in_a_row)
                if overflows_in_a_row >= MAX_OVERFLOWS_IN_A_ROW:
                    logger.close()
                    raise TrainingError(
                        f"stopped at step {step}: the fp16 gradients overflowed {overflows_in_a_row} steps "
                        f"in a row, down to a loss scale of {scaler.get_scale():.3g}: they are infinite at "
                        f"any scale. Train with --run.amp bf16 or none, or lower optim.lr_per_256, then "
                        f"resume from the newest checkpoint in {run_dir}/checkpoints.")
            elif not result.skipped:
                overflows_in_a_row = 0
            step += 1

            # --- bookkeeping (after a skipped step too, whose loss is logged as it was; its checkpoint
            # holds the model as the step left it, unchanged) ---
            if bar is not None:
                now = time.perf_counter()
                ips = images_per_step / max(now - t_last, 1e-9)
                t_last = now
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.3g}")
                bar.update(1)
            if step % cfg.run.log_every == 0 or step == last_step:
                rec = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "momentum": momentum,
                       "skipped": skipped_total}
                if scaler.is_enabled():
                    rec["overflows"], rec["loss_scale"] = overflows, scaler.get_scale()
                for k, v in result.terms.items():
                    if k != "loss":
                        rec[k] = v
                if bar is not None:
                    rec["images_per_s"] = ips
                logger.log(rec)
            if step % cfg.run.ckpt_every == 0 and step < last_step:
                save(step)

    except DataError as e:
        # A run that could not make its first step leaves no folder behind (as when its data
        # cannot be opened), so that the same command with the data fixed can start again.
        if created_run_dir and step == first_step and not ckpt.list_checkpoints(run_dir):
            logger.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise TrainingError(f"{e} (step {step})") from None
    finally:
        # the loader's workers end now, whatever ended the loop (with a stop signal, while they
        # still wait for this process; after an error, before the process exits with its message)
        data.close()
        if hasattr(loader, "close"):  # (both loaders have one; a wrapper around them may not)
            loader.close()
        clear_stop()   # (no worker is left to wait for it)
        watcher.close()
        for s, h in previous.items():
            signal.signal(s, h)
    if bar is not None:
        bar.close()
    save(step)
    summary = {"run_dir": run_dir, "step": step, "skipped": skipped_total}
    if scaler.is_enabled():
        summary["overflows"] = overflows
    if stopping or (world == 1 and stop["signal"] is not None):
        logger.event("stop", step=step, signal=stop["signal"])
        logger.close()
        if master:
            print(f"\n{stop['signal']}: saved step {step} in {run_dir}; continue with "
                  f"`python -m train.run --resume {run_dir}`", flush=True)
        summary["stopped"] = stop["signal"]
        finish_distributed(world)
        return summary

    if world > 1:
        # BN statistics without SyncBN drift per rank between DDP's broadcasts: end on rank 0's.
        with torch.no_grad():
            for b in raw.buffers():
                dist.broadcast(b, src=0)
    if cfg.run.debug_checksum:
        with open(os.path.join(run_dir, f"checksum.rank{rank}"), "w") as f:
            json.dump(state_checksum(raw), f)
        if world > 1:
            dist.barrier()

    # --- end of training: plot, O-KNN of trained vs random init --------------------------------------
    # The other ranks are done: they leave now rather than wait (and time out) while rank 0 evaluates.
    finish_distributed(world)
    if master:
        plot_loss_lr(os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "loss_lr.png"))
        eval_root, why_not = oknn_data
        if cfg.run.oknn and eval_root is not None:
            _CURRENT["phase"] = "oknn"
            try:
                summary["oknn"] = evaluate_trained_vs_random(cfg, raw, eval_root, len(dataset), device, logger,
                                                             step, run_dir)
            except ValueError as e:  # e.g. a val split without usable objects: the training is saved
                print(f"O-KNN skipped: {e} (the trained network is in {run_dir}/checkpoints; "
                      f"`python -m d3ssl.eval.oknn --ckpt {run_dir} --data DIR` evaluates it)")
        elif cfg.run.oknn:
            print(f"O-KNN skipped: {why_not}")
    logger.close()
    return summary


def evaluate_trained_vs_random(cfg, raw, eval_root, num_images, device, logger, step, run_dir):
    from d3ssl.eval.oknn import evaluate_oknn
    kwargs = dict(k=cfg.run.oknn_k, temperature=cfg.run.oknn_temperature,
                  max_objects_per_image=cfg.run.oknn_max_per_image, image_size=cfg.run.oknn_image_size,
                  batch_size=cfg.run.oknn_batch_size, device=device, progress=cfg.run.progress)
    print("O-KNN: trained network ...", flush=True)
    trained = evaluate_oknn(raw.online_backbone, eval_root, **kwargs)
    draws = []
    for i in range(cfg.run.oknn_random_draws):
        seed = cfg.run.seed + i
        print(f"O-KNN: the network at random initialisation, seed {seed}"
              f"{' (the trained one started here)' if i == 0 else ''} ...", flush=True)
        random_model = build_model(cfg, num_images, device, world=1, seed=seed)
        draws.append({"seed": seed, **evaluate_oknn(random_model.online_backbone, eval_root, **kwargs)})
        del random_model
    random_init = draws[0]
    result = {"trained": trained, "random_init": random_init, "random_draws": draws,
              "diff_top1": trained["top1"] - random_init["top1"],
              "diff_top5": trained["top5"] - random_init["top5"]}
    for key in ("top1", "top5"):
        print(f"O-KNN {key[:3]}-{key[3:]}: trained {number(trained[key])}  random init "
              f"{number(random_init[key])}  difference {number(result['diff_' + key], '+.2f')}")
    if not math.isfinite(trained["top1"]):
        print("O-KNN: the trained network's features are not finite: its weights are (the training "
              "diverged; log.jsonl has the loss of every step)")
    if len(draws) > 1:
        top1 = [d["top1"] for d in draws]
        mean, std = statistics.mean(top1), statistics.stdev(top1)
        result.update(random_top1_mean=mean, random_top1_std=std)
        above = (f"{(trained['top1'] - mean) / std:+.1f} of their standard deviations from their mean"
                 if std > 0 and math.isfinite(trained["top1"]) else
                 "their standard deviation is 0" if std == 0 else "not comparable (not finite)")
        print(f"O-KNN top-1 of {len(draws)} random initialisations: {number(mean)} ± {number(std)} "
              f"({number(min(top1))}-{number(max(top1))}); the trained network is {above}")
    if "position_share" in trained and "position_share" in random_init:
        print(f"Share of the val object features' variance explained by the object's position: "
              f"trained {number(100 * trained['position_share'], '.0f')}%  random init "
              f"{number(100 * random_init['position_share'], '.0f')}%")
    logger.event("oknn", step=step, **finite_or_none(dict(
        trained_top1=trained["top1"], trained_top5=trained["top5"], random_top1=random_init["top1"],
        random_top5=random_init["top5"])))
    with open(os.path.join(run_dir, "oknn.json"), "w") as f:
        json.dump(finite_or_none(result), f, indent=2)
    return result


def finish_distributed(world):
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    try:
        preset, overrides, resume, flags = parse_args(argv, with_flags=True)
        cfg = make_config(preset or "default", overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if flags["print_config"]:
        print(json.dumps(to_dict(cfg), indent=2))
        return {"config": to_dict(cfg)}
    if (cfg.preset in PRESET_WANTS_DATA and not cfg.data.path and resume is None
            and int(os.environ.get("RANK", "0")) == 0):
        print(f"note: --preset {cfg.preset} is meant for {PRESET_WANTS_DATA[cfg.preset]} (--data); without "
              "--data it trains on the embedded synthetic set", flush=True)
    # What this command line asks for explicitly; a resumed run applies only these to its saved config.
    # A preset names its method, also where that is the default one (d3ssl).
    explicit = {**({"model.method": make_config(preset).model.method, **PRESETS[preset]} if preset else {}),
                **overrides}
    t0 = time.time()
    _CURRENT.update(run_dir=None, phase=None)
    reset_interrupts()
    try:
        summary = train(cfg, resume=resume, explicit=explicit, command_line=overrides)
    except KeyboardInterrupt:  # a Ctrl-C where none is handled, or a second one: no traceback
        _interrupted()
    except Exception as e:
        if interrupted_twice() or _by_an_interrupt(e):
            _interrupted()  # (the loader's workers ended, or the save was cut short, by that second Ctrl-C)
        if isinstance(e, TrainingError):
            raise SystemExit(f"error: {e}") from None
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {summary['step']} steps in {time.time() - t0:.0f} s; run folder {summary['run_dir']}")
    return summary


def _by_an_interrupt(error: BaseException) -> bool:
    """Whether `error` was raised while a KeyboardInterrupt was handled (torch.save turns one into
    a RuntimeError of its zip writer)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _interrupted():
    """Ends the process after a Ctrl-C that the trainer did not handle, in one line: status 130."""
    # (no further Ctrl-C, nor the DataLoader's news of its workers' end, while this is said)
    previous = {s: signal.signal(s, quiet) for s, quiet in ((signal.SIGINT, signal.SIG_IGN),
                                                            (signal.SIGCHLD, signal.SIG_DFL))}
    run_dir = _CURRENT["run_dir"]
    newest = ckpt.latest_checkpoint(run_dir) if run_dir and os.path.isdir(run_dir) else None
    if _CURRENT["phase"] == "oknn":
        text = (f"interrupted during the final O-KNN: the training is complete and saved ({newest}); "
                f"`python -m train.run --resume {run_dir}` evaluates it again")
    else:
        text = "interrupted: nothing more was saved; " + (
            f"the run's newest checkpoint is {newest}, which `python -m train.run --resume {run_dir}` "
            "continues" if newest else "the run has no checkpoint yet")
    print(f"\n{text}", file=sys.stderr, flush=True)
    for s, handler in previous.items():
        signal.signal(s, handler)
    raise SystemExit(128 + signal.SIGINT) from None


def exit_status(summary: dict) -> int:
    """The process's exit status for a run's summary: 0 when it ran to its end; 128 + the signal's
    number when a stop signal ended it after saving (as a shell reports a process that the signal
    ended), so that a script can tell it from a finished run. Under torchrun always 0: it would take
    any other status of a worker for a failure, and restart the workers where it may."""
    stopped = summary.get("stopped")
    if not stopped or "TORCHELASTIC_RUN_ID" in os.environ:
        return 0
    name = stopped.split()[0]
    return 128 + (signal.Signals[name].value if name in signal.Signals.__members__ else signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
