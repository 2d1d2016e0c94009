"""mokd.py and eval_linear.py against the authors' own code: the training step, augmentation, schedules, evaluation.

One training step quantity by quantity, and (--all) the augmentation, the schedules of whole runs, an epoch boundary,
two processes and the k-NN evaluation.

The authors' code is github.com/skyoux/mokd at commit AUTHORS_COMMIT. This script imports it from a checkout (it holds
none of it), builds their models with their train() and runs their training loop unchanged for a few iterations,
observing it through hooks and wrappers. It copies their initial weights into mokd.py's models through an explicit
name map, runs mokd.py's step (Run.step) on the same crops with the same drop-path masks, and prints one row per
quantity: backbone outputs, MLP heads and T-heads of students and teachers, both searches and their queries, the eight
loss terms, gradients before and after clipping, lr and weight decay per tensor, the SGD and AdamW updates and states,
the teacher EMA, BatchNorm statistics and the six centres.

Four runs on the same crops from the same initial weights: theirs and ours in float64, theirs and ours in float32.
The verdict is float64's: a row is equal when our largest relative difference is within float64 rounding (TOL_F64,
scaled up where their own float32 run shows that the quantity amplifies rounding). The float32 columns put our float32
error (against their float64 run) beside theirs, the noise scale.

    git clone https://github.com/skyoux/mokd ../authors-mokd && git -C ../authors-mokd checkout f7b1386
    python experiments/authors_parity.py --authors-dir ../authors-mokd                  # resnet18 + vit_tiny/16
    python experiments/authors_parity.py --authors-dir ../authors-mokd --arch-vit vit_small
    python experiments/authors_parity.py --authors-dir ../authors-mokd --steps 3        # centres, moments in use
    python experiments/authors_parity.py --authors-dir ../authors-mokd --epoch 0 --steps 2   # frozen last layers
    python experiments/authors_parity.py --authors-dir ../authors-mokd --mokd /tmp/changed/mokd.py
    python experiments/authors_parity.py --authors-dir ../authors-mokd --all            # the step, then every part
    python experiments/authors_parity.py --authors-dir ../authors-mokd --part evaluation --eval-linear /tmp/e.py

Parts of --all (section 9), each printing its rows and verdict; the last line is the verdict over all:
  step          the step as configured by the options above.
  augmentation  their DINODataAugmentation (their class, built with their arguments) and our MultiCropAugmentation +
                normalise on the same images (sizes and colour modes; each side's loader too) and seeds, for the
                ImageNet recipe and the CIFAR recipe's sizes (set on their three crop transforms, which hard-code 224 /
                96 px): bit-identical crops, torch's generator in the same state after both. Their blur and
                solarisation draw from Python's random: a stand-in for the `random` name of their preprocessing
                module routes those draws through torch's generator, in their order.
  schedules     every schedule array of whole ImageNet-recipe runs as their train() builds them (lr and weight decay of
                both models, teacher momentum, the teacher temperature of each of their seven loss objects) against
                build_schedules, at global batches 256 and 1024 and 50, 100 and 300 epochs; the lr and weight decay
                per tensor that their train_one_epoch and our Run.step set, at probed iterations; a 20-epoch run, which
                their code cannot build, as expected differences (our clamp).
  boundary      the step over 2 epochs of 3 steps from epoch 0 (the frozen epoch ends between them), 64 / 32 px.
  ddp           the step in two processes (torchrun --nproc_per_node=2, gloo), DistributedDataParallel on both sides,
                each process with its own crops; every rank's table.
  evaluation    their eval_knn.py's extract_feature_pipeline and knn_classifier (called) and eval_linear.py --knn (its
                defaults) on identical backbone weights (resnet18, the ViT) and images: features, top-1 and top-5 at
                k = 10, 20, 100, 200 (top-5 differs where their classifier ranks classes without a vote, DINO#89).

Stand-ins replace only what cannot run on a CPU or without the authors' data: the dataset and DataLoader (fixed
random crops), the distributed set-up (a one-process gloo group, DistributedDataParallel as a plain wrapper, or under
torchrun the real one without GPU ids; BatchNorm left unsynchronised), .cuda() and torch.cuda.synchronize(), their
logger's end-of-epoch sync of logged averages (CUDA tensors), the checkpoint restart (it sets the start epoch, and the
float32 run's initial weights), their per-epoch checkpoints (a temporary folder) and the tensorboard writer. At import,
three timm names their ViT file imports (none of them used) and torchvision's removed resnet.model_urls are stubbed
when missing; their eval_knn.py runs with ImagenetLoader (undefined there) defined, and its dataset's `.target` read as
ImageFolder's `.targets`. Their drop_path draws the masks in their float64 run (wrapped, not changed); the other three
runs replay them. Not covered: fp16 autocast with grad scalers, SyncBatchNorm and nccl (CUDA), more than two processes.
Sections: 1 constants and the name map | 2 loading both codes | 3 records and comparison | 4 shared randomness |
5 the authors' run | 6 our run | 7 the table | 8 the step | 9 the other parts.
"""
import argparse
import contextlib
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image

# ======================================================================================
# 1. Constants: the authors' commit and files, the name map, the fingerprints of their state dicts.
# ======================================================================================
AUTHORS_COMMIT = "f7b138618c6730d0aa61f0d3e183e62d11330763"
# git blob ids (sha1 of "blob <size>\0<content>") of the authors' files this script imports, at AUTHORS_COMMIT.
AUTHORS_FILES = {
    "main_mokd.py": "568bec1bc5fd1c98a365ce5b3d0242de57440b2f",
    "models/mokd.py": "887f8dd0c3019385da02da33f2d4fd709d8891da",
    "backbones/resnet.py": "f0b86613f8e7972c3a21d633ea4e438727802b7b",
    "backbones/vision_transformer.py": "7229dbd407a9c2667b4f8ebaa6b8d99be8c22262",
    "utils/utils.py": "e4578a4db9af7437c820e067489704f037a7a20f",
    "utils/checkpoint_io.py": "a877eaa3fa4e42da2681743874cee0a50d815f10",
    "utils/optimizers.py": "fa46712e78f3365a4054f92519e00c12e287f9d3",
    "utils/preprocess.py": "1a3db57639ef31ce1e3ef9172dbfd1c1bf6a27ce",
    "augmentations/dino_augmentation.py": "03109d543df6d6996973734c665a8c966160ad5f",
}
# Our state-dict name -> the authors' name (student and teacher alike; model A = their "cnn", B = their "vit").
# A rule ending in "." maps a prefix and keeps the rest of the name; any other rule maps one exact name. The first
# matching rule wins. Layout "conv1x1": our Linear weight (d, C) is their 1x1 convolution's weight (d, C, 1, 1).
NAME_RULES = (
    ("backbone.net.", "backbone.", "same"),  # torchvision's ResNet sits in ResNetBackbone.net; theirs is the backbone
    ("backbone.", "backbone.", "same"),  # ViT: DINO's names on both sides
    ("head.mlp.", "head.mlp.", "same"),
    ("head.last_layer.parametrizations.weight.original0", "head.last_layer.weight_g", "same"),  # weight norm's g
    ("head.last_layer.parametrizations.weight.original1", "head.last_layer.weight_v", "same"),  # and v
    ("thead.proj.weight", "transhead.patch_embed.weight", "conv1x1"),  # the CNN's T-head projection
    ("thead.proj.bias", "transhead.patch_embed.bias", "same"),
    ("thead.pos_embed", "transhead.pos_embed", "same"),
    ("thead.blocks.", "transhead.blocks.", "same"),
    ("thead.norm.", "transhead.norm.", "same"),
    ("thead.last_layer.parametrizations.weight.original0", "transhead.last_layer.weight_g", "same"),
    ("thead.last_layer.parametrizations.weight.original1", "transhead.last_layer.weight_v", "same"),
)
# Model -> the authors' variables (train_one_epoch's arguments) holding its student and teacher.
MODULE_KEYS = {"a": ("student_cnn", "teacher_cnn"), "b": ("student_vit", "teacher_vit")}
# Our centre -> the authors' DINOLoss holding it (the search loss, L_ct, has none).
CENTRE_MAP = {"sm_a": "loss_cnn_fn", "st_a": "loss_cnn_thead_fn", "cm_a": "loss_cnn_ct_fn",
              "sm_b": "loss_vit_fn", "st_b": "loss_vit_thead_fn", "cm_b": "loss_vit_ct_fn"}
# The authors' DINOLoss -> (model, term, row of its student input, row of its teacher input).
LOSS_TERMS = {
    "loss_cnn_fn": ("A", "L_sm", "A student MLP head, all crops", "A teacher MLP head, global crops"),
    "loss_cnn_thead_fn": ("A", "L_st", "A student T-head, all crops", "A teacher T-head, global crops"),
    "loss_cnn_ct_fn": ("A", "L_cm", None, None),
    "loss_vit_fn": ("B", "L_sm", "B student MLP head, all crops", "B teacher MLP head, global crops"),
    "loss_vit_thead_fn": ("B", "L_st", "B student T-head, all crops", "B teacher T-head, global crops"),
    "loss_vit_ct_fn": ("B", "L_cm", None, None),
}
# mokd.py config key -> the authors' argument with the same meaning (the "recipe settings" row compares them).
CONFIG_PAIRS = (("patch_size", "patch_size"), ("global_crop_size", "input_size"), ("out_dim", "out_dim"),
                ("local_crops_number", "local_crops_number"), ("batch_size_per_gpu", "batch_size_per_gpu"),
                ("epochs", "epochs"), ("warmup_epochs", "warmup_epochs"), ("drop_path", "drop_path_rate"),
                ("momentum_teacher", "momentum_teacher"), ("warmup_teacher_temp", "warmup_teacher_temp"),
                ("teacher_temp", "teacher_temp"), ("warmup_teacher_temp_epochs_a", "warmup_teacher_temp_epochs_cnn"),
                ("warmup_teacher_temp_epochs_b", "warmup_teacher_temp_epochs_vit"), ("lr_a", "lr_cnn"),
                ("lr_b", "lr_vit"), ("thead_lr", "lr_vit"), ("lam_a", "lamda_c"), ("lam_b", "lamda_t"),
                ("clip_grad_a", "clip_grad_cnn"), ("clip_grad_b", "clip_grad_vit"),
                ("freeze_last_layer", "freeze_last_layer"))
# sha256 (first 16 hex digits) of the sorted lines "name shape" of the authors' student state dicts, with their
# count, measured on their code at AUTHORS_COMMIT (K = 256, 224 px global crops, patch 16). The tests check that the
# name map sends our models onto exactly these names and shapes without needing the authors' code.
AUTHORS_FINGERPRINTS = {
    "vit_tiny": {"a": (171, "cccc9496bc265e20"), "b": (199, "bfbc0c8315e0b104")},
    "vit_small": {"a": (171, "378ff1c16275d831"), "b": (199, "7f750d0a35d701f1")},  # both checked live
}
FINGERPRINT_SETUP = dict(out_dim=256, global_px=224, patch=16)
# float64 verdict: a row is equal when its max rel diff is at most max(TOL_F64, NOISE_FACTOR * 2^-29 * the authors'
# own float32 rel error on that row), capped at TOL_CAP. 2^-29 is float64's rounding unit over float32's: a quantity
# that amplifies rounding (AdamW divides each gradient element by |g| + eps: their float32 updates are off by up to
# 100 %) amplifies float64 rounding by as much. Rounding differences elsewhere are around 1e-15.
TOL_F64, NOISE_FACTOR, TOL_CAP = 1e-9, 100.0, 1e-6
SPILL_NUMEL = 1_000_000  # reference rows above this many numbers go to disk in runs of several steps
PARTS = (("backbone.", "backbone"), ("head.", "MLP head"), ("thead.", "T-head"))
SPLIT_BY_PART = ("gradients before clipping", "gradients after clipping", "update", "teacher after EMA")


class ParityError(Exception):
    """The comparison cannot be made (wrong checkout, names that do not map); main() prints it and exits with 2."""


