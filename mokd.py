"""MOKD: Multi-Mode Online Knowledge Distillation for self-supervised visual representation learning.

Song, Xie, Zhang, Luo, CVPR 2023, arXiv 2304.06461. One self-contained file (standard library, torch, torchvision,
numpy, PIL): augmentation, both backbones, heads, losses, the cross-attention feature search, schedules and a
torchrun-compatible training loop. Copy it alone and `python mokd.py` runs the demo.

Two models A and B (any pair: a CNN and a ViT in the paper) each have a student and an EMA teacher.
Per model X with partner Y, the four losses of the paper and where they are:

    paper   code                                   what                                              section
    L_sm    dino_loss(s_m[X], t_m[X])               self-distillation, MLP head (DINO loss)           5
    L_st    dino_loss(s_t[X], t_t[X])               self-distillation, T-head (DINO loss)             5
    L_cm    dino_loss(s_m[X], t_m[Y])               cross-distillation, MLP head                      5
    L_ct    cross_entropy(s_t[X] locals, search_Y)  cross-attention feature search (search: 4)     4, 5
    L_X   = L_sm + L_st + lambda_X * (L_cm + L_ct)   (model_losses)                                    5
    tau_s   0.1 (STUDENT_TEMP)   tau_t  teacher_temp_schedule   m  cosine_schedule(0.996 -> 1)     6

Sections: 1 config | 2 data and augmentation | 3 backbones | 4 heads and the search | 5 losses |
6 schedules, optimisers, EMA | 7 distributed set-up, checkpoints, resuming | 8 the MOKD step and training loop |
9 k-NN, the demo, main.

Run:
    python mokd.py                                   # demo: synthetic images, CPU or one GPU
    python mokd.py --data-path /imagenet/train       # authors' recipe on one process
    torchrun --nproc_per_node=8 mokd.py --arch-a resnet18 --arch-b vit_small --data-path /imagenet/train
Departures from the authors' code are tagged `DEVIATION:` and listed in README.md.
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torchvision import transforms as T

STUDENT_TEMP = 0.1
CENTER_MOMENTUM = 0.9
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNETS = ("resnet18", "resnet34", "resnet50")  # torchvision; widths 512, 512, 2048
VITS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads
ARCHS = sorted(RESNETS) + sorted(VITS)
LOSS_NAMES = ("L_sm", "L_st", "L_cm", "L_ct")
# Run.step order: the 8 terms, then per teacher the entropy of its outputs and of their batch mean (see entropy)
ENTROPY_KEYS = ["a.entropy", "b.entropy", "a.batch_entropy", "b.batch_entropy"]
VALUE_KEYS = [f"{m}.{k}" for m in "ab" for k in LOSS_NAMES] + ENTROPY_KEYS


class MOKDError(Exception):
    """A problem with the user's input or run; main() prints it without a traceback and exits with 2."""


# ======================================================================================
# 1. Config. A recipe (--recipe) fills every flag left unset: `demo` without --data-path, `imagenet` with it;
#    per-model flags (-a / -b) default from the model's family. A flag given explicitly always wins.
# ======================================================================================
RECIPES = {
    # The authors' ImageNet recipe: ResNet-18 + ViT-S/16, 2 x 224 + 8 x 96 px crops, 100 epochs.
    "imagenet": dict(arch_a="resnet18", arch_b="vit_small", patch_size=16, global_crop_size=224, local_crop_size=96,
                     local_crops_number=8, global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25),
                     out_dim=65536, epochs=100, batch_size_per_gpu=32, warmup_epochs=10, momentum_teacher=0.996,
                     warmup_teacher_temp=0.04, teacher_temp=0.07, cross_warmup_teacher_temp_epochs=30,
                     freeze_last_layer=1, log_every=50),
    # 32 px images (CIFAR-10): ResNet-18 with the CIFAR stem + ViT-tiny/4, 2 x 32 + 6 x 16 px, K = 4096.
    "cifar10": dict(arch_a="resnet18", arch_b="vit_tiny", patch_size=4, global_crop_size=32, local_crop_size=16,
                    local_crops_number=6, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4),
                    out_dim=4096, epochs=100, batch_size_per_gpu=256, warmup_epochs=10, momentum_teacher=0.996,
                    warmup_teacher_temp=0.04, teacher_temp=0.07, cross_warmup_teacher_temp_epochs=30,
                    freeze_last_layer=1, log_every=20),
    # The demo: about 3 minutes on 2 CPU cores (16 px synthetic shapes). Chosen for a short run (README, "Demo"): few
    # prototypes, a sharp fixed teacher temperature, a fast teacher, no warm-ups, no frozen last layer.
    "demo": dict(arch_a="resnet18", arch_b="vit_tiny", patch_size=4, global_crop_size=16, local_crop_size=8,
                 local_crops_number=4, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4),
                 out_dim=64, epochs=4, batch_size_per_gpu=32, warmup_epochs=1, momentum_teacher=0.95,
                 warmup_teacher_temp=0.04, teacher_temp=0.02, cross_warmup_teacher_temp_epochs=0,
                 freeze_last_layer=0, log_every=8,
                 family=dict(resnet=dict(lr=0.3, warmup_teacher_temp_epochs=0),
                             vit=dict(lr=1e-3, warmup_teacher_temp_epochs=0))),
}
FAMILY = {  # authors' per-family recipe (spec: Optimisation); a recipe's `family` entry may override keys
    "resnet": dict(optimizer="sgd", lr=0.1, min_lr=0.0048, weight_decay=1e-4, weight_decay_end=1e-4,
                   warmup_teacher_temp_epochs=50, lam=1.0, clip_grad=3.0, norm_last_layer=True),
    "vit": dict(optimizer="adamw", lr=3e-4, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4,
                warmup_teacher_temp_epochs=30, lam=0.1, clip_grad=3.0, norm_last_layer=False),
}
PER_MODEL = list(FAMILY["resnet"])
# Keys that must match between a checkpoint and the run that resumes it.
GEOMETRY_KEYS = ("arch_a", "arch_b", "patch_size", "out_dim", "thead_dim", "thead_depth", "thead_heads",
                 "head_hidden_dim", "bottleneck_dim", "global_crop_size", "local_crop_size",
                 "local_crops_number", "global_crops_scale", "local_crops_scale", "stem")


def family(arch):
    return "resnet" if arch in RESNETS else "vit"


def str2bool(v):
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; a flag without one names its recipe or family values in its own help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def recipe_help(key, text):
    """`text` plus the value each recipe gives `key`, e.g. "(recipe: imagenet 100, cifar10 100, demo 4)"."""
    values = ", ".join(f"{name} {recipe[key]}" for name, recipe in RECIPES.items())
    return f"{text} (recipe: {values})"


def per_model_help(key, m, text):
    """`text` plus the family defaults of `key` and any recipe's override of it for model m."""
    families = ", ".join(f"{fam} {FAMILY[fam][key]}" for fam in FAMILY)
    overrides = ""
    for name, recipe in RECIPES.items():
        values = [f"{fam} {v[key]}" for fam, v in recipe.get("family", {}).items() if key in v]
        overrides += f"; recipe {name}: {', '.join(values)}" if values else ""
    return f"model {m.upper()}: {text} (family default: {families}{overrides})"


