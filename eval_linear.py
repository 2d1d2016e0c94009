"""Linear-probe and k-NN evaluation of either model of a MOKD run (DINO's protocols).

    python eval_linear.py --checkpoint out/checkpoint.pth --model a --knn --train-path T --val-path V
    python eval_linear.py --checkpoint out/checkpoint.pth --model b --train-path T --val-path V   # DINO's full probe
    python eval_linear.py --checkpoint out/checkpoint.pth --model b --cached-features ...        # fast probe
    torchrun --nproc_per_node=8 eval_linear.py --checkpoint ... --model a --train-path T --val-path V
    python eval_linear.py --checkpoint out/checkpoint.pth --model a --export resnet18_a.pth   # the teacher backbone
    python eval_linear.py --backbone resnet18_a.pth --knn ...   # evaluate a backbone written by --export

Architecture, patch size, stem and crop size come from the checkpoint. Loading is strict; an unreadable image
stops the evaluation with its path. The last line of output is one JSON object with every accuracy.
"""
import argparse
import datetime
import functools
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time


def interrupted_while_loading(signum, frame):
    """Ctrl-C or SIGTERM while torch loads (seconds): the one line that `interrupt` prints later, no traceback."""
    print("evaluation interrupted: nothing was written", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, interrupted_while_loading)

import torch  # noqa: E402 (after the handlers above)
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

import mokd
from mokd import MOKDError


COST = (__doc__.split("\n")[0] + " What each mode costs: --knn passes the training and validation images through "
        "the frozen backbone once (CIFAR-10's 60,000 images: 20 s on an H200, tens of minutes on a 2-core CPU); "
        "--cached-features adds a probe on those features (seconds); without either, DINO's full linear probe passes "
        "the augmented training images through the backbone in each of --epochs (100) epochs, about --epochs times "
        "the cost of --knn (on a 2-core CPU, 1 s per epoch for 120 images of 16 px). --baseline runs the chosen "
        "protocol once more at initialisation.")