def rule_for(ours):
    """The first rule of NAME_RULES that covers our state-dict name, or None."""
    for rule in NAME_RULES:
        if (ours.startswith(rule[0]) if rule[0].endswith(".") else ours == rule[0]):
            return rule
    return None


def authors_name(ours):
    """Our state-dict name -> (the authors' name, layout), or None when no rule applies."""
    rule = rule_for(ours)
    if rule is None:
        return None
    our_side, their_side, layout = rule
    return (their_side + ours[len(our_side):] if our_side.endswith(".") else their_side), layout


def to_ours(tensor, layout):
    """The authors' tensor in our layout: a 1x1 convolution (d, C, 1, 1) becomes a Linear weight (d, C)."""
    if layout == "conv1x1":
        if tensor.ndim != 4 or tensor.shape[2:] != (1, 1):
            raise ParityError(f"expected a 1x1 convolution weight, got shape {tuple(tensor.shape)}")
        return tensor.reshape(tensor.shape[:2])
    return tensor


def their_shape(shape, layout):
    """Our tensor's shape -> the authors' shape of the same tensor."""
    return tuple(shape) + (1, 1) if layout == "conv1x1" else tuple(shape)


def name_map(our_shapes):
    """{our name: shape} -> ({our name: (their name, layout)}, problems). Problems name what does not map and why:
    a name no rule covers, or two of ours sent to one of theirs."""
    pairs, problems, taken = {}, [], {}
    for ours in our_shapes:
        mapped = authors_name(ours)
        if mapped is None:
            problems.append(f"{ours}: no rule in NAME_RULES maps it")
            continue
        if mapped[0] in taken:
            problems.append(f"{ours}: maps to {mapped[0]}, already the image of {taken[mapped[0]]}")
            continue
        taken[mapped[0]] = ours
        pairs[ours] = mapped
    return pairs, problems


def check_against_authors(pairs, our_shapes, their_shapes, what):
    """Problems (a list of lines) between the map and the authors' live state dict {name: shape}: names of theirs no
    entry reaches, entries reaching no name of theirs, shapes that disagree."""
    problems = []
    reached = {their for their, _ in pairs.values()}
    for their in sorted(set(their_shapes) - reached):
        problems.append(f"{what}: the authors' {their} {tuple(their_shapes[their])} has no counterpart in our model")
    for ours, (their, layout) in pairs.items():
        if their not in their_shapes:
            problems.append(f"{what}: our {ours} maps to {their}, which the authors' model lacks")
        elif their_shape(our_shapes[ours], layout) != tuple(their_shapes[their]):
            problems.append(f"{what}: our {ours} {tuple(our_shapes[ours])} vs their {their} "
                            f"{tuple(their_shapes[their])}")
    return problems


def fingerprint(their_shapes):
    """{the authors' name: shape} -> (count, first 16 hex digits of sha256 of the sorted "name shape" lines)."""
    lines = sorted(f"{name} {tuple(shape)}" for name, shape in their_shapes.items())
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def mapped_shapes(our_shapes):
    """{our name: shape} -> {the authors' name: shape} through the name map (names that do not map are left out)."""
    pairs, _ = name_map(our_shapes)
    return {their: their_shape(our_shapes[ours], layout) for ours, (their, layout) in pairs.items()}


def part_of(our_name):
    for prefix, part in PARTS:
        if our_name.startswith(prefix):
            return part
    return "other"


def git_blob_id(data):
    """The id git gives a file's content (sha1 of "blob <size>\\0" + content)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ======================================================================================
# 2. Loading both codes, and our config.
# ======================================================================================
def load_mokd(path):
    """Import mokd.py from `path` as the module `mokd` (a scratch copy with a planted change works the same way)."""
    spec = importlib.util.spec_from_file_location("mokd", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mokd"] = module
    spec.loader.exec_module(module)
    return module


def check_authors_files(authors_dir):
    """{file: "same" | "differs" | "missing"} for the authors' files against AUTHORS_COMMIT."""
    status = {}
    for rel, blob in AUTHORS_FILES.items():
        path = Path(authors_dir) / rel
        if not path.is_file():
            status[rel] = "missing"
        else:
            status[rel] = "same" if git_blob_id(path.read_bytes()) == blob else "differs"
    return status


def stub_module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


class SummaryWriterStandIn:
    """Stand-in for tensorboard's SummaryWriter: keeps the scalars in memory."""

    def __init__(self, log_dir=None, **unused):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), step))

    def close(self):
        pass