def build_parser():
    p = argparse.ArgumentParser("mokd", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--recipe", default=None, choices=list(RECIPES),
      help="preset of every flag left unset (default: demo without --data-path, imagenet with it)")
    a("--arch-a", default=None, help=recipe_help("arch_a", f"model A, one of {ARCHS}"))
    a("--arch-b", default=None, help=recipe_help("arch_b", "model B"))
    a("--patch-size", type=int, default=None, help=recipe_help("patch_size", "ViT patch size"))
    a("--drop-path", type=float, default=0.1, help="stochastic depth of ViT students (teachers: none)")
    a("--stem", default="auto", choices=["auto", "imagenet", "cifar"],
      help="ResNet stem; auto = cifar (3x3 conv, stride 1, no max-pool) when the global crop is <= 64 px")
    a("--out-dim", type=int, default=None, help=recipe_help("out_dim", "K, the heads' output dimension"))
    a("--head-hidden-dim", type=int, default=2048, help="MLP head hidden width (DINO)")
    a("--bottleneck-dim", type=int, default=256, help="MLP head bottleneck width (DINO)")
    a("--thead-dim", type=int, default=None, help="T-head width d (default, the authors' rule: the ViT's width, the "
      "wider one with two ViTs, 384 with two CNNs)")
    a("--thead-depth", type=int, default=3, help="transformer blocks in the T-head")
    a("--thead-heads", type=int, default=6, help="attention heads in the T-head")
    a("--thead-lr", type=float, default=3e-4, help="peak lr of a CNN's T-head (transformer schedule; scaled by "
      "global batch / 256)")
    a("--thead-min-lr", type=float, default=1e-5, help="final lr of a CNN's T-head (not scaled)")
    a("--thead-weight-decay", type=float, default=0.04, help="start weight decay of a CNN's T-head")
    a("--thead-weight-decay-end", type=float, default=0.4, help="final weight decay of a CNN's T-head")
    per_model = (("optimizer", None, "optimiser"), ("lr", float, "peak lr, scaled by global batch / 256"),
                 ("min_lr", float, "final lr (not scaled)"), ("weight_decay", float, "start weight decay"),
                 ("weight_decay_end", float, "final weight decay"),
                 ("warmup_teacher_temp_epochs", int, "epochs of the self terms' teacher-temperature warm-up"),
                 ("lam", float, "lambda, the weight of the cross terms"),
                 ("clip_grad", float, "per-tensor gradient-norm clip"),
                 ("norm_last_layer", str2bool, "freeze weight_g of the MLP head's last layer"))
    for m in "ab":
        for key, typ, text in per_model:
            name = "--" + key.replace("lam", "lambda").replace("_", "-") + f"-{m}"
            choices = ["sgd", "adamw"] if key == "optimizer" else None
            a(name, type=typ, default=None, choices=choices, dest=f"{key}_{m}", help=per_model_help(key, m, text))
    a("--warmup-teacher-temp", type=float, default=None,
      help=recipe_help("warmup_teacher_temp", "initial teacher temperature"))
    a("--teacher-temp", type=float, default=None, help=recipe_help("teacher_temp", "final teacher temperature"))
    a("--cross-warmup-teacher-temp-epochs", type=int, default=None,
      help=recipe_help("cross_warmup_teacher_temp_epochs", "warm-up epochs of the cross terms' temperature"))
    a("--momentum-teacher", type=float, default=None,
      help=recipe_help("momentum_teacher", "initial EMA momentum, cosine to 1"))
    a("--epochs", type=int, default=None, help=recipe_help("epochs", "training epochs"))
    a("--warmup-epochs", type=int, default=None,
      help=recipe_help("warmup_epochs", "linear lr warm-up epochs, clamped to --epochs"))
    a("--freeze-last-layer", type=int, default=None,
      help=recipe_help("freeze_last_layer", "epochs during which the heads' last layers stay fixed"))
    a("--batch-size-per-gpu", type=int, default=None, help=recipe_help("batch_size_per_gpu", "images per process"))
    a("--global-crop-size", type=int, default=None, help=recipe_help("global_crop_size", "global crops, px"))
    a("--local-crop-size", type=int, default=None, help=recipe_help("local_crop_size", "local crops, px"))
    a("--local-crops-number", type=int, default=None, help=recipe_help("local_crops_number", "local crops"))
    a("--global-crops-scale", type=float, nargs=2, default=None,
      help=recipe_help("global_crops_scale", "area range of the global crops"))
    a("--local-crops-scale", type=float, nargs=2, default=None,
      help=recipe_help("local_crops_scale", "area range of the local crops"))
    a("--data-path", default=None, help="ImageFolder tree; without it, a built-in synthetic dataset")
    a("--synthetic-size", type=int, default=768, help="images in the synthetic dataset (no --data-path)")
    a("--knn-images", type=int, default=900,
      help="held-out synthetic images for the demo's k-NN (2/3 bank, 1/3 test)")
    a("--bad-images", default="skip", choices=["skip", "error"],
      help="unreadable image: skip it (warn, substitute the next image, count per epoch) or stop the run")
    a("--num-workers", type=int, default=None, help="DataLoader workers per process (default: min(8, cpus))")
    a("--output-dir", default="output", help="checkpoint.pth, log.jsonl and config.json go here")
    a("--resume", default=None, help="resume from this checkpoint (default: OUTPUT_DIR/checkpoint.pth if present)")
    a("--saveckp-freq", type=int, default=0, help="also keep checkpoint0010.pth ... every N epochs (0: only "
      "checkpoint.pth, overwritten at each epoch)")
    a("--seed", type=int, default=0, help="seed of the initial weights, the data order and the augmentations")
    a("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    a("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    a("--max-steps", type=int, default=None, help="stop after N optimiser steps (writes a checkpoint)")
    a("--log-every", type=int, default=None, help=recipe_help("log_every", "steps between log.jsonl records"))
    a("--dist-timeout", type=float, default=30, help="minutes a collective may wait for another rank")
    a("--compile", action="store_true", help="torch.compile students and teachers")
    a("--grad-checkpointing", action="store_true", help="recompute ViT blocks in backward to save memory")
    return p


def resolve_config(args):
    """Fill unset flags (the recipe's, then family defaults) and return a plain dict. Overrides nothing set."""
    # DEVIATION: the authors' loop overrides some flags; per-model values here are flags with family defaults.
    cfg = vars(args).copy()
    if cfg["recipe"] is None:
        cfg["recipe"] = "demo" if cfg["data_path"] is None else "imagenet"
    recipe = RECIPES[cfg["recipe"]]
    for k, v in recipe.items():
        if k != "family" and cfg[k] is None:
            cfg[k] = v
    for m in "ab":
        arch = cfg[f"arch_{m}"]
        if arch not in ARCHS:
            raise MOKDError(f"--arch-{m} {arch!r} is not a known architecture; choices: {', '.join(ARCHS)}")
        defaults = {**FAMILY[family(arch)], **recipe.get("family", {}).get(family(arch), {})}
        for k in PER_MODEL:
            if cfg[f"{k}_{m}"] is None:
                cfg[f"{k}_{m}"] = defaults[k]
    for k in ("global_crops_scale", "local_crops_scale"):
        cfg[k] = list(cfg[k])
    if cfg["thead_dim"] is None:
        cfg["thead_dim"] = thead_width(cfg["arch_a"], cfg["arch_b"])
    if cfg["stem"] == "auto":
        cfg["stem"] = "cifar" if cfg["global_crop_size"] <= 64 else "imagenet"
    if cfg["device"] is None:
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg["precision"] is None:
        # DEVIATION: bf16 by default on CUDA (the authors use fp16, available as --precision fp16).
        cfg["precision"] = "bf16" if cfg["device"] == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if cfg["num_workers"] is None:
        cfg["num_workers"] = min(8, os.cpu_count() or 1)
    return cfg


def thead_width(arch_a, arch_b):
    """The authors' T-head width: the ViT's width (the wider ViT's with two), 384 for two CNNs."""
    vit_widths = [VITS[arch][0] for arch in (arch_a, arch_b) if arch in VITS]
    return max(vit_widths, default=384)


def feature_stride(arch, cfg):
    if family(arch) == "vit":
        return cfg["patch_size"]
    return 8 if cfg["stem"] == "cifar" else 32


def flag(key):
    """cfg key -> its command-line flag (lam_a -> --lambda-a)."""
    return "--" + key.replace("lam_", "lambda_").replace("_", "-")


def validate_config(cfg, world_size):
    """Refuse impossible settings before anything is built (one message naming the flag)."""
    def bad(msg):
        raise MOKDError(msg)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        bad("--device cuda was requested but no CUDA device is available")
    if cfg["device"] == "cpu" and cfg["precision"] == "fp16":
        bad("--precision fp16 needs CUDA; use fp32 or bf16 on the CPU")
    for k in ("patch_size", "out_dim", "thead_dim", "thead_depth", "thead_heads", "epochs", "batch_size_per_gpu",
              "global_crop_size", "local_crop_size", "log_every", "head_hidden_dim", "bottleneck_dim",
              "synthetic_size", "knn_images", "max_steps"):
        if cfg[k] is not None and cfg[k] < 1:
            bad(f"{flag(k)} must be a positive integer, got {cfg[k]}")
    for k in ("local_crops_number", "warmup_epochs", "freeze_last_layer", "num_workers", "saveckp_freq",
              "cross_warmup_teacher_temp_epochs", "warmup_teacher_temp_epochs_a", "warmup_teacher_temp_epochs_b"):
        if cfg[k] < 0:
            bad(f"{flag(k)} must be >= 0, got {cfg[k]}")
    per_model = ("lr", "min_lr", "weight_decay", "weight_decay_end", "lam", "clip_grad")
    shared = ["thead_lr", "thead_min_lr", "thead_weight_decay", "thead_weight_decay_end", "drop_path"]
    for k in [f"{k}_{m}" for m in "ab" for k in per_model] + shared:
        if not math.isfinite(cfg[k]) or cfg[k] < 0:
            bad(f"{flag(k)} must be a finite number >= 0, got {cfg[k]}")
    for k in ("warmup_teacher_temp", "teacher_temp"):
        if not math.isfinite(cfg[k]) or cfg[k] <= 0:
            bad(f"{flag(k)} must be a positive temperature, got {cfg[k]}")
    if not 0 <= cfg["momentum_teacher"] <= 1:
        bad(f"--momentum-teacher must lie in [0, 1], got {cfg['momentum_teacher']}")
    if cfg["drop_path"] >= 1:
        bad(f"--drop-path must be < 1, got {cfg['drop_path']}")
    for k in ("global_crops_scale", "local_crops_scale"):
        lo, hi = cfg[k]
        if not 0 < lo <= hi <= 1:
            bad(f"{flag(k)} must satisfy 0 < min <= max <= 1, got {lo} {hi}")
    if cfg["local_crops_number"] == 0 and (cfg["lam_a"] > 0 or cfg["lam_b"] > 0):
        # L_ct searches with local-crop queries: without local crops the cross terms are incomplete.
        bad("--local-crops-number 0 leaves L_ct without queries; give local crops or set --lambda-a 0 --lambda-b 0")
    if cfg["thead_dim"] % cfg["thead_heads"]:
        bad(f"--thead-dim {cfg['thead_dim']} is not divisible by --thead-heads {cfg['thead_heads']}")
    for m in "ab":
        arch, s = cfg[f"arch_{m}"], feature_stride(cfg[f"arch_{m}"], cfg)
        for k in ("global_crop_size", "local_crop_size"):
            size = cfg[k]
            if family(arch) == "vit" and size % s:
                bad(f"{flag(k)} {size} is not divisible by --patch-size {s} (model {m.upper()}, {arch})")
            if size < s:
                bad(f"{flag(k)} {size} is smaller than model {m.upper()}'s ({arch}, stem "
                    f"{cfg['stem']}) downsampling factor {s}: no feature map would remain")
    has_bn = any(family(cfg[f"arch_{m}"]) == "resnet" for m in "ab")
    if has_bn and cfg["batch_size_per_gpu"] < 2 and not (cfg["device"] == "cuda" and world_size > 1):
        bad("--batch-size-per-gpu 1 leaves BatchNorm (ResNet) with one image per process; use at least 2")
    if cfg["output_dir"]:
        check_writable_dir(cfg["output_dir"], "--output-dir")


def check_writable_dir(path, flag):
    """Create the folder if needed and write a file into it: fails now, not after hours of work."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise MOKDError(f"{flag} {path!r} cannot be created or written: {e.strerror or e}") from None


# ======================================================================================
# 2. Data: DINO multi-crop augmentation, robust image loading, the synthetic demo dataset.
# ======================================================================================
def to_rgb(img):
    """Any PIL mode -> 8-bit RGB (16-bit and float images are rescaled, alpha is dropped)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 255.0 if img.mode == "F" and arr.max() <= 255 else (65535.0 if arr.max() > 255 else 255.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_rgb(path):
    """Open an image file as RGB; any failure becomes a MOKDError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Exception as e:  # PIL raises many types for broken files
        raise MOKDError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def check_image_folder(path, flag="--data-path"):
    """Up-front checks of an ImageFolder tree; returns nothing, raises MOKDError naming the problem."""
    if not os.path.exists(path):
        raise MOKDError(f"{flag} {path!r} does not exist")
    if not os.path.isdir(path):
        raise MOKDError(f"{flag} {path!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise MOKDError(f"{flag} {path!r} has no class folders (expected {path}/<class>/<image>)")
    exts = torchvision.datasets.folder.IMG_EXTENSIONS
    for c in classes:
        for _, _, files in os.walk(os.path.join(path, c)):
            if any(f.lower().endswith(exts) for f in files):
                return
    raise MOKDError(f"{flag} {path!r} has class folders but no image files ({', '.join(exts)})")


def survey_image_folder(root, samples, crop_size):
    """Warnings about an ImageFolder tree: image files the loader skips (formats it does not read, files outside a
    class folder), files it reads more than once (one file reached by several paths), images far smaller than the
    global crops. Each names a count and an example path."""
    read = torchvision.datasets.folder.IMG_EXTENSIONS
    image_like = {e for e in Image.registered_extensions() if e not in read} | {".heic", ".heif", ".avif"}
    skipped = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        at_root = os.path.samefile(dirpath, root)  # ImageFolder reads no file directly under the root
        for name in files:
            ext = os.path.splitext(name)[1].lower()
            if ext in image_like or (at_root and ext in read):
                skipped.append(os.path.join(dirpath, name))
    warnings = []
    if skipped:
        warnings.append(f"{len(skipped)} image files under {root!r} are not read (a format the loader does not read "
                        f"({', '.join(read)}), or outside a class folder), e.g. {', '.join(skipped[:3])}")
    seen, repeats = {}, []
    for path, _ in samples:
        real = os.path.realpath(path)
        if real in seen:
            repeats.append(f"{path} = {seen[real]}")
        seen.setdefault(real, path)
    if repeats:
        warnings.append(f"{len(repeats)} images are read more than once (one file reached by several paths, e.g. "
                        f"through a symbolic link), e.g. {repeats[0]}")
    short_sides = []
    for path, _ in samples[:: max(1, len(samples) // 16)][:16]:
        try:
            with Image.open(path) as img:
                short_sides.append(min(img.size))
        except Exception:  # an unreadable file is reported when the loader reaches it
            continue
    median = sorted(short_sides)[len(short_sides) // 2] if short_sides else crop_size
    if median < crop_size / 2:
        fits = "cifar10" if median <= 48 else "imagenet"
        warnings.append(f"the images under {root!r} are about {median} px on their short side, far smaller than the "
                        f"{crop_size} px global crops; --recipe {fits} fits them")
    return warnings


SYNTHETIC_CLASSES = ("disc", "ring", "square", "triangle", "cross", "stripes")  # draw_synthetic's labels 0-5


def draw_synthetic(index, seed, size):
    """A procedurally drawn image of class index % 6: disc, ring, square, triangle, cross, stripes. The background is
    a smooth random colour field, so two crops of one image see different colours and colour cannot tell images
    apart; the shape, at a random position and scale, is lighter or darker than the field. The class is the shape."""
    rng = np.random.default_rng([seed, index])
    label = index % 6
    corners = torch.tensor(rng.uniform(0, 255, (1, 3, 2, 2)), dtype=torch.float32)  # a colour per image corner
    field = F.interpolate(corners, size=(size, size), mode="bilinear", align_corners=True)  # (1, 3, size, size)
    background = field[0].permute(1, 2, 0).numpy()  # (size, size, 3)
    shift = (1.0 if background.mean() < 128 else -1.0) * rng.uniform(80, 130)
    foreground = np.clip(background + shift + rng.normal(0, 25, 3), 0, 255)
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    r = size * rng.uniform(0.22, 0.4)
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(1, int(r / 3))
    if label == 0:
        d.ellipse(box, fill=255)
    elif label == 1:
        d.ellipse(box, outline=255, width=w)
    elif label == 2:
        d.rectangle(box, fill=255)
    elif label == 3:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    elif label == 4:
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    else:
        for k in range(-3, 4, 2):
            y = cy + k * r / 4
            d.rectangle((cx - r, y - w / 2, cx + r, y + w / 2), fill=255)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255  # (size, size, 1)
    pixels = background * (1 - alpha) + foreground * alpha + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), label


class RandomGaussianBlur:
    """PIL Gaussian blur with probability p and radius uniform in [0.1, 2.0] (DINO). Uses torch's RNG."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if torch.rand(()) >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=0.1 + 1.9 * torch.rand(()).item()))


class MultiCropAugmentation:
    """Image -> [g1, g2, local_1 .. local_n] uint8 tensors (3, H, W) (spec: Views); `normalise` finishes them."""

    def __init__(self, global_size, local_size, n_local, global_scale, local_scale):
        flip_colour = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)])
        # DEVIATION: DINO's workers end with ToTensor + Normalize; uint8 crops cost the workers 10-16 % less time
        # and the host-to-device copy 4x fewer bytes. normalise() applies the same arithmetic on the device.
        norm = T.PILToTensor()
        bicubic = T.InterpolationMode.BICUBIC

        def crop(size, scale):
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic, antialias=True)
        self.global1 = T.Compose([crop(global_size, global_scale), flip_colour, RandomGaussianBlur(1.0), norm])
        self.global2 = T.Compose([crop(global_size, global_scale), flip_colour, RandomGaussianBlur(0.1),
                                  T.RandomSolarize(128, p=0.2), norm])
        self.local = T.Compose([crop(local_size, local_scale), flip_colour, RandomGaussianBlur(0.5), norm])
        self.n_local = n_local

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]