def build_parser():
    p = argparse.ArgumentParser("eval_linear.py", description=COST, formatter_class=mokd.HelpFormatter,
                                usage="%(prog)s --checkpoint CKPT [--knn] [--cached-features] [--train-path T "
                                "--val-path V] [flags below]")
    a = p.add_argument
    a("--checkpoint", help="a mokd.py checkpoint.pth")
    a("--backbone", help="instead of --checkpoint: a file written by --export")
    a("--model", default="a", choices=["a", "b"], help="which model of the checkpoint")
    a("--which", default="teacher", choices=["teacher", "student"], help="which network of the model (DINO: teacher)")
    a("--train-path", help=f"labelled training images: an image folder (<root>/<class>/<image>) or a dataset name "
      f"({', '.join(mokd.DATASETS)}: its train split); without --train-path and --val-path, a demo checkpoint is "
      f"evaluated on 600 + 300 held-out synthetic images")
    a("--val-path", help="labelled validation images: an image folder or a dataset name (its test split)")
    a("--data-root", default="data", help="where named datasets are (or are downloaded to)")
    a("--export", metavar="OUT", help="write the backbone (--which) of --model of --checkpoint to OUT "
      "(torchvision ResNet keys without fc, or DINO/timm ViT keys, plus metadata) and exit")
    a("--knn", action="store_true", help="k-NN evaluation instead of the linear probe, one feature extraction (with "
      "--cached-features: both, from that extraction)")
    a("--nb-knn", type=mokd.positive_int, nargs="+", default=[10, 20, 100, 200], help="k values")
    a("--temperature", type=mokd.temperature, default=0.07, help="k-NN vote weights exp(similarity / T)")
    a("--cached-features", action="store_true", help="linear probe on features extracted once, without augmentation "
      "(about --epochs times cheaper than the full probe)")
    a("--n-last-blocks", type=mokd.positive_int, help="ViT: concatenate the CLS tokens of the last n blocks, for "
      "k-NN and probe (default: k-NN 1, the final CLS, as DINO's and the authors' eval_knn.py; probe 4 for vit_tiny "
      "and vit_small, 1 for vit_base, as DINO's eval_linear.py)")
    a("--avgpool-patchtokens", type=mokd.boolean, help="ViT: append the mean patch token, for k-NN and probe "
      "(default: true for a vit_base probe only)")
    a("--epochs", type=mokd.positive_int, default=100, help="linear-probe epochs (the full probe: one pass of the "
      "augmented training images through the backbone each)")
    a("--lr", type=mokd.non_negative, help="base lr of the linear probe, scaled by global batch / 256 (default: "
      "0.01 for a ResNet, 0.001 for a ViT)")
    a("--batch-size-per-gpu", type=mokd.positive_int, default=128, help="images (or cached features) per batch and "
      "process")
    a("--num-workers", type=mokd.count, default=min(8, os.cpu_count() or 1), help="DataLoader workers per process")
    a("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    a("--output-dir", help="keep the result JSON and the linear layer's weights here")
    a("--seed", type=int, default=0, help="seed of the linear layer's initialisation and the data order")
    a("--baseline", type=mokd.boolean, help="also evaluate the same architecture at its initialisation (the run's "
      "seed: its step-0 weights) with the same protocol, beside the trained numbers (default: true with --knn or "
      "--cached-features, which extract the features once more; false for the full probe, which it would train "
      "twice)")
    return p


class Progress:
    """Prints `what: done/total images, rate, ETA` on rank 0 at most every `every` seconds (and at the end)."""

    def __init__(self, what, total, rank, every=30.0):
        self.what, self.total, self.rank, self.every = what, total, rank, every
        self.done, self.t0 = 0, time.time()
        self.last = 0.0  # the first batch is reported at once

    def update(self, n):
        self.done += n
        now = time.time()
        if self.rank == 0 and (now - self.last >= self.every or self.done >= self.total):
            rate = self.done / max(now - self.t0, 1e-9)
            eta = datetime.timedelta(seconds=int((self.total - self.done) / max(rate, 1e-9)))
            print(f"{self.what}: {self.done}/{self.total} images, {rate:.1f} img/s, ETA {eta}", flush=True)
            self.last = now


# ----------------------------------------------------------------------------- loading
def load_backbone(args):
    """-> (backbone in eval mode, a cfg dict with arch / patch_size / stem / global_crop_size, and the run's whole
    config and "model" where known (for --baseline), source name)."""
    if bool(args.checkpoint) == bool(args.backbone):
        raise MOKDError("give exactly one of --checkpoint and --backbone")
    if args.checkpoint:
        ckpt = mokd.load_checkpoint(args.checkpoint)
        cfg = ckpt["config"]
        arch = cfg[f"arch_{args.model}"]
        state = {k[len("backbone."):]: v for k, v in ckpt["models"][args.model][args.which].items()
                 if k.startswith("backbone.")}
        bb = mokd.build_backbone(arch, cfg)
        mokd.load_strict(bb, state, f"{args.checkpoint} (model {args.model}, {args.which})")
        return bb.eval(), {**cfg, "arch": arch, "model": args.model}, args.checkpoint
    try:
        obj = torch.load(args.backbone, map_location="cpu", weights_only=True)
        meta, state = obj["meta"], obj["state_dict"]
    except Exception as e:
        raise MOKDError(f"--backbone {args.backbone!r} is not a backbone written by `eval_linear.py --export` "
                        f"({type(e).__name__}: {e})") from None
    cfg = {**meta.get("run_config", {}), "arch": meta["arch"], "patch_size": meta["patch_size"], "stem": meta["stem"],
           "global_crop_size": meta["image_size"], "model": meta.get("model")}  # an older export: no run_config
    bb = mokd.build_backbone(meta["arch"], cfg)
    mokd.load_strict(bb.net if meta["arch"] in mokd.RESNETS else bb, state, args.backbone)
    return bb.eval(), cfg, args.backbone


def initial_backbone(cfg, model):
    """Backbone of `model` ("a" or "b") at step 0 of the run whose config is `cfg`, in eval mode. mokd.py's train()
    seeds torch with cfg["seed"], then Run builds model A's student and teacher, then model B's (each teacher draws
    its own weights before it copies its student's): replaying those draws gives the step-0 weights (tested)."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(cfg["seed"])
        for m in "ab":
            student = mokd.MOKDModel(cfg[f"arch_{m}"], cfg, cfg[f"norm_last_layer_{m}"], cfg["drop_path"])
            if m == model:
                return student.backbone.eval()
            mokd.MOKDModel(cfg[f"arch_{m}"], cfg, cfg[f"norm_last_layer_{m}"])  # A's teacher, built before B


def last_blocks(vit, x, n):
    """Outputs of the ViT's last n blocks after its final norm, each (N, 1+h*w, D) (DINO's linear-probe features)."""
    x, kept = vit.tokens(x)[0], []  # (N, 1+h*w, D)
    for i, blk in enumerate(vit.blocks):
        x = blk(x)
        if i >= len(vit.blocks) - n:
            kept.append(vit.norm(x))
    return kept


def feature_spec(arch, dim, protocol, n_last_blocks=None, avgpool=None):
    """The frozen feature a protocol ("knn" or "linear") uses, as the result JSON names it. ResNet: the last stage
    average-pooled (dim C). ViT: k-NN the final block's CLS token after the norm (DINO's and the authors'
    eval_knn.py); linear probe the CLS tokens of the last 4 blocks (vit_base: 1, plus the mean patch token), DINO's
    eval_linear.py. n_last_blocks / avgpool given (not None) replace either default. dim: the backbone's width."""
    if arch in mokd.RESNETS:
        return {"backbone": arch, "pooling": "average of the last stage's map", "dim": dim}
    is_base = arch == "vit_base"
    n = n_last_blocks or (1 if protocol == "knn" or is_base else 4)
    avg = (protocol == "linear" and is_base) if avgpool is None else avgpool
    return {"backbone": arch, "tokens": "CLS after the final norm", "blocks": n, "avgpool_patchtokens": avg,
            "dim": dim * (n + avg)}


