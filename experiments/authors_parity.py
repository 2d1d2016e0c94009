"""One MOKD training step of mokd.py, compared quantity by quantity with the authors' own code.

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

Stand-ins replace only what cannot run on a CPU or without the authors' data: the dataset and DataLoader (fixed
random crops), the distributed set-up (a one-process gloo group, DistributedDataParallel as a plain wrapper, BatchNorm
left unsynchronised: the same numbers with one process), .cuda() and torch.cuda.synchronize(), the checkpoint restart
(it sets the start epoch, and the float32 run's initial weights) and the tensorboard writer. At import, three timm
names their ViT file imports (none of them used) and torchvision's removed resnet.model_urls are stubbed when missing.
Their drop_path draws the masks in their float64 run (wrapped, not changed); the other three runs replay them.
Not covered: fp16 autocast with grad scalers, several processes (SyncBatchNorm, all-reduces), the augmentations.
Sections: 1 constants and the name map | 2 loading both codes | 3 records and comparison | 4 shared randomness |
5 the authors' run | 6 our run | 7 the table | 8 main.
"""
import argparse
import contextlib
import functools
import hashlib
import importlib.util
import inspect
import io
import math
import os
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

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


class Record:
    """What one run observed, per (step, row key). The reference run (the authors' float64 run) keeps float64
    copies; a run given a reference compares each value on arrival and keeps only (max abs diff, max rel diff)."""

    def __init__(self, reference=None):
        self.reference = reference
        self.values = {}  # (step, key) -> value, or its comparison with the reference

    def put(self, step, key, value):
        value = snap(value)
        if self.reference is None:
            self.values[(step, key)] = value
        else:
            self.values[(step, key)] = compare(value, self.reference.values.get((step, key)))

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