def normalise(crops, mean, std):
    """A batch of uint8 crops (B, 3, H, W) -> on mean's device, float32 (x / 255 - mean) / std: the arithmetic of
    ToTensor + Normalize (bit-identical, tested). mean, std: (1, 3, 1, 1) tensors from image_stats."""
    return [c.to(mean.device, non_blocking=True).float().div(255).sub_(mean).div_(std) for c in crops]


def image_stats(device):
    return [torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD)]  # 2 x (1, 3, 1, 1)


def seeded(aug, img, seed, epoch, index):
    """Augment with torch's RNG seeded by (seed, epoch, index), leaving the caller's RNG untouched: the crops
    of an image never depend on which worker loads it, so data order and augmentation resume exactly."""
    # DEVIATION: the authors rely on per-worker RNG streams; per-image seeds make resume exact.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, epoch, index)) & 0x7FFFFFFF)
        return aug(img)


class ImageFolderMultiCrop(torchvision.datasets.ImageFolder):
    """ImageFolder whose samples are (crops, n_bad); unreadable files are skipped or stop the run (--bad-images)."""

    def __init__(self, root, transform, seed, bad_images):
        super().__init__(root, loader=read_rgb, allow_empty=True)  # labels are unused: an empty class is fine
        self.aug, self.seed, self.bad_images = transform, seed, bad_images

    def __getitem__(self, key):
        epoch, index = key  # from EpochSampler
        n_bad = 0
        for attempt in range(min(len(self.samples), 50)):  # 50 unreadable files in a row: the data is broken
            try:
                img = self.loader(self.samples[(index + attempt) % len(self.samples)][0])
                break
            except MOKDError as e:  # DEVIATION: the authors' loader crashes the worker on a broken file
                if self.bad_images == "error":
                    raise
                print(f"warning: skipping unreadable image ({e})", file=sys.stderr, flush=True)
                n_bad += 1
        else:
            raise MOKDError(f"{n_bad} unreadable images in a row from {self.samples[index][0]} on: is --data-path "
                            f"{self.root!r} corrupt? (each is named in a warning above)")
        return seeded(self.aug, img, self.seed, epoch, index), n_bad