def spec_columns(sub, spec, width):
    """Columns of a feature `spec` holding the feature `sub` (both from feature_spec), or None when it lacks them.
    width: the backbone's width D. A ViT feature is [CLS of block L-n+1, .., CLS of block L, (mean patch token)]."""
    if "blocks" not in spec:
        return list(range(spec["dim"])) if sub == spec else None
    if sub["blocks"] > spec["blocks"] or (sub["avgpool_patchtokens"] and not spec["avgpool_patchtokens"]):
        return None
    end = spec["blocks"] * width
    return list(range(end - sub["blocks"] * width, end)) + (list(range(end, end + width))
                                                            if sub["avgpool_patchtokens"] else [])


def feature_fn(bb, arch, n_last_blocks, avgpool):
    """Frozen features: ResNet pooled (N, C); ViT CLS of the last n blocks [+ mean patch token] (N, n*D [+ D])."""
    if arch in mokd.RESNETS:
        return lambda x: bb(x)[0]

    def vit(x):
        outs = last_blocks(bb, x, n_last_blocks)  # n x (N, 1+L, D)
        f = torch.cat([o[:, 0] for o in outs], dim=-1)
        if avgpool:
            f = torch.cat([f, outs[-1][:, 1:].mean(1)], dim=-1)
        return f
    return vit