class FixedCrops(torch.utils.data.Dataset):
    """Stand-in for their ImageFolder: only its length is read (by their DistributedSampler)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raise RuntimeError("the DataLoader stand-in serves fixed batches")


class FixedLoader:
    """Stand-in for their DataLoader: serves the fixed batches ([crops], labels) in order, calls on_start before and
    on_end after each iteration, then ends their loop (LoopEnded) instead of starting another epoch."""

    def __init__(self, batches, sampler, on_start, on_end):
        self.batches, self.sampler, self.on_start, self.on_end = batches, sampler, on_start, on_end

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, crops in enumerate(self.batches):
            self.on_start(i)
            yield crops, torch.zeros(len(crops[0]), dtype=torch.long)
            self.on_end(i)  # runs when their loop asks for the next batch: the iteration is complete
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

    def __init__(self, A, args, batches, epoch, record, tape, pairs, shapes, init=None, check_names=False):
        self.A, self.args, self.batches, self.epoch, self.record, self.tape = A, args, batches, epoch, record, tape
        self.pairs, self.shapes, self.init, self.check_names = pairs, shapes, init, check_names
        self.to_ours = {m: their_to_ours(pairs[m]) for m in "ab"}
        self.step, self.hooks, self.counts, self.initial, self.problems = 0, [], {}, None, []
        self.live_fingerprints = {}  # model -> fingerprint of the authors' live student state dict
        self.log = io.StringIO()  # their printed output
        self.pg_file = None

    # ---- stand-ins ----
    def init_one_process(self, args):
        """Stand-in for their init_distributed_mode: a one-process gloo group (their centre update all-reduces)."""
        args.rank, args.gpu, args.world_size = 0, 0, 1
        self.pg_file = tempfile.NamedTemporaryFile(prefix="authors_parity_pg_", delete=False).name
        os.remove(self.pg_file)
        dist.init_process_group("gloo", init_method=f"file://{self.pg_file}", rank=0, world_size=1)

    def image_folder(self, root, transform=None):
        return FixedCrops(len(self.batches) * len(self.batches[0][0]))

    def data_loader(self, dataset, sampler=None, batch_size=None, **unused):
        if batch_size != len(self.batches[0][0]):
            raise ParityError(f"their batch size {batch_size} differs from the crops' {len(self.batches[0][0])}")
        batches = [[c.to(self.dtype) for c in crops] for crops in self.batches]
        return FixedLoader(batches, sampler, self.on_start, self.on_end)

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
            self.setup(inspect.signature(original).bind(*args, **kwargs).arguments)
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

    def setup(self, o):
        """At their train_one_epoch: keep the objects, check the name map, keep the initial weights, add hooks."""
        self.o = o
        self.models = {"a": {"student": o["student_cnn"].module, "teacher": o["teacher_cnn_without_ddp"]},
                       "b": {"student": o["student_vit"].module, "teacher": o["teacher_vit_without_ddp"]}}
        self.ddp_students = {"a": o["student_cnn"], "b": o["student_vit"]}
        self.opts = {"a": o["optimizer_cnn"], "b": o["optimizer_vit"]}
        for m in "ab":
            for role, module in self.models[m].items():
                live = {k: tuple(v.shape) for k, v in module.state_dict().items()}
                if self.check_names:
                    self.problems += check_against_authors(self.pairs[m], self.shapes[m], live, f"{m} {role}")
                    if role == "student":
                        self.live_fingerprints[m] = fingerprint(live)
        if self.problems:
            raise ParityError("the name map does not match the authors' models:\n  " + "\n  ".join(self.problems))
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
        it = len(self.batches) * self.epoch + i
        self.record.put(i, "EMA momentum m", float(self.o["momentum_schedule"][it]))
        losses = [self.o[k] for k in CENTRE_MAP.values()] + [self.o["loss_search_ct_fn"]]
        self.record.put(i, "teacher temperatures", [float(f.teacher_temp_schedule[self.epoch]) for f in losses])
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
            enter(patched(nn.parallel, "DistributedDataParallel", OneProcessDDP))
            enter(patched(nn.Module, "cuda", lambda module, device=None: module))
            enter(patched(torch.Tensor, "cuda", lambda tensor, *args, **kwargs: tensor))
            enter(patched(torch.cuda, "synchronize", lambda device=None: None))
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
                if dist.is_initialized():
                    dist.destroy_process_group()
                if self.pg_file and os.path.exists(self.pg_file):
                    os.remove(self.pg_file)


# ======================================================================================
# 6. Our run: mokd.py's Run.step on the same crops, from the authors' initial weights.
# ======================================================================================
class OurRun:
    """mokd.py's Run over the same batches from the authors' initial weights, observed into a Record."""

    def __init__(self, mokd, cfg, batches, epoch, record, tape, pairs, init):
        self.mokd, self.cfg, self.batches, self.epoch, self.record, self.tape = mokd, cfg, batches, epoch, record, tape
        self.pairs, self.init, self.step = pairs, init, 0
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
            run = mokd.Run(self.cfg, torch.device("cpu"), 1)
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
            S = mokd.build_schedules(self.cfg, len(self.batches), 1)
            try:
                for i, crops in enumerate(self.batches):
                    it = len(self.batches) * self.epoch + i
                    self.on_start(i, S, it)
                    run.step([c.to(dtype) for c in crops], self.epoch, it, S)
                    self.on_end(i, run)
            finally:
                for h in hooks:
                    h.remove()

    def on_start(self, i, S, it):
        self.step, self.counts = i, {}
        self.tape.start_step(i)
        self.record.put(i, "EMA momentum m", float(S["momentum"][it]))
        e, a, b, c = self.epoch, S["a"]["tau"], S["b"]["tau"], S["tau_cross"]
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
# 8. Main.
# ======================================================================================
def build_parser():
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--authors-dir", required=True, help="checkout of github.com/skyoux/mokd (commit "
                   f"{AUTHORS_COMMIT[:7]})")
    p.add_argument("--mokd", default=str(here.parent / "mokd.py"), help="the mokd.py to check")
    p.add_argument("--arch-vit", default="vit_tiny", choices=["vit_tiny", "vit_small"],
                   help="model B (model A is resnet18)")
    p.add_argument("--steps", type=int, default=1, help="iterations (more than 1: centres, momentum and Adam "
                   "moments in use)")
    p.add_argument("--epoch", type=int, default=1, help="the epoch the iterations run in (0: frozen last layers)")
    p.add_argument("--epochs", type=int, default=100, help="run length (schedules); the authors' code needs >= 50")
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--local-crops", type=int, default=2, help="96 px local crops per image (global: 2 x 224 px)")
    p.add_argument("--out-dim", type=int, default=256, help="K")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops (their initial weights use theirs, 0)")
    p.add_argument("--per-tensor", action="store_true", help="also one row per tensor under per-tensor rows")
    p.add_argument("--all-steps", action="store_true", help="a full table for every step, not only the last")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch < 2 or args.local_crops < 1 or not 0 <= args.epoch < args.epochs:
        raise ParityError("need --steps >= 1, --batch >= 2, --local-crops >= 1 and 0 <= --epoch < --epochs")
    t_start = time.perf_counter()
    mokd = load_mokd(args.mokd)
    status = check_authors_files(args.authors_dir)
    A = import_authors(args.authors_dir)
    their_args = authors_args(A, args.arch_vit, args.batch, args.local_crops, args.out_dim, args.epochs)
    cfg = our_config(mokd, args.arch_vit, args.batch, args.local_crops, args.out_dim, args.epochs)
    shapes = our_shapes(mokd, cfg)
    pairs = {}
    for m in "ab":
        pairs[m], problems = name_map(shapes[m])
        if problems:
            raise ParityError(f"the name map does not cover model {m.upper()}:\n  " + "\n  ".join(problems))
    batches = make_batches(args.steps, args.batch, args.local_crops, 224, 96, args.seed)

    print(f"mokd.py: {os.path.relpath(args.mokd)}")
    differing = {k: v for k, v in status.items() if v != "same"}
    print(f"authors' code: {args.authors_dir}; files against commit {AUTHORS_COMMIT[:7]}: "
          f"{'all same' if not differing else differing}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"pair: A = resnet18 (their cnn, SGD), B = {args.arch_vit}/16 (their vit, AdamW)")
    print(f"batch {args.batch}, 2 x 224 + {args.local_crops} x 96 px crops, K {args.out_dim}; epoch {args.epoch}, "
          f"{args.steps} step(s)")

    tape, times = DropPathTape(), {}
    reference = Record()
    t = time.perf_counter()
    theirs64 = AuthorsRun(A, their_args, batches, args.epoch, reference, tape, pairs, shapes, check_names=True)
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
    AuthorsRun(A, their_args, batches, args.epoch, runs["theirs32"], tape, pairs, shapes, init=init).run(
        torch.float32, record_masks=False)
    times["theirs, float32"] = time.perf_counter() - t
    for name, dtype in (("ours64", torch.float64), ("ours32", torch.float32)):
        t = time.perf_counter()
        OurRun(mokd, cfg, batches, args.epoch, runs[name], tape, pairs, init).run(dtype)
        times[f"ours, {'float64' if dtype == torch.float64 else 'float32'}"] = time.perf_counter() - t

    print("\ncolumns: f64 = our float64 run vs theirs. abs = max |difference|; rel = abs / max |their value|, per "
          "tensor,\n  the largest over the row's tensors; (n) = tensors in the row. verdict: equal when rel <= tol = "
          f"max({TOL_F64:.0e},\n  {NOISE_FACTOR:.0f} x 2^-29 x theirs32 rel), at most {TOL_CAP:.0e}. ours32 = our "
          "float32 run vs their float64 run;\n  theirs32 = their float32 run vs their float64 run (the noise scale).")
    all_equal = True
    for step in range(args.steps):
        rows = table_rows(step, reference, runs, args.per_tensor)
        equal, n, scaled, worst, worst_rel, ratio_row, ratio = summary(rows)
        all_equal &= equal == n
        if args.all_steps or step == args.steps - 1:
            print_table(f"step {step + 1} of {args.steps} (epoch {args.epoch}, iteration "
                        f"{args.steps * args.epoch + step})", rows)
        print(f"step {step + 1}: float64 {equal} of {n} rows equal ({scaled} with a tolerance above {TOL_F64:.0e}); "
              f"closest to its tolerance:\n  {worst} (rel {fmt(worst_rel)});\n  largest ratio of our float32 rel "
              f"diff to theirs: {ratio:.1f} ({ratio_row})")
    times["total"] = time.perf_counter() - t_start
    print("\nwall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print("verdict: every quantity equal" if all_equal else "verdict: SOME QUANTITIES DIFFER (rows marked DIFFERS)")
    return 0 if all_equal else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