class SyntheticMultiCrop(torch.utils.data.Dataset):
    """The built-in demo dataset: `n` synthetic images (see draw_synthetic), optionally transformed."""
    classes = SYNTHETIC_CLASSES

    def __init__(self, n, size, seed, transform):
        self.n, self.size, self.seed, self.aug = n, size, seed, transform

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        epoch, index = key  # from EpochSampler
        return seeded(self.aug, draw_synthetic(index, self.seed, self.size)[0], self.seed, epoch, index), 0


class EpochSampler(torch.utils.data.Sampler):
    """Global permutation seeded by (seed, epoch), split across ranks (rank::world), full batches only,
    starting at batch `start` (mid-epoch resume). Step s of the global batch is the same images whatever
    the number of processes."""

    def __init__(self, n, batch_per_rank, rank, world, seed):
        self.n, self.b, self.rank, self.world, self.seed = n, batch_per_rank, rank, world, seed
        self.epoch, self.start = 0, 0
        self.steps = n // (batch_per_rank * world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.b * self.world]
        mine = perm[self.rank:: self.world]  # (steps * b,)
        return iter((self.epoch, i) for i in mine[self.start * self.b:].tolist())

    def __len__(self):
        return (self.steps - self.start) * self.b


def eval_transform(crop_size):
    """Resize + CenterCrop at the global crop size (nothing but normalisation at <= 64 px)."""
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if crop_size <= 64:
        return T.Compose([T.Resize(crop_size, antialias=True), T.CenterCrop(crop_size)] + norm)
    return T.Compose([T.Resize(int(crop_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC,
                               antialias=True), T.CenterCrop(crop_size)] + norm)



# ======================================================================================
# 3. Backbones. Each returns (pooled (N, C), tokens (N, h*w, C), (h, w)).
# ======================================================================================
class ResNetBackbone(nn.Module):
    """torchvision's ResNet without fc; `net` loads into torchvision.models.resnetXX() with fc = Identity."""

    def __init__(self, arch, stem):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        if stem == "cifar":  # DEVIATION (small images): 3x3 conv, stride 1, no max-pool: 32 px keeps a 4x4 map
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.embed_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))  # (N, C, h, w)
        return x.mean((2, 3)), x.flatten(2).transpose(1, 2), tuple(x.shape[-2:])  # (N, C), (N, h*w, C), (h, w)


