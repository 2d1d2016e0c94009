"""The plumbing around mokd.py: everything a training run needs that is not the method itself.

Nothing here builds a model or computes a loss; mokd.py and eval_linear.py import from this file, never the
other way round. Sections: errors and images (reading any file as RGB, the demo's synthetic shapes) | distributed
helpers and checkpoints | guards of the training loop (non-finite losses, signals, DataLoader workers) |
logging, k-NN, operation counting and backbone export.
"""
import argparse
import json
import math
import os
import platform
import resource
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torch.utils._python_dispatch import TorchDispatchMode  # the benchmark counts operations


# ======================================================================================
# Errors, command-line booleans and images.
# ======================================================================================
class MOKDError(Exception):
    """A problem with the user's input or run; main() prints it without a traceback and exits with 2."""


def str2bool(v):
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


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


SYNTHETIC_CLASSES = ("disc", "ring", "square", "triangle", "cross", "stripes")  # draw_synthetic's labels 0-5


def draw_synthetic(index, seed, size):
    """A procedurally drawn image of class index % 6: disc, ring, square, triangle, cross, stripes.
    Position, scale, colours and background noise are random; the class is the shape alone."""
    rng = np.random.default_rng([seed, index])
    label = index % 6
    bg = rng.integers(0, 256, 3)
    arr = np.clip(bg + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    fg = tuple(int(c) for c in (bg + rng.integers(80, 176, 3)) % 256)
    r = size * rng.uniform(0.22, 0.4)
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(1, int(r / 3))
    if label == 0:
        d.ellipse(box, fill=fg)
    elif label == 1:
        d.ellipse(box, outline=fg, width=w)
    elif label == 2:
        d.rectangle(box, fill=fg)
    elif label == 3:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif label == 4:
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
    else:
        for k in range(-3, 4, 2):
            y = cy + k * r / 4
            d.rectangle((cx - r, y - w / 2, cx + r, y + w / 2), fill=fg)
    return img, label


# ======================================================================================
# Distributed helpers and checkpoints (written atomically, loaded with weights_only and strict keys).
# ======================================================================================
def is_dist():
    return dist.is_available() and dist.is_initialized()


def say(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


def unwrap(model):
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
        raise MOKDError(f"checkpoint {path!r} is unreadable (truncated or not a mokd checkpoint): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
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
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [state]
    out = [None] * world
    dist.all_gather_object(out, state)
    return out


# ======================================================================================
# Guards of the training loop: non-finite losses, signals, DataLoader workers.
# ======================================================================================
class Monitor:  # DEVIATION: DINO / the authors check loss.item() every step (a host sync)
    """Checks each step's values one step late so the GPU never waits for the host: the step's tensor
    (8 terms, 2 entropies) is all-reduced and copied to the host asynchronously, and read after the next step
    is queued. Every rank sees the same reduced values, so all stop together."""

    def __init__(self, keys, world, device):
        self.keys, self.world, self.device, self.pending = keys, world, device, None

    def push(self, values, step):
        v = values.float()
        if self.world > 1:
            dist.all_reduce(v)
        v = v.to("cpu", non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        self.pending, prev = (step, v, event, time.time()), self.pending
        return self.read(prev) if prev is not None else None

    def read(self, item):
        """(step, host tensor, event, time) -> (step, {name: mean over ranks}, time the step was queued)."""
        step, v, event, t = item
        if event is not None:
            event.synchronize()
        return step, dict(zip(self.keys, (v / self.world).tolist())), t

    def flush(self):
        item, self.pending = self.pending, None
        return self.read(item) if item is not None else None


class NonFiniteLoss(MOKDError):
    pass


def check_finite(step, vals, last_ckpt):
    for k, v in vals.items():
        if not math.isfinite(v):
            model, term = k.split(".")
            raise NonFiniteLoss(f"non-finite loss: model {model.upper()} term {term} = {v} at step {step}. "
                                f"Last good checkpoint: {last_ckpt or 'none written yet'} (left intact).")


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


def trim_log(path, steps_done):
    """Keep the records of steps < steps_done in log.jsonl (atomically): steps logged after the last checkpoint
    (a stop without a save) run again after the resume, and appear once."""
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
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


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


# ======================================================================================
# Logging, k-NN (the demo's and eval_linear.py's), operation counting, backbone export.
# ======================================================================================
def peak_memory_mb(device):
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def write_run_info(cfg, world, device):
    """config.json: the resolved config, versions, hardware and command line."""
    with open(os.path.join(cfg["output_dir"], "config.json"), "w") as f:
        json.dump({"config": cfg, "world_size": world, "torch": torch.__version__, "torchvision": torchvision.__version__,
                   "python": platform.python_version(), "device": torch.cuda.get_device_name(device)
                   if device.type == "cuda" else platform.processor() or platform.machine(), "argv": sys.argv}, f, indent=1)


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


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block (views included)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def export_backbone(path, model, out):
    """Write one teacher backbone: torchvision ResNet keys (no fc) or DINO/timm ViT keys, plus metadata."""
    ckpt = load_checkpoint(path)
    cfg, arch = ckpt["config"], ckpt["config"][f"arch_{model}"]
    prefix = "backbone.net." if arch.startswith("resnet") else "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["models"][model]["teacher"].items() if k.startswith(prefix)}
    meta = {"arch": arch, "patch_size": cfg["patch_size"], "stem": cfg["stem"], "image_size": cfg["global_crop_size"],
            "source": os.path.basename(path)}
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic_save({"state_dict": state, "meta": meta}, out)
    except OSError as e:
        raise MOKDError(f"--out {out!r} cannot be written: {e.strerror or e}") from None
    print(f"exported the teacher backbone of model {model.upper()} ({arch}) to {out}")
