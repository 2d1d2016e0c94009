"""MOKD: Multi-Mode Online Knowledge Distillation for self-supervised visual representation learning.

Song, Xie, Zhang, Luo, CVPR 2023, arXiv 2304.06461. Self-contained (standard library, torch, torchvision, numpy,
PIL): copied alone, `python mokd.py` runs the demo. The method first, in the paper's order: 1 views, 2 backbones,
3 heads and the search, 4 losses, 5 the MOKD step, 6 schedules; then 7 data, 8 distributed set-up and checkpoints,
9 the training loop, 10 the demo, 11 the command line.

Two models A and B (a CNN and a ViT in the paper) each have a student and an EMA teacher. Per model X, partner Y:

    L_sm    dino_loss(s_m[X], t_m[X])               self-distillation, MLP head (DINO loss)
    L_st    dino_loss(s_t[X], t_t[X])               self-distillation, T-head
    L_cm    dino_loss(s_m[X], t_m[Y])               cross-distillation, MLP head
    L_ct    cross_entropy(s_t[X] locals, search_Y)  cross-distillation through the cross-attention feature search
    L_X   = L_sm + L_st + lambda_X * (L_cm + L_ct)   (model_losses)
    tau_s 0.1 (STUDENT_TEMP), tau_t teacher_temp_schedule, EMA momentum m cosine_schedule(0.996 -> 1)

Run:
    python mokd.py                                   # demo: synthetic images, CPU or one GPU, about 3 minutes
    python mokd.py --data-path /imagenet/train       # the authors' recipe on one process
    torchrun --nproc_per_node=8 mokd.py --arch-a resnet18 --arch-b vit_small --data-path /imagenet/train
Departures from the authors' code are tagged `DEVIATION:` and listed in README.md.
"""
import argparse
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import signal
import sys
import tempfile
import time
from collections import OrderedDict
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torchvision import transforms as T

STUDENT_TEMP = 0.1
CENTER_MOMENTUM = 0.9
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNETS = ("resnet18", "resnet34", "resnet50")  # torchvision; widths 512, 512, 2048
VITS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads
ARCHS = sorted(RESNETS) + sorted(VITS)
LOSS_NAMES = ("L_sm", "L_st", "L_cm", "L_ct")
# Run.step's values: the 8 terms, then per teacher the entropy of its outputs and of their global batch's mean
VALUE_KEYS = [f"{m}.{k}" for m in "ab" for k in LOSS_NAMES] + ["a.entropy", "b.entropy", "a.batch_entropy",
                                                                "b.batch_entropy"]

# The authors' numbers. A recipe (--recipe) gives every flag its default; per-model flags (-a / -b) default from the
# model's family, which a recipe's `family` entry may override. A flag given explicitly always wins.
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
    # The demo: about 3 minutes on 2 CPU cores (16 px synthetic shapes): few prototypes, a sharp fixed teacher
    # temperature, a fast teacher, no warm-ups, no frozen last layer (README, "Demo").
    "demo": dict(arch_a="resnet18", arch_b="vit_tiny", patch_size=4, global_crop_size=16, local_crop_size=8,
                 local_crops_number=4, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4),
                 out_dim=64, epochs=4, batch_size_per_gpu=32, warmup_epochs=1, momentum_teacher=0.95,
                 warmup_teacher_temp=0.04, teacher_temp=0.02, cross_warmup_teacher_temp_epochs=0,
                 freeze_last_layer=0, log_every=8,
                 family=dict(resnet=dict(lr=0.3, warmup_teacher_temp_epochs=0),
                             vit=dict(lr=1e-3, warmup_teacher_temp_epochs=0))),
}
FAMILY = {  # the authors' per-family recipe (spec: Optimisation)
    "resnet": dict(optimizer="sgd", lr=0.1, min_lr=0.0048, weight_decay=1e-4, weight_decay_end=1e-4,
                   warmup_teacher_temp_epochs=50, lam=1.0, clip_grad=3.0, norm_last_layer=True),
    "vit": dict(optimizer="adamw", lr=3e-4, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4,
                warmup_teacher_temp_epochs=30, lam=0.1, clip_grad=3.0, norm_last_layer=False),
}

class MOKDError(Exception):
    """A problem with the user's input or run; main() prints it without a traceback and exits with 2."""

def family(arch):
    return "resnet" if arch in RESNETS else "vit"

# ==== 1. Views: DINO's multi-crop augmentation (2 global crops, n local crops). =======================================
class RandomGaussianBlur:
    """PIL Gaussian blur with probability p and radius uniform in [0.1, 2.0] (DINO). Uses torch's RNG."""
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if torch.rand(()).item() > self.p:  # DEVIATION: torch's draws, not Python's random (README 8); u <= p blurs
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=0.1 + 1.9 * torch.rand(()).item()))

class MultiCropAugmentation:
    """PIL image -> [g1, g2, local_1 .. local_n] uint8 tensors (3, H, W) (spec: Views); `normalise` finishes them."""
    def __init__(self, global_size, local_size, n_local, global_scale, local_scale):
        flip_colour = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)])
        # DEVIATION: DINO's workers end with ToTensor + Normalize; uint8 crops cost the workers 10-16 % less time
        # and the host-to-device copy 4x fewer bytes. normalise() applies the same arithmetic on the device.
        to_uint8 = T.PILToTensor()
        bicubic = T.InterpolationMode.BICUBIC

        def crop(size, scale):
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic, antialias=True)
        self.global1 = T.Compose([crop(global_size, global_scale), flip_colour, RandomGaussianBlur(1.0), to_uint8])
        self.global2 = T.Compose([crop(global_size, global_scale), flip_colour, RandomGaussianBlur(0.1),
                                  T.RandomSolarize(128, p=0.2), to_uint8])
        self.local = T.Compose([crop(local_size, local_scale), flip_colour, RandomGaussianBlur(0.5), to_uint8])
        self.n_local = n_local

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]

def normalise(crops, mean, std):
    """A list of uint8 batches (B, 3, H, W) -> on mean's device, float32 (x / 255 - mean) / std: the arithmetic of
    ToTensor + Normalize (bit-identical, tested). mean, std: (1, 3, 1, 1) tensors from image_stats."""
    return [c.to(mean.device, non_blocking=True).float().div(255).sub_(mean).div_(std) for c in crops]

def image_stats(device):
    return [torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD)]  # 2 x (1, 3, 1, 1)

# ==== 2. Backbones f. Each returns (pooled (N, C), tokens (N, h*w, C), (h, w)). =======================================
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
    """Stochastic depth per sample: x (N, ...) with whole samples zeroed with probability p, the rest / (1 - p)."""
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

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, C/h)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/h)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, N, C)

class Block(nn.Module):
    """Pre-norm transformer block (ViT and T-head), LayerNorm eps 1e-6, MLP ratio 4."""
    def __init__(self, dim, heads, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)

def resize_pos_embed(pos, grid, new_grid):
    """(1, h*w, D) position embedding for `grid` (h, w) -> (1, h'*w', D) for `new_grid`, bicubic with DINO's and the
    authors' arithmetic: scale factors (h' + 0.1) / h and (w' + 0.1) / w, each on its own axis (the factors, not a
    target size, set the sampling positions); an unchanged grid is returned as it is."""
    if tuple(grid) == tuple(new_grid):
        return pos
    D = pos.shape[-1]
    x = f32(pos).reshape(1, *grid, D).permute(0, 3, 1, 2)  # (1, D, h, w)
    factors = [(new + 0.1) / old for new, old in zip(new_grid, grid)]  # [rows, columns]
    x = F.interpolate(x, scale_factor=factors, mode="bicubic", align_corners=False)  # (1, D, h', w')
    assert tuple(x.shape[-2:]) == tuple(new_grid), (x.shape, new_grid)  # floor(h * (h' + 0.1) / h) = h'
    return x.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)  # (1, h'*w', D)