def drop_path(x, p, training):
    """Stochastic depth per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # scaled_dot_product_attention; False = the explicit softmax (tests compare them)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, C/h)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)  # (B, h, N, N)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (ViT and T-head), LayerNorm eps 1e-6, MLP ratio 4."""

    def __init__(self, dim, heads, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


def resize_pos_embed(pos, grid, new_grid):
    """(1, h*w, D) position embedding for `grid` -> (1, h'*w', D) for `new_grid`, bicubic."""
    if tuple(grid) == tuple(new_grid):
        return pos
    # DEVIATION: interpolate to an exact size (DINO passes a scale factor with a +0.1 offset).
    D = pos.shape[-1]
    pos = pos.reshape(1, *grid, D).permute(0, 3, 1, 2)  # (1, D, h, w)
    pos = F.interpolate(pos.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return pos.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)  # (1, h'*w', D)


def trunc_normal_init(module):
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """DINO-style ViT; parameter names match DINO and timm (cls_token, pos_embed, patch_embed.proj, blocks.N...)."""

    def __init__(self, dim, heads, patch, img_size, depth=12, drop_path_rate=0.0):
        super().__init__()
        self.embed_dim, self.patch, self.grid = dim, patch, (img_size // patch, img_size // patch)
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(trunc_normal_init)

    def tokens(self, x):
        x = self.patch_embed.proj(x)  # (N, D, h, w)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, D)
        pos = torch.cat([self.pos_embed[:, :1], resize_pos_embed(self.pos_embed[:, 1:], self.grid, grid)], 1)
        # pos: (1, 1+h*w, D), the CLS position first
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + pos, grid  # (N, 1+h*w, D)

    def run_blocks(self, x, keep_last=0):
        kept = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i >= len(self.blocks) - keep_last:
                kept.append(self.norm(x))
        return x, kept

    def forward(self, x):
        x, grid = self.tokens(x)
        x = self.norm(self.run_blocks(x)[0])  # (N, 1+h*w, D)
        return x[:, 0], x[:, 1:], grid

    def last_layers(self, x, n):
        """Outputs of the last n blocks after the final norm, each (N, 1+h*w, D) (linear-probe features)."""
        return self.run_blocks(self.tokens(x)[0], keep_last=n)[1]


def build_backbone(arch, cfg, drop_path_rate=0.0):
    if arch in RESNETS:
        return ResNetBackbone(arch, cfg["stem"])
    if arch in VITS:
        dim, heads = VITS[arch]
        return VisionTransformer(dim, heads, cfg["patch_size"], cfg["global_crop_size"], 12, drop_path_rate)
    raise MOKDError(f"unknown architecture {arch!r}; choices: {', '.join(ARCHS)}")


# ======================================================================================
# 4. Heads: the DINO MLP head h, the transformer head g and its cross-attention feature search.
# ======================================================================================
def weight_normed_last_layer(in_dim, out_dim, freeze_norm):
    """Weight-normalised Linear(in, K) without bias; the norm g starts at 1 and is frozen if freeze_norm."""
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0  # (K, 1)
    with torch.no_grad():
        g.fill_(1.0)
    g.requires_grad_(not freeze_norm)
    return layer


def last_layer_f32(layer, x):
    """The weight-normalised Linear to K in float32 whatever the autocast dtype: bf16 logits would round the
    teacher's sharpened targets (tau_t 0.04) before the float32 losses see them. (N, D) -> (N, K) float32."""
    # DEVIATION: the authors run the last layer under fp16 autocast.
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


class DINOHead(nn.Module):
    """h: Linear-GELU-Linear-GELU-Linear to the bottleneck, L2-normalise, weight-normalised Linear to K."""

    def __init__(self, in_dim, out_dim, norm_last_layer, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.apply(trunc_normal_init)
        self.last_layer = weight_normed_last_layer(bottleneck, out_dim, norm_last_layer)

    def forward(self, x):
        return last_layer_f32(self.last_layer, F.normalize(self.mlp(x), dim=-1, p=2))  # (N, K)


class THead(nn.Module):
    """g: project backbone tokens to width d, add a position embedding for the global crop's grid,
    optionally prepend a query token, 3 transformer blocks + LayerNorm, mean over tokens (query dropped),
    weight-normalised Linear(d, K). embed() and run() are split so the search embeds g1 once and tiles it."""

    def __init__(self, in_dim, dim, grid, out_dim, depth, heads):
        super().__init__()
        # DEVIATION: any pair of backbones; a Linear when widths differ (= the authors' 1x1 conv on a CNN map).
        self.grid = tuple(grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(trunc_normal_init)
        # After the truncated-normal init: the projection keeps PyTorch's default init, as the authors' 1x1 conv.
        self.proj = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)  # identity when widths match
        self.last_layer = weight_normed_last_layer(dim, out_dim, freeze_norm=False)  # g always trains (spec)

    def embed(self, tokens, grid):
        """(N, h*w, C) backbone tokens -> (N, h*w, d) projected and position-embedded."""
        return self.proj(tokens) + resize_pos_embed(self.pos_embed, self.grid, grid)

    def run(self, x, query=None):
        """(N, L, d) embedded tokens [+ query (N, d)] -> logits (N, K)."""
        if query is not None:
            x = torch.cat([query.unsqueeze(1).to(x.dtype), x], dim=1)  # (N, 1+L, d), no position on the query
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if query is not None:
            x = x[:, 1:]  # (N, L, d)
        return last_layer_f32(self.last_layer, x.mean(dim=1))  # (N, K)


class MOKDModel(nn.Module):
    """One model X: backbone f, MLP head h, T-head g (None for independent DINO in the benchmark)."""

    def __init__(self, arch, cfg, norm_last_layer, drop_path_rate=0.0, with_thead=True):
        super().__init__()
        self.arch = arch
        self.backbone = build_backbone(arch, cfg, drop_path_rate)
        C = self.backbone.embed_dim
        self.head = DINOHead(C, cfg["out_dim"], norm_last_layer, cfg["head_hidden_dim"], cfg["bottleneck_dim"])
        s = feature_stride(arch, cfg)
        grid = (cfg["global_crop_size"] // s,) * 2
        self.thead = THead(C, cfg["thead_dim"], grid, cfg["out_dim"], cfg["thead_depth"],
                           cfg["thead_heads"]) if with_thead else None

    def forward(self, global_crops, local_crops=None):
        """global_crops (2B, 3, G, G), local_crops (nB, 3, l, l) or None. Returns a dict:
        m (V*B, K) MLP-head logits, t (V*B, K) T-head logits, query (nB, d) detached local-crop queries,
        g1 (B, L, d) embedded tokens of global crop 1 (what the teacher's search attends over)."""
        out, pooled_all, ts = {}, [], []
        for i, x in enumerate((global_crops, local_crops)):
            if x is None or len(x) == 0:
                continue
            if isinstance(self.backbone, ResNetBackbone) and x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            pooled, tokens, grid = self.backbone(x)  # (N, C), (N, h*w, C)
            pooled_all.append(pooled)
            if self.thead is not None:
                emb = self.thead.embed(tokens, grid)  # (N, h*w, d)
                ts.append(self.thead.run(emb))
                if i == 0:
                    out["g1"] = emb[: len(x) // 2]  # (B, h*w, d): crop-major, so rows [0, B) are g1
                else:  # q_X: CNN = mean of projected tokens = proj(pooled); ViT = CLS (projected if widths differ)
                    out["query"] = self.thead.proj(pooled).detach()  # (nB, d), no gradient through the search
        out["m"] = self.head(torch.cat(pooled_all))  # (V*B, K): one head call for all crops, as DINO
        out["t"] = torch.cat(ts) if ts else None  # (V*B, K)
        return out


def search(teacher, g1, query, n_local):
    """Cross-attention feature search: teacher T-head over its own g1 tokens, tiled once per local crop,
    with the partner's query prepended. g1 (B, L, d), query (n*B, d) crop-major -> (n*B, K).
    Row j*B + b pairs the query of local crop j of image b with g1 of image b."""
    # DEVIATION: g1 is projected and position-embedded once, then tiled (the authors tile the raw CNN map).
    tiled = g1.repeat(n_local, 1, 1)  # (n*B, L, d): row j*B + b is image b
    return teacher.thead.run(tiled, query)


# ======================================================================================
# 5. Losses (computed in float32 whatever the autocast dtype).
# ======================================================================================
def f32(x):
    """Losses run in float32 whatever the autocast dtype (float64 stays float64, for tests)."""
    return x if x.dtype == torch.float64 else x.float()


def dino_loss(student, teacher, center, tau_t, n_global=2):
    """DINO loss (L_sm, L_st, L_cm): student (V*B, K), teacher (2*B, K), centre (1, K).
    Mean over (teacher global view i, student view v != i) of mean_b[-sum_k p_t log p_s]."""
    B = len(teacher) // n_global
    log_s = F.log_softmax(f32(student) / STUDENT_TEMP, dim=-1).unflatten(0, (-1, B))  # (V, B, K)
    p = F.softmax((f32(teacher) - center) / tau_t, dim=-1).unflatten(0, (n_global, B))  # (2, B, K)
    # All (i, v) pairs at once, minus the pairs v == i (DINO loops over the pairs: ~5 small kernels each).
    pairs = (p.sum(0) * log_s.sum(0)).sum(-1) - (p * log_s[:n_global]).sum((0, 2))  # (B,)
    return -pairs.mean() / (n_global * (len(log_s) - 1))


def cross_entropy(student, teacher, tau_t):
    """L_ct: mean_b[-sum_k softmax(t / tau_t) log softmax(s / tau_s)], no centre. Both (n*B, K)."""
    return (-(F.softmax(f32(teacher) / tau_t, -1) * F.log_softmax(f32(student) / STUDENT_TEMP, -1)).sum(-1)).mean()


def entropy(teacher, center, tau_t):
    """The two collapse signals of the teacher's centred, sharpened output p (N, K): the mean entropy of each image's
    p, and the entropy of p's mean over the batch. Collapse to uniform: both near log K. Collapse onto one
    prototype: both near 0. Healthy: the first well below log K, the second near it (confident and diverse)."""
    def h(q):  # entropy over the last dimension
        return -(q * torch.log(q.clamp_min(1e-12))).sum(-1)
    p = F.softmax((teacher.float() - center) / tau_t, dim=-1)  # (N, K)
    return h(p).mean(), h(p.mean(0))


class Centres(nn.Module):
    """The six DINO centres: c_sm, c_st, c_cm for each model (L_ct has none)."""

    def __init__(self, out_dim):
        super().__init__()
        for m in "ab":
            for term in ("sm", "st", "cm"):
                self.register_buffer(f"{term}_{m}", torch.zeros(1, out_dim))

    @torch.no_grad()
    def update(self, teachers):
        """c <- 0.9 c + 0.1 mean over the global batch of t; teachers: {name: (2B, K)}. One all-reduce."""
        names = list(teachers)
        sums = torch.stack([teachers[k].float().sum(0) for k in names])  # (n, K)
        count = len(teachers[names[0]])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            count *= dist.get_world_size()
        for k, s in zip(names, sums):
            getattr(self, k).mul_(CENTER_MOMENTUM).add_(s / count, alpha=1 - CENTER_MOMENTUM)


def model_losses(x, y, s, t_self, t_other, search_other, centres, tau_self, tau_cross, lam):
    """Model X's four terms and total L_X = L_sm + L_st + lambda_X (L_cm + L_ct) (spec: Losses of model X).
    s: student X outputs; t_self / t_other: teacher X / Y outputs; search_other: search_Y(q_X) (n*B, K)."""
    zero = s["m"].new_zeros((), dtype=torch.float32)
    L = {"L_sm": dino_loss(s["m"], t_self["m"], getattr(centres, f"sm_{x}"), tau_self)}
    L["L_st"] = dino_loss(s["t"], t_self["t"], getattr(centres, f"st_{x}"), tau_self) if s["t"] is not None else zero
    if lam > 0:
        L["L_cm"] = dino_loss(s["m"], t_other["m"], getattr(centres, f"cm_{x}"), tau_cross)
        n_global_rows = len(t_self["m"])  # 2B: student rows after them are the local crops, crop-major
        L["L_ct"] = cross_entropy(s["t"][n_global_rows:], search_other, tau_cross)
    else:
        L["L_cm"] = L["L_ct"] = zero
    total = L["L_sm"] + L["L_st"] + lam * (L["L_cm"] + L["L_ct"])
    return total, L


# ======================================================================================
# 6. Schedules (pure functions of epoch / iteration), optimisers, gradient clipping, teacher EMA.
# ======================================================================================
def cosine_schedule(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
    """One value per iteration: linear warm-up from start_warmup, then cosine from base to final."""
    # DEVIATION: a warm-up longer than the run is clamped to the run (the authors' code crashes).
    warm = min(warmup_epochs, epochs) * niter
    total = epochs * niter
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(total - warm) / max(1, total - warm)))
    return np.concatenate([np.linspace(start_warmup, base, warm), cos])


def teacher_temp_schedule(start, final, warmup_epochs, epochs):
    """tau_t per epoch: linear from start to final over warm-up epochs, then final (clamped to the run)."""
    # DEVIATION: the authors' code crashes when epochs < warm-up; we clamp the warm-up to the run.
    warm = min(warmup_epochs, epochs)
    return np.concatenate([np.linspace(start, final, warm), np.full(epochs - warm, final)])


def param_groups(model, thead_sched):
    """No weight decay for biases and 1-D tensors (DINO), except in a CNN's T-head, whose parameters all decay
    (the authors' optimiser groups); the T-head gets its own schedule tag."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        sched = thead_sched if name.startswith("thead.") else "main"
        reg = sched == "thead" or not (name.endswith(".bias") or p.ndim == 1)
        groups.setdefault((sched, reg), []).append(p)
    return [{"params": ps, "sched": s, "reg": r} for (s, r), ps in groups.items()]


def build_optimizer(model, cfg, m, device):
    thead_sched = "thead" if family(model.arch) == "resnet" else "main"  # CNN T-head: transformer schedule
    groups = param_groups(model, thead_sched)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg[f"optimizer_{m}"] == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, **fused)
    return torch.optim.AdamW(groups, lr=0.0, **fused)


def build_schedules(cfg, niter, world_size):
    """Every per-iteration / per-epoch schedule of the run, computed in one place."""
    E, W = cfg["epochs"], cfg["warmup_epochs"]
    scale = cfg["batch_size_per_gpu"] * world_size / 256.0  # linear lr scaling rule
    S = {"momentum": cosine_schedule(cfg["momentum_teacher"], 1.0, E, niter),
         "tau_cross": teacher_temp_schedule(cfg["warmup_teacher_temp"], cfg["teacher_temp"],
                                            cfg["cross_warmup_teacher_temp_epochs"], E)}
    for m in "ab":
        S[m] = {"main": (cosine_schedule(cfg[f"lr_{m}"] * scale, cfg[f"min_lr_{m}"], E, niter, W),
                         cosine_schedule(cfg[f"weight_decay_{m}"], cfg[f"weight_decay_end_{m}"], E, niter)),
                "thead": (cosine_schedule(cfg["thead_lr"] * scale, cfg["thead_min_lr"], E, niter, W),
                          cosine_schedule(cfg["thead_weight_decay"], cfg["thead_weight_decay_end"], E, niter)),
                "tau": teacher_temp_schedule(cfg["warmup_teacher_temp"], cfg["teacher_temp"],
                                             cfg[f"warmup_teacher_temp_epochs_{m}"], E)}
    return S


def set_schedule(opt, sched, it):
    for g in opt.param_groups:
        lr, wd = sched[g["sched"]]
        g["lr"] = float(lr[it])
        g["weight_decay"] = float(wd[it]) if g["reg"] else 0.0


def clip_per_tensor(params, max_norm):
    """DINO-style clipping: each gradient tensor's own norm is clipped to max_norm. A handful of multi-tensor
    kernels, not four per tensor (the small models of the CIFAR recipe are launch-bound on a GPU); no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm <= 0 or not grads:
        return
    scale = torch._foreach_norm(grads)  # per tensor: min(1, max_norm / (norm + 1e-6))
    torch._foreach_add_(scale, 1e-6)
    torch._foreach_reciprocal_(scale)
    torch._foreach_mul_(scale, max_norm)
    torch._foreach_clamp_max_(scale, 1.0)
    torch._foreach_mul_(grads, scale)


@torch.no_grad()
def ema_update(student_params, teacher_params, m):
    """teacher <- m teacher + (1 - m) student, over all parameters (BatchNorm buffers are not averaged)."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - m)


# ======================================================================================
# 7. Distributed set-up, checkpoints (written atomically, loaded strictly) and resuming.
# ======================================================================================
def setup_distributed(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python runs one process without a group."""
    # DEVIATION: the authors need a launcher and several GPUs; here torchrun or plain python, nccl or gloo.
    if "RANK" not in os.environ:
        return 0, 1, torch.device(cfg["device"])
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if cfg["device"] == "cuda":
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg["dist_timeout"]),
                            device_id=device if backend == "nccl" else None)
    return rank, world, device


def is_dist():
    return dist.is_available() and dist.is_initialized()


def say(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


def unwrap(model):
    """The plain module inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, rename: a crash mid-save leaves the old file intact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    """torch.load(weights_only=True) with a clear error for a missing, truncated or foreign file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MOKDError(f"checkpoint {path!r} does not exist") from None
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise MOKDError(f"checkpoint {path!r} is unreadable (truncated or not a mokd checkpoint): "
                        f"{type(e).__name__}: {first_line}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "models" not in ckpt:
        raise MOKDError(f"checkpoint {path!r} is not a mokd.py checkpoint (no 'config' / 'models' entries)")
    return ckpt


def load_strict(module, state, what):
    """load_state_dict(strict=True) with an error listing missing and unexpected keys."""
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise MOKDError(f"{what}: state dict does not match the model; missing keys: {missing[:10]}"
                        f"{' ...' if len(missing) > 10 else ''}; unexpected keys: {unexpected[:10]}"
                        f"{' ...' if len(unexpected) > 10 else ''}")
    module.load_state_dict(state, strict=True)


def gather_rng_states(world):
    """Every rank's RNG state (rank 0 saves them all): each rank resumes its own stream."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def check_resume_config(saved, cfg, path):
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs requested {cfg[k]!r}"
            for k in GEOMETRY_KEYS if saved.get(k) != cfg[k]]
    if diff:
        raise MOKDError(f"checkpoint {path!r} was trained with a different configuration; "
                        f"differing keys: {'; '.join(diff)}. Use another --output-dir or the saved settings.")


def restore(run, saved, path, niter, rank, world):
    """Load a checkpoint into the run and each rank's RNG; returns (epoch, step in epoch) to continue from."""
    run.load(saved, path)
    epoch, it = saved["epoch"], saved["step_in_epoch"]
    if it and saved.get("steps_per_epoch") != niter:  # another global batch or dataset size
        say(rank, f"warning: {path} stopped mid-epoch with {saved.get('steps_per_epoch')} steps per epoch, "
                  f"this run has {niter}: epoch {epoch} restarts from its first step")
        it = 0
    rngs = saved["rng"]
    if len(rngs) == world:
        torch.set_rng_state(rngs[rank]["torch"])
        if "cuda" in rngs[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rngs[rank]["cuda"])
    else:  # another number of processes: correct, not bit-identical
        torch.manual_seed(run.cfg["seed"] + rank + 1000 * saved["global_step"])
    return epoch, it


def trim_log(path, steps_done):
    """Keep the log.jsonl records of steps < steps_done (atomically): steps logged after the last checkpoint (a
    stop without a save) run again after the resume, and so appear once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] < steps_done:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut by a crash mid-write
            continue
    if len(kept) < len(lines):
        with open(f"{path}.tmp", "w") as f:
            f.writelines(kept)
        os.replace(f"{path}.tmp", path)


# ======================================================================================
# 8. The MOKD step and the training loop (stops cleanly on a signal and on a non-finite loss).
# ======================================================================================
class Run:
    """Everything one training run holds: both models' students, teachers, optimisers and scalers, centres."""

    def __init__(self, cfg, device, world, with_thead=True):
        self.cfg, self.device, self.world = cfg, device, world
        self.students, self.teachers, self.opts, self.scalers, self.last_layers, self.params = {}, {}, {}, {}, {}, {}
        for m in "ab":
            arch = cfg[f"arch_{m}"]
            student = MOKDModel(arch, cfg, cfg[f"norm_last_layer_{m}"], cfg["drop_path"], with_thead)
            teacher = MOKDModel(arch, cfg, cfg[f"norm_last_layer_{m}"], 0.0, with_thead)
            teacher.load_state_dict(student.state_dict())
            if isinstance(student.backbone, VisionTransformer):
                student.backbone.grad_checkpointing = cfg["grad_checkpointing"]
            if family(arch) == "resnet" and world > 1 and device.type == "cuda":  # DEVIATION: plain BN on CPU/gloo
                student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
                teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
            mf = torch.channels_last if family(arch) == "resnet" and device.type == "cuda" else torch.preserve_format
            student, teacher = student.to(device, memory_format=mf), teacher.to(device, memory_format=mf)
            teacher.requires_grad_(False)  # teachers run in train mode (BatchNorm batch statistics), as DINO
            self.opts[m] = build_optimizer(student, cfg, m, device)
            self.scalers[m] = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16")
            if world > 1:
                device_ids = [device.index] if device.type == "cuda" else None
                student = nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
            if cfg["compile"]:
                student, teacher = torch.compile(student), torch.compile(teacher)
            self.students[m], self.teachers[m] = student, teacher
            self.last_layers[m] = [p for k, p in student.named_parameters() if "last_layer" in k]
            self.params[m] = [list(unwrap(x).parameters()) for x in (student, teacher)]  # (student, teacher) lists
        self.centres = Centres(cfg["out_dim"]).to(device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg["precision"]]
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def losses(self, crops, epoch, S):
        """Forward pass of both models and the eight terms. crops: [g1, g2, l_1..l_n], each (B, 3, H, W)."""
        cfg, n = self.cfg, len(crops) - 2
        glob = torch.cat(crops[:2])  # (2B, 3, G, G) crop-major
        loc = torch.cat(crops[2:]) if n else None  # (nB, 3, l, l)
        with self.autocast:
            s = {m: self.students[m](glob, loc) for m in "ab"}
            with torch.no_grad():
                t = {m: self.teachers[m](glob) for m in "ab"}  # teachers see the 2 global crops only
                # DEVIATION: with lambda_X = 0 the search for X (and L_cm, L_ct of X) is skipped, not computed.
                srch = {x: (search(unwrap(self.teachers[y]), t[y]["g1"], s[x]["query"], n)
                            if cfg[f"lam_{x}"] > 0 else None) for x, y in (("a", "b"), ("b", "a"))}
        totals, terms = {}, {}
        for x, y in (("a", "b"), ("b", "a")):
            totals[x], terms[x] = model_losses(x, y, s[x], t[x], t[y], srch[x], self.centres, S[x]["tau"][epoch],
                                               S["tau_cross"][epoch], cfg[f"lam_{x}"])
        ents = {m: entropy(t[m]["m"], getattr(self.centres, f"sm_{m}"), S[m]["tau"][epoch]) for m in "ab"}
        new = {f"sm_{m}": t[m]["m"] for m in "ab"}
        new.update({f"st_{m}": t[m]["t"] for m in "ab" if t[m]["t"] is not None})
        new.update({f"cm_{x}": t[y]["m"] for x, y in (("a", "b"), ("b", "a")) if cfg[f"lam_{x}"] > 0})
        return totals, terms, ents, new

    def step(self, crops, epoch, it, S):
        """One optimiser step of both models; returns its 12 VALUE_KEYS values as one device tensor."""
        for m in "ab":
            set_schedule(self.opts[m], S[m], it)
        totals, terms, ents, new_teacher_outputs = self.losses(crops, epoch, S)
        for m in "ab":  # separate backward passes: L_A only reaches student A, L_B only student B
            opt, scaler = self.opts[m], self.scalers[m]
            opt.zero_grad(set_to_none=True)
            scaler.scale(totals[m]).backward()
            scaler.unscale_(opt)
            clip_per_tensor(self.params[m][0], self.cfg[f"clip_grad_{m}"])
            if epoch < self.cfg["freeze_last_layer"]:  # last layers of both heads stay fixed in epoch 0
                for p in self.last_layers[m]:
                    p.grad = None
            scaler.step(opt)
            scaler.update()
        self.centres.update(new_teacher_outputs)  # after the loss, as DINO
        for m in "ab":
            ema_update(*self.params[m], float(S["momentum"][it]))
        values = [terms[m][k].detach() for m in "ab" for k in LOSS_NAMES]
        values += [ents[m][0].detach() for m in "ab"] + [ents[m][1].detach() for m in "ab"]
        return torch.stack(values)  # (12,): VALUE_KEYS order

    def state(self):
        return {"models": {m: {"student": unwrap(self.students[m]).state_dict(),
                               "teacher": unwrap(self.teachers[m]).state_dict()} for m in "ab"},
                "optimizers": {m: self.opts[m].state_dict() for m in "ab"},
                "scalers": {m: self.scalers[m].state_dict() for m in "ab"},
                "centres": self.centres.state_dict()}

    def load(self, ckpt, path):
        for m in "ab":
            for role, mods in (("student", self.students), ("teacher", self.teachers)):
                load_strict(unwrap(mods[m]), ckpt["models"][m][role], f"{path}: model {m} {role}")
            self.opts[m].load_state_dict(ckpt["optimizers"][m])
            self.scalers[m].load_state_dict(ckpt["scalers"][m])
        load_strict(self.centres, ckpt["centres"], f"{path}: centres")


class StopRequest:
    """`with StopRequest() as stop:` SIGTERM / SIGINT set stop.requested; the training loop makes the step during
    which the signal arrived (on any rank) the last one, writes a checkpoint and exits. A second signal exits at once,
    without saving. The old handlers return on exit."""

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"received signal {signum}: the current step completes, then a checkpoint is written and the run exits "
              f"(another signal exits at once, without saving)", file=sys.stderr, flush=True)

    def agreed(self, group):
        """True on every rank if a signal reached any rank: a tiny all-reduce on the CPU (gloo), no GPU sync."""
        if group is None:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, group=group)
        return flag.item() > 0


def quiet_worker(_):
    """DataLoader workers leave their rank's process group: torchrun (and some schedulers) stop a rank by signalling
    its whole group, which would kill the workers mid-step, before the rank can save. The workers still end with the
    DataLoader, and on their own when the rank dies (they watch their parent). Ctrl-C is the main process's too."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_error_message(e):
    """An error raised in a DataLoader worker comes back with the worker's traceback text: keep our message."""
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return msg.split("Error: ", 1)[-1] if "Traceback" in str(e) else msg


def make_loader(cfg, rank, world, device):
    aug = MultiCropAugmentation(cfg["global_crop_size"], cfg["local_crop_size"], cfg["local_crops_number"],
                                cfg["global_crops_scale"], cfg["local_crops_scale"])
    if cfg["data_path"]:
        ds = ImageFolderMultiCrop(cfg["data_path"], aug, cfg["seed"], cfg["bad_images"])
    else:
        ds = SyntheticMultiCrop(cfg["synthetic_size"], max(32, cfg["global_crop_size"]), cfg["seed"], aug)
    sampler = EpochSampler(len(ds), cfg["batch_size_per_gpu"], rank, world, cfg["seed"])
    if sampler.steps == 0:
        raise MOKDError(f"the dataset ({len(ds)} images) is smaller than one global batch "
                        f"({cfg['batch_size_per_gpu']} x {world} processes); lower --batch-size-per-gpu")
    w = cfg["num_workers"]
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size_per_gpu"], sampler=sampler, num_workers=w,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg["seed"]),  # not the global RNG
                                         worker_init_fn=quiet_worker,
                                         persistent_workers=w > 0, prefetch_factor=4 if w > 0 else None)
    return ds, sampler, loader


def train(cfg, rank, world, device, stop):
    """The training loop. `stop` (a StopRequest) is set by SIGTERM / SIGINT: the step completes, every rank saves."""
    out = cfg["output_dir"]
    ckpt_path = os.path.join(out, "checkpoint.pth")
    resume = cfg["resume"] or (ckpt_path if os.path.exists(ckpt_path) else None)
    saved = None
    if resume:  # read and validate before building anything; a bad file is never overwritten by a fresh start
        saved = load_checkpoint(resume)
        check_resume_config(saved["config"], cfg, resume)
    ds, sampler, loader = make_loader(cfg, rank, world, device)
    if cfg["data_path"] and rank == 0:
        for warning in survey_image_folder(cfg["data_path"], ds.samples, cfg["global_crop_size"]):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    torch.manual_seed(cfg["seed"])  # same initial weights on every rank
    run = Run(cfg, device, world)
    niter = sampler.steps
    S = build_schedules(cfg, niter, world)
    resumed = saved is not None
    if resumed:
        start_epoch, start_it = restore(run, saved, resume, niter, rank, world)
        del saved
    else:
        start_epoch, start_it = 0, 0
        torch.manual_seed(cfg["seed"] + rank)  # per-rank randomness (drop-path)
    all_steps = cfg["epochs"] * niter
    total_steps = all_steps if cfg["max_steps"] is None else min(all_steps, cfg["max_steps"])
    done = start_epoch * niter + start_it
    evaluate = evaluation_command(cfg, ckpt_path)
    if done >= all_steps:  # relaunch of a finished run
        say(rank, f"{resume} is a finished run ({cfg['epochs']} epochs, {done} steps): nothing to do. {evaluate}")
        return None
    if done >= total_steps:  # relaunch of a run that reached --max-steps
        say(rank, f"{resume} is already at step {done} (--max-steps {cfg['max_steps']}): nothing to do")
        return None
    if resumed:
        say(rank, f"resumed from {resume}: epoch {start_epoch}, step {start_it}/{niter}")
    if rank == 0:
        write_run_info(cfg, world, device)
        print(run_summary(cfg, ds, niter, all_steps, total_steps, world, device, S), flush=True)
    demo = not cfg["data_path"] and total_steps == all_steps  # the demo reports k-NN before / after
    knn_before = demo_knn(run, cfg, device, rank) if demo and done == 0 else None
    stats = image_stats(device)
    # Every rank learns of a signal after each step (on the CPU: no GPU sync), so all stop after the same step.
    stop_group = None if world == 1 else dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    log_path = os.path.join(out, "log.jsonl")
    if rank == 0:
        trim_log(log_path, done)  # steps logged but never saved run again: each step appears once
    log = open(log_path, "a") if rank == 0 else None
    last_ckpt, pending = resume, []
    clock = {"t": time.time(), "images": 0, "t0": time.time(), "start": done}

    def check(log_it):
        """Read the steps since the last check (one host sync per log interval, averaged over ranks): stop on a
        non-finite value, so that a broken state is never saved; log the last step if log_it."""
        # DEVIATION: DINO checks loss.item() every step (a host sync each step); the steps are checked in batches.
        if not pending:
            return
        values = torch.stack([v for _, v in pending]).float()  # (steps, 12): VALUE_KEYS
        if world > 1:
            dist.all_reduce(values)
        rows = (values / world).tolist()
        for (step, _), row in zip(pending, rows):
            for key, v in zip(VALUE_KEYS, row):
                if not math.isfinite(v):
                    model, term = key.split(".")
                    raise MOKDError(f"non-finite loss: model {model.upper()} term {term} = {v} at step {step}. "
                                    f"Last good checkpoint: {last_ckpt or 'none written yet'} (left intact).")
        clock["images"] += len(pending) * cfg["batch_size_per_gpu"] * world
        if rank == 0 and log_it:
            log_step(cfg, log, pending[-1][0], niter, dict(zip(VALUE_KEYS, rows[-1])), S, clock, total_steps, device)
        pending.clear()

    def save(epoch, it):
        nonlocal last_ckpt
        check(log_it=False)  # never save a state whose last steps were non-finite
        rng = gather_rng_states(world)
        if rank == 0:
            state = {"config": cfg, "epoch": epoch, "step_in_epoch": it, "global_step": epoch * niter + it,
                     "steps_per_epoch": niter, "rng": rng, **run.state()}
            atomic_save(state, ckpt_path)
            if cfg["saveckp_freq"] and it == 0 and epoch % cfg["saveckp_freq"] == 0:  # DINO's --saveckp_freq
                atomic_save(state, os.path.join(out, f"checkpoint{epoch:04d}.pth"))
        last_ckpt = ckpt_path

    step = done
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            sampler.epoch, sampler.start = epoch, (start_it if epoch == start_epoch else 0)
            n_bad, stopping = 0, False
            try:
                for it, (crops, bad) in enumerate(loader, start=sampler.start):
                    crops = normalise(crops, *stats)
                    n_bad += int(bad.sum())
                    pending.append((step, run.step(crops, epoch, step, S)))
                    if step % cfg["log_every"] == 0 or step == total_steps - 1:
                        check(log_it=True)
                    step += 1
                    stopping = stop.agreed(stop_group)
                    if stopping or step >= total_steps:
                        break
            except MOKDError as e:  # raised here, or in a worker (then it carries the worker's traceback text)
                raise MOKDError(worker_error_message(e)) from None
            except RuntimeError:  # a scheduler's SIGTERM to every process also killed the workers
                if not (stop.requested and world == 1):
                    raise
                stopping = True  # the model is at the end of a complete step: save it
            if n_bad:
                print(f"warning: epoch {epoch} (rank {rank}): {n_bad} unreadable images were skipped", file=sys.stderr)
            in_epoch = step - epoch * niter
            save(epoch + 1, 0) if in_epoch >= niter else save(epoch, in_epoch)
            if stopping:
                say(rank, f"stopped by signal after step {step}; relaunch the same command to resume")
                return None
            if step >= total_steps:
                if step < all_steps:
                    say(rank, f"--max-steps {cfg['max_steps']} reached; checkpoint written to {ckpt_path}")
                    return None
                break
    finally:
        if log:
            log.close()
    say(rank, f"finished: {cfg['epochs']} epochs, {step} steps; checkpoint: {ckpt_path}. {evaluate}")
    if rank == 0 and demo:
        demo_report(cfg, knn_before, demo_knn(run, cfg, device, rank), log_path, ckpt_path)
    return run


def run_summary(cfg, ds, niter, all_steps, total_steps, world, device, S):
    """What the run is, printed at its start on rank 0."""
    data = cfg["data_path"] or "the built-in synthetic shapes (no --data-path)"
    classes = getattr(ds, "classes", ())
    lr = ", ".join(f"{m.upper()} {S[m]['main'][0].max():.3g} ({cfg[f'optimizer_{m}']})" for m in "ab")
    global_batch = cfg["batch_size_per_gpu"] * world
    return (f"recipe {cfg['recipe']}: {cfg['arch_a']} (A) + {cfg['arch_b']} (B), T-head width {cfg['thead_dim']}, "
            f"K {cfg['out_dim']}, crops 2 x {cfg['global_crop_size']} + {cfg['local_crops_number']} x "
            f"{cfg['local_crop_size']} px\n"
            f"data: {data}: {len(ds)} images, {len(classes)} classes\n"
            f"{niter} steps per epoch x {cfg['epochs']} epochs = {all_steps} steps"
            f"{f' (this launch stops at {total_steps})' if total_steps < all_steps else ''}; "
            f"global batch {global_batch} ({cfg['batch_size_per_gpu']} per process x {world}); peak lr {lr}\n"
            f"precision {cfg['precision']} on {world} x {device.type}; output: {cfg['output_dir']}")


def evaluation_command(cfg, ckpt_path):
    """The command that evaluates a checkpoint of this run (k-NN of model A's teacher)."""
    train_path, val_path = cfg["data_path"] or "TRAIN_DIR", "VAL_DIR"
    if cfg["data_path"]:
        parent = os.path.dirname(os.path.normpath(train_path))
        val_path = next((os.path.join(parent, d) for d in ("val", "test") if os.path.isdir(os.path.join(parent, d))),
                        val_path)
    return (f"Evaluate: python eval_linear.py --checkpoint {ckpt_path} --model a --knn --train-path {train_path} "
            f"--val-path {val_path}")


def log_step(cfg, log, step, niter, vals, S, clock, total_steps, device):
    """One log.jsonl record and one console line for `step` (vals: its VALUE_KEYS values)."""
    now, epoch = time.time(), step // niter
    rec = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in vals.items()},
           "lr_a": float(S["a"]["main"][0][step]), "lr_b": float(S["b"]["main"][0][step]),
           "momentum": float(S["momentum"][step]), "tau_a": float(S["a"]["tau"][epoch]),
           "tau_b": float(S["b"]["tau"][epoch]), "tau_cross": float(S["tau_cross"][epoch]),
           "images_per_s": round(clock["images"] / max(now - clock["t"], 1e-9), 2),
           "peak_mem_mb": peak_memory_mb(device)}
    for m in "ab":  # cross terms are not computed with lambda 0
        if cfg[f"lam_{m}"] == 0:
            rec[f"{m}.L_cm"] = rec[f"{m}.L_ct"] = None
    log.write(json.dumps(rec) + "\n")
    log.flush()
    terms = " | ".join(f"{m.upper()}: " + " ".join(f"{k} {vals[f'{m}.{k}']:.3f}" for k in LOSS_NAMES) for m in "ab")
    eta = (now - clock["t0"]) / max(step + 1 - clock["start"], 1) * (total_steps - step - 1)
    print(f"step {step + 1}/{total_steps} epoch {epoch} | {terms} | {rec['images_per_s']:.1f} img/s | "
          f"ETA {datetime.timedelta(seconds=int(eta))}", flush=True)
    clock["t"], clock["images"] = now, 0