def checksum(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def eval_transform(crop_size):
    """Resize + CenterCrop at the global crop size (nothing but normalisation at <= 64 px)."""
    norm = [T.ToTensor(), T.Normalize(mokd.IMAGENET_MEAN, mokd.IMAGENET_STD)]
    if crop_size <= 64:
        return T.Compose([T.Resize(crop_size, antialias=True), T.CenterCrop(crop_size)] + norm)
    return T.Compose([T.Resize(int(crop_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC,
                               antialias=True), T.CenterCrop(crop_size)] + norm)


# ----------------------------------------------------------------------------- distributed feature extraction
def collate_marked(items):
    """(image, label) pairs; an unreadable image (None, -1: mokd.ImageFolder) becomes zeros, its label -1 leaves its
    row out after extraction (readable_rows) and out of the probe's loss: no other image stands in for it."""
    like = next((x for x, _ in items if x is not None), None)
    if like is None:
        return mokd.collate_readable([None] * len(items))  # the error: a whole batch unreadable
    return torch.utils.data.default_collate([(torch.zeros_like(like) if x is None else x, y) for x, y in items])


def readable_rows(f, y, what, rank):
    """Features and labels without the rows of unreadable images (label -1), saying how many were left out."""
    if (y < 0).any():
        mokd.say(rank, f"warning: {int((y < 0).sum())} of the {len(y)} {what} are unreadable and left out (each is "
                       f"named above)")
    return f[y >= 0], y[y >= 0]


@torch.no_grad()
def extract(feat, dataset, what, args, device, rank, world):
    """Features and labels of the whole dataset, split across ranks and gathered: ((N, D), (N,))."""
    idx = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=args.batch_size_per_gpu,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         collate_fn=collate_marked,
                                         worker_init_fn=mokd.quiet_worker)  # Ctrl-C reaches this process only
    fs, ys = [], []
    progress = Progress(f"features of {what}", len(dataset), rank)
    try:
        for x, y in loader:
            fs.append(feat(x.to(device, non_blocking=True)).float())
            ys.append(y.to(device))
            progress.update(len(x) * world)
    except MOKDError as e:
        raise MOKDError(mokd.worker_error_message(e)) from None
    f = torch.cat(fs) if fs else torch.zeros(0, 1, device=device)
    y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long, device=device)
    if world == 1:
        return f.cpu(), y.cpu()
    n_max = math.ceil(len(dataset) / world)
    D = torch.tensor([f.shape[1]], device=device)
    dist.all_reduce(D, op=dist.ReduceOp.MAX)
    pad_f = torch.zeros(n_max, int(D), device=device)
    pad_f[: len(f)] = f
    pad_y = torch.full((n_max,), -1, dtype=torch.long, device=device)
    pad_y[: len(y)] = y
    all_f, all_y = [torch.zeros_like(pad_f) for _ in range(world)], [torch.zeros_like(pad_y) for _ in range(world)]
    dist.all_gather(all_f, pad_f)
    dist.all_gather(all_y, pad_y)
    out_f, out_y = torch.zeros(len(dataset), int(D)), torch.zeros(len(dataset), dtype=torch.long)
    for r in range(world):  # rank r holds images r, r + world, ...
        n = len(range(r, len(dataset), world))
        out_f[r::world], out_y[r::world] = all_f[r][:n].cpu(), all_y[r][:n].cpu()
    return out_f, out_y