def trunc_normal_init(module):
    if isinstance(module, nn.Linear):  # DINO's init; a LayerNorm keeps PyTorch's (weight 1, bias 0), which is DINO's
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

class VisionTransformer(nn.Module):
    """DINO-style ViT; parameter names match DINO and timm (cls_token, pos_embed, patch_embed.proj, blocks.N...)."""
    def __init__(self, dim, heads, patch, img_size, depth=12, drop_path_rate=0.0):
        super().__init__()
        self.embed_dim, self.patch, self.grid = dim, patch, (img_size // patch, img_size // patch)
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, dim, kernel_size=patch, stride=patch)))  # DINO's names
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False  # --grad-checkpointing
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(trunc_normal_init)

    def tokens(self, x):
        """Images (N, 3, H, W) -> (N, 1+h*w, D) CLS + patch tokens with positions, and the grid (h, w)."""
        x = self.patch_embed.proj(x)  # (N, D, h, w)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, D)
        pos = torch.cat([self.pos_embed[:, :1], resize_pos_embed(self.pos_embed[:, 1:], self.grid, grid)], 1)
        # pos: (1, 1+h*w, D), the CLS position first
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + pos, grid  # (N, 1+h*w, D)

    def forward(self, x):
        x, grid = self.tokens(x)
        for blk in self.blocks:  # with grad_checkpointing, each block is recomputed in the backward pass
            recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        x = self.norm(x)  # (N, 1+h*w, D)
        return x[:, 0], x[:, 1:], grid

def build_backbone(arch, cfg, drop_path_rate=0.0):
    if arch in RESNETS:
        return ResNetBackbone(arch, cfg["stem"])
    if arch in VITS:
        dim, heads = VITS[arch]
        return VisionTransformer(dim, heads, cfg["patch_size"], cfg["global_crop_size"], 12, drop_path_rate)
    raise MOKDError(f"unknown architecture {arch!r}; choices: {', '.join(ARCHS)}")

def feature_stride(arch, cfg):
    """Pixels per feature-map cell: the ViT's patch, the ResNet's total stride (8 with the CIFAR stem, else 32)."""
    if family(arch) == "vit":
        return cfg["patch_size"]
    return 8 if cfg["stem"] == "cifar" else 32

# ==== 3. Heads: the DINO MLP head h, the transformer head g (T-head) and its cross-attention feature search. ==========
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
    teacher's sharpened targets (tau_t 0.04) before the float32 losses see them. (N, D) -> (N, K), at least float32."""
    # DEVIATION: the authors run the last layer under fp16 autocast.
    with torch.autocast(x.device.type, enabled=False):
        return layer(f32(x))

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
    optionally prepend a query token, transformer blocks + LayerNorm, mean over tokens (query dropped),
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
        grid = (cfg["global_crop_size"] // feature_stride(arch, cfg),) * 2
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

# ==== 4. Losses (in float32 whatever the autocast dtype; float64 stays float64). ======================================
def f32(x):
    """At least float32: low-precision tensors are raised to float32, float64 stays float64."""
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

def entropy(p):
    """Entropy in nats over the last dimension of probabilities p (..., K). The collapse signals of a teacher's
    centred, sharpened outputs p (N, K): entropy(p).mean() and the entropy of their mean over the global batch."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)

class Centres(nn.Module):
    """The six DINO centres: c_sm, c_st, c_cm for each model (L_ct has none)."""
    def __init__(self, out_dim):
        super().__init__()
        for m in "ab":
            for term in ("sm", "st", "cm"):
                self.register_buffer(f"{term}_{m}", torch.zeros(1, out_dim))

    @torch.no_grad()
    def update(self, teachers, extra=()):
        """c <- 0.9 c + 0.1 mean over the global batch of t; teachers: {name: (2B, K)}. One all-reduce, which also
        sums the rows `extra` (each (K,)) over the ranks: -> their means over the global batch (len(extra), K)."""
        names = list(teachers)
        sums = torch.stack([f32(teachers[k]).sum(0) for k in names] + list(extra))  # (n, K)
        count = len(teachers[names[0]])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            count *= dist.get_world_size()
        for k, s in zip(names, sums):
            getattr(self, k).mul_(CENTER_MOMENTUM).add_(s / count, alpha=1 - CENTER_MOMENTUM)
        return sums[len(names):] / count

def model_losses(x, y, s, t_self, t_other, search_other, centres, tau_self, tau_cross, lam):
    """Model X's four terms and total L_X = L_sm + L_st + lambda_X (L_cm + L_ct) (spec: Losses of model X).
    s: student X outputs; t_self / t_other: teacher X / Y outputs; search_other: search_Y(q_X) (n*B, K)."""
    zero = f32(s["m"]).new_zeros(())
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

# ==== 5. The MOKD step of one pair: forward, losses, backward, clipping, update, centres, EMA. ========================
def build_optimizer(model, optimizer, device):
    """SGD (momentum 0.9) or AdamW over groups tagged with their schedule ("sched") and weight decay ("reg"): none for
    biases and 1-D tensors (DINO), except in a CNN's T-head, whose parameters all decay on the transformer schedule
    ("thead"), as in the authors' optimiser groups."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            sched = "thead" if family(model.arch) == "resnet" and name.startswith("thead.") else "main"
            reg = sched == "thead" or not (name.endswith(".bias") or p.ndim == 1)
            groups.setdefault((sched, reg), []).append(p)
    groups = [{"params": ps, "sched": s, "reg": r} for (s, r), ps in groups.items()]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, **fused)
    return torch.optim.AdamW(groups, lr=0.0, **fused)

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
            if family(arch) == "resnet" and is_dist() and device.type == "cuda":  # DEVIATION: plain BN on CPU/gloo
                student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
                teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
            mf = torch.channels_last if family(arch) == "resnet" and device.type == "cuda" else torch.preserve_format
            student, teacher = student.to(device, memory_format=mf), teacher.to(device, memory_format=mf)
            teacher.requires_grad_(False)  # teachers run in train mode (BatchNorm batch statistics), as DINO
            self.opts[m] = build_optimizer(student, cfg[f"optimizer_{m}"], device)
            self.scalers[m] = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16")
            if is_dist():  # under torchrun, one process too: the multi-GPU code path
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
        probs = [F.softmax((f32(t[m]["m"]) - getattr(self.centres, f"sm_{m}")) / S[m]["tau"][epoch], -1)
                 for m in "ab"]
        new = {f"sm_{m}": t[m]["m"] for m in "ab"}
        new.update({f"st_{m}": t[m]["t"] for m in "ab" if t[m]["t"] is not None})
        new.update({f"cm_{x}": t[y]["m"] for x, y in (("a", "b"), ("b", "a")) if cfg[f"lam_{x}"] > 0})
        return totals, terms, probs, new  # probs: per teacher its centred, sharpened MLP-head outputs (2B, K)

    def step(self, crops, epoch, it, S):
        """One optimiser step of both models at global iteration `it`; returns its VALUE_KEYS values (12,)."""
        for m in "ab":
            for g in self.opts[m].param_groups:
                lr, wd = S[m][g["sched"]]  # the group's schedule: (lr, weight decay) per iteration
                g["lr"], g["weight_decay"] = float(lr[it]), float(wd[it]) if g["reg"] else 0.0
        totals, terms, probs, new_teacher_outputs = self.losses(crops, epoch, S)
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
        p_mean = self.centres.update(new_teacher_outputs, [p.sum(0) for p in probs])  # after the loss, as DINO
        for m in "ab":
            ema_update(*self.params[m], float(S["momentum"][it]))
        values = [terms[m][k].detach() for m in "ab" for k in LOSS_NAMES]
        values += [entropy(p).mean() for p in probs] + list(entropy(p_mean))
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