def peak_memory_mb(device):
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def write_run_info(cfg, world, device):
    """config.json: the resolved config, versions, hardware and command line."""
    on_gpu = device.type == "cuda"
    hardware = torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine()
    info = {"config": cfg, "world_size": world, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "device": hardware, "argv": sys.argv}
    with open(os.path.join(cfg["output_dir"], "config.json"), "w") as f:
        json.dump(info, f, indent=1)


# ======================================================================================
# 9. k-NN (the demo's and eval_linear.py's), the demo, main.
# ======================================================================================
@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, ks=(20,), T=0.07, num_classes=None, chunk=256):
    """Weighted k-NN (DINO): cosine similarity of L2-normalised features, vote weights exp(s / T).
    Returns {k: (top1 %, top5 %)}. Any number of train / test images; memory bounded by `chunk`.
    Runs on the features' device (a GPU for ImageNet-sized banks)."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    C = num_classes or int(max(train_y.max(), test_y.max())) + 1
    hits = {k: [0, 0] for k in ks}
    kmax = min(max(ks), len(train_f))
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(kmax, dim=1)  # (n, kmax)
        w, labels, y = (sim / T).exp(), train_y[idx], test_y[i:i + chunk]
        for k in ks:
            votes = torch.zeros(len(y), C, device=w.device).scatter_add_(1, labels[:, :k], w[:, :k])  # (n, C)
            top = votes.topk(min(5, C), dim=1).indices
            hits[k][0] += (top[:, 0] == y).sum().item()
            hits[k][1] += (top == y[:, None]).any(1).sum().item()
    return {k: (100.0 * h1 / len(test_f), 100.0 * h5 / len(test_f)) for k, (h1, h5) in hits.items()}


def knn_split(n_images):
    """The demo's held-out images: 2/3 form the k-NN bank, 1/3 the test set -> (bank size, test size)."""
    n_bank = max(1, 2 * n_images // 3)
    return n_bank, max(1, n_images - n_bank)


@torch.no_grad()
def demo_knn(run, cfg, device, rank):
    """k-NN top-1 (k=20, T=0.07, as eval_linear.py --knn) of both teachers' backbone features on held-out synthetic
    images: a bank and a test set drawn with other seeds than the training images."""
    if rank != 0:
        return None
    tf, size = eval_transform(cfg["global_crop_size"]), max(32, cfg["global_crop_size"])

    def images(n, seed):
        pairs = [draw_synthetic(i, seed, size) for i in range(n)]
        return torch.stack([tf(im) for im, _ in pairs]), torch.tensor([y for _, y in pairs])  # (n, 3, G, G), (n,)
    n_bank, n_test = knn_split(cfg["knn_images"])
    bank_x, bank_y = images(n_bank, cfg["seed"] + 1)
    test_x, test_y = images(n_test, cfg["seed"] + 2)
    res = {}
    for m in "ab":
        bb = unwrap(run.teachers[m]).backbone
        bb.eval()  # BatchNorm running statistics; the teacher trains in train mode
        feats = []
        for x in (bank_x, test_x):
            batches = [bb(x[i:i + 100].to(device))[0].float().cpu() for i in range(0, len(x), 100)]
            feats.append(torch.cat(batches))  # (n, C) pooled features
        bb.train()
        top1 = knn_classify(feats[0], bank_y, feats[1], test_y, (20,))[20][0]
        res[cfg[f"arch_{m}"] + f" ({m.upper()})"] = round(top1, 2)
    say(rank, f"k-NN top-1 (k=20) of the teachers on held-out synthetic images: {res}")
    return res


def demo_report(cfg, before, after, log_path, ckpt_path):
    """What the demo shows: both teachers' k-NN before and after, their entropy against log K, each loss term's
    first and last logged value, where the checkpoint is and what to try next. The last line is one JSON object."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    first, last = records[0], records[-1]
    log_k = math.log(cfg["out_dim"])
    n_test = knn_split(cfg["knn_images"])[1]
    print(f"\nk-NN top-1 (k = 20) of the teachers on {n_test} held-out synthetic images "
          f"(chance {100 / len(SYNTHETIC_CLASSES):.1f} %), and at the last logged step the teacher's entropy and the "
          f"entropy of its batch mean (log K = {log_k:.2f}; see entropy()):")
    print(f"  {'teacher':<15}{'before':>8}{'after':>8}{'change':>8}{'entropy':>9}{'of mean':>9}")
    entropy_after = {}
    for m, name in zip("ab", after):
        entropy_after[name] = round(last[f"{m}.entropy"], 3)
        # before is None for a resumed run: the k-NN before training was measured by the first launch
        start = "-" if before is None else f"{before[name]:.2f}"
        change = "-" if before is None else f"{after[name] - before[name]:+.2f}"
        print(f"  {name:<15}{start:>8}{after[name]:>8.2f}{change:>8}{entropy_after[name]:>9.2f}"
              f"{last[f'{m}.batch_entropy']:>9.2f}")
    print(f"loss terms, logged step {first['step']} -> {last['step']}:")
    for m in "ab":
        terms = [f"{k} {first[f'{m}.{k}']:.2f} -> {last[f'{m}.{k}']:.2f}" for k in LOSS_NAMES
                 if first[f"{m}.{k}"] is not None]
        print(f"  {m.upper()}: " + ", ".join(terms))
    print(f"checkpoint: {ckpt_path}\nnext: train on your images, e.g. the CIFAR-10 recipe "
          f"`python mokd.py --recipe cifar10 --data-path data/cifar10/train --output-dir OUT`\n"
          f"{evaluation_command({**cfg, 'data_path': None}, 'OUT/checkpoint.pth')}")
    print(json.dumps({"knn_top1_before": before, "knn_top1_after": after, "teacher_entropy": entropy_after,
                      "log_K": round(log_k, 3)}), flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = resolve_config(args)
        if cfg["data_path"]:
            check_image_folder(cfg["data_path"])
        validate_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        rank, world, device = setup_distributed(cfg)
        try:
            with StopRequest() as stop:  # installed before anything is built: a signal during start-up still saves
                train(cfg, rank, world, device, stop)
            return None
        finally:
            if is_dist():
                dist.destroy_process_group()
    except MOKDError as e:
        error = str(e)
    # Exit outside the except block: the traceback and the DataLoader it holds are released (and collected)
    # first, so that worker processes shut down normally.
    gc.collect()
    print(f"error{f' [rank {rank}]' if 'RANK' in os.environ else ''}: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