# ----------------------------------------------------------------------------- k-NN
@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, ks=(20,), T=0.07, num_classes=None, chunk=256):
    """Weighted k-NN (DINO): cosine similarity of L2-normalised features, vote weights exp(s / T).
    Returns {k: (top1 %, top5 % or None)}: a class without a vote is never predicted, so with k < 5 top-5 counts only
    classes that received votes (DINO's min(5, k)); top-5 is None with 5 classes or fewer. Memory bounded by `chunk`.
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
            h1, h5 = top_hits(votes, y, votes=True)
            hits[k][0] += h1
            hits[k][1] = None if h5 is None else hits[k][1] + h5  # None: 5 classes or fewer
    n = len(test_f)
    return {k: (100.0 * h1 / n, None if h5 is None else 100.0 * h5 / n) for k, (h1, h5) in hits.items()}


# ----------------------------------------------------------------------------- the linear probe
def top_hits(scores, y, votes=False):
    """How many rows of scores (N, C) rank label y first, and within their top 5 (None with 5 classes or fewer,
    where top-5 says nothing). With votes=True a class without a vote (score 0) is never predicted."""
    values, top = scores.topk(min(5, scores.shape[1]), dim=1)  # (N, <=5)
    hit = (top == y[:, None]) & (values > 0 if votes else True)
    return hit[:, 0].sum().item(), hit.any(1).sum().item() if scores.shape[1] > 5 else None


def accuracy(logits, y):
    """Top-1 and top-5 accuracy (%) of logits (N, C) against labels (N,); top-5 None with 5 classes or fewer."""
    h1, h5 = top_hits(logits, y)
    return round(100.0 * h1 / len(y), 3), None if h5 is None else round(100.0 * h5 / len(y), 3)


def probe_result(best, last, feature, base_lr, lr, args, world, augmentation):
    """The probe's accuracies and its protocol: feature (feature_spec), lr (base and scaled by global batch / 256),
    epochs, batch, augmentation; SGD momentum 0.9, no weight decay, cosine lr to 0."""
    return {"best_top1": best[0], "best_top5": best[1], "last_top1": last[0], "last_top5": last[1],
            "feature": feature, "base_lr": base_lr, "lr": lr, "epochs": args.epochs,
            "batch_size_per_gpu": args.batch_size_per_gpu, "global_batch": args.batch_size_per_gpu * world,
            "augmentation": augmentation}


def chance(y, num_classes):
    """Top-1 and top-5 accuracy (%) of a constant answer that knows the label frequencies of y (N,): the share of the
    most frequent class (100 / classes when balanced) and of the 5 most frequent (None with 5 classes or fewer)."""
    counts = torch.bincount(y, minlength=num_classes).float()  # (C,)
    return accuracy(counts.expand(len(y), -1), y)


def make_linear(dim, num_classes):
    lin = nn.Linear(dim, num_classes)
    nn.init.normal_(lin.weight, std=0.01)
    nn.init.zeros_(lin.bias)
    return lin


def train_linear_cached(train_f, train_y, val_f, val_y, num_classes, args, lr, device):
    """The DINO probe on fixed features: SGD momentum 0.9, no weight decay, cosine lr to 0. Runs on `device`."""
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the layer's initialisation too: a rerun gives the same probe
    train_f, train_y, val_f, val_y = (x.to(device) for x in (train_f, train_y, val_f, val_y))
    lin = make_linear(train_f.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps = args.epochs * math.ceil(len(train_f) / args.batch_size_per_gpu)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0)
    best, shown = None, time.time()
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(train_f), generator=g).to(device).split(args.batch_size_per_gpu):
            loss = F.cross_entropy(lin(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            last = accuracy(lin(val_f), val_y)
        best = last if best is None or last[0] > best[0] else best
        if time.time() - shown > 30 or epoch + 1 == args.epochs:
            print(f"linear probe epoch {epoch + 1}/{args.epochs}: val top-1 {last[0]:.2f}", flush=True)
            shown = time.time()
    return lin.cpu(), best, last


def train_linear_full(feat, train_ds, val_feats, args, lr, device, rank, world, num_classes, dim):
    """The DINO probe with augmentation: frozen backbone under no_grad, DDP linear layer under torchrun."""
    torch.manual_seed(args.seed)
    lin = make_linear(dim, num_classes).to(device)
    model = nn.parallel.DistributedDataParallel(lin) if world > 1 else lin
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(train_ds, world, rank, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size_per_gpu, sampler=sampler,
                                         shuffle=sampler is None, num_workers=args.num_workers, drop_last=False,
                                         collate_fn=collate_marked,
                                         worker_init_fn=mokd.quiet_worker,  # Ctrl-C reaches this process only
                                         pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * len(loader), eta_min=0)
    val_f, val_y = val_feats[0].to(device), val_feats[1].to(device)
    best = None
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        try:
            for x, y in loader:
                with torch.no_grad():
                    f = feat(x.to(device, non_blocking=True)).float()
                loss = F.cross_entropy(model(f), y.to(device), ignore_index=-1)  # -1: unreadable
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        except MOKDError as e:
            raise MOKDError(mokd.worker_error_message(e)) from None
        with torch.no_grad():
            last = accuracy(lin(val_f), val_y)
        best = last if best is None or last[0] > best[0] else best
        mokd.say(rank, f"linear probe epoch {epoch + 1}/{args.epochs}: val top-1 {last[0]:.2f}")
    return lin.cpu(), best, last


# ----------------------------------------------------------------------------- main
def protocols(feat, spec, train_eval, val, C, args, size, lrs, device, rank, world, label=""):
    """The chosen protocols (--knn, --cached-features, or the full probe) on the frozen features `feat` (one
    extraction of the feature spec["extracted"]; the k-NN takes its columns of spec["knn"]) -> ({"knn": ...,
    "linear": ...} on rank 0, the linear layer or None, validation labels (N,)). lrs: (base lr, scaled lr); `label`
    marks the progress lines."""
    found, lin, (base_lr, lr) = {}, None, lrs
    val_f, val_y = readable_rows(*extract(feat, val, f"the validation images{label}", args, device, rank, world),
                                 "validation images", rank)
    if args.knn or args.cached_features:
        train_f, train_y = readable_rows(*extract(feat, train_eval, f"the training images{label}", args, device, rank,
                                                  world), "training images", rank)
    if args.knn and rank == 0:
        too_large = [k for k in args.nb_knn if k > len(train_f)] if not label else []  # said once, not at init
        for k in too_large:
            print(f"warning: --nb-knn {k} exceeds the {len(train_f)} readable training images: that k votes with "
                  f"all {len(train_f)} (reported as k_used)", file=sys.stderr, flush=True)
        cols = spec_columns(spec["knn"], spec["extracted"], spec["width"])  # k-NN + cached probe: one extraction
        if cols is None:
            raise MOKDError("this k-NN feature is not part of the probe's: give --knn and --cached-features in two "
                            "calls")
        knn_f = [f[:, cols].contiguous() if len(cols) < f.shape[1] else f for f in (train_f, val_f)]
        res = knn_classify(*(x.to(device) for x in (knn_f[0], train_y, knn_f[1], val_y)), args.nb_knn,
                           args.temperature, C)
        found["knn_feature"], found["knn_temperature"] = spec["knn"], args.temperature
        found["knn"] = {str(k): {"top1": round(a, 3), "top5": b if b is None else round(b, 3),
                                 "k_used": min(k, len(train_f))}
                        for k, (a, b) in res.items()}
    if args.cached_features and rank == 0:
        lin, *acc = train_linear_cached(train_f, train_y, val_f, val_y, C, args, lr, device)
        # one process trains it: its global batch is --batch-size-per-gpu
        found["linear"] = probe_result(*acc, spec["linear"], base_lr, lr, args, 1, "none (cached features)")
    if not (args.knn or args.cached_features):
        aug = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                         T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mokd.IMAGENET_MEAN, mokd.IMAGENET_STD)])
        train_aug = mokd.open_images(args.train_path, "--train-path", "train", args.data_root, aug)
        lin, *acc = train_linear_full(feat, train_aug, (val_f, val_y), args, lr, device,
                                      rank, world, C, val_f.shape[1])
        found["linear"] = probe_result(*acc, spec["linear"], base_lr, lr, args, world,
                                       "RandomResizedCrop + horizontal flip")
    return found, lin, val_y


def export_backbone(path, model, which, out):
    """Write one backbone (the teacher's or the student's): torchvision ResNet keys (no fc) or DINO/timm ViT keys,
    plus metadata."""
    ckpt = mokd.load_checkpoint(path)
    cfg, arch = ckpt["config"], ckpt["config"][f"arch_{model}"]
    prefix = "backbone.net." if arch in mokd.RESNETS else "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["models"][model][which].items() if k.startswith(prefix)}
    meta = {"arch": arch, "patch_size": cfg["patch_size"], "stem": cfg["stem"], "image_size": cfg["global_crop_size"],
            "source": os.path.basename(path), "which": which, "model": model, "run_config": cfg}  # run: --baseline
    if arch in mokd.VITS:  # mokd.VisionTransformer(dim, heads, patch_size, image_size, depth) rebuilds it
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        meta.update(dim=mokd.VITS[arch][0], heads=mokd.VITS[arch][1], depth=depth)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        mokd.atomic_save({"state_dict": state, "meta": meta}, out)
    except OSError as e:
        raise MOKDError(f"--export {out!r} cannot be written: {e.strerror or e}") from None
    print(f"exported the {which} backbone of model {model.upper()} ({arch}) to {out}")


def evaluate(args):
    if args.export:
        if not args.checkpoint:
            raise MOKDError("--export needs --checkpoint (the mokd.py checkpoint to export from)")
        return export_backbone(args.checkpoint, args.model, args.which, args.export)
    if (args.train_path is None) != (args.val_path is None):
        raise MOKDError("give both --train-path and --val-path, or neither (a demo checkpoint: synthetic images)")
    if args.train_path is None and not (args.knn or args.cached_features):
        raise MOKDError("the full linear probe needs --train-path and --val-path (or use --knn or --cached-features)")
    if args.output_dir:  # fail now, not after the whole evaluation
        mokd.check_writable_dir(args.output_dir, "--output-dir")
    cfg0 = {"device": args.device, "dist_timeout": 30}
    rank, world, device = mokd.setup_distributed(cfg0)
    bb, cfg, source = load_backbone(args)
    arch, size = cfg["arch"], cfg["global_crop_size"]
    if arch in mokd.VITS and args.n_last_blocks and args.n_last_blocks > len(bb.blocks):
        raise MOKDError(f"--n-last-blocks must lie in [1, {len(bb.blocks)}], got {args.n_last_blocks}")
    bb = bb.to(device)
    bb.requires_grad_(False)
    spec = {p: feature_spec(arch, bb.embed_dim, p, args.n_last_blocks, args.avgpool_patchtokens)
            for p in ("knn", "linear")}
    spec["extracted"] = spec["knn"] if args.knn and not args.cached_features else spec["linear"]  # one extraction
    spec["width"] = bb.embed_dim
    blocks, avgpool = spec["extracted"].get("blocks"), spec["extracted"].get("avgpool_patchtokens")
    feat = feature_fn(bb, arch, blocks, avgpool)
    before = checksum(bb)
    tf_eval = eval_transform(size)
    if args.train_path is None:  # a demo checkpoint: held-out synthetic images, apart from the training images
        if cfg.get("data_path"):
            raise MOKDError(f"{source} was trained on {cfg['data_path']!r}: give --train-path and --val-path")
        seed, side = cfg.get("seed", 0), max(32, size)
        train_eval = mokd.SyntheticShapes(600, seed + 1, side, tf_eval)
        val = mokd.SyntheticShapes(300, seed + 2, side, tf_eval)
    else:
        train_eval = mokd.open_images(args.train_path, "--train-path", "train", args.data_root, tf_eval)
        val = mokd.open_images(args.val_path, "--val-path", "test", args.data_root, tf_eval)
    unknown = sorted(set(val.classes) - set(train_eval.classes))
    if unknown:
        raise MOKDError(f"--val-path has class folders that --train-path lacks: {unknown[:10]}"
                        f"{f' (and {len(unknown) - 10} more)' if len(unknown) > 10 else ''}")
    if val.classes != train_eval.classes:  # a subset of the training classes: map each by name
        index = {c: i for i, c in enumerate(train_eval.classes)}
        val.samples = [(path, index[val.classes[y]]) for path, y in val.samples]
        val.classes = train_eval.classes
    C = len(train_eval.classes)
    both = set() if rank else {os.path.realpath(p) for p, _ in getattr(val, "samples", [])} & {
        os.path.realpath(p) for p, _ in getattr(train_eval, "samples", [])}  # rank 0 alone looks (a path each)
    if both:  # said before any number
        print(f"warning: {len(both)} of the {len(val)} validation images are training images too (e.g. "
              f"{min(both)}): k-NN finds each one itself, the probe has trained on it: the accuracy overstates",
              file=sys.stderr, flush=True)
    mode = "+".join(n for n, on in (("knn", args.knn), ("linear_cached", args.cached_features)) if on) or "linear"
    result = {"mode": mode,
              "model": args.model if args.checkpoint else None, "which": args.which if args.checkpoint else None,
              "arch": arch, "checkpoint": source, "train_size": len(train_eval), "val_size": len(val),
              "num_classes": C}
    base_lr = args.lr if args.lr is not None else (0.01 if arch in mokd.RESNETS else 0.001)
    # The cached probe trains in one process on every feature: its batch, and so its lr, do not depend on the world.
    lr = base_lr * args.batch_size_per_gpu * (1 if args.cached_features else world) / 256
    if not (args.knn or args.cached_features):
        mokd.say(rank, f"DINO's full linear probe: {args.epochs} epochs, each a pass of {len(train_eval)} augmented "
                       f"training images through the backbone (--knn or --cached-features: one pass)")
    run = (spec, train_eval, val, C, args, size, (base_lr, lr), device, rank, world)
    found, lin, val_y = protocols(feat, *run)
    result.update(found)
    top1, top5 = chance(val_y, C)
    result["chance"] = {"top1": top1, "top5": top5, "rule": "answer the validation set's most frequent class(es)"}
    baseline = args.baseline if args.baseline is not None else args.knn or args.cached_features
    result["baseline"] = init = None
    if baseline:
        try:  # an export written before exports kept their run's config cannot say how its run began
            init = initial_backbone(cfg, cfg["model"]).to(device).requires_grad_(False)
        except KeyError as e:
            mokd.say(rank, f"note: {source} does not say how its run began (no {e} in its config): no baseline")
    if init is not None:
        mokd.say(rank, f"baseline: the same protocol on {arch} at its initialisation (seed {cfg['seed']}, the run's "
                       f"step-0 weights); --baseline false skips it")
        found, _, _ = protocols(feature_fn(init, arch, blocks, avgpool), *run, label=" (at initialisation)")
        result["baseline"] = {"seed": cfg["seed"], **{k: v for k, v in found.items() if k in ("knn", "linear")}}
    if checksum(bb) != before:
        raise MOKDError("the frozen backbone changed during evaluation (checksum mismatch): this is a bug")
    result["backbone_unchanged"] = True
    if rank == 0:
        print_table(result)
        if args.output_dir:  # checked writable at the start, created only now: nothing is left by a failed run
            os.makedirs(args.output_dir, exist_ok=True)
            who = f"model_{args.model}_{args.which}" if args.checkpoint else f"backbone_{arch}"
            name = f"eval_{result['mode']}_{who}"  # one file per model and teacher / student
            with open(os.path.join(args.output_dir, name + ".json"), "w") as f:
                json.dump(result, f, indent=1)
            if lin is not None:
                mokd.atomic_save(lin.state_dict(), os.path.join(args.output_dir, name + "_linear.pth"))
        print(json.dumps(result), flush=True)
    return result


def print_table(r):
    """Every accuracy beside what it means: the same protocol at initialisation and chance (a constant answer)."""
    print(f"{r['arch']} ({r['checkpoint']}, model {r['model']}, {r['which']}): {r['train_size']} train / "
          f"{r['val_size']} val images, {r['num_classes']} classes")
    for what, f in (("k-NN", r.get("knn_feature")), ("probe", r.get("linear", {}).get("feature"))):
        if f:
            print(f"{what} feature: " + (f"{f['pooling']}" if "pooling" in f else f"{f['tokens']} of the last "
                  f"{f['blocks']} block(s){' + mean patch token' if f['avgpool_patchtokens'] else ''}") +
                  f", dim {f['dim']}")
    base, rows = r["baseline"] or {}, []
    for k, v in r.get("knn", {}).items():
        b = base.get("knn", {}).get(k)
        asked = "" if v["k_used"] == int(k) else f" ({k} asked)"  # the bank holds fewer images than k
        rows.append((f"k-NN k={v['k_used']}{asked}", (v["top1"], v["top5"]), b and (b["top1"], b["top5"])))
    for end in ("best", "last") if "linear" in r else ():
        b = base.get("linear")
        rows.append((f"linear {end}", (r["linear"][f"{end}_top1"], r["linear"][f"{end}_top5"]),
                     b and (b[f"{end}_top1"], b[f"{end}_top5"])))
    rows.append(("chance", (r["chance"]["top1"], r["chance"]["top5"]), None))
    print(f"{'protocol':<24}{'top-1':>8}{'top-5':>8}" + (f"{'at init: top-1':>16}{'top-5':>8}" if base else ""))
    for name, acc, init in rows:
        cells = [f"{'-' if a is None else f'{a:.2f}'}" for a in (*acc, *(init or ()))]  # top-5: - with <= 5 classes
        print(f"{name:<24}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (8, 8, 16, 8))))
    if r["baseline"]:
        print(f"at init: the same protocol on {r['arch']} at its initialisation (seed {base['seed']}: the run's "
              f"weights at step 0); what training added is the difference")
    print(f"chance: always answering the validation set's most frequent class (100 / {r['num_classes']} = "
          f"{100 / r['num_classes']:.2f} when the classes are balanced)")
    print("backbone_unchanged: the backbone's weights hash the same before and after this evaluation (the probe "
          "trains only its linear layer)")


def interrupt(main_pid, signum, frame):
    """Ctrl-C or SIGTERM: one line, the DataLoader's workers killed, exit at once (nothing is written before the end of
    an evaluation, so nothing is lost). A worker that saw this process vanish would print a traceback. A terminal's
    Ctrl-C reaches the whole process group: a worker forked with this handler, before quiet_worker made it ignore
    Ctrl-C, stays silent (this process kills it)."""
    if os.getpid() != main_pid:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal (torchrun forwards Ctrl-C) changes nothing
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's own handler would raise for the workers killed here
    try:
        print("evaluation interrupted: nothing was written", file=sys.stderr, flush=True)
        workers = multiprocessing.active_children()
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.join()
    finally:
        os._exit(130)


def main(argv=None):
    args = build_parser().parse_args(argv)
    handler = functools.partial(interrupt, os.getpid())
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return evaluate(args)
    except MOKDError as e:
        message = f"error: {e}"
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
        mokd.end_workers()
        if mokd.is_dist():
            dist.destroy_process_group()
    print(message, file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