# ==== 6. Schedules: pure functions of the epoch or iteration. =========================================================
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

def build_schedules(cfg, niter, world_size):
    """Every per-iteration / per-epoch schedule of the run, computed in one place."""
    E, W = cfg["epochs"], cfg["warmup_epochs"]
    scale = cfg["batch_size_per_gpu"] * world_size / 256.0  # linear lr scaling rule
    S = {"momentum": cosine_schedule(cfg["momentum_teacher"], 1.0, E, niter),
         "tau_cross": teacher_temp_schedule(cfg["warmup_teacher_temp"], cfg["teacher_temp"],
                                            cfg["cross_warmup_teacher_temp_epochs"], E)}
    def lr(peak, final):  # DEVIATION: the final lr is never above the scaled peak, so it never rises after warm-up
        return cosine_schedule(peak * scale, min(final, peak * scale), E, niter, W)  # (see lr_floor_warnings)
    for m in "ab":
        S[m] = {"main": (lr(cfg[f"lr_{m}"], cfg[f"min_lr_{m}"]),
                         cosine_schedule(cfg[f"weight_decay_{m}"], cfg[f"weight_decay_end_{m}"], E, niter)),
                "thead": (lr(cfg["thead_lr"], cfg["thead_min_lr"]),
                          cosine_schedule(cfg["thead_weight_decay"], cfg["thead_weight_decay_end"], E, niter)),
                "tau": teacher_temp_schedule(cfg["warmup_teacher_temp"], cfg["teacher_temp"],
                                             cfg[f"warmup_teacher_temp_epochs_{m}"], E)}
    return S

def schedule_values(S, step, niter):
    """The schedules' values at `step` (past a schedule's end: its last value): lr of each model's main group, EMA
    momentum, teacher temperatures (log.jsonl's lr_a ... tau_cross)."""
    def at(values, i):
        return float(values[min(i, len(values) - 1)])
    e = step // niter
    return {"lr_a": at(S["a"]["main"][0], step), "lr_b": at(S["b"]["main"][0], step),
            "momentum": at(S["momentum"], step),
            "tau_a": at(S["a"]["tau"], e), "tau_b": at(S["b"]["tau"], e), "tau_cross": at(S["tau_cross"], e)}

def lr_floor_warnings(cfg, world_size):
    """One line per final lr above its scaled peak (small global batches), which build_schedules lowers to the peak."""
    gb = cfg["batch_size_per_gpu"] * world_size
    pairs = [(f"--lr-{m}", f"--min-lr-{m}", cfg[f"lr_{m}"], cfg[f"min_lr_{m}"]) for m in "ab"]
    if any(family(cfg[f"arch_{m}"]) == "resnet" for m in "ab"):  # a CNN's T-head has its own lrs
        pairs.append(("--thead-lr", "--thead-min-lr", cfg["thead_lr"], cfg["thead_min_lr"]))
    return [f"warning: {fmin} {low} is above the scaled peak lr {lr * gb / 256:.4g} ({flr} {lr} x global batch {gb} "
            f"/ 256): the lr stays at {lr * gb / 256:.4g} after warm-up; lower {fmin} or raise the batch"
            for flr, fmin, lr, low in pairs if low > lr * gb / 256]