def unavailable(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in for a timm name the authors' file imports but never uses")
    return call


def import_authors(authors_dir):
    """Import the authors' training script and the modules it uses, unchanged, from their checkout. Returns a
    namespace: main (main_mokd), utils (utils.utils), checkpoint_io, vits (backbones.vision_transformer)."""
    missing = [rel for rel, s in check_authors_files(authors_dir).items() if s == "missing"]
    if missing:
        raise ParityError(f"--authors-dir {authors_dir!r} is not a checkout of skyoux/mokd: missing {missing}")
    root = Path(authors_dir).resolve()
    for package in ("utils", "models", "backbones", "augmentations", "main_mokd"):  # their top-level names
        loaded = sys.modules.get(package)
        where = getattr(loaded, "__file__", None) or "".join(getattr(loaded, "__path__", []) or [])
        if loaded is not None and not str(where).startswith(str(root)):
            raise ParityError(f"a module named {package!r} is already imported from {where}; the authors' code "
                              "needs that name")
    if importlib.util.find_spec("timm") is None:  # three names imported by their ViT file, never used (shadowed)
        sys.modules["timm"] = stub_module("timm")
        sys.modules["timm.models"] = stub_module("timm.models")
        sys.modules["timm.models.vision_transformer"] = stub_module(
            "timm.models.vision_transformer", VisionTransformer=unavailable("VisionTransformer"),
            _cfg=unavailable("_cfg"))
        sys.modules["timm.models.layers"] = stub_module("timm.models.layers")
        sys.modules["timm.models.layers.helpers"] = stub_module("timm.models.layers.helpers",
                                                                to_2tuple=unavailable("to_2tuple"))
    import torchvision.models.resnet as tv_resnet
    if not hasattr(tv_resnet, "model_urls"):  # removed in torchvision 0.15; their code reads it for pretrained only
        tv_resnet.model_urls = {}
    sys.path.insert(0, str(root))
    tensorboard = stub_module("torch.utils.tensorboard", SummaryWriter=SummaryWriterStandIn)
    with patched(sys.modules, "torch.utils.tensorboard", tensorboard, item=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main = importlib.import_module("main_mokd")
    return types.SimpleNamespace(main=main, utils=sys.modules["utils.utils"],
                                 checkpoint_io=sys.modules["utils.checkpoint_io"],
                                 vits=sys.modules["backbones.vision_transformer"])


def authors_args(A, arch_vit, batch, n_local, out_dim, epochs):
    """The authors' arguments: the pre-training command of their README, at this script's sizes."""
    argv = ["--arch_cnn", "resnet18", "--arch_vit", arch_vit, "--out_dim", str(out_dim), "--norm_last_layer", "False",
            "--clip_grad_cnn", "3", "--clip_grad_vit", "3", "--freeze_last_layer", "1", "--optimizer", "sgd",
            "--lr_cnn", "0.1", "--lr_vit", "0.0003", "--warmup_epochs", "10", "--use_fp16", "False",
            "--warmup_teacher_temp", "0.04", "--teacher_temp", "0.07", "--warmup_teacher_temp_epochs_cnn", "50",
            "--warmup_teacher_temp_epochs_vit", "30", "--patch_size", "16", "--drop_path_rate", "0.1",
            "--local_crops_number", str(n_local), "--global_crops_scale", "0.25", "1",
            "--local_crops_scale", "0.05", "0.25", "--momentum_teacher", "0.996", "--num_workers", "0",
            "--batch_size_per_gpu", str(batch), "--epochs", str(epochs), "--lamda_t", "0.1", "--lamda_c", "1.0",
            "--input_size", "224", "--seed", "0", "--output_dir", tempfile.gettempdir()]
    return A.main.get_args_parser().parse_args(argv)


def our_config(mokd, arch_vit, batch, n_local, out_dim, epochs):
    """mokd.py's config: the authors' ImageNet recipe at this script's sizes, fp32 on the CPU (a plain dict).
    Keys set here: arch_a, arch_b, out_dim, batch_size_per_gpu, local_crops_number, epochs, device, precision;
    CONFIG_PAIRS lists the keys compared with the authors' arguments."""
    argv = ["--recipe", "imagenet", "--arch-a", "resnet18", "--arch-b", arch_vit, "--out-dim", str(out_dim),
            "--batch-size-per-gpu", str(batch), "--local-crops-number", str(n_local), "--epochs", str(epochs),
            "--device", "cpu", "--precision", "fp32", "--warmup-epochs", "10", "--warmup-teacher-temp-epochs-a", "50",
            "--warmup-teacher-temp-epochs-b", "30", "--cross-warmup-teacher-temp-epochs", "30"]  # the authors' warm-ups
    return mokd.parse_config(argv)


def our_shapes(mokd, cfg):
    """{model: {state-dict name: shape}} of mokd.py's two students, built on the meta device (no memory, no init)."""
    linspace = torch.linspace
    with patched(torch, "linspace", functools.partial(linspace, device="cpu")), torch.device("meta"):
        models = {m: mokd.MOKDModel(cfg[f"arch_{m}"], cfg, cfg[f"norm_last_layer_{m}"], cfg["drop_path"])
                  for m in "ab"}  # drop-path rates are read with .tolist(): their linspace stays on the CPU
    return {m: {k: tuple(v.shape) for k, v in models[m].state_dict().items()} for m in "ab"}


def make_batches(steps, batch, n_local, global_px, local_px, seed):
    """`steps` lists [g1, g2, l_1 .. l_n] of float64 crops: g (B, 3, G, G), l (B, 3, L, L), standard normal
    (the scale of normalised images)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 3, global_px, global_px, generator=g, dtype=torch.float64) for _ in range(2)]
            + [torch.randn(batch, 3, local_px, local_px, generator=g, dtype=torch.float64) for _ in range(n_local)]
            for _ in range(steps)]


@contextlib.contextmanager
def patched(obj, name, value, item=False):
    """Set obj.name (or obj[name] with item=True) for the duration, then restore it (or remove it if it was only
    inherited or absent)."""
    if item:
        had, old = name in obj, obj.get(name)
        obj[name] = value
    else:
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)
    try:
        yield
    finally:
        if item:
            if had:
                obj[name] = old
            else:
                del obj[name]
        elif had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def stderr_to_file():
    """Send file descriptor 2 (subprocesses' stderr included) to a temporary file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ======================================================================================
# 3. Records and their comparison.
# ======================================================================================
def snap(x):
    """A float64 CPU copy of a tensor (None stays None, numbers become 0-d tensors, lists stay lists)."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [snap(v) for v in x]
    if isinstance(x, dict):
        return {k: snap(v) for k, v in x.items()}
    return torch.as_tensor(x).detach().to("cpu", torch.float64, copy=True)


def tensor_diff(ours, theirs):
    """(max |ours - theirs|, that / max |theirs|) of two tensors; None vs None is (0, 0); any other mismatch,
    a missing side or a NaN is (inf, inf)."""
    if ours is None and theirs is None:
        return 0.0, 0.0
    if ours is None or theirs is None or ours.shape != theirs.shape:
        return math.inf, math.inf
    if ours.numel() == 0:
        return 0.0, 0.0
    d = (ours.double() - theirs.double()).abs().max().item()
    scale = theirs.double().abs().max().item()
    if math.isnan(d):
        return math.inf, math.inf
    return d, (d / scale if scale > 0 else (0.0 if d == 0 else math.inf))


def flat(x):
    """A value as a list of tensors (None kept)."""
    return [t for v in x for t in flat(v)] if isinstance(x, list) else [x]


def compare(ours, theirs):
    """A value against the reference's: {name: (abs, rel)} for dicts (a name on one side only: inf), else the
    (abs, rel) of the worst tensor."""
    if isinstance(theirs, dict) or isinstance(ours, dict):
        ours, theirs = ours if isinstance(ours, dict) else {}, theirs if isinstance(theirs, dict) else {}
        return {k: tensor_diff(ours.get(k), theirs.get(k)) for k in {**theirs, **ours}}
    a, b = flat(ours), flat(theirs)
    if len(a) != len(b):
        return math.inf, math.inf
    diffs = [tensor_diff(x, y) for x, y in zip(a, b)]
    return max(d[0] for d in diffs), max(d[1] for d in diffs)


class Spilled(dict):
    """A reference row kept on disk (spill_dir): its names map to None; `path` holds the tensors."""


class Record:
    """What one run observed, per (step, row key). The reference run (the authors' float64 run) keeps float64
    copies; a run given a reference compares each value on arrival and keeps only (max abs diff, max rel diff).
    spill_dir: the reference writes rows of more than SPILL_NUMEL numbers there (runs of several steps would
    otherwise hold gigabytes) and reads them back to compare."""

    def __init__(self, reference=None, spill_dir=None):
        self.reference, self.spill_dir = reference, spill_dir
        self.values = {}  # (step, key) -> value, or its comparison with the reference

    def put(self, step, key, value):
        value = snap(value)
        if self.reference is None:
            if self.spill_dir and isinstance(value, dict) and sum(
                    v.numel() for v in value.values() if v is not None) > SPILL_NUMEL:
                spilled = Spilled.fromkeys(value)
                spilled.path = os.path.join(self.spill_dir, f"{len(self.values)}.pt")
                torch.save(value, spilled.path)
                value = spilled
            self.values[(step, key)] = value
        else:
            ref = self.reference.values.get((step, key))
            if isinstance(ref, Spilled):
                ref = torch.load(ref.path, weights_only=True)
            self.values[(step, key)] = compare(value, ref)

    def result(self, step, key):
        """The comparison stored for a row, (inf, inf) when this run never produced it."""
        return self.values.get((step, key), (math.inf, math.inf))


# ======================================================================================
# 4. Shared randomness: the ViT students' drop-path masks.
# ======================================================================================
class DropPathTape:
    """The students' drop-path masks, drawn by the authors' own drop_path in their float64 run and replayed into
    every other run (their float32 run, both of ours), so that all four drop the same residual branches."""

    def __init__(self):
        self.masks = {}  # step -> [(rate, keep mask (N, 1, ..., 1) bool)] in call order
        self.seen = {}  # step -> [(rate, rows)] of the current run's calls
        self.step, self.cursor = 0, 0

    def start_step(self, step):
        self.step, self.cursor = step, 0
        self.seen[step] = []

    def calls(self, step):
        """This run's drop-path calls of a step as a (calls, 2) tensor of (rate, rows)."""
        return torch.tensor(self.seen.get(step, []), dtype=torch.float64).reshape(-1, 2)

    def recorder(self, original):
        """Wraps the authors' drop_path: runs it unchanged and reads its mask by drawing the same numbers again
        (same RNG state, same shape and dtype) on a tensor of ones, then restores the RNG state it left."""
        def drop_path(x, drop_prob=0.0, training=False):
            if drop_prob == 0.0 or not training:
                return original(x, drop_prob, training)
            state = torch.get_rng_state()
            out = original(x, drop_prob, training)
            after = torch.get_rng_state()
            torch.set_rng_state(state)
            ones = torch.ones((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
            probe = original(ones, drop_prob, True)  # (N, 1, ..., 1): the mask / keep probability
            torch.set_rng_state(after)
            self.masks.setdefault(self.step, []).append((drop_prob, (probe != 0).cpu()))
            self.seen[self.step].append((drop_prob, x.shape[0]))
            return out
        return drop_path

    def replayer(self, original):
        """A drop_path that applies the recorded masks in call order: x * mask / (1 - p), the arithmetic of both
        codes (exact for a 0/1 mask). A call without a recorded mask of its shape drops nothing (the drop-path row
        then shows the mismatch)."""
        def drop_path(x, p=0.0, training=False):
            if p == 0.0 or not training:
                return original(x, p, training)
            recorded = self.masks.get(self.step, [])
            self.seen[self.step].append((p, x.shape[0]))
            i, self.cursor = self.cursor, self.cursor + 1
            shape = (x.shape[0],) + (1,) * (x.ndim - 1)
            if i < len(recorded) and tuple(recorded[i][1].shape) == shape:
                keep = recorded[i][1].to(x.device, x.dtype)
            else:
                keep = torch.ones(shape, dtype=x.dtype, device=x.device)
            return x * keep / (1 - p)
        return drop_path


# ======================================================================================
# 5. The authors' run: their train(), unchanged, with stand-ins and observers.
# ======================================================================================
class LoopEnded(Exception):
    """Raised by the DataLoader stand-in after the requested iterations (their loop would go on for epochs)."""


class OneProcessDDP(nn.Module):
    """Stand-in for DistributedDataParallel in one process: .module and a forward that calls it. With one process
    DDP's gradient all-reduce (a mean over one rank) and buffer broadcast change nothing."""

    def __init__(self, module, device_ids=None, **unused):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def cpu_ddp(ddp, module, device_ids=None, **kwargs):
    """Stand-in for their DistributedDataParallel(module, device_ids=[gpu], ...) on a CPU: the real wrapper (gradient
    all-reduce over gloo, buffers broadcast from rank 0), without the GPU ids a CPU module must not be given."""
    return ddp(module, **kwargs)


class FixedCrops(torch.utils.data.Dataset):
    """Stand-in for their ImageFolder: only its length is read (by their DistributedSampler)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raise RuntimeError("the DataLoader stand-in serves fixed batches")


class FixedLoader:
    """Stand-in for their DataLoader: serves the fixed batches ([crops], labels) in order, `per_epoch` per epoch
    (one pass of their loop each), calls on_start before and on_end after each iteration (i counts across epochs),
    then ends their loop (LoopEnded) instead of starting another epoch."""

    def __init__(self, batches, sampler, on_start, on_end, per_epoch=None):
        self.batches, self.sampler, self.on_start, self.on_end = batches, sampler, on_start, on_end
        self.per_epoch, self.passes = per_epoch or len(batches), 0

    def __len__(self):
        return self.per_epoch

    def __iter__(self):
        first = self.passes * self.per_epoch
        self.passes += 1
        for i in range(first, first + self.per_epoch):
            self.on_start(i)
            yield self.batches[i], torch.zeros(len(self.batches[i][0]), dtype=torch.long)
            self.on_end(i)  # runs when their loop asks for the next batch: the iteration is complete
            if i == len(self.batches) - 1:
                raise LoopEnded


def their_to_ours(model_pairs):
    """{our name: (their name, layout)} -> {their name: (our name, layout)}."""
    return {their: (ours, layout) for ours, (their, layout) in model_pairs.items()}


def backbone_outputs(out):
    """A backbone's output as [pooled or CLS (N, C), tokens (N, L, C)]. The authors' ResNet returns (pooled, map
    (N, C, h, w)), their ViT (all tokens (N, 1+L, C), None); ours (pooled or CLS, tokens, grid)."""
    if len(out) == 3:
        return [out[0], out[1]]
    if out[1] is None:
        return [out[0][:, 0], out[0][:, 1:]]
    return [out[0], out[1].flatten(2).transpose(1, 2)]


def bn_buffers(named_buffers, rename):
    return {rename(k): v for k, v in named_buffers if k.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


class AuthorsRun:
    """One run of the authors' train(args) over fixed batches, observed into a Record.
    init: {module key: state dict} to start from (the float64 run's initial weights), None for their own init."""

    def __init__(self, A, args, batches, epoch, record, tape, pairs, shapes, init=None, check_names=False,
                 per_epoch=None):
        self.A, self.args, self.batches, self.epoch, self.record, self.tape = A, args, batches, epoch, record, tape
        self.per_epoch = per_epoch or len(batches)  # iterations per epoch (the batches may span several epochs)
        self.pairs, self.shapes, self.init, self.check_names = pairs, shapes, init, check_names
        self.to_ours = {m: their_to_ours(pairs[m]) for m in "ab"}
        self.step, self.hooks, self.counts, self.initial, self.problems = 0, [], {}, None, []
        self.live_fingerprints = {}  # model -> fingerprint of the authors' live student state dict
        self.log = io.StringIO()  # their printed output
        self.pg_file, self.o = None, None

    # ---- stand-ins ----
    def init_one_process(self, args):
        """Stand-in for their init_distributed_mode: a one-process gloo group (their centre update all-reduces), or
        the group torchrun's processes already share (--ddp-worker)."""
        if dist.is_initialized():
            args.rank, args.gpu, args.world_size = dist.get_rank(), 0, dist.get_world_size()
            return
        args.rank, args.gpu, args.world_size = 0, 0, 1
        self.pg_file = tempfile.NamedTemporaryFile(prefix="authors_parity_pg_", delete=False).name
        os.remove(self.pg_file)
        dist.init_process_group("gloo", init_method=f"file://{self.pg_file}", rank=0, world_size=1)

    def image_folder(self, root, transform=None):
        return FixedCrops(self.per_epoch * len(self.batches[0][0]) * (dist.get_world_size() if dist.is_initialized()
                                                                      else 1))

    def data_loader(self, dataset, sampler=None, batch_size=None, **unused):
        if batch_size != len(self.batches[0][0]):
            raise ParityError(f"their batch size {batch_size} differs from the crops' {len(self.batches[0][0])}")
        batches = [[c.to(self.dtype) for c in crops] for crops in self.batches]
        return FixedLoader(batches, sampler, self.on_start, self.on_end, self.per_epoch)

    def restart(self, ckpt_path, run_variables=None, **objects):
        """Stand-in for their checkpoint restart: the start epoch, and the initial weights when given."""
        run_variables["epoch"] = self.epoch
        for key, state in (self.init or {}).items():
            module = objects[key]
            getattr(module, "module", module).load_state_dict(state, strict=True)

    # ---- observers ----
    def ours(self, m, their_name):
        name = their_name[len("module."):] if their_name.startswith("module.") else their_name
        return self.to_ours[m][name]

    def renamed(self, m, named):
        """{their name: tensor} -> {our name: tensor in our layout}."""
        out = {}
        for k, v in named:
            ours, layout = self.ours(m, k)
            out[ours] = to_ours(v, layout) if v is not None else None
        return out

    def observe_epoch(self, original):
        def train_one_epoch(*args, **kwargs):
            self.setup(inspect.signature(original).bind(*args, **kwargs).arguments, first=self.o is None)
            try:
                return original(*args, **kwargs)
            finally:
                for h in self.hooks:
                    h.remove()
        return train_one_epoch

    def observe_clip(self, original):
        def clip_gradients(model, clip):
            m = next(k for k, v in self.ddp_students.items() if v is model)
            named = [(k, p) for k, p in model.named_parameters() if p.grad is not None]
            before = {k: snap(p.grad) for k, p in named}
            norms = original(model, clip)
            after = {k: before[k] if torch.equal(before[k], p.grad.double()) else snap(p.grad) for k, p in named}
            X = m.upper()
            self.record.put(self.step, f"{X} gradients before clipping", self.renamed(m, before.items()))
            self.record.put(self.step, f"{X} gradients after clipping", self.renamed(m, after.items()))
            return norms
        return clip_gradients

    def setup(self, o, first=True):
        """At their train_one_epoch: keep the objects, check the name map, keep the initial weights (first epoch
        only), add hooks (removed at the end of each epoch)."""
        self.o = o
        self.models = {"a": {"student": o["student_cnn"].module, "teacher": o["teacher_cnn_without_ddp"]},
                       "b": {"student": o["student_vit"].module, "teacher": o["teacher_vit_without_ddp"]}}
        self.ddp_students = {"a": o["student_cnn"], "b": o["student_vit"]}
        self.opts = {"a": o["optimizer_cnn"], "b": o["optimizer_vit"]}
        for m in "ab":
            for role, module in self.models[m].items() if first else ():
                live = {k: tuple(v.shape) for k, v in module.state_dict().items()}
                if self.check_names:
                    self.problems += check_against_authors(self.pairs[m], self.shapes[m], live, f"{m} {role}")
                    if role == "student":
                        self.live_fingerprints[m] = fingerprint(live)
        if self.problems:
            raise ParityError("the name map does not match the authors' models:\n  " + "\n  ".join(self.problems))
        if first:
            self.initial = {key: {k: v.detach().clone() for k, v in self.models[m][role].state_dict().items()}
                            for m in "ab" for role, key in zip(("student", "teacher"), MODULE_KEYS[m])}
        self.param_names = {m: {id(p): self.ours(m, k) for k, p in self.models[m]["student"].named_parameters()}
                            for m in "ab"}  # id -> (our name, layout)
        for m in "ab":
            X, Y = m.upper(), "B" if m == "a" else "A"
            for role in ("student", "teacher"):
                bb = self.models[m][role].backbone
                self.hooks.append(bb.register_forward_hook(functools.partial(self.on_backbone, X, role)))
            # their teacher X receives the partner's query as local_token: the query of student Y
            self.hooks.append(self.models[m]["teacher"].register_forward_pre_hook(
                functools.partial(self.on_teacher_input, Y), with_kwargs=True))
            self.hooks.append(self.opts[m].register_step_pre_hook(functools.partial(self.before_step, m)))
            self.hooks.append(self.opts[m].register_step_post_hook(functools.partial(self.after_step, m)))
        for name in LOSS_TERMS:
            self.hooks.append(o[name].register_forward_hook(functools.partial(self.on_loss, name)))
        self.hooks.append(o["loss_search_ct_fn"].register_forward_hook(self.on_search_loss))

    def on_start(self, i):
        self.step, self.counts = i, {}
        self.tape.start_step(i)
        epoch = self.epoch + i // self.per_epoch
        it = self.per_epoch * epoch + i % self.per_epoch
        self.record.put(i, "EMA momentum m", float(self.o["momentum_schedule"][it]))
        losses = [self.o[k] for k in CENTRE_MAP.values()] + [self.o["loss_search_ct_fn"]]
        self.record.put(i, "teacher temperatures", [float(f.teacher_temp_schedule[epoch]) for f in losses])
        if i == 0:
            self.record.put(0, "recipe settings", [float(getattr(self.args, a)) for _, a in CONFIG_PAIRS])

    def on_backbone(self, X, role, module, inputs, out):
        n = self.counts.get((X, role), 0)
        self.counts[(X, role)] = n + 1
        crops = "global crops" if n == 0 else "local crops"
        self.record.put(self.step, f"{X} {role} backbone, {crops}", backbone_outputs(out))

    def on_teacher_input(self, Y, module, args, kwargs):
        self.record.put(self.step, f"{Y} query (student {Y}, local crops)", kwargs.get("local_token"))

    def on_loss(self, name, module, inputs, out):
        X, term, s_row, t_row = LOSS_TERMS[name]
        self.record.put(self.step, f"{X} {term}", out)
        if s_row:
            self.record.put(self.step, s_row, inputs[0])
            self.record.put(self.step, t_row, inputs[1])

    def on_search_loss(self, module, inputs, out):
        n = self.counts.get("search", 0)  # called for the CNN first, then for the ViT
        self.counts["search"] = n + 1
        X, Y = ("A", "B") if n == 0 else ("B", "A")
        self.record.put(self.step, f"{X} L_ct", out)
        self.record.put(self.step, f"search of teacher {Y} with {X}'s queries", inputs[1])

    def their_params(self, m, opt):
        """[(our name, layout, parameter, its group)] of one of their optimisers."""
        return [(*self.param_names[m][id(p)], p, g) for g in opt.param_groups for p in g["params"]]

    def before_step(self, m, opt, args, kwargs):
        X, params = m.upper(), self.their_params(m, opt)
        self.record.put(self.step, f"{X} lr per tensor", {k: g["lr"] for k, _, _, g in params})
        self.record.put(self.step, f"{X} weight decay per tensor", {k: g["weight_decay"] for k, _, _, g in params})
        self.record.put(self.step, f"{X} tensors without gradient",
                        {k: float(p.grad is None) for k, _, p, _ in params})
        self.before = {k: snap(to_ours(p, layout)) for k, layout, p, _ in params}

    def after_step(self, m, opt, args, kwargs):
        update = {k: snap(to_ours(p, layout)) - self.before[k] for k, layout, p, _ in self.their_params(m, opt)}
        self.record.put(self.step, f"{m.upper()} update", update)
        self.before = None

    def on_end(self, i):
        for m in "ab":
            X = m.upper()
            teacher, student = self.models[m]["teacher"], self.models[m]["student"]
            self.record.put(i, f"{X} teacher after EMA", self.renamed(m, teacher.named_parameters()))
            for role, module in (("student", student), ("teacher", teacher)):
                buffers = bn_buffers(module.named_buffers(), lambda k, m=m: self.ours(m, k)[0])
                if buffers:
                    self.record.put(i, f"{X} BatchNorm buffers, {role}", buffers)
            if i == len(self.batches) - 1:
                self.put_optimizer_state(i, m)
        for ours, theirs in CENTRE_MAP.items():
            self.record.put(i, f"centre c_{ours[:2]}({ours[-1].upper()})", self.o[theirs].center)
        self.record.put(i, "drop-path calls (rate, rows)", self.tape.calls(i))

    def put_optimizer_state(self, i, m):
        per_key = {}
        for p, state in self.opts[m].state.items():
            name, layout = self.param_names[m][id(p)]
            for k, v in state.items():
                per_key.setdefault(k, {})[name] = to_ours(v, layout) if v.ndim == 4 else v
        for k, v in per_key.items():
            self.record.put(i, f"{m.upper()} optimiser state: {k}", v)

    # ---- the run ----
    def run(self, dtype, record_masks):
        """Their train(args) in `dtype` until the fixed batches are used up."""
        A, self.dtype = self.A, dtype
        drop_path = self.tape.recorder(A.vits.drop_path) if record_masks else self.tape.replayer(A.vits.drop_path)
        try:
            self.run_patched(A, drop_path)
        except Exception:
            tail = "\n".join(self.log.getvalue().splitlines()[-20:])
            print(f"the authors' run failed; the end of its output:\n{tail}", file=sys.stderr)
            raise

    def run_patched(self, A, drop_path):
        with contextlib.ExitStack() as stack:
            enter = stack.enter_context
            # stand-ins: what cannot run on a CPU or without their data
            enter(patched(A.utils, "init_distributed_mode", self.init_one_process))
            enter(patched(A.main, "datasets", types.SimpleNamespace(ImageFolder=self.image_folder)))
            enter(patched(torch.utils.data, "DataLoader", self.data_loader))
            enter(patched(A.checkpoint_io, "restart_from_checkpoint", self.restart))
            enter(patched(nn.SyncBatchNorm, "convert_sync_batchnorm", staticmethod(lambda module, pg=None: module)))
            enter(patched(nn.parallel, "DistributedDataParallel", OneProcessDDP if not dist.is_initialized() else
                          functools.partial(cpu_ddp, nn.parallel.DistributedDataParallel)))
            out_dir = enter(tempfile.TemporaryDirectory(prefix="authors_parity_out_"))  # their per-epoch checkpoints
            enter(patched(self.args, "output_dir", out_dir))
            enter(patched(nn.Module, "cuda", lambda module, device=None: module))
            enter(patched(torch.Tensor, "cuda", lambda tensor, *args, **kwargs: tensor))
            enter(patched(torch.cuda, "synchronize", lambda device=None: None))
            # their logger averages the logged meters over processes at an epoch's end in CUDA tensors: skipped
            enter(patched(A.utils.MetricLogger, "synchronize_between_processes", lambda logger: None))
            stack.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
            # observers
            enter(patched(A.main, "train_one_epoch", self.observe_epoch(A.main.train_one_epoch)))
            enter(patched(A.utils, "clip_gradients", self.observe_clip(A.utils.clip_gradients)))
            enter(patched(A.vits, "drop_path", drop_path))
            enter(default_dtype(self.dtype))
            enter(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            enter(contextlib.redirect_stdout(self.log))
            enter(stderr_to_file())  # their get_sha() runs git, which complains outside a git checkout
            try:
                A.main.train(self.args)
            except LoopEnded:
                pass
            finally:
                if dist.is_initialized() and self.pg_file:  # the group init_one_process made (not torchrun's)
                    dist.destroy_process_group()
                if self.pg_file and os.path.exists(self.pg_file):
                    os.remove(self.pg_file)


# ======================================================================================
# 6. Our run: mokd.py's Run.step on the same crops, from the authors' initial weights.
# ======================================================================================
class OurRun:
    """mokd.py's Run over the same batches from the authors' initial weights, observed into a Record."""

    def __init__(self, mokd, cfg, batches, epoch, record, tape, pairs, init, per_epoch=None, world=1):
        self.mokd, self.cfg, self.batches, self.epoch, self.record, self.tape = mokd, cfg, batches, epoch, record, tape
        self.pairs, self.init, self.step, self.world = pairs, init, 0, world
        self.per_epoch = per_epoch or len(batches)
        self.counts = {}

    def load_authors_weights(self, run):
        """Their initial student and teacher weights into ours, through the name map; checked exactly after."""
        for m in "ab":
            for role, key in zip(("students", "teachers"), MODULE_KEYS[m]):
                module = self.mokd.unwrap(getattr(run, role)[m])
                state = {ours: to_ours(self.init[key][their], layout)
                         for ours, (their, layout) in self.pairs[m].items()}
                module.load_state_dict(state, strict=True)
                for k, v in module.state_dict().items():
                    if not torch.equal(v.double(), state[k].to(v.dtype).double()):
                        raise ParityError(f"copying the authors' weights: {m} {role} {k} differs after loading")

    def run(self, dtype):
        mokd = self.mokd
        with contextlib.ExitStack() as stack:
            enter = stack.enter_context
            enter(default_dtype(dtype))
            run = mokd.Run(self.cfg, torch.device("cpu"), self.world)
            self.load_authors_weights(run)
            self.run_obj = run
            self.names = {m: {id(p): k for k, p in mokd.unwrap(run.students[m]).named_parameters()} for m in "ab"}
            hooks = []
            for m in "ab":
                X = m.upper()
                for role, models in (("student", run.students), ("teacher", run.teachers)):
                    model = mokd.unwrap(models[m])
                    hooks.append(model.backbone.register_forward_hook(functools.partial(self.on_backbone, X, role)))
                    hooks.append(model.register_forward_hook(functools.partial(self.on_model, X, role)))
                hooks.append(run.opts[m].register_step_pre_hook(functools.partial(self.before_step, m)))
                hooks.append(run.opts[m].register_step_post_hook(functools.partial(self.after_step, m)))
            enter(patched(mokd, "drop_path", self.tape.replayer(mokd.drop_path)))
            enter(patched(mokd, "search", self.observe_search(mokd.search)))
            enter(patched(mokd, "clip_per_tensor", self.observe_clip(mokd.clip_per_tensor)))
            enter(patched(run, "losses", self.observe_losses(run.losses)))
            S = mokd.build_schedules(self.cfg, self.per_epoch, self.world)
            try:
                for i, crops in enumerate(self.batches):
                    epoch = self.epoch + i // self.per_epoch
                    it = self.per_epoch * epoch + i % self.per_epoch
                    self.on_start(i, S, it, epoch)
                    run.step([c.to(dtype) for c in crops], epoch, it, S)
                    self.on_end(i, run)
            finally:
                for h in hooks:
                    h.remove()

    def on_start(self, i, S, it, e):
        self.step, self.counts = i, {}
        self.tape.start_step(i)
        self.record.put(i, "EMA momentum m", float(S["momentum"][it]))
        a, b, c = S["a"]["tau"], S["b"]["tau"], S["tau_cross"]
        self.record.put(i, "teacher temperatures", [float(v) for v in (a[e], a[e], c[e], b[e], b[e], c[e], c[e])])
        if i == 0:
            self.record.put(0, "recipe settings", [float(self.cfg[k]) for k, _ in CONFIG_PAIRS])

    def on_backbone(self, X, role, module, inputs, out):
        n = self.counts.get((X, role), 0)
        self.counts[(X, role)] = n + 1
        crops = "global crops" if n == 0 else "local crops"
        self.record.put(self.step, f"{X} {role} backbone, {crops}", backbone_outputs(out))

    def on_model(self, X, role, module, inputs, out):
        crops = "all crops" if role == "student" else "global crops"
        self.record.put(self.step, f"{X} {role} MLP head, {crops}", out["m"])
        self.record.put(self.step, f"{X} {role} T-head, {crops}", out["t"])

    def observe_search(self, original):
        def search(teacher, g1, query, n_local):
            out = original(teacher, g1, query, n_local)
            Y = "A" if teacher is self.mokd.unwrap(self.run_obj.teachers["a"]) else "B"
            X = "B" if Y == "A" else "A"
            self.record.put(self.step, f"{X} query (student {X}, local crops)", query)
            self.record.put(self.step, f"search of teacher {Y} with {X}'s queries", out)
            return out
        return search

    def observe_losses(self, original):
        def losses(crops, epoch, S):
            totals, terms, ents, new = original(crops, epoch, S)
            for x in "ab":
                for term, value in terms[x].items():
                    self.record.put(self.step, f"{x.upper()} {term}", value)
            return totals, terms, ents, new
        return losses

    def observe_clip(self, original):
        def clip_per_tensor(params, max_norm):
            ids = {id(p) for p in params}
            m = next(k for k in "ab" if ids <= set(self.names[k]))
            named = [(self.names[m][id(p)], p) for p in params if p.grad is not None]
            before = {k: snap(p.grad) for k, p in named}
            out = original(params, max_norm)
            after = {k: before[k] if torch.equal(before[k], p.grad.double()) else snap(p.grad) for k, p in named}
            self.record.put(self.step, f"{m.upper()} gradients before clipping", before)
            self.record.put(self.step, f"{m.upper()} gradients after clipping", after)
            return out
        return clip_per_tensor

    def before_step(self, m, opt, args, kwargs):
        X, names = m.upper(), self.names[m]
        params = [(p, g) for g in opt.param_groups for p in g["params"]]
        self.record.put(self.step, f"{X} lr per tensor", {names[id(p)]: g["lr"] for p, g in params})
        self.record.put(self.step, f"{X} weight decay per tensor", {names[id(p)]: g["weight_decay"] for p, g in params})
        self.record.put(self.step, f"{X} tensors without gradient",
                        {names[id(p)]: float(p.grad is None) for p, _ in params})
        self.before = {names[id(p)]: snap(p) for p, _ in params}

    def after_step(self, m, opt, args, kwargs):
        names = self.names[m]
        update = {names[id(p)]: snap(p) - self.before[names[id(p)]] for g in opt.param_groups for p in g["params"]}
        self.record.put(self.step, f"{m.upper()} update", update)
        self.before = None

    def on_end(self, i, run):
        mokd = self.mokd
        for m in "ab":
            X = m.upper()
            student, teacher = mokd.unwrap(run.students[m]), mokd.unwrap(run.teachers[m])
            self.record.put(i, f"{X} teacher after EMA", dict(teacher.named_parameters()))
            for role, module in (("student", student), ("teacher", teacher)):
                buffers = bn_buffers(module.named_buffers(), lambda k: k)
                if buffers:
                    self.record.put(i, f"{X} BatchNorm buffers, {role}", buffers)
            if i == len(self.batches) - 1:
                per_key = {}
                for p, state in run.opts[m].state.items():
                    for k, v in state.items():
                        per_key.setdefault(k, {})[self.names[m][id(p)]] = v
                for k, v in per_key.items():
                    self.record.put(i, f"{X} optimiser state: {k}", v)
        for ours in CENTRE_MAP:
            self.record.put(i, f"centre c_{ours[:2]}({ours[-1].upper()})", getattr(run.centres, ours))
        self.record.put(i, "drop-path calls (rate, rows)", self.tape.calls(i))


# ======================================================================================
# 7. The table.
# ======================================================================================
ROW_ORDER = (
    "recipe settings", "teacher temperatures", "EMA momentum m", "drop-path calls (rate, rows)",
    "{X} student backbone, global crops", "{X} student backbone, local crops", "{X} teacher backbone, global crops",
    "{X} student MLP head, all crops", "{X} student T-head, all crops", "{X} teacher MLP head, global crops",
    "{X} teacher T-head, global crops", "{X} query (student {X}, local crops)",
    "search of teacher {Y} with {X}'s queries", "{X} L_sm", "{X} L_st", "{X} L_cm", "{X} L_ct",
    "{X} gradients before clipping", "{X} gradients after clipping", "{X} tensors without gradient",
    "{X} lr per tensor", "{X} weight decay per tensor", "{X} update", "{X} optimiser state: momentum_buffer",
    "{X} optimiser state: step", "{X} optimiser state: exp_avg", "{X} optimiser state: exp_avg_sq",
    "{X} teacher after EMA", "{X} BatchNorm buffers, student", "{X} BatchNorm buffers, teacher",
    "centre c_sm({X})", "centre c_st({X})", "centre c_cm({X})",
)


def ordered_keys(keys):
    """Row keys in reading order: ROW_ORDER with X = A then B (per template group), anything else at the end."""
    order = []
    for template in ROW_ORDER:
        for X, Y in (("A", "B"), ("B", "A")):
            key = template.format(X=X, Y=Y)
            if key not in order:
                order.append(key)
    known = [k for k in order if k in keys]
    return known + sorted(k for k in keys if k not in order)


def reduce(result, names=None):
    """(abs, rel) of a row: a dict of per-tensor results reduced over `names` (all when None)."""
    if isinstance(result, dict):
        items = [v for k, v in result.items() if names is None or k in names]
        if not items:
            return 0.0, 0.0
        return max(v[0] for v in items), max(v[1] for v in items)
    return result


def table_rows(step, reference, runs, per_tensor=False):
    """[(label, {run: (abs, rel)})] for one step. runs: {name: Record compared with the reference}."""
    keys = {k for (s, k) in reference.values if s == step}
    for record in runs.values():
        keys |= {k for (s, k) in record.values if s == step}
    rows = []
    for key in ordered_keys(keys):
        ref = reference.values.get((step, key))
        results = {name: r.result(step, key) for name, r in runs.items()}
        if isinstance(ref, dict) and any(key.endswith(s) for s in SPLIT_BY_PART):
            for part in dict.fromkeys(part_of(k) for k in ref):
                names = {k for k in ref if part_of(k) == part}
                rows.append((f"{key}: {part} ({len(names)})", {n: reduce(v, names) for n, v in results.items()}))
        else:
            count = f" ({len(ref)})" if isinstance(ref, dict) else ""
            if key.endswith("tensors without gradient") and isinstance(ref, dict):
                count = f" ({int(sum(float(v) for v in ref.values()))} of {len(ref)})"  # the frozen ones
            rows.append((f"{key}{count}", {n: reduce(v) for n, v in results.items()}))
        if per_tensor and isinstance(ref, dict):
            for name in ref:
                rows.append((f"    {name}", {n: reduce(v, {name}) for n, v in results.items()}))
    return rows


def fmt(x):
    if x == 0:
        return "0"
    return "inf" if math.isinf(x) else f"{x:.1e}"


def tolerance(r):
    """The float64 tolerance of a row (see TOL_F64) from its results {run: (abs, rel)}."""
    noise = r["theirs32"][1]
    if not math.isfinite(noise):
        return TOL_F64
    return min(max(TOL_F64, NOISE_FACTOR * 2.0 ** -29 * noise), TOL_CAP)


def verdict(r):
    return "equal" if r["ours64"][1] <= tolerance(r) else "DIFFERS"


def print_table(title, rows):
    """Columns: float64 ours vs theirs (abs, rel, tolerance, verdict); float32 ours vs their float64 run (abs, rel);
    their float32 run vs their float64 run (abs, rel)."""
    print(f"\n{title}")
    head = (f"{'quantity':<46} {'f64 abs':>7} {'rel':>7} {'tol':>7} {'verdict':<7} | {'ours32':>7} {'rel':>7} |"
            f" {'theirs32':>8} {'rel':>7}")
    print(head)
    print("-" * len(head))
    for label, r in rows:
        a64, r64 = r["ours64"]
        a32, r32 = r["ours32"]
        n32, nr32 = r["theirs32"]
        print(f"{label[:46]:<46} {fmt(a64):>7} {fmt(r64):>7} {fmt(tolerance(r)):>7} {verdict(r):<7} |"
              f" {fmt(a32):>7} {fmt(r32):>7} | {fmt(n32):>8} {fmt(nr32):>7}")


def summary(rows):
    """(rows equal, rows, rows whose tolerance is above TOL_F64, worst float64 row and its rel, the row with the
    largest ratio of our float32 rel diff to theirs and that ratio)."""
    equal = sum(verdict(r) == "equal" for _, r in rows)
    scaled = sum(tolerance(r) > TOL_F64 for _, r in rows)
    worst = max(rows, key=lambda row: row[1]["ours64"][1] / tolerance(row[1]))
    ratios = [(r["ours32"][1] / r["theirs32"][1], label) for label, r in rows if r["theirs32"][1] > 0]
    ratio, ratio_row = max(ratios, default=(0.0, "-"))
    return equal, len(rows), scaled, worst[0], worst[1]["ours64"][1], ratio_row, ratio


# ======================================================================================
# 8. The step (as before: --steps, --epoch; also over several epochs and in torchrun's processes).
# ======================================================================================
def build_parser():
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--authors-dir", required=True, help="checkout of github.com/skyoux/mokd (commit "
                   f"{AUTHORS_COMMIT[:7]})")
    p.add_argument("--mokd", default=str(here.parent / "mokd.py"), help="the mokd.py to check")
    p.add_argument("--eval-linear", default=str(here.parent / "eval_linear.py"),
                   help="the eval_linear.py to check (the evaluation part)")
    p.add_argument("--arch-vit", default="vit_tiny", choices=["vit_tiny", "vit_small"],
                   help="model B (model A is resnet18)")
    p.add_argument("--steps", type=int, default=1, help="iterations per epoch (more than 1: centres, momentum and "
                   "Adam moments in use)")
    p.add_argument("--epoch", type=int, default=1, help="the epoch the iterations start in (0: frozen last layers)")
    p.add_argument("--run-epochs", type=int, default=1, help="epochs of --steps iterations each (2: across an "
                   "epoch boundary)")
    p.add_argument("--epochs", type=int, default=100, help="run length (schedules); the authors' code needs >= 50")
    p.add_argument("--batch", type=int, default=4, help="images per step (and process)")
    p.add_argument("--local-crops", type=int, default=2, help="local crops per image")
    p.add_argument("--crop-px", type=int, nargs=2, default=[224, 96], metavar=("GLOBAL", "LOCAL"),
                   help="crop sizes of the step (both models are built for 224 px either way)")
    p.add_argument("--out-dim", type=int, default=256, help="K")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops (their initial weights use theirs, 0)")
    p.add_argument("--per-tensor", action="store_true", help="also one row per tensor under per-tensor rows")
    p.add_argument("--all-steps", action="store_true", help="a full table for every step, not only the last")
    p.add_argument("--aug-images", type=int, default=24, help="images of the augmentation part (sizes and modes "
                   "cycle)")
    p.add_argument("--eval-images", type=int, nargs=2, default=[200, 100], metavar=("TRAIN", "VAL"),
                   help="images of the evaluation part (VAL >= 100: their classifier splits it in 100 chunks)")
    p.add_argument("--part", choices=PART_NAMES, help="run one part of --all (step: the options above)")
    p.add_argument("--all", action="store_true", help="the step as configured, then every other part")
    p.add_argument("--ddp-worker", metavar="OUT", help=argparse.SUPPRESS)  # one torchrun process of part ddp
    return p


def step_parity(args, mokd=None, A=None):
    """The step's comparison as configured by args; prints its tables; True when every row is equal."""
    if args.steps < 1 or args.batch < 2 or args.local_crops < 1 or args.run_epochs < 1 or \
            not 0 <= args.epoch < args.epoch + args.run_epochs <= args.epochs:
        raise ParityError("need --steps >= 1, --batch >= 2, --local-crops >= 1, --run-epochs >= 1 and "
                          "0 <= --epoch < --epoch + --run-epochs <= --epochs")
    gpx, lpx = args.crop_px
    t_start = time.perf_counter()
    mokd = mokd or load_mokd(args.mokd)
    status = check_authors_files(args.authors_dir)
    A = A or import_authors(args.authors_dir)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    # both models are built for 224 px (their input_size, our global crop size); other crop sizes go through both
    # codes' position-embedding interpolation, as their 96 px local crops do
    their_args = authors_args(A, args.arch_vit, args.batch, args.local_crops, args.out_dim, args.epochs)
    cfg = our_config(mokd, args.arch_vit, args.batch, args.local_crops, args.out_dim, args.epochs)
    shapes = our_shapes(mokd, cfg)
    pairs = {}
    for m in "ab":
        pairs[m], problems = name_map(shapes[m])
        if problems:
            raise ParityError(f"the name map does not cover model {m.upper()}:\n  " + "\n  ".join(problems))
    n_iter = args.steps * args.run_epochs
    batches = make_batches(n_iter, args.batch, args.local_crops, gpx, lpx, args.seed + 1000 * rank)

    print(f"mokd.py: {os.path.relpath(args.mokd)}")
    differing = {k: v for k, v in status.items() if v != "same"}
    print(f"authors' code: {args.authors_dir}; files against commit {AUTHORS_COMMIT[:7]}: "
          f"{'all same' if not differing else differing}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads" +
          (f"; process {rank} of {world} (torchrun, gloo; its own crops)" if world > 1 else ""))
    print(f"pair: A = resnet18 (their cnn, SGD), B = {args.arch_vit}/16 (their vit, AdamW)")
    span = (f"epoch {args.epoch}" if args.run_epochs == 1 else
            f"epochs {args.epoch} to {args.epoch + args.run_epochs - 1}, {args.steps} step(s) each")
    print(f"batch {args.batch}, 2 x {gpx} + {args.local_crops} x {lpx} px crops, K {args.out_dim}; {span}, "
          f"{n_iter} step(s)")

    tape, times = DropPathTape(), {}
    spill = tempfile.TemporaryDirectory(prefix="authors_parity_rows_") if n_iter > 2 else None
    reference = Record(spill_dir=spill.name if spill else None)
    t = time.perf_counter()
    theirs64 = AuthorsRun(A, their_args, batches, args.epoch, reference, tape, pairs, shapes, check_names=True,
                          per_epoch=args.steps)
    theirs64.run(torch.float64, record_masks=True)
    times["theirs, float64"] = time.perf_counter() - t
    init = theirs64.initial
    for m in "ab":
        live = theirs64.live_fingerprints[m]
        stored = AUTHORS_FINGERPRINTS.get(args.arch_vit, {}).get(m)
        same_setup = (args.out_dim == FINGERPRINT_SETUP["out_dim"])
        note = ("matches the stored one" if live == stored else f"stored: {stored}") if same_setup else "(other K)"
        print(f"name map, model {m.upper()}: {len(pairs[m])} entries, each mapped both ways; their state dict: "
              f"{live[0]} entries,\n  fingerprint {live[1]} {note}")

    masks = [mask for step in tape.masks.values() for _, mask in step]
    print(f"drop-path masks drawn by their code: {len(masks)} calls, {sum(int((~k).sum()) for k in masks)} of "
          f"{sum(k.numel() for k in masks)} rows dropped; replayed in the other three runs")

    runs = {"ours64": Record(reference), "ours32": Record(reference), "theirs32": Record(reference)}
    t = time.perf_counter()
    AuthorsRun(A, their_args, batches, args.epoch, runs["theirs32"], tape, pairs, shapes, init=init,
               per_epoch=args.steps).run(torch.float32, record_masks=False)
    times["theirs, float32"] = time.perf_counter() - t
    for name, dtype in (("ours64", torch.float64), ("ours32", torch.float32)):
        t = time.perf_counter()
        OurRun(mokd, cfg, batches, args.epoch, runs[name], tape, pairs, init, args.steps, world).run(dtype)
        times[f"ours, {'float64' if dtype == torch.float64 else 'float32'}"] = time.perf_counter() - t

    print("\ncolumns: f64 = our float64 run vs theirs. abs = max |difference|; rel = abs / max |their value|, per "
          "tensor,\n  the largest over the row's tensors; (n) = tensors in the row. verdict: equal when rel <= tol = "
          f"max({TOL_F64:.0e},\n  {NOISE_FACTOR:.0f} x 2^-29 x theirs32 rel), at most {TOL_CAP:.0e}. ours32 = our "
          "float32 run vs their float64 run;\n  theirs32 = their float32 run vs their float64 run (the noise scale).")
    all_equal = True
    for step in range(n_iter):
        rows = table_rows(step, reference, runs, args.per_tensor)
        equal, n, scaled, worst, worst_rel, ratio_row, ratio = summary(rows)
        expected = [label for label, r in rows if rank > 0 and "BatchNorm buffers" in label and verdict(r) != "equal"]
        all_equal &= equal + len(expected) == n
        epoch = args.epoch + step // args.steps
        if args.all_steps or step == n_iter - 1 or any(verdict(r) != "equal" for _, r in rows):
            print_table(f"step {step + 1} of {n_iter} (epoch {epoch}, iteration "
                        f"{args.steps * epoch + step % args.steps})", rows)
        print(f"step {step + 1}: float64 {equal} of {n} rows equal ({scaled} with a tolerance above {TOL_F64:.0e}); "
              f"closest to its tolerance:\n  {worst} (rel {fmt(worst_rel)});\n  largest ratio of our float32 rel "
              f"diff to theirs: {ratio:.1f} ({ratio_row})")
        if expected:
            print(f"  expected differences on process {rank}: {', '.join(expected)}. Running statistics only: their "
                  "DDP-wrapped student (two forward calls a step) and ResNet teacher take rank 0's BatchNorm buffers "
                  "before each forward, ours once a step and not the teacher's. Only rank 0's are saved, and there "
                  "both agree; with SyncBatchNorm (CUDA) every rank holds the same statistics.")
    times["total"] = time.perf_counter() - t_start
    if spill:
        spill.cleanup()
    print("\nwall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(("verdict: every quantity equal" + (" (or an expected difference, above)" if rank > 0 else ""))
          if all_equal else "verdict: SOME QUANTITIES DIFFER (rows marked DIFFERS)")
    return all_equal


# ======================================================================================
# 9. The other parts of --all: augmentation, run schedules, an epoch boundary, two processes, evaluation.
# ======================================================================================
PART_NAMES = ("step", "augmentation", "schedules", "boundary", "ddp", "evaluation")
TOL_EXACT = 1e-12  # schedules: both codes compute them in float64 with numpy; equal means equal to rounding
TOL_FEATURE = 1e-4  # evaluation: float32 features of two implementations (attention kernels differ)


def part_table(title, rows):
    """rows: [(label, value text, verdict)] with verdict "equal", "expected" or "DIFFERS"; prints them, returns
    (equal, expected, differing) counts."""
    print(f"\n{title}")
    width = max([len(r[0]) for r in rows] + [8])
    for label, text, v in rows:
        print(f"{label:<{width}}  {v:<8} {text}")
    counts = [sum(r[2] == v for r in rows) for v in ("equal", "expected", "DIFFERS")]
    print(f"rows: {counts[0]} equal, {counts[1]} expected differences, {counts[2]} differ")
    return counts


def max_rel(ours, theirs):
    """(max |a - b|, that / max |b|) of two arrays or numbers (inf when the shapes differ)."""
    a, b = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    return tensor_diff(a, b)


# ---- augmentation (item 1) ----
class TorchRandom:
    """Stand-in for the `random` module the authors' utils/preprocess.py imports (their GaussianBlur and
    Solarization): random() and uniform(a, b) = a + (b - a) * random(), as Python's, each number drawn from torch's
    global generator (torch.rand(()) as a Python float), so both pipelines consume the same numbers in the same
    order. `draws` counts them."""

    def __init__(self):
        self.draws = 0

    def random(self):
        self.draws += 1
        return torch.rand(()).item()

    def uniform(self, a, b):
        return a + (b - a) * self.random()


AUG_MODES = ("RGB", "L", "RGBA", "P", "LA", "CMYK", "I;16", "1")


def aug_images(folder, n, seed=0):
    """n image files of different sizes and modes in folder: [(path, mode, (w, h))]."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(224, 224), (500, 375), (37, 53), (96, 300), (1024, 683), (64, 64), (300, 97), (250, 250)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        mode = AUG_MODES[i % len(AUG_MODES)]
        rgb = (torch.rand(3, 1, 1, generator=g) * 255 * torch.linspace(0.2, 1, w).view(1, 1, w)
               + torch.randint(0, 60, (3, h, w), generator=g)).clamp(0, 255).to(torch.uint8)
        img = Image.fromarray(rgb.permute(1, 2, 0).numpy())
        if mode == "I;16":
            img = img.convert("L").point(lambda v: v * 257, "I").convert("I;16")  # 16-bit grey
        elif mode != "RGB":
            img = img.convert(mode)
        path = os.path.join(folder, f"{i}_{mode.replace(';', '')}.{'jpg' if mode in ('CMYK',) else 'png'}")
        img.save(path)
        out.append((path, mode, (w, h)))
    return out


def augmentation_part(args, mokd, A):
    """Item 1: their DINODataAugmentation and our MultiCropAugmentation on the same images and seeds."""
    import torchvision
    sys_random = importlib.import_module("utils.preprocess")
    their_aug = importlib.import_module("augmentations.dino_augmentation")
    rows = []
    with tempfile.TemporaryDirectory(prefix="authors_parity_aug_") as folder:
        files = aug_images(folder, args.aug_images)
        loaded = {}
        for path, mode, size in files:
            theirs = torchvision.datasets.folder.pil_loader(path)  # what their ImageFolder reads
            ours = mokd.read_rgb(path)
            same = theirs.size == ours.size and torch.equal(torch.as_tensor(np.asarray(theirs)),
                                                            torch.as_tensor(np.asarray(ours)))
            loaded[path] = ours
            if mode == "I;16":
                rows.append((f"loader, {mode} {size[0]}x{size[1]}", "pil_loader clips 16-bit values to 255, our "
                             "read_rgb scales by 255/65535 (README Deviations)", "equal" if same else "expected"))
            else:
                rows.append((f"loader, {mode} {size[0]}x{size[1]}", "their pil_loader and our read_rgb give the "
                             "same RGB pixels" if same else "the RGB pixels differ", "equal" if same else "DIFFERS"))
        for recipe in ("imagenet", "cifar10"):
            r = mokd.RECIPES[recipe]
            G, L, n_local = r["global_crop_size"], r["local_crop_size"], r["local_crops_number"]
            theirs = their_aug.DINODataAugmentation(r["global_crops_scale"], r["local_crops_scale"], n_local)
            # their class builds 224 / 96 px crops; the CIFAR recipe's sizes are set on its three crop transforms
            for t, px in ((theirs.global_transfo1, G), (theirs.global_transfo2, G), (theirs.local_transfo, L)):
                t.transforms[0].size = (px, px)
            ours = mokd.MultiCropAugmentation(G, L, n_local, r["global_crops_scale"], r["local_crops_scale"])
            mean, std = mokd.image_stats(torch.device("cpu"))
            worst, equal_images, draws, rng_same = 0.0, 0, 0, 0
            for k, (path, mode, size) in enumerate(files):
                img = loaded[path]
                stand_in = TorchRandom()
                with torch.random.fork_rng(devices=[]), patched(sys_random, "random", stand_in), \
                        warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.manual_seed(args.seed + k)
                    a = theirs(img)
                    state_a = torch.get_rng_state()
                    torch.manual_seed(args.seed + k)
                    b = mokd.normalise([c[None] for c in ours(img)], mean, std)
                    state_b = torch.get_rng_state()
                draws += stand_in.draws
                rng_same += torch.equal(state_a, state_b)
                diffs = [max_rel(y[0], x)[0] for x, y in zip(a, b)] if len(a) == len(b) else [math.inf]
                worst = max([worst] + diffs)
                equal_images += all(d == 0 for d in diffs)
            n = len(files)
            rows.append((f"{recipe}: 2 x {G} + {n_local} x {L} px, scales {tuple(r['global_crops_scale'])} "
                         f"{tuple(r['local_crops_scale'])}", f"{equal_images} of {n} images: all {2 + n_local} "
                         f"crops bit-identical after normalisation (max |diff| {fmt(worst)}); torch's generator in "
                         f"the same state after both: {rng_same} of {n}; their blur / solarisation drew {draws} "
                         "numbers through the stand-in", "equal" if equal_images == n and rng_same == n else
                         "DIFFERS"))
    rows.append(("blur and solarisation draws", "theirs from Python's random (float64, a stream per worker), ours "
                 "from torch's generator (float32, seeded per image): DEVIATION 8, same distributions (test_mokd.py: "
                 "test_blur_draws_from_torch_have_dinos_distribution); here both drew torch's numbers", "expected"))
    counts = part_table("augmentation: their DINODataAugmentation (their random module's draws routed through "
                        "torch's generator) vs our MultiCropAugmentation + normalise", rows)
    return counts[2] == 0


# ---- schedules of whole runs (item 2) ----
class ProbeDone(Exception):
    """Raised right after a loop has set its learning rates and weight decays for one iteration."""


class ProbeImage:
    def cuda(self, *args, **kwargs):
        raise ProbeDone


class OneIteration:
    """A loader of length 1: their train_one_epoch(epoch=k) then reads its schedules at iteration 1 * k + 0 = k."""

    def __len__(self):
        return 1

    def __iter__(self):
        yield [ProbeImage()], None


class LengthOnly:
    """Stand-in for their DataLoader where only its length (iterations per epoch) is read."""

    def __init__(self, n, sampler):
        self.n, self.sampler = n, sampler

    def __len__(self):
        return self.n


class ScheduleRun(AuthorsRun):
    """Their train(args) up to their train_one_epoch, with a loader of `niter` iterations per epoch: keeps their
    bound arguments (schedules, loss objects, optimisers) and, per probed iteration k, the lr and weight decay per
    tensor that their train_one_epoch sets (called with a loader of one iteration at epoch k, stopped right after)."""

    def __init__(self, A, args, niter, probes, pairs, shapes):
        super().__init__(A, args, [[torch.zeros(1)]], 0, Record(), DropPathTape(), pairs, shapes)
        self.niter, self.probes, self.per_iteration = niter, probes, {}
        self.dtype = torch.float32

    def image_folder(self, root, transform=None):
        return FixedCrops(self.niter * self.args.batch_size_per_gpu)

    def data_loader(self, dataset, sampler=None, batch_size=None, **unused):
        return LengthOnly(self.niter, sampler)

    def observe_epoch(self, original):
        def train_one_epoch(*args, **kwargs):
            bound = inspect.signature(original).bind(*args, **kwargs)
            self.setup(bound.arguments)
            for h in self.hooks:
                h.remove()
            for k in self.probes:
                bound.arguments.update(data_loader=OneIteration(), epoch=k)
                try:
                    original(*bound.args, **bound.kwargs)
                except ProbeDone:
                    pass
                self.per_iteration[k] = {m: self.group_values(m) for m in "ab"}
            raise LoopEnded
        return train_one_epoch

    def run(self, dtype, record_masks=False):
        """Their train(args) up to the probes; a failure (a run their code cannot build) propagates unprinted."""
        self.dtype = dtype
        self.run_patched(self.A, self.A.vits.drop_path)

    def group_values(self, m):
        params = self.their_params(m, self.opts[m])
        return ({k: g["lr"] for k, _, _, g in params}, {k: g["weight_decay"] for k, _, _, g in params})


def our_group_values(mokd, run, S, k):
    """Our Run.step's lr and weight decay per tensor at iteration k (Run.step stopped after it sets them)."""
    def stop(*args, **kwargs):
        raise ProbeDone
    with patched(run, "losses", stop):
        try:
            run.step(None, 0, k, S)
        except ProbeDone:
            pass
    out = {}
    for m in "ab":
        names = {id(p): n for n, p in mokd.unwrap(run.students[m]).named_parameters()}
        params = [(names[id(p)], g) for g in run.opts[m].param_groups for p in g["params"]]
        out[m] = ({n: g["lr"] for n, g in params}, {n: g["weight_decay"] for n, g in params})
    return out


def as_f64(values):
    """{name: number} -> {name: float64 0-d tensor} (snap would go through the default dtype, float32)."""
    return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()}


def probe_iterations(epochs, niter, warmup, seed=0):
    """Iterations to probe: first, warm-up end, epoch boundaries around it, the middle, the last, and 12 drawn."""
    total = epochs * niter
    fixed = {0, 1, niter - 1, niter, warmup * niter - 1, warmup * niter, warmup * niter + 1, total // 2, total - 1}
    g = torch.Generator().manual_seed(seed)
    return sorted({k for k in fixed if 0 <= k < total} | set(torch.randint(0, total, (12,), generator=g).tolist()))


SCHEDULE_PAIRS = (  # (row, the authors' bound argument of train_one_epoch, our schedule)
    ("A lr, backbone and MLP head groups", "lr_schedule_cnn", ("a", "main", 0)),
    ("A weight decay, regularised group", "wd_schedule_cnn", ("a", "main", 1)),
    ("A lr, T-head group (their lr_schedule_vit)", "lr_schedule_vit", ("a", "thead", 0)),
    ("A weight decay, T-head group (their wd_schedule_vit)", "wd_schedule_vit", ("a", "thead", 1)),
    ("B lr, all groups", "lr_schedule_vit", ("b", "main", 0)),
    ("B weight decay, regularised group", "wd_schedule_vit", ("b", "main", 1)),
    ("B lr, T-head", "lr_schedule_vit", ("b", "thead", 0)),
    ("B weight decay, T-head", "wd_schedule_vit", ("b", "thead", 1)),
    ("teacher EMA momentum", "momentum_schedule", ("momentum",)),
)
TEMPERATURE_PAIRS = (("loss_cnn_fn", ("a", "tau")), ("loss_cnn_thead_fn", ("a", "tau")),
                     ("loss_cnn_ct_fn", ("tau_cross",)), ("loss_vit_fn", ("b", "tau")),
                     ("loss_vit_thead_fn", ("b", "tau")), ("loss_vit_ct_fn", ("tau_cross",)),
                     ("loss_search_ct_fn", ("tau_cross",)))


def our_schedule(S, path):
    x = S
    for key in path:
        x = x[key]
    return x


def schedules_part(args, mokd, A):
    """Item 2: every schedule array of whole runs from their train(), and the per-tensor values their loop sets at
    probed iterations, against ours; runs shorter than their warm-ups as expected differences."""
    n_images = 1281167  # ImageNet's training set: iterations per epoch = n_images // global batch (drop_last)
    configs = [(256, 100), (256, 50), (1024, 100), (1024, 300), (256, 20)]
    ok = True
    for batch, epochs in configs:
        niter = n_images // batch
        their_args = authors_args(A, args.arch_vit, batch, args.local_crops, args.out_dim, epochs)
        cfg = our_config(mokd, args.arch_vit, batch, args.local_crops, args.out_dim, epochs)
        shapes = our_shapes(mokd, cfg)
        pairs = {m: name_map(shapes[m])[0] for m in "ab"}
        probes = probe_iterations(epochs, niter, cfg["warmup_epochs"])
        S = mokd.build_schedules(cfg, niter, 1)
        title = (f"schedules: ImageNet recipe, global batch {batch} ({niter} iterations per epoch), {epochs} epochs, "
                 f"{epochs * niter} iterations")
        rows = []
        run = ScheduleRun(A, their_args, niter, probes, pairs, shapes)
        try:
            run.run(torch.float32, record_masks=False)
        except Exception as e:  # their code cannot build a run shorter than a warm-up
            failure = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            short = [f"{w} {cfg[w]}" for w in ("warmup_epochs", "warmup_teacher_temp_epochs_a",
                                               "warmup_teacher_temp_epochs_b") if cfg[w] > epochs]
            rows.append(("their train()", f"stops: {failure}; ours clamps the warm-ups longer than the run "
                         f"({', '.join(short)}) to the run (DEVIATION, README)", "expected" if short else "DIFFERS"))
            for label, _, path in SCHEDULE_PAIRS:
                rows.append((f"our {label}", f"{len(our_schedule(S, path))} values (their train() made none)",
                             "expected" if short else "DIFFERS"))
            ok &= part_table(title, rows)[2] == 0
            continue
        o = run.o
        for label, theirs, path in SCHEDULE_PAIRS:
            a, b = our_schedule(S, path), o[theirs]
            d = max_rel(a, b) if len(a) == len(b) else (math.inf, math.inf)
            rows.append((label, f"{len(b)} values, max |diff| {fmt(d[0])}, rel {fmt(d[1])}",
                         "equal" if d[1] <= TOL_EXACT else "DIFFERS"))
        for theirs, path in TEMPERATURE_PAIRS:
            a, b = our_schedule(S, path), o[theirs].teacher_temp_schedule
            d = max_rel(a, b) if len(a) == len(b) else (math.inf, math.inf)
            rows.append((f"teacher temperature per epoch, their {theirs}", f"{len(b)} values, rel {fmt(d[1])}",
                         "equal" if d[1] <= TOL_EXACT else "DIFFERS"))
        with default_dtype(torch.float32):
            ours_run = mokd.Run(cfg, torch.device("cpu"), 1)
        worst = {"lr": (0.0, 0.0), "weight decay": (0.0, 0.0)}
        for k in probes:
            mine = our_group_values(mokd, ours_run, S, k)
            for m in "ab":
                for j, what in enumerate(("lr", "weight decay")):
                    per = compare(as_f64(mine[m][j]), as_f64(run.per_iteration[k][m][j]))
                    worst[what] = max(worst[what], reduce(per), key=lambda x: x[1])
        for what, (d, rel) in worst.items():
            rows.append((f"{what} per tensor set by the loop, both models", f"at {len(probes)} iterations (first, "
                         f"warm-up end, epoch boundaries, last, 12 drawn): max |diff| {fmt(d)}, rel {fmt(rel)}",
                         "equal" if rel <= TOL_EXACT else "DIFFERS"))
        ok &= part_table(title, rows)[2] == 0
    return ok


def boundary_part(args, mokd, A):
    """Item 2, the loop's indexing: 2 epochs of 3 steps from epoch 0 (the frozen epoch ends between them)."""
    sub = build_parser().parse_args(["--authors-dir", args.authors_dir, "--mokd", args.mokd, "--steps", "3",
                                     "--epoch", "0", "--run-epochs", "2", "--crop-px", "64", "32", "--batch", "2",
                                     "--arch-vit", args.arch_vit, "--local-crops", "2", "--out-dim", str(args.out_dim),
                                     "--seed", str(args.seed)])
    print("\nan epoch boundary: 2 epochs of 3 steps from epoch 0 (last layers frozen in epoch 0), 64 / 32 px crops")
    return step_parity(sub, mokd, A)


# ---- two processes (item 3) ----
def ddp_part(args, mokd, A):
    """Item 3: the step in two processes under torchrun (gloo), each with its own crops; every rank's table."""
    import subprocess
    here = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory(prefix="authors_parity_ddp_") as tmp:
        out = os.path.join(tmp, "rank")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", here,
               "--ddp-worker", out, "--authors-dir", args.authors_dir, "--mokd", args.mokd, "--steps", "2",
               "--epoch", "1", "--crop-px", "64", "32", "--batch", "2", "--local-crops", "2",
               "--arch-vit", args.arch_vit, "--out-dim", str(args.out_dim), "--seed", str(args.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        print("\ntwo processes: torchrun --nproc_per_node=2 (gloo), 2 steps of epoch 1, batch 2 per process, 64 / 32 "
              "px crops; each process compares its own four runs")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        verdicts = []
        for rank in range(2):
            path = f"{out}.{rank}"
            text = open(path).read() if os.path.exists(path) else ""
            print(f"\n---- process {rank} ----\n{text}")
            verdicts.append("verdict: every quantity equal" in text)
        if r.returncode not in (0, 1) or not text:
            print(f"torchrun exited with {r.returncode}; the end of its output:\n{(r.stdout + r.stderr)[-3000:]}")
            return False
    return all(verdicts)


def ddp_worker(args):
    """One torchrun process of ddp_part: the step with DDP-wrapped students on both sides; output to OUT.<rank>."""
    import datetime
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))  # a failed rank cannot hang the other
    rank = dist.get_rank()
    with open(f"{args.ddp_worker}.{rank}", "w") as f, contextlib.redirect_stdout(f):
        try:
            ok = step_parity(args)
        except Exception as e:
            print(f"error: {type(e).__name__}: {e}")
            raise
        finally:
            dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


# ---- evaluation protocol (item 4) ----
class ImagenetLoaderStandIn:
    """Stand-in for ImagenetLoader, a name their eval_knn.py derives a class from at module level but never defines
    (so the file cannot be imported as shipped); that class is not used here."""


def load_authors_eval_knn(authors_dir):
    """Their eval_knn.py executed unchanged as a module, with ImagenetLoader defined beforehand (timm is stubbed by
    import_authors when missing). Returns the module."""
    path = Path(authors_dir) / "eval_knn.py"
    module = types.ModuleType("authors_eval_knn")
    module.__file__ = str(path)
    module.ImagenetLoader = ImagenetLoaderStandIn
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


def eval_images(mokd, root, n_train, n_val, seed):
    """<root>/train and <root>/val image folders of the demo's synthetic shapes (6 classes), 64 px PNGs."""
    for split, n, s in (("train", n_train, seed + 1), ("val", n_val, seed + 2)):
        shapes = mokd.SyntheticShapes(n, s, 64)
        for i in range(n):
            img, y = shapes[i]
            os.makedirs(os.path.join(root, split, f"c{y}"), exist_ok=True)
            img.save(os.path.join(root, split, f"c{y}", f"{i}.png"))


def load_eval_linear(path):
    spec = importlib.util.spec_from_file_location("eval_linear_checked", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluation_part(args, mokd, A):
    """Item 4: their eval_knn.py's extract_feature_pipeline and knn_classifier (called) and our eval_linear.py --knn
    on identical backbone weights and images: features, top-1 and top-5 for k = 10, 20, 100, 200."""
    ev = load_eval_linear(args.eval_linear)
    knn = load_authors_eval_knn(args.authors_dir)
    ks, T = (10, 20, 100, 200), 0.07
    ok = True
    with tempfile.TemporaryDirectory(prefix="authors_parity_eval_") as tmp:
        eval_images(mokd, tmp, args.eval_images[0], args.eval_images[1], args.seed)
        for arch in ("resnet18", args.arch_vit):
            torch.manual_seed(args.seed)
            bb = mokd.build_backbone(arch, {"stem": "imagenet", "patch_size": 16, "global_crop_size": 224}).eval()
            net = bb.net if arch in mokd.RESNETS else bb
            meta = {"arch": arch, "patch_size": 16, "stem": "imagenet", "image_size": 224, "source": "random init",
                    "which": "teacher"}
            torch.save({"state_dict": net.state_dict(), "meta": meta}, os.path.join(tmp, "ours.pth"))
            their_file = os.path.join(tmp, "theirs.pth")  # their loader's format: key "teacher", "backbone." names
            torch.save({"teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()}, "epoch": 0}, their_file)
            theirs = their_knn(knn, A, arch, tmp, their_file, net.state_dict(), ks, T, args)
            ours = our_knn(ev, os.path.join(tmp, "ours.pth"), tmp, ks, T)
            rows = eval_rows(ours, theirs, knn, ks, T)
            ok &= part_table(f"evaluation: {arch} teacher backbone (random init, identical weights), "
                             f"{args.eval_images[0]} training / {args.eval_images[1]} validation images (224 px "
                             "after resize 256 + centre crop); our feature: "
                             f"{json.dumps(ours['json'].get('knn_feature'))}", rows)[2] == 0
    return ok


def their_knn(knn, A, arch, root, weights, state, ks, T, args):
    """Their extract_feature_pipeline(args) and knn_classifier, called, in a one-process gloo group."""
    e_args = knn.get_args_parser().parse_args(
        ["--input_size", "224", "--batch_size_per_gpu", "50", "--arch", arch, "--patch_size", "16",
         "--pretrained_weights", weights, "--checkpoint_key", "teacher", "--method", "mokd", "--num_workers", "0",
         "--avgpool_patchtokens", "0", "--use_cuda", "False", "--data_path", root])
    loaded = {}

    def load_pretrained(original):
        def load(model, path, key, method):  # observer: their loader is strict=False; check every weight arrived
            out = original(model, path, key, method)
            got = model.state_dict()
            loaded["missing"] = sorted(set(state) ^ set(k for k in got if k in state or not k.startswith("fc")))
            loaded["same"] = all(torch.equal(got[k], v) for k, v in state.items() if k in got)
            return out
        return load

    pg = tempfile.NamedTemporaryFile(prefix="authors_parity_pg_", delete=False).name
    os.remove(pg)
    dist.init_process_group("gloo", init_method=f"file://{pg}", rank=0, world_size=1)
    try:
        with contextlib.ExitStack() as stack:
            enter = stack.enter_context
            # their pipeline reads dataset.target, which torchvision's ImageFolder calls targets: an alias
            enter(patched(knn.ReturnIndexDataset, "target", property(lambda dataset: dataset.targets)))
            enter(patched(knn.checkpoint_io, "load_pretrained_weights",
                          load_pretrained(knn.checkpoint_io.load_pretrained_weights)))
            enter(patched(nn.Module, "cuda", lambda module, device=None: module))
            enter(patched(torch.Tensor, "cuda", lambda tensor, *a, **k: tensor))
            enter(contextlib.redirect_stdout(io.StringIO()))
            enter(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            train_f, test_f, train_y, test_y = knn.extract_feature_pipeline(e_args)
            acc = {k: knn.knn_classifier(train_f, train_y, test_f, test_y, k, T, int(train_y.max()) + 1, False)
                   for k in ks}
    finally:
        dist.destroy_process_group()
        if os.path.exists(pg):
            os.remove(pg)
    if loaded.get("missing") or not loaded.get("same"):
        raise ParityError(f"their loader did not take every weight ({loaded})")
    return {"train": train_f, "val": test_f, "train_y": train_y, "val_y": test_y, "acc": acc}


def our_knn(ev, weights, root, ks, T):
    """Our eval_linear.py --knn (its defaults) on the same folders; the features it passed to knn_classify."""
    seen = []
    original = ev.knn_classify

    def knn_classify(train_f, train_y, test_f, test_y, *a, **kw):
        seen.append((train_f, train_y, test_f, test_y))
        return original(train_f, train_y, test_f, test_y, *a, **kw)
    out = io.StringIO()
    with patched(ev, "knn_classify", knn_classify), contextlib.redirect_stdout(out):
        ev.main(["--backbone", weights, "--knn", "--train-path", os.path.join(root, "train"), "--val-path",
                 os.path.join(root, "val"), "--nb-knn", *map(str, ks), "--temperature", str(T), "--num-workers", "0",
                 "--device", "cpu", "--batch-size-per-gpu", "50"])
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    train_f, train_y, test_f, test_y = seen[0]
    return {"train": train_f, "val": test_f, "train_y": train_y, "val_y": test_y, "json": result}


def unvoted_share(train_f, train_y, test_f, test_y, k, T, C):
    """% of test images whose label got no vote among its k neighbours while fewer than 5 classes got votes: where
    their top-5 (which ranks classes without a vote too, DINO#89) may count a hit that ours does not."""
    sim, idx = (test_f @ train_f.T).topk(k, dim=1)
    votes = torch.zeros(len(test_f), C).scatter_add_(1, train_y[idx], (sim / T).exp())
    few = (votes > 0).sum(1) < 5
    unvoted = votes.gather(1, test_y[:, None])[:, 0] == 0
    return 100.0 * float((few & unvoted).sum()) / len(test_f)


def eval_rows(ours, theirs, knn, ks, T):
    import torch.nn.functional as F
    rows = []
    same_order = torch.equal(ours["train_y"], theirs["train_y"]) and torch.equal(ours["val_y"], theirs["val_y"])
    rows.append(("labels, both sets, in order", "same" if same_order else "differ", "equal" if same_order else
                 "DIFFERS"))
    normed = {}
    for split in ("train", "val"):
        a = F.normalize(ours[split].double(), dim=1)
        b = theirs[split].double()
        normed[split] = a.float()
        d = max_rel(a, b)
        rows.append((f"features, {split} ({tuple(b.shape)} theirs, {tuple(a.shape)} ours), L2-normalised",
                     f"max |diff| {fmt(d[0])}, rel {fmt(d[1])} (tol {TOL_FEATURE:.0e})",
                     "equal" if d[1] <= TOL_FEATURE else "DIFFERS"))
    C = int(theirs["train_y"].max()) + 1
    for k in ks:
        o = ours["json"]["knn"][str(k)]
        t1, t5 = theirs["acc"][k]
        rows.append((f"k={k} top-1", f"theirs {t1:.3f}, ours {o['top1']:.3f}",
                     "equal" if abs(t1 - o["top1"]) < 1e-9 else "DIFFERS"))
        if o["top5"] is None:
            rows.append((f"k={k} top-5", f"theirs {t5:.3f}, ours none ({C} classes)", "expected"))
            continue
        gap = t5 - o["top5"]
        share = unvoted_share(normed["train"], ours["train_y"], normed["val"], ours["val_y"], k, T, C) \
            if normed["train"].shape[1] == theirs["train"].shape[1] else math.nan
        v = "equal" if abs(gap) < 1e-9 else ("expected" if 0 < gap <= share + 1e-9 else "DIFFERS")
        rows.append((f"k={k} top-5", f"theirs {t5:.3f}, ours {o['top5']:.3f}" + (
            f" (their top-5 counts classes without a vote, DINO#89: {share:.1f} % of images have an unvoted label "
            "among fewer than 5 voted classes)" if v == "expected" else ""), v))
    return rows


def run_parts(args, argv):
    """--part NAME: that part in this process. --all: each part in a process of its own (its memory is returned
    before the next starts), the step with the options given; the last line is the verdict over all parts."""
    import subprocess
    if not args.all:
        mokd = load_mokd(args.mokd)
        A = import_authors(args.authors_dir)
        functions = {"step": lambda: step_parity(args, mokd, A), "augmentation": augmentation_part,
                     "schedules": schedules_part, "boundary": boundary_part, "ddp": ddp_part,
                     "evaluation": evaluation_part}
        t = time.perf_counter()
        f = functions[args.part]
        ok = f() if args.part == "step" else f(args, mokd, A)
        print(f"part {args.part}: {'every row equal (or an expected difference)' if ok else 'DIFFERS'} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        return 0 if ok else 1
    rest = [a for a in argv if a != "--all"]
    results, times = {}, {}
    for name in PART_NAMES:
        print(f"\n{'=' * 30} part: {name} {'=' * 30}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, os.path.abspath(__file__), *rest, "--part", name]).returncode
        times[name] = time.perf_counter() - t
        results[name] = rc == 0
        if rc not in (0, 1):
            print(f"part {name} failed: exit status {rc} (its error is above)", flush=True)
    print("\nparts: " + ", ".join(f"{k} {'equal' if v else 'DIFFERS'} ({times[k]:.0f} s)" for k, v in results.items())
          + f"; total {sum(times.values()) / 60:.1f} min")
    bad = [k for k, v in results.items() if not v]
    print(f"verdict over all parts: {'every part equal' if not bad else 'DIFFERS in ' + ', '.join(bad)}")
    return 0 if not bad else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)
    if not (args.all or args.part):
        return 0 if step_parity(args) else 1
    if args.all and args.part:
        raise ParityError("give --all or --part, not both")
    return run_parts(args, argv)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