# ==== 7. Data: image files (ImageFolder) or the built-in synthetic shapes; per-image seeded augmentation. =============
def to_rgb(img):
    """Any PIL mode -> 8-bit RGB, scaled by the mode, never by the content: 16-bit modes (I;16*, and I, PIL's mode for
    16-bit data after conversion) by 255 / 65535, float (F) as values in [0, 1]; alpha is dropped."""
    if img.mode.startswith("I") or img.mode == "F":
        unit = np.asarray(img, dtype=np.float64) / (1.0 if img.mode == "F" else 65535.0)  # full scale -> 1
        img = Image.fromarray(np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")

def read_rgb(path):
    """Open an image file (a GIF: its first frame) as RGB; any failure becomes a MOKDError naming the file."""
    try:
        with Image.open(path) as img:
            return to_rgb(ImageOps.exif_transpose(img))  # the EXIF orientation: a phone photo stands upright
    except Image.DecompressionBombError:
        raise MOKDError(f"cannot read image {path}: it has more than {2 * Image.MAX_IMAGE_PIXELS} pixels, the limit "
                        f"PIL sets against decompression bombs (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except Exception as e:  # PIL raises many types for broken files
        raise MOKDError(f"cannot read image {path}: {type(e).__name__}: {e}") from None

IMAGE_EXTENSIONS = torchvision.datasets.folder.IMG_EXTENSIONS + (".gif", ".jfif", ".jpe")  # JPEG's other names

class ImageFolder(torchvision.datasets.DatasetFolder):
    """DatasetFolder whose unreadable image (named in a warning, with the reason) gives (None, -1): training and
    evaluation leave it out (collate_readable, eval_linear.collate_marked); no other image stands in for it."""
    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except MOKDError as e:  # DEVIATION: the authors' loader crashes the worker on a broken file
            print(f"warning: skipping unreadable image ({e})", file=sys.stderr, flush=True)
            return None, -1

def collate_readable(items):
    """default_collate of a batch without its unreadable images (None): the batch is smaller by them."""
    kept = [x for x in items if x is not None]
    if not kept:
        raise MOKDError(f"all {len(items)} images of a batch are unreadable (each named above): is the data corrupt?")
    return torch.utils.data.default_collate(kept)

def image_folder(root, flag, transform=None):
    """<root>/<class>/<image> as torchvision's ImageFolder (GIF included), yielding (PIL image, label). Its errors,
    split folders taken for classes, stray images, and the files not read, by kind (macOS's AppleDouble "._name.jpg"
    files hold metadata; a file reached twice through symbolic links is read once), name `flag`."""
    skipped, seen = {}, set()

    def image_file(path):
        name, real = os.path.basename(path), os.path.realpath(path)
        kind = ("macOS metadata files (._*: not images)" if name.startswith("._") else
                f"'{os.path.splitext(name)[1].lower() or name}' files (not images)" if not name.lower().endswith(
                    IMAGE_EXTENSIONS) else "second paths to one image (symbolic links: read once)" if real in seen
                else None)
        seen.add(real)
        skipped[kind] = skipped.get(kind, 0) + 1
        return kind is None
    try:
        ds = ImageFolder(root, read_rgb, transform=transform, is_valid_file=image_file)
    except (OSError, RuntimeError) as e:  # FileNotFoundError, NotADirectoryError, ...
        raise MOKDError(f"{flag} {root!r}: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
    splits = [c for c in ds.classes if c.lower() in ("train", "training", "val", "valid", "validation", "test")]
    if splits:
        raise MOKDError(f"{flag} {root!r} holds folders named like dataset splits ({', '.join(splits)}), which would "
                        f"be read as classes: point {flag} at one split, e.g. {os.path.join(root, splits[0])}")
    skipped.pop(None)
    if skipped:
        print(f"warning: {flag} {root!r}: not read: {', '.join(f'{n} {k}' for k, n in skipped.items())} (images: "
              f"{' '.join(IMAGE_EXTENSIONS)})", file=sys.stderr, flush=True)
    stray = [e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if stray:
        print(f"warning: {len(stray)} images directly in {flag} {root!r} are not read (only <root>/<class>/<image> "
              f"is), e.g. {stray[0]}", file=sys.stderr, flush=True)
    return ds

DATASETS = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "cifar100": ("CIFAR100", "cifar-100-python"),
            "stl10": ("STL10", "stl10_binary")}  # --data-path NAME: torchvision's class and its folder in --data-root

def open_images(path, flag, split, root, transform=None):
    """(PIL image or transform(image), label) pairs of an image folder (image_folder) or of torchvision's dataset named
    `path` (DATASETS) in `root`, downloaded on first use (torchvision checks its md5); split "ssl": the training
    images (STL-10's train+unlabeled), "train" or "test"."""
    if path not in DATASETS:
        return image_folder(path, flag, transform)
    cls_name, folder = DATASETS[path]
    stl10_split = "train+unlabeled" if split == "ssl" else split
    kwargs = {"split": stl10_split} if path == "stl10" else {"train": split != "test"}
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0  # the first process of each machine downloads
    if is_dist() and not first:
        dist.barrier()  # the others wait for it, then read the files
    try:
        return getattr(torchvision.datasets, cls_name)(root, transform=transform, download=first, **kwargs)
    except Exception as e:  # no network, a full disk, a corrupt archive, files missing
        why = str(e).split(" You can use download=True")[0].rstrip(".")  # torchvision's advice: we did download
        raise MOKDError(f"{flag} {path}: {type(e).__name__}: {why}. The files belong in "
                        f"{os.path.join(root, folder)!r}: without network here, download them elsewhere "
                        f"(torchvision.datasets.{cls_name}('data', download=True)) and copy data/{folder} there, or "
                        f"set --data-root") from None
    finally:
        if is_dist() and first:
            dist.barrier()  # reached after a failure too: no process waits for one that gave up

class SyntheticShapes(torch.utils.data.Dataset):
    """The demo's images: `n` of `size` px drawn with `seed`, as (PIL image or transform(image), label) pairs. Image i
    shows shape i % 6 (`classes`) at a random position and scale, lighter or darker than a smooth random colour field:
    two crops of one image see different colours, so colour cannot tell images apart. The class is the shape."""
    classes = ("disc", "ring", "square", "triangle", "cross", "stripes")

    def __init__(self, n, seed, size, transform=None):
        self.n, self.seed, self.size, self.transform = n, seed, size, transform

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        rng, label, size = np.random.default_rng([self.seed, index]), index % 6, self.size
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
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        return (img if self.transform is None else self.transform(img)), label

class MultiCropDataset(torch.utils.data.Dataset):
    """Item (epoch, index) -> the crops of image `index` of `images` (a dataset of (PIL image, label) pairs),
    augmented with torch's RNG seeded by (seed, epoch, index): resume is exact, whatever the workers."""
    def __init__(self, images, aug, seed):
        self.images, self.aug, self.seed = images, aug, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key  # from EpochSampler
        img = self.images[index][0]
        if img is None:  # unreadable (ImageFolder): left out of its batch by collate_readable
            return None
        # DEVIATION: the authors rely on per-worker RNG streams; per-image seeds make resume exact.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFFFFFF)
            return self.aug(img)

class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) keys: a permutation seeded by (seed, epoch), split across ranks (rank::world), full batches only,
    from batch `start` (mid-epoch resume). Step s sees the same global batch whatever the number of processes."""
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

def quiet_worker(_):
    """DataLoader workers leave the process group that torchrun signals and ignore SIGINT and SIGTERM (a scheduler
    signals every process): no stop kills them before their rank has saved; they end with their DataLoader or rank."""
    os.setpgrp()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)

def end_workers():
    """Kill the DataLoader workers still running (at the end of a run, or after an error held its DataLoader):
    they ignore SIGTERM, with which Python's exit would otherwise end them, and would be waited for forever."""
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()

def worker_error_message(e):
    """An error raised in a DataLoader worker comes back with the worker's traceback text: keep our message."""
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return msg.split("Error: ", 1)[-1] if "Traceback" in str(e) else msg

def make_loader(cfg, rank, world, device):
    """-> (dataset, EpochSampler, DataLoader) of the run's training images; batches are lists of uint8 crops."""
    aug = MultiCropAugmentation(cfg["global_crop_size"], cfg["local_crop_size"], cfg["local_crops_number"],
                                cfg["global_crops_scale"], cfg["local_crops_scale"])
    if cfg["data_path"]:
        images = open_images(cfg["data_path"], "--data-path", "ssl", cfg["data_root"])
    else:
        images = SyntheticShapes(cfg["synthetic_size"], cfg["seed"], max(32, cfg["global_crop_size"]))
    ds = MultiCropDataset(images, aug, cfg["seed"])
    sample = [images[i][0] for i in range(0, len(images), max(1, len(images) // 16))][:16] if rank == 0 else []
    sides = sorted(min(img.size) for img in sample if img is not None)  # of 16 images at most; unreadable: None
    side, G = sides[len(sides) // 2] if sides else math.inf, cfg["global_crop_size"]  # the median short side
    if 2 * side < G:  # the crops would enlarge the images more than twice (rank 0: the others read none)
        print(f"warning: the images are about {side} px on their short side, far smaller than the {G} px global crops "
              f"(--recipe cifar10 crops 32 px; --global-crop-size and --local-crop-size set any size)", file=sys.stderr)
    sampler = EpochSampler(len(ds), cfg["batch_size_per_gpu"], rank, world, cfg["seed"])
    if sampler.steps == 0:
        raise MOKDError(f"{len(ds)} images are fewer than one global batch ({cfg['batch_size_per_gpu']} x {world} "
                        f"processes); --batch-size-per-gpu {max(2, len(ds) // (4 * world))} gives ~4 steps per epoch")
    w = cfg["num_workers"]
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size_per_gpu"], sampler=sampler, num_workers=w,
                                         pin_memory=device.type == "cuda", worker_init_fn=quiet_worker,
                                         collate_fn=collate_readable,
                                         generator=torch.Generator().manual_seed(cfg["seed"]),  # not the global RNG
                                         persistent_workers=w > 0, prefetch_factor=4 if w > 0 else None)
    return ds, sampler, loader

# ==== 8. Distributed set-up, checkpoints (written atomically, loaded strictly). =======================================
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

def check_writable_dir(path, flag):
    """Write a file into the folder or the nearest existing one above: fails now, creates nothing (start_report does)"""
    parent = os.path.abspath(path)
    while not os.path.lexists(parent):  # a dangling link counts: writing into it fails
        parent = os.path.dirname(parent)
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise MOKDError(f"{flag} {path!r} cannot be created or written: {e.strerror or e}") from None

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
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)  # the rename itself reaches the disk
    os.fsync(dir_fd)
    os.close(dir_fd)

def load_checkpoint(path):
    """torch.load(weights_only=True) with a clear error for a missing, truncated or foreign file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MOKDError(f"checkpoint {path!r} does not exist") from None
    except Exception as e:  # torch's advice for a refused pickle (weights_only=False) does not apply to ours
        detail = "" if type(e).__name__ == "UnpicklingError" else f": {(str(e).splitlines() or [''])[0]}"
        raise MOKDError(f"checkpoint {path!r} is unreadable (truncated, altered, or not a mokd checkpoint): "
                        f"{type(e).__name__}{detail}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "models" not in ckpt:
        raise MOKDError(f"checkpoint {path!r} is not a mokd.py checkpoint (no 'config' / 'models' entries)")
    return ckpt

def load_strict(module, state, what):
    """load_state_dict(strict=True); a mismatch becomes a MOKDError naming the missing and unexpected keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MOKDError(f"{what}: state dict does not match the model: {' '.join(str(e).split())[:1000]}") from None

# Settings a resume cannot change: the models' shapes and the optimisers' state.
FIXED_KEYS = ("arch_a", "arch_b", "patch_size", "out_dim", "thead_dim", "thead_depth", "thead_heads", "head_hidden_dim",
              "bottleneck_dim", "global_crop_size", "local_crop_size", "local_crops_number", "global_crops_scale",
              "local_crops_scale", "stem", "optimizer_a", "optimizer_b", "norm_last_layer_a", "norm_last_layer_b")

def check_resume_config(saved, cfg, path, rank):
    """Refuse a resume that changes FIXED_KEYS; name every other setting that differs (the new value applies)."""
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs requested {cfg[k]!r}" for k in FIXED_KEYS if saved.get(k) != cfg[k]]
    if diff:
        raise MOKDError(f"checkpoint {path!r} was trained with a different configuration; "
                        f"differing keys: {'; '.join(diff)}. Use another --output-dir or the saved settings.")
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in cfg.items()
               if k not in ("resume", "output_dir", "max_steps", "overwrite") and saved.get(k, v) != v]
    if changed:
        say(rank, f"warning: resuming {path} with settings that differ from its own (the new values apply from "
                  f"here on): {'; '.join(changed)}")

def claim_output_dir(cfg, ckpt_path, log_path, resume, saved, rank):
    """-> how log.jsonl opens. A launch never destroys newer work: --resume FILE (another file than OUTPUT_DIR/
    checkpoint.pth) into a folder holding a checkpoint.pth or log.jsonl is refused unless --overwrite, which starts
    both anew. A relaunch cuts log.jsonl back to its checkpoint (steps logged after it run again: each appears once);
    a fresh start writes it anew (a killed run's records are never continued)."""
    same = os.path.exists(ckpt_path) and os.path.samefile(resume, ckpt_path)
    held = [p for p in (ckpt_path, log_path) if os.path.exists(p)] if saved and not same else []
    if held and not cfg["overwrite"]:
        raise MOKDError(f"{' and '.join(held)} would be overwritten by resuming {resume} (step {saved['global_step']})"
                        f": give another --output-dir, or add --overwrite to replace them")
    if saved and not held and os.path.exists(log_path) and rank == 0:
        os.truncate(log_path, min(saved.get("log_bytes", math.inf), os.path.getsize(log_path)))
    return "a" if saved and not held else "w"

# ==== 9. The training loop: stops cleanly on a signal and on a non-finite loss, resumes exactly. ======================
class StopRequest:
    """`with StopRequest(path) as stop:` SIGTERM / SIGINT set stop.requested: the step during which a signal reached
    any rank is the last; the run saves it to `path` and exits. Another SIGINT (Ctrl-C) exits at once, without saving;
    more SIGTERMs change nothing (a scheduler and torchrun may both signal a rank)."""
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested and os.environ.get("RANK", "0") == "0":  # one line, not one per process
            print(f"{signal.Signals(signum).name} received: the run finishes its current step, saves it to {self.path} "
                  f"and stops (Ctrl-C again: stop at once, without saving)", file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self, group, save_due):
        """(stop, save): whether a signal reached any rank, whether a periodic save is due on any rank; the same on
        every rank: a tiny all-reduce on the CPU (gloo), no GPU sync."""
        if group is None:
            return self.requested, save_due
        flags = torch.tensor([float(self.requested), float(save_due)])
        dist.all_reduce(flags, group=group)
        return flags[0].item() > 0, flags[1].item() > 0

class Logger:
    """Holds each step's VALUE_KEYS values on the device; `check` reads them once per log interval (averaged over
    ranks), stops on a non-finite value (never saved), and on rank 0 writes log.jsonl and the console line."""
    def __init__(self, cfg, path, mode, rank, world, S, niter, total, device, last_ckpt):
        self.cfg, self.rank, self.world, self.S, self.niter, self.total = cfg, rank, world, S, niter, total
        self.device, self.last_ckpt = device, last_ckpt
        self.file = open(path, mode) if rank == 0 else None
        self.pending, self.steps, self.t = [], 0, time.time()
        self.saved_at, self.last = self.t, None  # last: (step, values) of the last step checked

    def check(self, log_it):
        # DEVIATION: DINO checks loss.item() every step (a host sync each step); the steps are checked in batches.
        if not self.pending:
            return
        values = f32(torch.stack([v for _, v in self.pending]))  # (steps, 12): VALUE_KEYS
        if self.world > 1:
            dist.all_reduce(values)
        rows = (values / self.world).tolist()
        for (step, _), row in zip(self.pending, rows):
            for key, v in zip(VALUE_KEYS, row):
                if not math.isfinite(v):
                    model, term = key.split(".")
                    raise MOKDError(f"non-finite loss: model {model.upper()} term {term} = {v} at step {step}. "
                                    f"Last good checkpoint: {self.last_ckpt or 'none written yet'} (left intact).")
        self.steps += len(self.pending)
        self.last = (self.pending[-1][0], dict(zip(VALUE_KEYS, rows[-1])))  # for the collapse verdict at the end
        if self.rank == 0 and log_it:
            self.write(*self.last)
        self.pending.clear()

    def write(self, step, vals):
        """One log.jsonl record and one console line for `step` (vals: its VALUE_KEYS values)."""
        S, epoch, now = self.S, step // self.niter, time.time()
        rate = self.steps * self.cfg["batch_size_per_gpu"] * self.world / max(now - self.t, 1e-9)
        rec = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in vals.items()},
               **schedule_values(S, step, self.niter), "images_per_s": round(rate, 2),
               "peak_mem_mb": peak_memory_mb(self.device)}
        for m in "ab":  # cross terms are not computed with lambda 0
            if self.cfg[f"lam_{m}"] == 0:
                rec[f"{m}.L_cm"] = rec[f"{m}.L_ct"] = None
        print(json.dumps(rec), file=self.file, flush=True)
        terms = " | ".join(f"{m.upper()}: " + " ".join(f"{k} {vals[f'{m}.{k}']:.3f}" for k in LOSS_NAMES)
                           for m in "ab")
        eta = datetime.timedelta(seconds=int((now - self.t) / max(self.steps, 1) * (self.total - step - 1)))
        print(f"step {step}/{self.total - 1} epoch {epoch} | {terms} | {rate:.1f} img/s | ETA {eta}", flush=True)
        self.t, self.steps = now, 0

def save_views(ds, path, n=4):
    """views.png: the crops of the first n training images as the model receives them (augmented, before
    normalisation): a row per image, g1, g2, then each local crop centred on a canvas of the global size; crops are
    enlarged x s, nearest neighbour, so that a cell is at least 64 px. Returns s."""
    cells, s = [], 1
    for crops in filter(None, (ds[(0, i)] for i in range(min(n, len(ds))))):  # None: an unreadable image
        G, s = crops[0].shape[-1], math.ceil(64 / crops[0].shape[-1])  # epoch 0's [g1, g2, l_1 ..], uint8 (3, H, W)
        for c in crops:  # (3, h s, w s) zero-padded to (3, G s, G s)
            cells.append(T.functional.center_crop(c.repeat_interleave(s, -1).repeat_interleave(s, -2), G * s))
    if cells:
        torchvision.utils.save_image(torch.stack(cells).float() / 255, path, nrow=len(crops), pad_value=1.0)
    return s

def peak_memory_mb(device):
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB

def save_checkpoint(run, log, step, path):
    """Every rank checks its last steps (never save a non-finite state); rank 0 writes checkpoint.pth atomically,
    and checkpointNNNN.pth at the end of every --saveckp-freq-th epoch."""
    log.check(log_it=False)
    epoch, it = divmod(step, log.niter)
    freq = run.cfg["saveckp_freq"]
    if log.rank == 0:
        state = {"config": run.cfg, "epoch": epoch, "step_in_epoch": it, "global_step": step,
                 "steps_per_epoch": log.niter, "log_bytes": log.file.tell(), **run.state()}
        try:
            atomic_save(state, path)
            if freq and it == 0 and epoch % freq == 0:  # DINO's --saveckp_freq
                atomic_save(state, os.path.join(os.path.dirname(path), f"checkpoint{epoch:04d}.pth"))
        except OSError as e:  # a full disk, a lost mount: the previous file is intact (atomic_save)
            raise MOKDError(f"cannot write a checkpoint into {os.path.dirname(path)!r} at step {step}: "
                            f"{e.strerror or e}. Still good: {log.last_ckpt or 'no checkpoint yet'}") from None
    log.last_ckpt, log.saved_at = path, time.time()

def train_epoch(run, loader, log, step, end, stop, stop_group):
    """Steps until the epoch, the run (`end`) or a signal ends; -> (next step, stopped by a signal)."""
    cfg, stats, batches = run.cfg, image_stats(run.device), iter(loader)
    # A dead worker is found when the next batch is fetched, at a step boundary: PyTorch's SIGCHLD handler would
    # raise wherever the step is and leave it half applied.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while step < end:
        try:
            crops = next(batches)
        except StopIteration:
            break
        except MOKDError as e:  # raised in a worker: it carries the worker's traceback text
            raise MOKDError(worker_error_message(e)) from None
        except RuntimeError as e:  # a worker was killed (SIGKILL, out of memory), or failed: the last step is complete
            if stop.requested and run.world == 1:
                return step, True
            died = "killed by signal" in str(e) or "exited unexpectedly" in str(e)
            raise MOKDError(f"{'a DataLoader worker died' if died else 'loading the data failed'} ({e}) after step "
                            f"{step - 1}; nothing was saved since {log.last_ckpt or 'the start'}") from None
        # DEVIATION: per-step randomness (drop-path) from (seed, rank, step): a resumed run draws the same masks.
        torch.manual_seed(hash((cfg["seed"], log.rank, step)) & 0x7FFFFFFF)
        log.pending.append((step, run.step(normalise(crops, *stats), step // log.niter, step, log.S)))
        if step % cfg["log_every"] == 0 or step == end - 1:
            log.check(log_it=True)
        step += 1
        stopped, due = stop.agreed(stop_group, 0 < cfg["saveckp_minutes"] * 60 <= time.time() - log.saved_at)
        if stopped:
            return step, True
        if due and step % log.niter and step < end:  # a hard kill loses at most --saveckp-minutes of work
            save_checkpoint(run, log, step, stop.path)
    return step, False

def collapse_verdict(e, b, K, N):
    """A teacher's state by the rule of README, "Outputs", from its collapse signals: e, the mean entropy of its
    outputs, and b, the entropy of their mean over a global batch of N outputs of K."""
    top = min(math.log(K), math.log(N))  # b of N confident outputs on N distinct prototypes (of K)
    state = (f"collapsed onto few prototypes (the batch uses about {math.exp(b):.0f})" if b < 0.5 * top else
             f"uniform (outputs alike, each spread over about {math.exp(e):.0f} prototypes)" if e > 0.8 * b else
             "healthy (confident and diverse)")
    return (f"{state}: entropy {e:.2f} (log K {math.log(K):.2f}), of the batch mean {b:.2f} (min(log K, log N) "
            f"{top:.2f})")

def eval_command(cfg, ckpt_path):
    """The k-NN evaluation that fits this run: its named dataset's test split, a held-out folder of the user's classes,
    or (no --data-path) held-out synthetic images."""
    cmd, data = f"python eval_linear.py --checkpoint {shlex.quote(ckpt_path)} --knn", cfg["data_path"]
    if data in DATASETS:
        cmd += f" --train-path {data} --val-path {data} --data-root {shlex.quote(cfg['data_root'])}"
    elif data:
        cmd += f" --train-path {shlex.quote(data)} --val-path HELD_OUT_FOLDER"
    return f"evaluate: {cmd}   # model A; --model b for B"

def train(cfg, rank, world, device, stop):
    """The training loop. `stop` (a StopRequest) is set by SIGTERM / SIGINT: the step completes, every rank saves."""
    ckpt_path, log_path = stop.path, os.path.join(cfg["output_dir"], "log.jsonl")
    resume = cfg["resume"] or (ckpt_path if os.path.exists(ckpt_path) else None)
    saved = load_checkpoint(resume) if resume else None  # a bad file is never overwritten by a fresh start
    if saved:
        check_resume_config(saved["config"], cfg, resume, rank)
    log_mode = claim_output_dir(cfg, ckpt_path, log_path, resume, saved, rank)
    ds, sampler, loader = make_loader(cfg, rank, world, device)
    torch.manual_seed(cfg["seed"])  # same initial weights on every rank
    run = Run(cfg, device, world)
    niter = sampler.steps
    S = build_schedules(cfg, niter, world)
    all_steps = cfg["epochs"] * niter
    end = min(all_steps, cfg["max_steps"] or all_steps)
    step = 0
    if saved:
        run.load(saved, resume)
        epoch, it = saved["epoch"], saved["step_in_epoch"]
        if it and saved["steps_per_epoch"] != niter:  # another global batch or dataset size
            say(rank, f"warning: {resume} stopped mid-epoch with {saved['steps_per_epoch']} steps per epoch, this run "
                      f"has {niter}: epoch {epoch} restarts from its first step")
            it = 0
        step = epoch * niter + it
        old = schedule_values(build_schedules({**cfg, **saved["config"]}, niter, world), step, niter)
        jumps = [f"{k} {old[k]:.4g} -> {v:.4g}" for k, v in schedule_values(S, step, niter).items()
                 if not math.isclose(v, old[k], rel_tol=1e-6)]
        if jumps:
            say(rank, f"warning: at step {step} the new settings change the schedules: {', '.join(jumps)}")
    del saved
    if step >= end:
        done = f"a finished run ({cfg['epochs']} epochs, {step} steps)" if step >= all_steps else f"at step {step}"
        return say(rank, f"{resume} is {done}: nothing to do.\n{eval_command(cfg, resume)}")
    if resume:
        say(rank, f"resumed from {resume}: continues with step {step} (epoch {step // niter})")
    if rank == 0:
        start_report(cfg, ds, niter, end, world, device, S)
    stop_group = None if world == 1 else dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    log = Logger(cfg, log_path, log_mode, rank, world, S, niter, end, device, last_ckpt=resume)
    stopped = False
    try:
        while step < end and not stopped:  # one epoch per iteration
            sampler.epoch, sampler.start = divmod(step, niter)
            step, stopped = train_epoch(run, loader, log, step, end, stop, stop_group)
            save_checkpoint(run, log, step, ckpt_path)
    finally:
        if log.file:
            log.file.close()
    if rank == 0:
        print(f"stopped by signal after step {step - 1}; relaunch the same command to resume" if stopped else
              f"--max-steps {cfg['max_steps']} reached" if step < all_steps else
              f"finished: {cfg['epochs']} epochs, {step} steps", f"checkpoint: {ckpt_path}", sep="; ")
        for m in "ab" if log.last else ():  # N: 2 global crops per image of the global batch
            e, b = (log.last[1][f"{m}.{k}"] for k in ("entropy", "batch_entropy"))
            print(f"teacher {m.upper()} ({cfg[f'arch_{m}']}) at step {log.last[0]}: "
                  f"{collapse_verdict(e, b, cfg['out_dim'], 2 * cfg['batch_size_per_gpu'] * world)}")
        print(eval_command(cfg, ckpt_path), flush=True)
        if step >= all_steps and not cfg["data_path"]:
            demo_report(cfg, log_path, ckpt_path)

def start_report(cfg, ds, niter, end, world, device, S):
    """At the start, on rank 0: config.json (config, versions, hardware, command line), views.png, a run summary."""
    info = {"config": cfg, "world_size": world, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "argv": sys.argv,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    os.makedirs(cfg["output_dir"], exist_ok=True)  # only now: a refused run leaves no folder (check_writable_dir)
    with open(os.path.join(cfg["output_dir"], "config.json"), "w") as f:
        json.dump(info, f, indent=1)
    scale = save_views(ds, os.path.join(cfg["output_dir"], "views.png"))
    data = cfg["data_path"] or "the built-in synthetic shapes (no --data-path)"
    data += f" (from {cfg['data_root']})" if cfg["data_path"] in DATASETS else ""
    lr = ", ".join(f"{m.upper()} {S[m]['main'][0].max():.3g} ({cfg[f'optimizer_{m}']})" for m in "ab")
    print(f"recipe {cfg['recipe']}: {cfg['arch_a']} (A) + {cfg['arch_b']} (B), K {cfg['out_dim']}, crops 2 x "
          f"{cfg['global_crop_size']} + {cfg['local_crops_number']} x {cfg['local_crop_size']} px; data: {data}, "
          f"{len(ds)} images\n{niter} steps per epoch x {cfg['epochs']} epochs (this launch stops at step {end}); "
          f"global batch {cfg['batch_size_per_gpu'] * world}; peak lr {lr}; {cfg['precision']} on {world} x "
          f"{device.type}{' (DDP)' if is_dist() else ''}; output: {cfg['output_dir']}\nviews.png: per image g1, g2 "
          f"({cfg['global_crop_size']} px), {cfg['local_crops_number']} local crops ({cfg['local_crop_size']} px), "
          f"drawn x{scale}", *lr_floor_warnings(cfg, world), sep="\n", flush=True)

# ==== 10. The demo's report (`python mokd.py`, no --data-path). =======================================================
def demo_report(cfg, log_path, ckpt_path):
    """Each loss term's first and last logged value and what to try next; the last line is one JSON object."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    first, last, log_k = records[0], records[-1], math.log(cfg["out_dim"])
    report = {m: {"arch": cfg[f"arch_{m}"], "first": {k: first[f"{m}.{k}"] for k in LOSS_NAMES},
                  "last": {k: last[f"{m}.{k}"] for k in LOSS_NAMES}, "entropy": last[f"{m}.entropy"],
                  "batch_entropy": last[f"{m}.batch_entropy"]} for m in "ab"}
    print(f"\nloss terms, logged step {first['step']} -> {last['step']}:")
    for m, r in report.items():
        terms = [f"{k} {r['first'][k]:.2f} -> {r['last'][k]:.2f}" for k in LOSS_NAMES if r["first"][k] is not None]
        print(f"  {m.upper()} ({r['arch']}): {', '.join(terms)}")
    print("This run checks that the whole method runs end to end; it is too short to learn (about 100 CPU steps did "
          "not lift DINO-family features above random ones here): that takes real data.\n"
          "next: python mokd.py --recipe cifar10 --data-path cifar10 --output-dir OUT   # train on CIFAR-10")
    print(json.dumps({**report, "log_K": round(log_k, 3), "checkpoint": ckpt_path}), flush=True)

# ==== 11. The command line: a recipe gives every default (two-stage parse), argparse types validate single flags. =====
def checked(convert, ok, what):
    """An argparse type: convert the text and require ok(value); argparse's message names the flag."""
    def parse(text):
        try:
            value = convert(text)
        except (ValueError, KeyError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse
positive_int = checked(int, lambda v: v >= 1, "a positive integer")
count = checked(int, lambda v: v >= 0, "an integer >= 0")
non_negative = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
temperature = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive temperature")
fraction = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
area = checked(float, lambda v: 0 < v <= 1, "an area fraction in (0, 1]")
probability = checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
boolean = checked(lambda t: {"true": True, "1": True, "false": False, "0": False}[t.lower()], lambda v: True,
                  "true or false")

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, but not "None": such a flag says in its help what happens without it."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)

def recipe_defaults(recipe, arch_a=None, arch_b=None, epochs=None):
    """Every default of a recipe: its table entry, per model its family's values (with the recipe's overrides), the
    authors' T-head width; with other `epochs`, the warm-ups keep their share of the run (>= 1 epoch if not 0)."""
    # DEVIATION: the authors' loop overrides some flags; here per-model values are flags with family defaults.
    r = RECIPES[recipe]
    d = {k: v for k, v in r.items() if k != "family"}
    d["arch_a"], d["arch_b"] = arch_a or r["arch_a"], arch_b or r["arch_b"]
    for m in "ab":
        fam = family(d[f"arch_{m}"])
        d.update({f"{k}_{m}": v for k, v in {**FAMILY[fam], **r.get("family", {}).get(fam, {})}.items()})
    vit_widths = [VITS[d[f"arch_{m}"]][0] for m in "ab" if d[f"arch_{m}"] in VITS]
    d["thead_dim"] = max(vit_widths, default=384)  # the authors' T-head width: the (wider) ViT's, 384 for two CNNs
    warmups = ("warmup_epochs", "cross_warmup_teacher_temp_epochs", "warmup_teacher_temp_epochs_a",
               "warmup_teacher_temp_epochs_b")
    if epochs:
        d.update({k: max(1, round(d[k] * epochs / r["epochs"])) if d[k] else 0 for k in warmups})
    return d

def build_parser(recipe="demo", arch_a=None, arch_b=None, epochs=None):
    """The full parser with the defaults of `recipe` for the pair (arch_a, arch_b) and `epochs`."""
    p = argparse.ArgumentParser("mokd.py", formatter_class=HelpFormatter, allow_abbrev=False, usage="%(prog)s [flags]",
                                description=f"{__doc__.splitlines()[0]} Defaults below: recipe {recipe!r}, this pair, "
                                f"--epochs. Demo's (no --data-path) suit 3 minutes on synthetic shapes, not real data; "
                                f"`--recipe NAME --help` shows NAME's ({', '.join(RECIPES)}; --data-path: imagenet)")
    a = p.add_argument
    a("--recipe", choices=list(RECIPES), help="preset of every default (demo without --data-path, imagenet with it)")
    a("--arch-a", choices=ARCHS, help="model A")
    a("--arch-b", choices=ARCHS, help="model B")
    a("--patch-size", type=positive_int, help="ViT patch size")
    a("--drop-path", type=probability, default=0.1, help="stochastic depth of ViT students (teachers: none)")
    a("--stem", default="auto", choices=["auto", "imagenet", "cifar"],
      help="ResNet stem; auto = cifar (3x3 conv, stride 1, no max-pool) when the global crop is <= 64 px")
    a("--out-dim", type=positive_int, help="K, the heads' output dimension")
    a("--head-hidden-dim", type=positive_int, default=2048, help="MLP head hidden width (DINO)")
    a("--bottleneck-dim", type=positive_int, default=256, help="MLP head bottleneck width (DINO)")
    a("--thead-dim", type=positive_int, help="T-head width d (the authors' rule: the ViT's width, 384 for two CNNs)")
    a("--thead-depth", type=positive_int, default=3, help="transformer blocks in the T-head")
    a("--thead-heads", type=positive_int, default=6, help="attention heads in the T-head")
    a("--thead-lr", type=non_negative, default=3e-4, help="peak lr of a CNN's T-head, scaled by global batch / 256")
    a("--thead-min-lr", type=non_negative, default=1e-5, help="final lr of a CNN's T-head (not scaled)")
    a("--thead-weight-decay", type=non_negative, default=0.04, help="start weight decay of a CNN's T-head")
    a("--thead-weight-decay-end", type=non_negative, default=0.4, help="final weight decay of a CNN's T-head")
    for m in "ab":
        M = m.upper()
        a(f"--optimizer-{m}", choices=["sgd", "adamw"], help=f"model {M}'s optimiser")
        a(f"--lr-{m}", type=non_negative, help=f"model {M}'s peak lr, scaled by global batch / 256")
        a(f"--min-lr-{m}", type=non_negative, help=f"model {M}'s final lr (not scaled)")
        a(f"--weight-decay-{m}", type=non_negative, help=f"model {M}'s start weight decay")
        a(f"--weight-decay-end-{m}", type=non_negative, help=f"model {M}'s final weight decay")
        a(f"--warmup-teacher-temp-epochs-{m}", type=count, help=f"model {M}'s self terms' temperature warm-up")
        a(f"--lambda-{m}", type=non_negative, dest=f"lam_{m}", help=f"model {M}'s weight of the cross terms")
        a(f"--clip-grad-{m}", type=non_negative, help=f"model {M}'s per-tensor gradient-norm clip (0: none)")
        a(f"--norm-last-layer-{m}", type=boolean, help=f"freeze weight_g of model {M}'s MLP head's last layer")
    a("--warmup-teacher-temp", type=temperature, help="initial teacher temperature")
    a("--teacher-temp", type=temperature, help="final teacher temperature")
    a("--cross-warmup-teacher-temp-epochs", type=count, help="warm-up epochs of the cross terms' temperature")
    a("--momentum-teacher", type=fraction, help="initial EMA momentum, cosine to 1")
    a("--epochs", type=positive_int, help="training epochs")
    a("--warmup-epochs", type=count, help="linear lr warm-up epochs, a recipe's share of --epochs")
    a("--freeze-last-layer", type=count, help="epochs during which the heads' last layers stay fixed")
    a("--batch-size-per-gpu", type=positive_int, help="images per process")
    a("--global-crop-size", type=positive_int, help="global crops, px")
    a("--local-crop-size", type=positive_int, help="local crops, px")
    a("--local-crops-number", type=count, help="local crops per image")
    a("--global-crops-scale", type=area, nargs=2, help="area range of the global crops")
    a("--local-crops-scale", type=area, nargs=2, help="area range of the local crops")
    a("--data-path", help=f"an image folder (<root>/<class>/<image>) or a dataset name ({', '.join(DATASETS)}: "
      f"downloaded into --data-root on first use); without it, built-in synthetic shapes")
    a("--data-root", default="data", help="where named datasets are (or are downloaded to)")
    a("--synthetic-size", type=positive_int, default=320, help="images in the synthetic dataset (no --data-path)")
    a("--num-workers", type=count, default=min(8, os.cpu_count() or 1), help="DataLoader workers per process")
    a("--output-dir", default="output", help="checkpoint.pth, log.jsonl and config.json go here")
    a("--resume", help="resume from this checkpoint (default: OUTPUT_DIR/checkpoint.pth if present)")
    a("--overwrite", action="store_true", help="let --resume FILE replace the checkpoint.pth and log.jsonl that "
      "--output-dir holds (refused without it)")
    a("--saveckp-freq", type=count, default=0, help="also keep checkpointNNNN.pth every N epochs (0: never)")
    a("--saveckp-minutes", type=non_negative, default=30, help="also write checkpoint.pth mid-epoch every N minutes: "
      "a hard kill (kill -9, out of memory, node lost) loses at most that (0: at epoch ends only)")
    a("--seed", type=int, default=0, help="seed of the initial weights, the data order and the augmentations")
    a("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    a("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    a("--max-steps", type=positive_int, help="stop after N optimiser steps (writes a checkpoint)")
    a("--log-every", type=positive_int, help="steps between log.jsonl records")
    a("--dist-timeout", type=non_negative, default=30, help="minutes a collective may wait for another rank")
    a("--compile", action="store_true", help="torch.compile students and teachers")
    a("--grad-checkpointing", action="store_true", help="recompute ViT blocks in backward to save memory")
    p.set_defaults(**recipe_defaults(recipe, arch_a, arch_b, epochs))
    return p

def parse_config(argv=None):
    """Command line -> the run's config dict. Stage 1 reads the recipe and the pair, stage 2 parses every flag with
    their defaults, so `--help` shows the values of the run being configured."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("--recipe", "--data-path", "--arch-a", "--arch-b", "--epochs"):
        pre.add_argument(name)
    known = pre.parse_known_args(argv)[0]
    recipe = known.recipe if known.recipe in RECIPES else "demo" if known.data_path is None else "imagenet"
    archs = [a if a in ARCHS else None for a in (known.arch_a, known.arch_b)]
    epochs = int(known.epochs) if (known.epochs or "").isdigit() and int(known.epochs) > 0 else None
    cfg = vars(build_parser(recipe, *archs, epochs).parse_args(argv))
    cfg.update(recipe=recipe, global_crops_scale=list(cfg["global_crops_scale"]),
               local_crops_scale=list(cfg["local_crops_scale"]))
    if cfg["stem"] == "auto":
        cfg["stem"] = "cifar" if cfg["global_crop_size"] <= 64 else "imagenet"
    if cfg["precision"] is None:  # DEVIATION: bf16 by default on CUDA (the authors': fp16, --precision fp16)
        cfg["precision"] = "bf16" if cfg["device"] == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return cfg

def check_config(cfg, world_size):
    """Refuse settings that involve several flags before anything is built (one message naming the flags)."""
    def bad(msg):
        raise MOKDError(msg)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        bad("--device cuda was requested but no CUDA device is available")
    if cfg["device"] == "cpu" and cfg["precision"] == "fp16":
        bad("--precision fp16 needs CUDA; use fp32 or bf16 on the CPU")
    for k in ("global_crops_scale", "local_crops_scale"):
        if cfg[k][0] > cfg[k][1]:
            bad(f"--{k.replace('_', '-')} must be given as MIN MAX with MIN <= MAX, got {cfg[k][0]} {cfg[k][1]}")
    if cfg["local_crops_number"] == 0 and (cfg["lam_a"] > 0 or cfg["lam_b"] > 0):  # L_ct's queries are local crops
        bad("--local-crops-number 0 leaves L_ct without queries; give local crops or set --lambda-a 0 --lambda-b 0")
    if cfg["thead_dim"] % cfg["thead_heads"]:
        bad(f"--thead-dim {cfg['thead_dim']} is not divisible by --thead-heads {cfg['thead_heads']}")
    for m in "ab":
        arch, s = cfg[f"arch_{m}"], feature_stride(cfg[f"arch_{m}"], cfg)
        for flag, size in (("--global-crop-size", cfg["global_crop_size"]),
                           ("--local-crop-size", cfg["local_crop_size"])):
            if family(arch) == "vit" and size % s:
                bad(f"{flag} {size} is not divisible by --patch-size {s} (model {m.upper()}, {arch})")
            if size < s:
                bad(f"{flag} {size} is smaller than model {m.upper()}'s ({arch}, stem {cfg['stem']}) downsampling "
                    f"factor {s}: no feature map would remain")
    has_bn = "resnet" in (family(cfg["arch_a"]), family(cfg["arch_b"]))
    if has_bn and cfg["batch_size_per_gpu"] < 2 and not (cfg["device"] == "cuda" and world_size > 1):
        bad("--batch-size-per-gpu 1 leaves BatchNorm (ResNet) with one image per process; use at least 2")
    check_writable_dir(cfg["output_dir"], "--output-dir")

def main(argv=None):
    cfg = parse_config(argv)  # a bad flag: argparse's message naming it, exit status 2
    rank = int(os.environ.get("RANK", 0))
    try:
        check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        rank, world, device = setup_distributed(cfg)
        try:
            # Installed before anything is built: a signal during start-up still saves.
            with StopRequest(os.path.join(cfg["output_dir"], "checkpoint.pth")) as stop:
                train(cfg, rank, world, device, stop)
            return None
        finally:
            end_workers()
            if is_dist():
                dist.destroy_process_group()
    except MOKDError as e:
        error = str(e)
    gc.collect()  # outside the except block: the traceback's DataLoader is gone and its workers shut down normally
    print(f"error{f' [rank {rank}]' if 'RANK' in os.environ else ''}: {error}", file=sys.stderr, flush=True)
    sys.exit(2)

if __name__ == "__main__":
    main()
