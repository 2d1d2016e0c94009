"""Tests for mokd.py and eval_linear.py: CPU only, tiny models, images made here. Run: python -m pytest -q"""
import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st
from PIL import Image
from torchvision import transforms as T

import benchmark
import eval_linear
import mokd

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--patch-size", "4", "--out-dim", "64", "--head-hidden-dim", "64", "--bottleneck-dim", "32",
        "--thead-dim", "48", "--thead-heads", "4", "--thead-depth", "1", "--global-crop-size", "16",
        "--local-crop-size", "8",
        "--local-crops-number", "2", "--batch-size-per-gpu", "4", "--device", "cpu", "--drop-path", "0",
        "--num-workers", "0", "--synthetic-size", "32", "--epochs", "2", "--warmup-epochs", "1"]
FEW = settings(deadline=None, max_examples=15)


def make_cfg(arch_a="vit_tiny", arch_b="resnet18", *extra, **over):
    cfg = mokd.parse_config(["--arch-a", arch_a, "--arch-b", arch_b, *TINY, *extra])
    cfg.update(over)
    return cfg


def make_crops(B=4, n=2, G=16, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    global_crops = [torch.randn(B, 3, G, G, generator=g) for _ in range(2)]
    return global_crops + [torch.randn(B, 3, L, L, generator=g) for _ in range(n)]


def make_run(cfg, seed=0):
    torch.manual_seed(seed)
    run = mokd.Run(cfg, torch.device("cpu"), 1)
    return run, mokd.build_schedules(cfg, 10, 1)


def last_json(text):
    """The JSON object on the last line of a program's output (mokd.py's demo and benchmark, eval_linear.py)."""
    return json.loads(text.strip().splitlines()[-1])


@contextlib.contextmanager
def started(cmd, **kwargs):
    """subprocess.Popen in a session of its own, text pipes; on leaving, a failed assertion or a timeout included,
    whatever of its process group still runs (torchrun's ranks, DataLoader workers, a script's children) is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **{"env": {**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs})
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group has ended
            pass
        proc.wait()


def run_proc(cmd, timeout=600, **kwargs):
    """subprocess.run for the tests: the whole process group is killed on a timeout (TimeoutExpired fails the test)."""
    with started(cmd, **kwargs) as proc:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launcher(nproc=1, torchrun=False):
    """The interpreter, under torchrun with nproc processes when nproc > 1 or torchrun is asked for."""
    if nproc > 1 or torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable]


def run_cli(args, nproc=1, timeout=600, torchrun=False):
    return run_proc(launcher(nproc, torchrun) + [os.path.join(HERE, "mokd.py"), *args], timeout=timeout)


# ----------------------------------------------------------------------------- the losses
def ref_dino(student, teacher, center, tau_t, n_global=2, tau_s=0.1):
    """The DINO loss written out plainly in float64 numpy."""
    s, t, c = (np.asarray(a, dtype=np.float64) for a in (student, teacher, center))
    B = len(t) // n_global
    total, n = 0.0, 0
    for i in range(n_global):
        z = (t[i * B:(i + 1) * B] - c) / tau_t
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        for v in range(len(s) // B):
            if v == i:
                continue
            x = s[v * B:(v + 1) * B] / tau_s
            logq = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
            total += np.mean(-(p * logq).sum(1))
            n += 1
    return total / n


def ref_cross_entropy(student, teacher, tau_t, tau_s=0.1):
    """L_ct written out plainly in float64 numpy: mean_b[-sum_k softmax(t / tau_t) log softmax(s / tau_s)]."""
    s, t = np.asarray(student, dtype=np.float64) / tau_s, np.asarray(teacher, dtype=np.float64) / tau_t
    p = np.exp(t - t.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    logq = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    return np.mean(-(p * logq).sum(1))


shapes = st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(2, 17))  # B, n_local, K


@FEW
@given(shapes, st.floats(0.02, 0.1), st.integers(0, 2**31 - 1))
def test_dino_loss_matches_plain_reference_in_float64(shape, tau, seed):
    B, n, K = shape
    g = torch.Generator().manual_seed(seed)
    s = torch.randn((2 + n) * B, K, generator=g, dtype=torch.float64)
    t = torch.randn(2 * B, K, generator=g, dtype=torch.float64)
    c = torch.randn(1, K, generator=g, dtype=torch.float64) * 0.1
    assert mokd.dino_loss(s, t, c, tau).item() == pytest.approx(ref_dino(s, t, c, tau), rel=1e-10, abs=1e-12)


@FEW
@given(shapes, st.integers(0, 2**31 - 1))
def test_loss_invariances_and_non_negativity(shape, seed):
    B, n, K = shape
    g = torch.Generator().manual_seed(seed)
    s = torch.randn((2 + n) * B, K, generator=g, dtype=torch.float64)
    t = torch.randn(2 * B, K, generator=g, dtype=torch.float64)
    c = torch.zeros(1, K, dtype=torch.float64)
    base = mokd.dino_loss(s, t, c, 0.04).item()
    assert base >= 0
    views = list(s.chunk(2 + n))
    swapped_s = torch.cat([views[1], views[0]] + views[2:])  # swap g1 and g2 in student and teacher
    swapped_t = torch.cat(list(t.chunk(2))[::-1])
    assert mokd.dino_loss(swapped_s, swapped_t, c, 0.04).item() == pytest.approx(base, rel=1e-12)
    perm_locals = torch.cat(views[:2] + views[2:][::-1])
    assert mokd.dino_loss(perm_locals, t, c, 0.04).item() == pytest.approx(base, rel=1e-12)
    p = torch.randperm(B, generator=g)  # the same image permutation in every crop
    s_p = torch.cat([v[p] for v in views])
    t_p = torch.cat([v[p] for v in t.chunk(2)])
    assert mokd.dino_loss(s_p, t_p, c, 0.04).item() == pytest.approx(base, rel=1e-12)
    shift = torch.randn(len(s), 1, generator=g, dtype=torch.float64)  # a constant per student row
    assert mokd.dino_loss(s + shift, t, c, 0.04).item() == pytest.approx(base, rel=1e-9)
    ce = mokd.cross_entropy(s[: 2 * B], t, 0.04)
    assert ce.item() >= 0


@FEW
@given(st.integers(2, 16), st.integers(2, 64), st.integers(0, 2**31 - 1))
def test_entropy_tells_the_two_collapses_from_a_healthy_teacher(N, K, seed):
    """Uniform outputs: both signals at log K; every image on one prototype: both near 0; image i confidently on
    prototype i mod K: per-image entropy near 0, batch-mean entropy that of the prototypes' shares of the batch."""
    g = torch.Generator().manual_seed(seed)

    def signals(teacher, centre, tau_t):  # as Run.losses and Run.step measure them (here one process)
        p = F.softmax((teacher - centre) / tau_t, dim=-1)
        return mokd.entropy(p).mean(), mokd.entropy(p.mean(0))
    c = torch.randn(1, K, generator=g)
    per_image, of_mean = signals(c.expand(N, K), c, 0.04)  # logits equal to the centre: uniform
    assert per_image.item() == pytest.approx(math.log(K), rel=1e-5)
    assert of_mean.item() == pytest.approx(math.log(K), rel=1e-5)
    one = torch.zeros(N, K)
    one[:, int(torch.randint(K, (1,), generator=g))] = 1.0
    per_image, of_mean = signals(one, torch.zeros(1, K), 0.01)
    assert per_image.item() < 1e-3 and of_mean.item() < 1e-3
    own = torch.zeros(N, K)
    own[torch.arange(N), torch.arange(N) % K] = 1.0
    per_image, of_mean = signals(own, torch.zeros(1, K), 0.01)
    shares = torch.bincount(torch.arange(N) % K).double() / N
    assert per_image.item() < 1e-3
    assert of_mean.item() == pytest.approx(-(shares * shares.log()).sum().item(), abs=1e-3)


def test_losses_run_in_float32_under_low_precision():
    s, t = torch.randn(8, 16).bfloat16(), torch.randn(4, 16).bfloat16()
    out = mokd.dino_loss(s, t, torch.zeros(1, 16), 0.04)
    assert out.dtype == torch.float32
    assert mokd.cross_entropy(s[:4], t, 0.04).dtype == torch.float32


def test_two_centre_updates_keep_0_9_of_the_old_centre():
    """c <- 0.9 c + 0.1 mean_b t, twice from a non-zero centre; only the named centres move."""
    g = torch.Generator().manual_seed(0)
    c = mokd.Centres(5).double()
    c0 = torch.randn(1, 5, dtype=torch.float64, generator=g)
    c.sm_a.copy_(c0)
    t1, t2 = (torch.randn(6, 5, dtype=torch.float64, generator=g) for _ in range(2))
    c.update({"sm_a": t1, "cm_b": t2})
    c.update({"sm_a": t2})
    m1, m2 = t1.numpy().mean(0), t2.numpy().mean(0)
    expect = 0.9 * (0.9 * c0.numpy()[0] + 0.1 * m1) + 0.1 * m2  # (atol: an element near 0 has no relative scale)
    np.testing.assert_allclose(c.sm_a.numpy()[0], expect, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c.cm_b.numpy()[0], 0.1 * m2, rtol=1e-12, atol=1e-15)
    assert c.sm_b.abs().sum() == 0 and c.st_a.abs().sum() == 0


@FEW
@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 17), st.floats(0.02, 0.1), st.integers(0, 2**31 - 1))
def test_cross_entropy_matches_plain_reference_in_float64(B, n, K, tau, seed):
    """L_ct against a numpy reference: no centre, the teacher at tau_t, the student at tau_s = 0.1, mean over rows."""
    g = torch.Generator().manual_seed(seed)
    s, t = (torch.randn(n * B, K, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    assert mokd.cross_entropy(s, t, tau).item() == pytest.approx(ref_cross_entropy(s, t, tau), rel=1e-10)


# ----------------------------------------------------------------------------- schedules and EMA
@FEW
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 9))
def test_schedules_lengths_end_points_and_clamped_warmup(epochs, niter, warmup):
    lr = mokd.cosine_schedule(1.0, 0.01, epochs, niter, warmup)
    assert len(lr) == epochs * niter and np.all(np.isfinite(lr))
    assert lr.max() <= 1.0 + 1e-12
    if warmup == 0:
        assert lr[0] == pytest.approx(1.0)
    tau = mokd.teacher_temp_schedule(0.04, 0.07, warmup, epochs)  # warm-up longer than the run: clamped
    assert len(tau) == epochs and np.all(np.diff(tau) >= 0) and 0.04 - 1e-12 <= tau.min() <= tau.max() <= 0.07 + 1e-12
    assert tau[0] == pytest.approx(0.04 if warmup >= 1 else 0.07)
    assert tau[-1] == pytest.approx(0.04 if epochs == 1 and warmup >= 1 else 0.07)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=6), st.floats(0.1, 10.0))
def test_clip_per_tensor_clips_each_gradient_to_its_own_norm(norms, max_norm):
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in norms]
    for p, n in zip(params, norms):
        p.grad = F.normalize(torch.arange(1.0, 5.0), dim=0) * n
    before = [p.grad.clone() for p in params]
    mokd.clip_per_tensor(params, max_norm)
    for p, g, n in zip(params, before, norms):
        expect = g * min(1.0, max_norm / (n + 1e-6))  # DINO: each tensor on its own, direction kept
        torch.testing.assert_close(p.grad, expect, rtol=1e-5, atol=1e-7)


def test_ema_with_momentum_zero_one_and_between():
    s, t = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    sp, tp = list(s.parameters()), list(t.parameters())
    before = [p.clone() for p in tp]
    mokd.ema_update(sp, tp, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, tp))
    mokd.ema_update(sp, tp, 0.996)
    for a, b, c in zip(tp, before, sp):
        torch.testing.assert_close(a, 0.996 * b + 0.004 * c)
    mokd.ema_update(sp, tp, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(sp, tp))


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize("arch", mokd.ARCHS)
@pytest.mark.parametrize("sizes", [(224, 96, 16), (32, 16, 4)])
def test_backbone_contracts(arch, sizes):
    G, L, patch = sizes
    cfg = make_cfg(arch, arch, "--global-crop-size", str(G), "--local-crop-size", str(L), "--patch-size", str(patch))
    bb = mokd.build_backbone(arch, cfg).eval()
    stride = mokd.feature_stride(arch, cfg)
    C = bb.embed_dim
    with torch.no_grad():
        for size in (G, L):
            pooled, tokens, grid = bb(torch.randn(2, 3, size, size))
            assert pooled.shape == (2, C) and grid == (size // stride, size // stride)
            assert tokens.shape == (2, (size // stride) ** 2, C)


@pytest.mark.parametrize("pair", [("vit_tiny", "resnet18"), ("resnet18", "resnet34"), ("vit_tiny", "vit_small")])
def test_model_forward_shapes_and_projection_rule(pair):
    for arch in pair:
        cfg = make_cfg(*pair, "--thead-dim", "192", "--thead-heads", "4")
        model = mokd.MOKDModel(arch, cfg, True)
        assert isinstance(model.thead.proj, torch.nn.Identity) == (model.backbone.embed_dim == 192)
        out = model(torch.cat(make_crops()[:2]), torch.cat(make_crops()[2:]))
        assert out["m"].shape == out["t"].shape == (16, 64)
        assert out["query"].shape == (8, 192) and not out["query"].requires_grad
        assert out["g1"].shape[0] == 4 and out["g1"].shape[2] == 192


def test_sdpa_matches_explicit_attention():
    torch.manual_seed(0)
    attn = mokd.Attention(48, 4)
    x = torch.randn(3, 7, 48)
    q, k, v = attn.qkv(x).reshape(3, 7, 3, 4, 12).permute(2, 0, 3, 1, 4)  # (3, heads, 7, 12) each
    explicit = ((q @ k.transpose(-2, -1)) / math.sqrt(12)).softmax(-1) @ v  # the paper's softmax(q k^T / sqrt(d)) v
    torch.testing.assert_close(attn(x), attn.proj(explicit.transpose(1, 2).reshape(3, 7, 48)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the search
def test_search_pairs_local_crop_j_of_image_b_with_g1_of_image_b():
    cfg = make_cfg()
    torch.manual_seed(0)
    teacher = mokd.MOKDModel("vit_tiny", cfg, True).eval()
    B, n, L, d = 3, 2, 4, 48
    g1 = torch.randn(B, L, d)
    q = torch.randn(n * B, d)
    with torch.no_grad():
        out = mokd.search(teacher, g1, q, n)
        for j in range(n):
            for b in range(B):
                row = teacher.thead.run(g1[b:b + 1], q[j * B + b:j * B + b + 1])
                torch.testing.assert_close(out[j * B + b], row[0], rtol=1e-4, atol=1e-5)
        wrong = teacher.thead.run(g1.repeat_interleave(n, 0), q)  # image-major tiling: a wrong pairing
    assert not torch.allclose(out, wrong, atol=1e-3)


# ----------------------------------------------------------------------------- gradient flow
def test_gradient_flow():
    cfg = make_cfg()
    run, S = make_run(cfg)
    crops = make_crops()
    totals, terms, _, _ = run.losses(crops, 1, S)
    for m in "ab":
        assert all(torch.isfinite(v) and v > 0 for v in terms[m].values())
    totals["a"].backward(retain_graph=True)
    assert all(p.grad is None for p in run.students["b"].parameters()), "L_A reached student B"
    totals["b"].backward()
    for m in "ab":
        for name, p in run.students[m].named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (m, name)
        assert all(not p.requires_grad and p.grad is None for p in run.teachers[m].parameters())


def test_no_gradient_through_the_search_query():
    cfg = make_cfg()
    run, S = make_run(cfg)
    crops = make_crops()
    glob, loc = torch.cat(crops[:2]), torch.cat(crops[2:])
    s = run.students["a"](glob, loc)
    assert not s["query"].requires_grad
    with torch.no_grad():
        t = run.teachers["b"](glob)
    out = mokd.search(run.teachers["b"], t["g1"], s["query"], 2)
    assert not out.requires_grad  # computed with gradients enabled: the query's cut alone keeps student A out


def test_last_layers_frozen_in_epoch_0_and_trained_after():
    cfg = make_cfg(**{"lr_a": 0.01, "lr_b": 0.1, "freeze_last_layer": 1})  # the authors' 1 epoch (the demo: 0)
    run, S = make_run(cfg)
    last = {m: {k: p.clone() for k, p in run.students[m].named_parameters() if "last_layer" in k} for m in "ab"}
    other = run.students["a"].head.mlp[0].weight.clone()
    run.step(make_crops(), 0, 3, S)  # epoch 0, after lr warm-up began
    for m in "ab":
        for k, p in run.students[m].named_parameters():
            if k in last[m]:
                assert torch.equal(p, last[m][k]), (m, k)
    assert not torch.equal(other, run.students["a"].head.mlp[0].weight)
    run.step(make_crops(), 1, 12, S)
    assert not torch.equal(last["a"]["head.last_layer.parametrizations.weight.original1"],
                           run.students["a"].head.last_layer.parametrizations.weight.original1)
    # norm_last_layer: the MLP head's weight_g is frozen for the CNN (model B), trained for the ViT (model A) by
    # default; the T-heads' weight_g always trains
    assert not run.students["b"].head.last_layer.parametrizations.weight.original0.requires_grad
    assert run.students["a"].head.last_layer.parametrizations.weight.original0.requires_grad
    assert all(run.students[m].thead.last_layer.parametrizations.weight.original0.requires_grad for m in "ab")


# ----------------------------------------------------------------------------- the whole objective
def test_lambda_zero_is_independent_training():
    """With lambda 0 for both, model A trains exactly the same whatever its partner."""
    states = []
    for partner in ("resnet18", "vit_tiny"):
        cfg = make_cfg("vit_tiny", partner, lam_a=0.0, lam_b=0.0)
        run, S = make_run(cfg, seed=3)
        for i in range(3):
            values = run.step(make_crops(seed=i), 1, 10 + i, S)
            assert values[2] == 0 and values[3] == 0  # L_cm and L_ct of A are not computed
        teacher = {"t." + k: v for k, v in run.teachers["a"].state_dict().items()}
        states.append({**run.students["a"].state_dict(), **teacher, "c": run.centres.sm_a.clone()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    cfg = make_cfg(lr_a=5e-4, lr_b=0.05)
    run, S = make_run(cfg)
    crops = make_crops()
    first = None
    for i in range(12):
        values = run.step(crops, 1, 10, S)
        total = sum(values[:8].tolist())
        first = total if first is None else first
    assert total < first


# ----------------------------------------------------------------------------- the wiring of whole steps
# An asymmetric pair: another family, lambda, clip, teacher temperature and centre per model, and a cross temperature
# unlike both, so that a term fed the partner's (or the wrong step's) value cannot pass.
ASYM = dict(lam_a=0.7, lam_b=0.2, clip_grad_a=0.05, clip_grad_b=0.5, freeze_last_layer=1, drop_path=0.0)


def distinct_schedules(cfg):
    """Schedules of 2 epochs x 2 iterations in which every value differs from every other, so that a value read at
    the wrong index (the epoch for the iteration), or another model's, cannot pass."""
    S = mokd.build_schedules(cfg, 2, 1)
    S["momentum"] = np.array([0.95, 0.9, 0.7, 0.6])
    S["tau_cross"] = np.array([0.039, 0.083])
    S["a"]["tau"], S["b"]["tau"] = np.array([0.05, 0.062]), np.array([0.071, 0.044])
    for i, m in enumerate("ab"):
        base = 1e-3 if cfg[f"optimizer_{m}"] == "adamw" else 0.05
        S[m]["main"] = (np.array([0.5, 1.0, 2.1, 1.7]) * base * (1 + i / 10),
                        np.array([0.005, 0.01, 0.03, 0.02]) * (1 + i / 7))
        S[m]["thead"] = (np.array([2e-4, 3e-4, 7e-4, 5e-4]) * (1 + i / 10),
                         np.array([0.01, 0.02, 0.05, 0.04]) * (1 + i / 7))
    return S


def float64_run(cfg, seed=0):
    run, _ = make_run(cfg, seed)
    for m in "ab":
        run.students[m].double()
        run.teachers[m].double()
    run.centres.double()
    g = torch.Generator().manual_seed(seed + 100)
    for name, c in run.centres.named_buffers():  # distinct non-zero centres
        c.copy_(0.3 * torch.randn(c.shape, generator=g, dtype=torch.float64))
    return run


class StepRecorder:
    """Records what one Run.step computes: each MOKDModel's outputs (forward hooks on the run's own modules), the
    totals and terms (a wrapper of Run.losses), and at each optimiser step its groups' lr / weight decay and the
    gradients it receives."""
    def __init__(self, run):
        self.run, self.out, self.opt = run, {}, {}
        for role, mods in (("s", run.students), ("t", run.teachers)):
            for m in "ab":
                mods[m].register_forward_hook(self.hook(role, m, mods[m]))
        losses = run.losses

        def recorded_losses(*args):
            result = losses(*args)
            self.totals, self.terms = result[0], result[1]
            return result
        run.losses = recorded_losses
        for m in "ab":
            self.wrap_step(m)

    def hook(self, role, m, module):
        def record(mod, inputs, output):
            if mod is module:  # not a copy of it
                self.out[role + m] = {k: v.detach().clone() for k, v in output.items() if v is not None}
        return record

    def wrap_step(self, m):
        opt, step = self.run.opts[m], self.run.opts[m].step

        def recorded_step(*args, **kwargs):
            self.opt[m] = {"groups": [(g["sched"], g["reg"], g["lr"], g["weight_decay"]) for g in opt.param_groups],
                           "grads": {id(p): None if p.grad is None else p.grad.clone()
                                     for g in opt.param_groups for p in g["params"]}}
            return step(*args, **kwargs)
        opt.step = recorded_step


def reference_search(teacher, g1, query, n):
    """The search row by row: local crop j of image b (row j*B + b) queries teacher Y's g1 tokens of image b."""
    B = len(g1)
    rows = [teacher.thead.run(g1[b:b + 1], query[j * B + b:j * B + b + 1]) for j in range(n) for b in range(B)]
    return torch.cat(rows)  # (n*B, K)


def check_one_step(run, rec, crops, epoch, it, S, cfg):
    """Run step `it` (epoch `epoch`) and check every quantity against references from its captured inputs."""
    B, n = len(crops[0]), len(crops) - 2
    before = copy.deepcopy(run)  # students, teachers, centres and optimisers as the step finds them
    raw = {}  # the gradients of the step's own totals, before clipping and freezing (`before` is a copy)
    totals, _, _, _ = mokd.Run.losses(before, crops, epoch, S)  # (before.losses is the recorder's)
    for m in "ab":
        params = [p for p in before.students[m].parameters() if p.requires_grad]
        raw[m] = dict(zip((id(p) for p in run.params[m][0] if p.requires_grad),
                          torch.autograd.grad(totals[m], params, retain_graph=True, allow_unused=True)))
    values = run.step(crops, epoch, it, S)
    s, t = {m: rec.out["s" + m] for m in "ab"}, {m: rec.out["t" + m] for m in "ab"}
    c0 = {k: v.numpy() for k, v in before.centres.named_buffers()}
    with torch.no_grad():
        for x, y in (("a", "b"), ("b", "a")):
            srch = reference_search(before.teachers[y], t[y]["g1"], s[x]["query"], n).numpy()
            tau, tau_c, lam = S[x]["tau"][epoch], S["tau_cross"][epoch], cfg[f"lam_{x}"]
            ref = {"L_sm": ref_dino(s[x]["m"], t[x]["m"], c0[f"sm_{x}"], tau),
                   "L_st": ref_dino(s[x]["t"], t[x]["t"], c0[f"st_{x}"], tau),
                   "L_cm": ref_dino(s[x]["m"], t[y]["m"], c0[f"cm_{x}"], tau_c),
                   "L_ct": ref_cross_entropy(s[x]["t"][2 * B:], srch, tau_c)}
            for k, v in ref.items():
                assert rec.terms[x][k].item() == pytest.approx(v, rel=1e-9), (x, k, epoch)
            total = ref["L_sm"] + ref["L_st"] + lam * (ref["L_cm"] + ref["L_ct"])
            assert rec.totals[x].item() == pytest.approx(total, rel=1e-9), (x, "total", epoch)
            # the six centres: c <- 0.9 c + 0.1 mean of the teacher outputs of their term, after the loss
            for term, out in (("sm", t[x]["m"]), ("st", t[x]["t"]), ("cm", t[y]["m"])):
                expect = 0.9 * c0[f"{term}_{x}"] + 0.1 * out.numpy().mean(0, keepdims=True)
                np.testing.assert_allclose(getattr(run.centres, f"{term}_{x}").numpy(), expect, rtol=1e-12,
                                           atol=1e-15, err_msg=f"centre {term}_{x}")
    assert values[:8].tolist() == [rec.terms[m][k].item() for m in "ab" for k in mokd.LOSS_NAMES]
    for m in "ab":
        # the optimiser's groups read the model's own schedule at this iteration; no decay on exempt groups
        for sched, reg, lr, wd in rec.opt[m]["groups"]:
            assert lr == S[m][sched][0][it] and wd == (S[m][sched][1][it] if reg else 0.0), (m, sched, reg)
        # each gradient tensor clipped to the model's own clip; last layers frozen in epoch 0 only
        names = {id(p): k for k, p in run.students[m].named_parameters()}
        for pid, got in rec.opt[m]["grads"].items():
            if epoch < cfg["freeze_last_layer"] and "last_layer" in names[pid]:
                assert got is None, (m, names[pid])
                continue
            g = raw[m][pid]
            expect = g * min(1.0, cfg[f"clip_grad_{m}"] / (g.norm().item() + 1e-6))
            torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-15, msg=f"{m} {names[pid]}")
        # the EMA: teacher <- m teacher + (1 - m) student, towards the updated student
        mom = S["momentum"][it]
        for (k, p_t0), p_t, p_s in zip(before.teachers[m].named_parameters(), run.teachers[m].parameters(),
                                       run.students[m].parameters()):
            torch.testing.assert_close(p_t, mom * p_t0 + (1 - mom) * p_s, rtol=1e-12, atol=1e-15, msg=f"{m} {k}")
        moved = [k for (k, p0), p in zip(before.students[m].named_parameters(), run.students[m].parameters())
                 if "last_layer" in k and p.requires_grad and not torch.equal(p0, p)]
        assert bool(moved) == (epoch >= cfg["freeze_last_layer"]), (m, epoch, moved)


def test_step_wiring_under_an_asymmetric_configuration():
    """Two float64 steps of a heterogeneous pair (the frozen epoch, then the next): each of the eight terms, both
    totals, the six centres, each group's lr and weight decay, the clipped gradients, the frozen last layers and the
    EMA recomputed from the step's captured outputs by references that share no code with mokd.py's losses."""
    cfg = make_cfg("resnet18", "vit_tiny", **ASYM)
    run = float64_run(cfg)
    S = distinct_schedules(cfg)
    rec = StepRecorder(run)
    for epoch, it in ((0, 1), (1, 2)):  # the last step of the frozen epoch 0, then the first of epoch 1
        crops = [c.double() for c in make_crops(seed=10 + it)]
        check_one_step(run, rec, crops, epoch, it, S, cfg)


def test_swapping_everything_of_a_and_b_swaps_the_terms_and_totals():
    """Run 2 is run 1 with A and B exchanged after one step: weights, optimiser states, lambdas, clips, temperatures,
    schedules and centres. Two more steps give the same eight terms and two totals, exchanged, and the same states."""
    cfg1 = make_cfg("resnet18", "vit_tiny", **ASYM)
    cfg2 = make_cfg("vit_tiny", "resnet18", lam_a=0.2, lam_b=0.7, clip_grad_a=0.5, clip_grad_b=0.05,
                    freeze_last_layer=1, drop_path=0.0)
    assert cfg2["optimizer_a"] == cfg1["optimizer_b"] and cfg2["lam_b"] == cfg1["lam_a"]
    run1, run2 = float64_run(cfg1, seed=1), float64_run(cfg2, seed=2)
    S1 = distinct_schedules(cfg1)
    S2 = {**S1, "a": S1["b"], "b": S1["a"]}
    run1.step([c.double() for c in make_crops(seed=20)], 0, 1, S1)
    swap = {"a": "b", "b": "a"}
    for m in "ab":
        for role in ("students", "teachers"):
            getattr(run2, role)[m].load_state_dict(getattr(run1, role)[swap[m]].state_dict())
        run2.opts[m].load_state_dict(copy.deepcopy(run1.opts[swap[m]].state_dict()))  # (load shares tensors)
        for term in ("sm", "st", "cm"):
            getattr(run2.centres, f"{term}_{m}").copy_(getattr(run1.centres, f"{term}_{swap[m]}"))
    rec1, rec2 = StepRecorder(run1), StepRecorder(run2)
    for it in (2, 3):  # the two steps of epoch 1
        crops = [c.double() for c in make_crops(seed=20 + it)]
        run1.step(crops, 1, it, S1)
        run2.step(crops, 1, it, S2)
        for m in "ab":
            assert rec1.totals[m].item() == pytest.approx(rec2.totals[swap[m]].item(), rel=1e-9), m
            for k in mokd.LOSS_NAMES:
                assert rec1.terms[m][k].item() == pytest.approx(rec2.terms[swap[m]][k].item(), rel=1e-9), (m, k)
    for m in "ab":
        for role in ("students", "teachers"):
            own, other = getattr(run1, role)[m].state_dict(), getattr(run2, role)[swap[m]].state_dict()
            for k in own:
                torch.testing.assert_close(own[k], other[k], rtol=1e-9, atol=1e-12, msg=f"{role} {m} {k}")


def term_reach(arch_a, arch_b):
    """For each model X and term: the names of X's and of its partner's trainable parameters that the term's
    gradient reaches (non-zero), and the names of the frozen ones, in float64."""
    cfg = make_cfg(arch_a, arch_b, **ASYM)
    run = float64_run(cfg)
    for m in "ab":  # a teacher must not be reached even when its parameters could take a gradient
        run.teachers[m].requires_grad_(True)
    _, terms, _, _ = run.losses([c.double() for c in make_crops(seed=5)], 1, distinct_schedules(cfg))
    reach, frozen = {}, {}
    for x, y in (("a", "b"), ("b", "a")):
        frozen[x] = {k for k, p in run.students[x].named_parameters() if not p.requires_grad}
        named = [(who + k, p) for who, m in (("", x), ("partner.", y), ("teacher.", x), ("teacher.partner.", y))
                 for k, p in (run.students if "teacher" not in who else run.teachers)[m].named_parameters()
                 if p.requires_grad]
        for term in mokd.LOSS_NAMES:
            grads = torch.autograd.grad(terms[x][term], [p for _, p in named], retain_graph=True, allow_unused=True)
            reach[x, term] = {k for (k, _), g in zip(named, grads) if g is not None and g.abs().sum() > 0}
    return run, reach, frozen


@pytest.mark.parametrize("pair", [("resnet18", "vit_tiny"), ("vit_tiny", "resnet18")])
def test_each_term_reaches_exactly_its_own_students_parts(pair):
    """L_sm and L_cm reach X's backbone and MLP head, L_st and L_ct X's backbone and T-head: every trainable
    parameter there and nothing else (not the partner, not a teacher, not the other head). Frozen parameters are
    exactly the MLP head's weight norm of a model with norm_last_layer (the CNN by default): any other is reported."""
    run, reach, frozen = term_reach(*pair)
    for x in "ab":
        names = {k for k, _ in run.students[x].named_parameters()}
        weight_norm = "head.last_layer.parametrizations.weight.original0"
        expect_frozen = {weight_norm} if run.cfg[f"norm_last_layer_{x}"] else set()
        assert frozen[x] == expect_frozen, f"model {x}: frozen {sorted(frozen[x] - expect_frozen)}, " \
                                           f"trainable {sorted(expect_frozen - frozen[x])}"
        for term, head in (("L_sm", "head."), ("L_cm", "head."), ("L_st", "thead."), ("L_ct", "thead.")):
            expect = {k for k in names - frozen[x] if k.startswith(("backbone.", head))}
            missing, extra = sorted(expect - reach[x, term]), sorted(reach[x, term] - expect)
            assert not missing and not extra, f"model {x} {term}: not reached {missing[:5]}, reached {extra[:5]}"


@pytest.mark.slow
def test_benchmark_mode_prints_json(capsys, tmp_path):
    cfg = make_cfg(benchmark_steps=1, data_path=make_folder(tmp_path / "data", 4))  # 12 images: 3 batches of 4
    summary = benchmark.benchmark(cfg, torch.device("cpu"))
    assert summary["mokd"]["gflop_per_step"] > summary["independent"]["gflop_per_step"] > 0
    assert summary["mokd"]["ops_per_step"] > summary["independent"]["ops_per_step"] > 0
    assert summary["loader"]["images_per_s"] > 0 and summary["loader"]["num_workers"] == 0
    assert last_json(capsys.readouterr().out)["flop_ratio"] == summary["flop_ratio"]
    with pytest.raises(mokd.MOKDError, match="at least 3 batches"):  # 2 batches: nothing left to time
        benchmark.loader_throughput({**cfg, "batch_size_per_gpu": 6}, torch.device("cpu"))


# ----------------------------------------------------------------------------- integration
def run_pair_script(tmp_path, epochs, **env):
    """cifar10_pair.sh on 12 + 6 generated 32 px images with tiny heads, on the CPU; returns (result, out dir)."""
    data, out = tmp_path / "data", tmp_path / "out"
    make_folder(data / "train", 4, size=32)
    make_folder(data / "test", 2, size=32, seed=1)
    small = ["--batch-size-per-gpu", "4", "--out-dim", "64", "--head-hidden-dim", "64", "--bottleneck-dim", "32",
             "--local-crops-number", "2", "--thead-depth", "1", "--num-workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    script = os.path.join(HERE, "experiments", "cifar10_pair.sh")
    r = run_proc(["bash", script, str(data), str(out), str(epochs), *small], timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r, out


@pytest.mark.slow
def test_cifar10_pair_script_end_to_end(tmp_path):
    """The paired experiment's one command on tiny data: two runs that differ only in lambda, four evaluations.
    An unfired TRAIN_DEADLINE_S watchdog must not hold the output pipes open (that would hang past the timeout)."""
    r, out = run_pair_script(tmp_path, 1, TRAIN_DEADLINE_S="3000")
    rows = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert sorted((row["run"], row["eval"]["model"]) for row in rows) == [
        ("independent", "a"), ("independent", "b"), ("mokd", "a"), ("mokd", "b")]
    for row in rows:
        ev = row["eval"]
        assert ev["mode"] == "knn+linear_cached" and set(ev["knn"]) == {"20", "200"} and ev["train_size"] == 12
    first = {run: json.loads(open(out / run / "log.jsonl").readline()) for run in ("mokd", "independent")}
    for k in ("a.L_sm", "a.L_st", "b.L_sm", "b.L_st", "a.entropy", "b.entropy"):  # paired: same data, weights, crops
        assert first["mokd"][k] == first["independent"][k], k
    assert first["independent"]["a.L_cm"] is None and first["mokd"]["a.L_cm"] > 0  # lambda 0 vs the recipe's
    assert re.search(r"^independent resnet18 +3 ", r.stdout, re.M) and re.search(r"^mokd +vit_tiny +3 ", r.stdout, re.M)
    curves = re.findall(r"^(independent|mokd) +0 \| (.*)$", r.stdout, re.M)  # the per-epoch loss table, epoch 0
    assert [run for run, _ in curves] == ["independent", "mokd"]
    cells = {run: row.split() for run, row in curves}
    assert cells["independent"][2:4] == ["-", "-"] and all(c != "-" for c in cells["mokd"])  # L_cm, L_ct of A
    recs = [json.loads(line) for line in open(out / "mokd" / "log.jsonl") if json.loads(line)["epoch"] == 0]
    assert cells["mokd"][3] == f"{sum(r['a.L_ct'] for r in recs) / len(recs):.3f}"


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_cifar10_pair_script_rejects_a_bad_deadline(tmp_path, value):
    script = os.path.join(HERE, "experiments", "cifar10_pair.sh")
    r = run_proc(["bash", script, str(tmp_path), str(tmp_path / "out"), "1"], timeout=60,
                 env={**os.environ, "TRAIN_DEADLINE_S": value})
    assert r.returncode == 2 and f"TRAIN_DEADLINE_S must be a whole number of seconds > 0, got '{value}'" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.slow
def test_cifar10_pair_script_deadline_stops_both_runs_then_evaluates(tmp_path):
    """TRAIN_DEADLINE_S: once both runs have logged a step, both get SIGTERM mid-training, save, and the evaluation
    runs only after both have exited. The interpreter is wrapped to log events; the independent run exits 5 s later."""
    events, wrapper = tmp_path / "events.txt", tmp_path / "python.sh"
    wrapper.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *mokd.py*) {sys.executable} "$@" & child=$!
             trap 'kill -TERM $child' TERM  # the pair script signals this wrapper: pass it on
             while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done
             case "$*" in *independent*) sleep 5;; esac
             echo "exit $rc" >> {events}; exit $rc;;
  *eval_linear.py*) echo eval >> {events}; exec {sys.executable} "$@";;
  *) exec {sys.executable} "$@";;
esac
""")
    wrapper.chmod(0o755)
    r, out = run_pair_script(tmp_path, 1000, TRAIN_DEADLINE_S="2", PYTHON=str(wrapper))  # counted from both first steps
    assert "TRAIN_DEADLINE_S=2 reached" in r.stderr
    assert events.read_text().split("\n") == ["exit 0", "exit 0", "eval", "eval", "eval", "eval", ""]
    assert len(open(out / "eval.jsonl").readlines()) == 4
    for run in ("mokd", "independent"):
        steps = torch.load(out / run / "checkpoint.pth", weights_only=True)["global_step"]
        assert 0 < steps < 3000, (run, steps)  # stopped early, after at least one step
        assert re.search(rf"^{run} +resnet18 +{steps} ", r.stdout, re.M), r.stdout


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_after_updates(tmp_path):
    """Three steps on 2 processes x 4 images equal 1 process x 8 (the same global batch): every weight, centre and
    optimiser state (DDP's gradient average and the centres' all-reduce in use), and each step's logged terms.
    SGD: Adam would turn the rounding noise of a zero gradient (the attention's key bias) into a full step."""
    common = ["--arch-a", "vit_tiny", "--arch-b", "vit_tiny", *TINY, "--max-steps", "3", "--log-every", "1",
              "--optimizer-a", "sgd", "--optimizer-b", "sgd", "--lr-a", "0.2", "--lr-b", "0.1", "--warmup-epochs", "0"]
    r2 = run_cli(common + ["--output-dir", str(tmp_path / "two")], nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = run_cli(common + ["--batch-size-per-gpu", "8", "--output-dir", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr[-3000:]
    one, two = (checkpoint_tensors(tmp_path / d / "checkpoint.pth", optimizers=True)[0] for d in ("one", "two"))
    assert one.keys() == two.keys() and any(k.startswith("opt.") for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in ("one", "two")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [0, 1, 2]
    for rec1, rec2 in zip(*logs):
        for k in [f"{m}.{t}" for m in "ab" for t in mokd.LOSS_NAMES + ("entropy", "batch_entropy")]:
            assert rec2[k] == pytest.approx(rec1[k], rel=1e-4), (rec1["step"], k)  # collapse signals: global batch


@pytest.mark.slow
def test_torchrun_with_one_process_takes_the_ddp_path_and_matches_plain_python(tmp_path):
    """One process under torchrun runs inside the DDP wrapper, as several do: a one-GPU machine checks that code."""
    common = ["--arch-a", "resnet18", "--arch-b", "vit_tiny", *TINY, "--max-steps", "2", "--log-every", "1"]
    ddp = run_cli(common + ["--output-dir", str(tmp_path / "ddp")], torchrun=True)
    assert ddp.returncode == 0 and "fp32 on 1 x cpu (DDP)" in ddp.stdout, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    plain = run_cli(common + ["--output-dir", str(tmp_path / "plain")])
    assert plain.returncode == 0 and "fp32 on 1 x cpu;" in plain.stdout, plain.stderr[-2000:]
    a, _ = checkpoint_tensors(tmp_path / "ddp" / "checkpoint.pth")
    b, _ = checkpoint_tensors(tmp_path / "plain" / "checkpoint.pth")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def test_demo_cli_mixed_pair_runs_reports_and_its_checkpoint_evaluates(tmp_path, capsys):
    r = run_cli(["--arch-a", "resnet18", "--arch-b", "vit_tiny", *TINY, "--epochs", "1", "--output-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "synthetic" in r.stdout
    res = last_json(r.stdout)
    assert res["a"]["arch"] == "resnet18" and res["b"]["arch"] == "vit_tiny" and res["log_K"] == round(math.log(64), 3)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    for m in "ab":  # the report's first and last values are the log's
        assert res[m]["first"]["L_ct"] == log[0][f"{m}.L_ct"] and res[m]["last"]["L_sm"] == log[-1][f"{m}.L_sm"]
        assert res[m]["batch_entropy"] == log[-1][f"{m}.batch_entropy"]
    for part in ("(log K 4.16)", "loss terms, logged step 0 -> 7", "L_ct", f"checkpoint: {tmp_path / 'checkpoint.pth'}",
                 "end to end", "--recipe cifar10", f"eval_linear.py --checkpoint {tmp_path / 'checkpoint.pth'} --knn"):
        assert part in r.stdout, part
    keys = {"a.entropy", "b.batch_entropy", "lr_a", "momentum", "tau_cross", "images_per_s", "peak_mem_mb"}
    assert keys <= set(log[0])
    assert all(0 <= rec[f"{m}.batch_entropy"] <= math.log(64) + 1e-4 for rec in log for m in "ab")
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and len([k for k in ckpt["centres"]]) == 6 and "rng" not in ckpt
    # The command the demo prints: k-NN on held-out synthetic images, drawn apart from the training images.
    res = eval_linear.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--knn", "--nb-knn", "20",
                            "--num-workers", "0", "--device", "cpu"])
    assert res["train_size"] == 600 and res["val_size"] == 300 and res["num_classes"] == 6
    assert 0 <= res["knn"]["20"]["top1"] <= 100
    bank = mokd.SyntheticShapes(600, 1, 32, T.ToTensor())
    train = mokd.SyntheticShapes(32, 0, 32, T.ToTensor())
    assert not torch.equal(bank[0][0], train[0][0])  # other seeds than the training images


# ============================================================================= eval_linear.py and export
def make_folder(root, n_per_class, size=16, seed=0):
    """Tiny ImageFolder of synthetic shapes (3 classes) written as PNG."""
    for c in range(3):
        os.makedirs(root / f"class{c}", exist_ok=True)
        for i in range(n_per_class):
            img, _ = mokd.SyntheticShapes(6 * n_per_class, seed, size)[c + 6 * i]
            img.save(root / f"class{c}" / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny real mokd.py run (resnet18 + vit_tiny, 16/8 px) and small train / val folders."""
    root = tmp_path_factory.mktemp("run")
    mokd.main(["--arch-a", "resnet18", "--arch-b", "vit_tiny", "--patch-size", "4", *TINY, "--epochs", "1",
               "--output-dir", str(root / "out")])
    return {"ckpt": str(root / "out" / "checkpoint.pth"), "train": make_folder(root / "train", 5),
            "val": make_folder(root / "val", 3, seed=1), "root": root}


def brute_knn_top1(train_f, train_y, test_f, test_y, k, T, C):
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = 0
    for f, y in zip(test_f, test_y):
        sims = [(float(f @ t), int(l)) for t, l in zip(train_f, train_y)]
        sims.sort(key=lambda p: -p[0])
        votes = [0.0] * C
        for s, l in sims[:k]:
            votes[l] += np.exp(s / T)
        correct += int(np.argmax(votes) == int(y))
    return 100.0 * correct / len(test_f)



def test_knn_on_hand_made_features():
    train = torch.tensor([[1.0, 0], [0, 1], [0, 1], [-1, 0]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[1.0, 0], [0, 1], [-1, 0]])
    truth = torch.tensor([0, 1, 0])
    # k=3, T=0.07. Point 1: neighbours (1,0) s=1 [class 0], two (0,1) s=0 [class 1]: exp(1/0.07) > 2 -> class 0
    # (a plain majority vote would say class 1). Point 2: two s=1 of class 1 -> 1. Point 3: (-1,0) s=1 -> class 2,
    # wrong. Top-1 = 2/3.
    res = eval_linear.knn_classify(train, labels, test, truth, ks=(3,), T=0.07, num_classes=3)
    assert res[3][0] == pytest.approx(200 / 3) and res[3][1] is None  # 3 classes: top-5 says nothing


@pytest.mark.parametrize("n_test", [1, 7, 101])
def test_knn_any_number_of_test_images(n_test):
    g = torch.Generator().manual_seed(n_test)
    train_f, train_y = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    test_f, test_y = torch.randn(n_test, 8, generator=g), torch.randint(0, 4, (n_test,), generator=g)
    for k in (1, 20, 200):  # k larger than the training set is capped
        res = eval_linear.knn_classify(train_f, train_y, test_f, test_y, ks=(k,), num_classes=4, chunk=3)
        assert res[k][0] == pytest.approx(brute_knn_top1(train_f, train_y, test_f, test_y, min(k, 50), 0.07, 4))


def test_linear_probe_reaches_100_on_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    f = F.one_hot(y, 8).float() * 3 + 0.1 * torch.randn(60, 8, generator=g)
    args = eval_linear.build_parser().parse_args(["--train-path", "x", "--val-path", "x", "--epochs", "30",
                                                  "--batch-size-per-gpu", "16"])
    _, best, last = eval_linear.train_linear_cached(f, y, f, y, 3, args, 0.5, torch.device("cpu"))
    assert best[0] == 100.0 and last[0] == 100.0


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_strict_loading_names_the_key(trained, tmp_path, change):
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    state = ckpt["models"]["b"]["teacher"]
    if change == "extra":
        state["backbone.extra_weight"] = torch.zeros(1)
    else:
        del state["backbone.norm.weight"]
    path = tmp_path / "bad.pth"
    torch.save(ckpt, path)
    argv = ["--checkpoint", str(path), "--model", "b", "--train-path", "x", "--val-path", "x"]
    args = eval_linear.build_parser().parse_args(argv)
    with pytest.raises(mokd.MOKDError, match="extra_weight" if change == "extra" else "norm.weight"):
        eval_linear.load_backbone(args)


def test_export_round_trips_into_torchvision_and_vit(trained, tmp_path):
    x = torch.randn(2, 3, 16, 16)
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    for model in "ab":
        out = tmp_path / f"{model}.pth"
        eval_linear.main(["--checkpoint", trained["ckpt"], "--model", model, "--export", str(out)])
        exported = torch.load(out, weights_only=True)
        meta, sd = exported["meta"], exported["state_dict"]
        ours = mokd.build_backbone(meta["arch"], {**ckpt["config"]}).eval()
        ours.load_state_dict({k[len("backbone."):]: v for k, v in ckpt["models"][model]["teacher"].items()
                              if k.startswith("backbone.")})
        if meta["arch"] == "resnet18":
            assert meta["stem"] == "cifar"
            net = torchvision.models.resnet18()
            net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem, as the README shows
            net.maxpool, net.fc = torch.nn.Identity(), torch.nn.Identity()
            net.load_state_dict(sd, strict=True)
            torch.testing.assert_close(net.eval()(x), ours(x)[0], rtol=0, atol=0)
        else:
            assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                    "blocks.11.mlp.fc2.bias", "norm.weight"} <= set(sd)
            vit = mokd.VisionTransformer(192, 3, meta["patch_size"], meta["image_size"]).eval()
            vit.load_state_dict(sd, strict=True)
            torch.testing.assert_close(vit(x)[0], ours(x)[0], rtol=0, atol=0)


def test_eval_end_to_end_knn_cached_and_full_probe(trained, capsys):
    common = ["--checkpoint", trained["ckpt"], "--train-path", trained["train"], "--val-path", trained["val"],
              "--num-workers", "0", "--device", "cpu", "--batch-size-per-gpu", "4"]
    for extra in (["--model", "a", "--knn"], ["--model", "b", "--cached-features", "--epochs", "3"],
                  ["--model", "a", "--epochs", "1", "--output-dir", str(trained["root"] / "eval")]):
        eval_linear.main(common + extra)
        last = last_json(capsys.readouterr().out)
        assert last["train_size"] == 15 and last["val_size"] == 9 and last["backbone_unchanged"]
        if "--knn" in extra:
            assert set(last["knn"]) == {"10", "20", "100", "200"}
            assert all(0 <= v["top1"] <= 100 for v in last["knn"].values())
        else:
            assert 0 <= last["linear"]["best_top1"] <= 100
    assert os.path.exists(trained["root"] / "eval" / "eval_linear_model_a_teacher_linear.pth")


def test_eval_knn_and_cached_probe_in_one_call_equal_separate_calls(trained, capsys):
    common = ["--checkpoint", trained["ckpt"], "--model", "b", "--train-path", trained["train"], "--val-path",
              trained["val"], "--num-workers", "0", "--device", "cpu", "--batch-size-per-gpu", "4", "--epochs", "2"]
    out = {}
    modes = (("knn", ["--knn"]), ("cached", ["--cached-features"]), ("both", ["--knn", "--cached-features"]))
    for name, extra in modes:
        eval_linear.main(common + extra)
        out[name] = last_json(capsys.readouterr().out)
    assert out["both"]["mode"] == "knn+linear_cached"
    assert out["both"]["knn"] == out["knn"]["knn"] and out["both"]["linear"] == out["cached"]["linear"]


@pytest.mark.slow
def test_eval_knn_two_processes_equal_one(trained, tmp_path):
    args = ["--checkpoint", trained["ckpt"], "--model", "b", "--knn", "--train-path", trained["train"], "--val-path",
            trained["val"], "--num-workers", "0", "--device", "cpu", "--batch-size-per-gpu", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = []
    for pre in (launcher(1), launcher(2)):
        r = run_proc(pre + [os.path.join(HERE, "eval_linear.py"), *args], env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(last_json(r.stdout)["knn"])
    assert outs[0] == outs[1]


# ============================================================================= reliability
def cli_error(capsys, *argv):
    """Run mokd.main in-process; return its error message (it must exit with status 2)."""
    with pytest.raises(SystemExit) as e:
        mokd.main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("layout,expected", [
    ("missing", "No such file or directory"), ("file", "Not a directory"), ("empty", "Couldn't find any class folder"),
    ("no_classes", "Couldn't find any class folder"), ("no_images", "Found no valid file for the classes cats")])
def test_bad_data_path(tmp_path, capsys, layout, expected):
    path = tmp_path / "data"
    if layout == "file":
        path.write_text("x")
    elif layout != "missing":
        path.mkdir()
    if layout == "no_classes":
        make_folder(tmp_path / "flat", 1)
        Image.new("RGB", (8, 8)).save(path / "a.png")
    if layout == "no_images":
        (path / "cats").mkdir()
        (path / "cats" / "notes.txt").write_text("x")
    err = cli_error(capsys, *TINY, "--data-path", str(path), "--output-dir", str(tmp_path / "o"))
    assert "--data-path" in err and str(path) in err and expected in err


@pytest.mark.parametrize("flags,expected", [
    (["--arch-a", "resnet19"], "argument --arch-a: invalid choice: 'resnet19'"),
    (["--arch-b", "vit_tiny", "--patch-size", "5"], "not divisible by --patch-size 5"),
    (["--arch-a", "resnet18", "--stem", "imagenet"], "smaller than model A's (resnet18, stem imagenet)"),
    (["--local-crops-number", "0"], "--local-crops-number 0 leaves L_ct without queries"),
    (["--arch-a", "resnet18", "--batch-size-per-gpu", "1"], "--batch-size-per-gpu 1 leaves BatchNorm"),
    (["--lambda-a", "-1"], "argument --lambda-a: expected a finite number >= 0, got '-1'"),
    (["--lambda-b", "nan"], "argument --lambda-b: expected a finite number >= 0, got 'nan'"),
    (["--lr-a", "inf"], "argument --lr-a: expected a finite number >= 0, got 'inf'"),
    (["--teacher-temp", "0"], "argument --teacher-temp: expected a positive temperature, got '0'"),
    (["--momentum-teacher", "1.5"], "argument --momentum-teacher: expected a number in [0, 1], got '1.5'"),
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (["--local-crops-scale", "0", "0.4"], "argument --local-crops-scale: expected an area fraction in (0, 1], got '0'"),
    (["--norm-last-layer-a", "maybe"], "argument --norm-last-layer-a: expected true or false, got 'maybe'"),
    (["--thead-dim", "50"], "--thead-dim 50 is not divisible by --thead-heads 4"),
    (["--global-crops-scale", "0.5", "0.2"], "--global-crops-scale must be given as MIN MAX with MIN <= MAX"),
    (["--precision", "fp16"], "--precision fp16 needs CUDA"),
])
def test_bad_flags_are_refused_with_a_message(tmp_path, capsys, flags, expected):
    err = cli_error(capsys, *TINY, *flags, "--output-dir", str(tmp_path))
    assert expected in err
    assert not os.path.exists(tmp_path / "checkpoint.pth")


def test_local_crops_zero_with_lambda_zero_trains(tmp_path):
    mokd.main([*TINY, "--local-crops-number", "0", "--lambda-a", "0", "--lambda-b", "0", "--arch-a", "vit_tiny",
               "--arch-b", "vit_tiny", "--max-steps", "2", "--output-dir", str(tmp_path)])
    assert os.path.exists(tmp_path / "checkpoint.pth")


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = cli_error(capsys, *TINY, "--output-dir", str(blocker / "sub"))
    assert "--output-dir" in err and "cannot be created or written" in err


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA", "YCbCr"]


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from(MODES), st.integers(0, 3))
def test_multicrop_any_size_and_mode(w, h, mode, n_local):
    arr = np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)
    if mode in ("I;16", "I", "F"):  # deep grey images
        img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
        img = img if mode == "I;16" else img.convert(mode)
    else:
        img = Image.fromarray(arr).convert(mode)
    aug = mokd.MultiCropAugmentation(16, 8, n_local, (0.25, 1.0), (0.05, 0.25))
    crops = aug(mokd.to_rgb(img))
    assert len(crops) == 2 + n_local
    assert all(c.shape == (3, 16, 16) for c in crops[:2]) and all(c.shape == (3, 8, 8) for c in crops[2:])
    assert all(c.dtype == torch.uint8 for c in crops)


def test_normalise_on_the_device_equals_totensor_normalize():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    reference = T.Normalize(mokd.IMAGENET_MEAN, mokd.IMAGENET_STD)(T.ToTensor()(img))  # DINO's workers
    crops = [T.PILToTensor()(img)[None]] * 2  # (1, 3, 5, 7) uint8, as the loader batches them
    out = mokd.normalise(crops, *mokd.image_stats(torch.device("cpu")))
    assert all(o.dtype == torch.float32 and torch.equal(o[0], reference) for o in out)


def test_sixteen_bit_images_keep_their_contrast():
    img = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    rgb = mokd.to_rgb(img)
    assert rgb.getpixel((1, 0)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (0, 0, 0)


def broken_folder(root):
    """A folder of good images of several modes plus three unreadable files."""
    make_folder(root, 4)
    Image.new("CMYK", (20, 20), (10, 200, 30, 0)).save(root / "class0" / "cmyk.jpg")
    Image.new("P", (20, 20)).save(root / "class1" / "palette.png")
    Image.new("RGBA", (20, 20)).save(root / "class1" / "rgba.png")
    Image.fromarray(np.full((20, 20), 4000, np.uint16)).save(root / "class2" / "deep.png")
    (root / "class0" / "empty.jpg").write_bytes(b"")
    (root / "class1" / "text.jpg").write_text("not an image")
    good = root / "class2" / "0.png"
    Image.open(good).save(root / "class2" / "whole.jpg", quality=90)
    data = (root / "class2" / "whole.jpg").read_bytes()
    (root / "class2" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return ["empty.jpg", "text.jpg", "truncated.jpg"]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_images_are_skipped_with_a_warning(tmp_path, capfd, workers):
    bad = broken_folder(tmp_path / "data")
    mokd.main([*TINY, "--arch-b", "vit_tiny", "--data-path", str(tmp_path / "data"), "--num-workers", workers,
               "--epochs", "1", "--batch-size-per-gpu", "4", "--output-dir", str(tmp_path / "o")])
    err = capfd.readouterr().err
    for name in bad:
        assert f"skipping unreadable image (cannot read image {tmp_path / 'data'}" in err and name in err
    assert os.path.exists(tmp_path / "o" / "checkpoint.pth")


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o")
    mokd.main([*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--epochs", "1", "--output-dir", out])
    ckpt = os.path.join(out, "checkpoint.pth")
    before = open(ckpt, "rb").read()
    real = mokd.cross_entropy
    calls = {"n": 0}

    def poisoned(s, t, tau):  # L_ct of model A becomes NaN at the third step of the resumed run
        calls["n"] += 1
        loss = real(s, t, tau)
        return loss * float("nan") if calls["n"] == 5 else loss
    monkeypatch.setattr(mokd, "cross_entropy", poisoned)
    err = cli_error(capsys, *TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--epochs", "2", "--output-dir", out)
    assert "non-finite loss: model A term L_ct = nan at step 10" in err and f"Last good checkpoint: {ckpt}" in err
    assert open(ckpt, "rb").read() == before
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    mokd.atomic_save({"v": torch.ones(3)}, path)

    def fail(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mokd.os, "replace", fail)
    with pytest.raises(OSError):
        mokd.atomic_save({"v": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_resume_refuses_a_different_config_and_a_truncated_file(tmp_path, capsys):
    out = str(tmp_path / "o")
    base = [*TINY, "--arch-a", "vit_tiny", "--arch-b", "resnet18", "--max-steps", "1", "--output-dir", out]
    mokd.main(base)
    err = cli_error(capsys, *base, "--out-dim", "32", "--arch-b", "resnet34")
    assert "differing keys" in err and "arch_b" in err and "out_dim" in err
    ckpt = os.path.join(out, "checkpoint.pth")
    data = open(ckpt, "rb").read()
    open(ckpt, "wb").write(data[: len(data) // 3])
    err = cli_error(capsys, *base)
    assert f"checkpoint {ckpt!r} is unreadable" in err
    assert os.path.getsize(ckpt) == len(data) // 3  # never overwritten by a fresh start
    err = cli_error(capsys, *base, "--resume", str(tmp_path / "nope.pth"))
    assert "does not exist" in err


def checkpoint_tensors(path, optimizers=False):
    """{name: tensor} of a checkpoint's models and centres (and with `optimizers`, every optimiser state tensor)."""
    ck = torch.load(path, weights_only=True)
    out = {f"{m}.{r}.{k}": v for m in "ab" for r in ("student", "teacher") for k, v in ck["models"][m][r].items()}
    out.update({f"centre.{k}": v for k, v in ck["centres"].items()})
    if optimizers:
        out.update({f"opt.{m}.{i}.{k}": torch.as_tensor(v) for m in "ab"
                    for i, state in ck["optimizers"][m]["state"].items() for k, v in state.items()})
    return out, ck


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_exact_resume_at_epoch_end_and_mid_epoch(tmp_path, workers):
    base = [*TINY, "--arch-a", "vit_tiny", "--arch-b", "resnet18", "--drop-path", "0.1", "--num-workers", workers,
            "--epochs", "2"]
    mokd.main(base + ["--output-dir", str(tmp_path / "full")])
    full, ck = checkpoint_tensors(tmp_path / "full" / "checkpoint.pth")
    assert ck["epoch"] == 2
    for stop in ("8", "5"):  # 8 steps per epoch: stop at the epoch boundary, and in the middle of epoch 0
        out = str(tmp_path / f"stop{stop}")
        mokd.main(base + ["--max-steps", stop, "--output-dir", out])
        mokd.main(base + ["--max-steps", stop, "--output-dir", out])  # the same command again: nothing to do
        part, ck = checkpoint_tensors(os.path.join(out, "checkpoint.pth"))
        assert ck["global_step"] == int(stop)
        mokd.main(base + ["--output-dir", out])  # plain relaunch resumes
        resumed, _ = checkpoint_tensors(os.path.join(out, "checkpoint.pth"))
        assert resumed.keys() == full.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), (stop, k)


def wait_for_records(proc, log, n, timeout=300):
    """Wait until `log` holds n complete JSON lines (the run is under way), or fail if the run ends first."""
    deadline = time.time() + timeout
    while not (log.exists() and log.read_text().count("\n") >= n):
        assert proc.poll() is None, f"the run ended before logging {n} steps: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"no {n} records in {log} after {timeout} s"
        time.sleep(0.1)


def sigterm_run(out, launcher, group=False, extra=()):
    """Start a long run, wait until it has logged two steps, send SIGTERM (to the process, or to its whole process
    group as some schedulers do); return (process, stdout, stderr, args)."""
    args = [os.path.join(HERE, "mokd.py"), *TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--epochs", "50",
            "--log-every", "1", "--output-dir", str(out), *extra]
    with started(launcher + args) as proc:
        wait_for_records(proc, out / "log.jsonl", 2)
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    return proc, stdout, stderr, args


@pytest.mark.slow
def test_sigterm_saves_and_relaunch_resumes(tmp_path):
    out = tmp_path / "o"
    proc, stdout, stderr, args = sigterm_run(out, [sys.executable])
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by signal" in stdout
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert 0 < ck["global_step"] < 50 * 8
    r = run_cli(args[1:] + ["--max-steps", str(ck["global_step"] + 1)])
    assert r.returncode == 0 and f"resumed from {out / 'checkpoint.pth'}" in r.stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["global_step"] == ck["global_step"] + 1


@pytest.mark.slow
def test_broken_data_ends_the_torchrun_job(tmp_path):
    root = tmp_path / "data" / "class0"
    root.mkdir(parents=True)
    for i in range(60):
        (root / f"broken{i}.jpg").write_bytes(b"GIF89a broken")
    r = run_cli([*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--data-path", str(tmp_path / "data"),
                 "--batch-size-per-gpu", "2", "--output-dir", str(tmp_path / "o")], nproc=2, timeout=300)  # no hang
    assert r.returncode != 0 and "images of a batch are unreadable" in r.stderr and "broken" in r.stderr


# ============================================================================= performance paths
def losses_and_grads(cfg, seed=0):
    run, S = make_run(cfg, seed)
    totals, terms, _, _ = run.losses(make_crops(), 1, S)
    for m in "ab":
        totals[m].backward()
    grads = {f"{m}.{k}": p.grad.clone() for m in "ab" for k, p in run.students[m].named_parameters()
             if p.grad is not None}
    return torch.stack([terms[m][k] for m in "ab" for k in mokd.LOSS_NAMES]), grads


def test_grad_checkpointing_gives_the_same_losses_and_gradients():
    ref_l, ref_g = losses_and_grads(make_cfg("vit_tiny", "resnet18", drop_path=0.1))
    ckpt_l, ckpt_g = losses_and_grads(make_cfg("vit_tiny", "resnet18", drop_path=0.1, grad_checkpointing=True))
    torch.testing.assert_close(ref_l, ckpt_l, rtol=1e-6, atol=1e-6)
    assert ref_g.keys() == ckpt_g.keys()
    for k in ref_g:
        torch.testing.assert_close(ref_g[k], ckpt_g[k], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(os.environ.get("MOKD_TEST_COMPILE") != "1", reason="torch.compile on the CPU takes minutes; "
                    "set MOKD_TEST_COMPILE=1 to run")
def test_compiled_matches_eager():
    ref_l, _ = losses_and_grads(make_cfg("vit_tiny", "resnet18"))
    comp_l, _ = losses_and_grads(make_cfg("vit_tiny", "resnet18", compile=True))
    torch.testing.assert_close(ref_l, comp_l, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_resume_mid_epoch_with_another_batch_restarts_the_epoch(tmp_path, capsys):
    base = [*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--output-dir", str(tmp_path)]
    mokd.main(base + ["--max-steps", "3"])
    mokd.main(base + ["--batch-size-per-gpu", "8", "--max-steps", "2"])
    out = capsys.readouterr().out
    assert "stopped mid-epoch with 8 steps per epoch, this run has 4: epoch 0 restarts" in out
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_on_every_rank(tmp_path):
    """torchrun forwards SIGTERM to its workers: both finish the same step and rank 0 saves."""
    out = tmp_path / "o"
    proc, stdout, stderr, _ = sigterm_run(out, launcher(2))
    assert "stopped by signal" in stdout, stderr[-2000:]
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ck["global_step"] > 0 and "rng" not in ck


def test_model_losses_wire_each_term_to_the_right_tensors():
    """L_sm, L_st on X's own teacher with X's schedule; L_cm on Y's teacher and L_ct on the search, cross schedule."""
    g = torch.Generator().manual_seed(0)
    B, n, K = 3, 2, 11
    r = lambda rows: torch.randn(rows, K, generator=g, dtype=torch.float64)  # noqa: E731
    s = {"m": r((2 + n) * B), "t": r((2 + n) * B)}
    t_self, t_other, srch = {"m": r(2 * B), "t": r(2 * B)}, {"m": r(2 * B), "t": r(2 * B)}, r(n * B)
    c = mokd.Centres(K).double()
    for k in ("sm_a", "st_a", "cm_a"):
        getattr(c, k).normal_(generator=g)
    total, L = mokd.model_losses("a", "b", s, t_self, t_other, srch, c, 0.05, 0.06, 0.3)
    assert L["L_sm"] == mokd.dino_loss(s["m"], t_self["m"], c.sm_a, 0.05)
    assert L["L_st"] == mokd.dino_loss(s["t"], t_self["t"], c.st_a, 0.05)
    assert L["L_cm"] == mokd.dino_loss(s["m"], t_other["m"], c.cm_a, 0.06)
    assert L["L_ct"] == mokd.cross_entropy(s["t"][2 * B:], srch, 0.06)
    assert total == L["L_sm"] + L["L_st"] + 0.3 * (L["L_cm"] + L["L_ct"])


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_query_is_the_spec_feature(arch):
    """CNN: mean of the T-head's projected tokens; ViT: the CLS token after the final norm (width d = 192: no
    projection)."""
    cfg = make_cfg(arch, arch, "--thead-dim", "192", "--thead-heads", "4")
    model = mokd.MOKDModel(arch, cfg, True).eval()
    crops = make_crops()
    with torch.no_grad():
        out = model(torch.cat(crops[:2]), torch.cat(crops[2:]))
        pooled, tokens, _ = model.backbone(torch.cat(crops[2:]))
        expected = model.thead.proj(tokens).mean(1) if arch == "resnet18" else pooled
    torch.testing.assert_close(out["query"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_folder_of_only_broken_files_stops_cleanly(tmp_path):
    """A batch of only unreadable files stops the run, in a subprocess with workers: exit 2, no hang, no
    traceback."""
    root = tmp_path / "data" / "c"
    root.mkdir(parents=True)
    for i in range(8):
        (root / f"{i}.jpg").write_text("not an image")
    r = run_cli([*TINY, "--arch-b", "vit_tiny", "--data-path", str(tmp_path / "data"), "--num-workers", "2",
                 "--batch-size-per-gpu", "2", "--output-dir", str(tmp_path / "o")], timeout=120)
    assert r.returncode == 2 and "images of a batch are unreadable" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_still_saves(tmp_path):
    out = tmp_path / "o"
    proc, stdout, stderr, _ = sigterm_run(out, [sys.executable], group=True, extra=("--num-workers", "2"))
    assert proc.returncode == 0 and "stopped by signal" in stdout, stderr[-2000:]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["global_step"] > 0


def test_eval_of_an_exported_backbone_equals_eval_of_the_checkpoint(trained, tmp_path, capsys):
    out = str(tmp_path / "b.pth")
    eval_linear.main(["--checkpoint", trained["ckpt"], "--model", "b", "--export", out])
    common = ["--knn", "--train-path", trained["train"], "--val-path", trained["val"], "--num-workers", "0",
              "--device", "cpu", "--nb-knn", "1", "3"]
    results = []
    for source in (["--backbone", out], ["--checkpoint", trained["ckpt"], "--model", "b"]):
        eval_linear.main(source + common)
        results.append(last_json(capsys.readouterr().out)["knn"])
    assert results[0] == results[1]


def log_steps(out):
    return [json.loads(line)["step"] for line in open(out / "log.jsonl")]


@pytest.mark.slow
def test_sigterm_to_torchrun_with_workers_saves_and_the_relaunch_resumes(tmp_path):
    """torchrun signals each rank's whole process group, DataLoader workers included: every rank still finishes
    its step, saves and exits 0; the relaunch resumes and log.jsonl holds each step once."""
    out = tmp_path / "o"
    proc, stdout, stderr, args = sigterm_run(out, launcher(2), extra=("--num-workers", "2"))
    # torchrun itself exits 1 with its own SignalException after its ranks have ended; the ranks exit 0.
    assert "stopped by signal" in stdout, stderr[-3000:]
    assert "DataLoader worker" not in stderr and "error [rank" not in stderr, stderr[-3000:]
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ck["global_step"] > 0 and "rng" not in ck
    assert log_steps(out) == list(range(ck["global_step"]))  # the log stops where the checkpoint does
    r = run_cli(args[1:] + ["--num-workers", "2", "--max-steps", str(ck["global_step"] + 2)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert log_steps(out) == list(range(ck["global_step"] + 2))


@pytest.mark.slow
def test_a_signal_during_step_k_makes_step_k_the_last(tmp_path, monkeypatch):
    base = [*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--log-every", "1", "--output-dir", str(tmp_path)]
    real_step = mokd.Run.step
    stops = []

    def step_with_a_signal(self, crops, epoch, it, S):
        values = real_step(self, crops, epoch, it, S)
        if epoch * 8 + it == 4:
            stops[0].requested = True  # as the handler does when a signal arrives during this step
        return values

    real_enter = mokd.StopRequest.__enter__
    monkeypatch.setattr(mokd.StopRequest, "__enter__", lambda self: stops.append(real_enter(self)) or stops[-1])
    monkeypatch.setattr(mokd.Run, "step", step_with_a_signal)
    mokd.main(base)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["global_step"] == 5
    assert log_steps(tmp_path) == list(range(5))


@pytest.mark.slow
def test_the_log_never_holds_a_step_twice_after_a_stop_without_a_save(tmp_path, monkeypatch):
    """A second Ctrl-C exits at once, after steps were logged but not saved: the resume drops them from the log."""
    base = [*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--log-every", "1", "--output-dir", str(tmp_path)]
    mokd.main(base + ["--max-steps", "3"])
    real_step = mokd.Run.step

    def interrupted(self, crops, epoch, it, S):
        if epoch * 8 + it == 7:
            raise KeyboardInterrupt  # what the second signal raises
        return real_step(self, crops, epoch, it, S)

    with monkeypatch.context() as m:
        m.setattr(mokd.Run, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            mokd.main(base)
    assert log_steps(tmp_path)[-1] > 3  # steps 3.. were logged and never saved
    mokd.main(base + ["--max-steps", "9"])
    assert log_steps(tmp_path) == list(range(9))


@pytest.mark.parametrize("pair, width", [(("resnet18", "vit_small"), 384), (("resnet50", "vit_base"), 768),
                                          (("vit_tiny", "vit_small"), 384), (("resnet18", "resnet50"), 384),
                                          (("resnet18", "vit_tiny"), 192)])
def test_thead_width_follows_the_authors_rule_without_a_flag(pair, width):
    cfg = mokd.parse_config(["--arch-a", pair[0], "--arch-b", pair[1]])
    assert cfg["thead_dim"] == width
    over = mokd.parse_config(["--arch-a", pair[0], "--arch-b", pair[1], "--thead-dim", "96"])
    assert over["thead_dim"] == 96


def test_cnn_thead_decays_every_parameter_and_vit_thead_exempts_biases_and_norms():
    """The authors' groups: a CNN's T-head decays all its parameters (biases, LayerNorms); elsewhere DINO's rule."""
    cfg = make_cfg("resnet18", "vit_tiny")
    for arch, thead_sched in (("resnet18", "thead"), ("vit_tiny", "main")):
        model = mokd.MOKDModel(arch, cfg, True)
        groups = mokd.build_optimizer(model, "sgd", torch.device("cpu")).param_groups
        decayed = {id(p) for g in groups if g["reg"] for p in g["params"]}
        schedule = {id(p): g["sched"] for g in groups for p in g["params"]}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            exempt = name.endswith(".bias") or p.ndim == 1
            expected = thead_sched == "thead" and name.startswith("thead.") or not exempt
            assert (id(p) in decayed) == expected, (arch, name)
            assert schedule[id(p)] == (thead_sched if name.startswith("thead.") else "main"), (arch, name)


def test_cnn_thead_projection_has_pytorchs_default_init():
    """The authors project a CNN map with a 1x1 convolution at PyTorch's default init: kaiming-uniform weights and
    uniform biases within 1 / sqrt(fan_in) (the truncated-normal init would give zero biases)."""
    torch.manual_seed(0)
    proj = mokd.THead(512, 48, (2, 2), 64, 1, 4).proj
    bound = 1 / 512 ** 0.5
    assert proj.weight.abs().max() <= bound and proj.bias.abs().max() <= bound
    assert proj.bias.abs().min() > 0 and proj.weight.std() > 0.8 * bound / 3 ** 0.5


def test_heads_last_layers_run_in_float32_under_autocast():
    """Under bf16 autocast both heads' logits are float32 and equal the last layer applied in float32 to the same
    (low-precision) bottleneck: the teacher targets are not rounded to bf16."""
    torch.manual_seed(0)
    head, thead = mokd.DINOHead(32, 512, False, 64, 16), mokd.THead(32, 32, (2, 2), 512, 1, 4)
    x, tokens = torch.randn(6, 32), torch.randn(6, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, bottleneck = head(x), F.normalize(head.mlp(x), dim=-1)
        t_logits = thead.run(thead.embed(tokens, (2, 2)))
    assert logits.dtype == torch.float32 and t_logits.dtype == torch.float32
    torch.testing.assert_close(logits, head.last_layer(bottleneck.float()), rtol=0, atol=0)


@pytest.mark.slow
def test_mokd_py_is_self_contained(tmp_path):
    """Copied alone into an empty folder, mokd.py imports (only the standard library, torch, torchvision, numpy
    and PIL) and trains."""
    import ast
    source = open(os.path.join(HERE, "mokd.py")).read()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) <= {"torch", "torchvision", "numpy", "PIL"}
    (tmp_path / "mokd.py").write_text(source)
    code = ("from mokd import THead, search, dino_loss, model_losses, main; "
            f"main({[*TINY, '--max-steps', '1', '--output-dir', str(tmp_path / 'o')]!r})")
    r = run_proc([sys.executable, "-c", code], cwd=tmp_path, timeout=300,
                 env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "checkpoint.pth").exists()


def test_no_line_of_the_python_files_is_over_120_characters():
    files = ["mokd.py", "eval_linear.py", "benchmark.py", "test_mokd.py",
             os.path.join("experiments", "authors_parity.py"), os.path.join("experiments", "mutation_check.py")]
    long = [f"{name}:{i}" for name in files for i, line in enumerate(open(os.path.join(HERE, name)), 1)
            if len(line.rstrip("\n")) > 120]
    assert not long, long


# ----------------------------------------------------------------------------- recipes, help, what a run says
def parse(*argv):
    return mokd.parse_config(list(argv))


def test_named_recipes_fill_unset_flags_and_explicit_flags_win(tmp_path):
    assert parse()["recipe"] == "demo" and parse()["out_dim"] == mokd.RECIPES["demo"]["out_dim"]
    assert parse("--data-path", "d")["recipe"] == "imagenet"
    cifar = parse("--data-path", "d", "--recipe", "cifar10")
    assert {k: cifar[k] for k in mokd.RECIPES["cifar10"] if "_" in k or k in cifar} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in mokd.RECIPES["cifar10"].items()}
    assert cifar["thead_dim"] == 192 and cifar["stem"] == "cifar"
    assert parse("--data-path", "d", "--recipe", "cifar10", "--out-dim", "128", "--teacher-temp", "0.05")[
        "out_dim"] == 128
    assert parse("--recipe", "imagenet", "--teacher-temp", "0.05")["teacher_temp"] == 0.05


def help_text(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        mokd.parse_config([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces


def test_help_shows_the_defaults_of_the_run_being_configured_and_which_lrs_are_scaled(capsys):
    for argv, recipe in (((), "demo"), (("--data-path", "d"), "imagenet"), (("--recipe", "cifar10"), "cifar10")):
        text = help_text(capsys, *argv)
        assert "(default: None)" not in text and f"recipe '{recipe}'" in text
        for key in ("out_dim", "epochs", "global_crop_size", "teacher_temp"):
            flag = "--" + key.replace("_", "-")
            assert re.search(rf"{flag} \S+ [^(]*\(default: {mokd.RECIPES[recipe][key]}\)", text), (recipe, key)
    text = help_text(capsys, "--recipe", "imagenet", "--arch-a", "vit_small", "--arch-b", "resnet50")
    assert re.search(r"--lr-a LR_A [^(]*\(default: 0.0003\)", text) and "--thead-dim THEAD_DIM" in text
    assert re.search(r"--optimizer-b \{sgd,adamw\} [^(]*\(default: sgd\)", text)
    # A flag whose help says "scaled by global batch / 256" is scaled in the schedules; the others are not.
    helps = {a.dest: a.help for a in mokd.build_parser()._actions}
    assert all(helps.values())
    cfg = parse("--arch-a", "resnet18", "--arch-b", "vit_tiny")
    for key, sched, index in (("lr_a", "main", 0), ("min_lr_a", "main", -1), ("lr_b", "main", 0),
                              ("min_lr_b", "main", -1), ("thead_lr", "thead", 0), ("thead_min_lr", "thead", -1)):
        model = "b" if key.endswith("_b") else "a"
        peak = {w: mokd.build_schedules({**cfg, "warmup_epochs": 0, "batch_size_per_gpu": 128}, 10, w)[model][sched][0]
                for w in (1, 2)}
        scaled = abs(peak[2][index] - 2 * peak[1][index]) < 1e-12
        assert scaled == ("scaled by global batch / 256" in helps[key]), key


@pytest.mark.slow
def test_start_summary_end_message_and_a_finished_relaunch(tmp_path):
    base = [*TINY, "--arch-a", "vit_tiny", "--arch-b", "resnet18", "--epochs", "1", "--output-dir", str(tmp_path)]
    r = run_cli(base)
    assert r.returncode == 0, r.stderr[-2000:]
    for part in ("recipe demo: vit_tiny (A) + resnet18 (B)", "synthetic shapes (no --data-path), 32 images",
                 "8 steps per epoch x 1 epochs", "global batch 4", "peak lr A", "fp32 on 1 x cpu",
                 f"output: {tmp_path}",
                 "finished: 1 epochs, 8 steps;", f"python eval_linear.py --checkpoint {tmp_path / 'checkpoint.pth'}"):
        assert part in r.stdout, part
    again = run_cli(base)
    assert again.returncode == 0 and "is a finished run (1 epochs, 8 steps): nothing to do" in again.stdout
    assert "resumed from" not in again.stdout


@pytest.mark.slow
def test_periodic_checkpoints_are_kept(tmp_path):
    mokd.main([*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--epochs", "2", "--saveckp-freq", "1",
               "--output-dir", str(tmp_path)])
    first, last = (torch.load(tmp_path / f"checkpoint000{e}.pth", weights_only=True) for e in (1, 2))
    assert first["epoch"] == 1 and last["epoch"] == 2
    final, _ = checkpoint_tensors(tmp_path / "checkpoint.pth")
    periodic, _ = checkpoint_tensors(tmp_path / "checkpoint0002.pth")
    assert all(torch.equal(final[k], periodic[k]) for k in final)


def test_data_the_loader_skips_or_repeats_is_reported(tmp_path, capfd):
    root = make_folder(tmp_path / "data", 3)
    Image.new("RGB", (16, 16)).save(os.path.join(root, "class0", "animated.gif"))  # read: its first frame
    Image.new("RGB", (16, 16)).save(os.path.join(root, "stray.png"))  # outside any class folder
    os.symlink(os.path.join(root, "class1"), os.path.join(root, "class2", "again"))
    ds = mokd.image_folder(root, "--data-path")
    assert len(ds) == 10 and any(p.endswith("animated.gif") for p, _ in ds.samples)
    err = capfd.readouterr().err
    assert "3 second paths to one image (symbolic links: read once)" in err
    assert "1 images directly in" in err and "stray.png" in err


@pytest.mark.slow
def test_eval_output_names_an_unwritable_dir_at_once_and_never_overwrites(trained, tmp_path, capsys):
    common = ["--checkpoint", trained["ckpt"], "--train-path", trained["train"], "--val-path", trained["val"],
              "--num-workers", "0", "--device", "cpu", "--knn", "--nb-knn", "3", "100"]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        eval_linear.main(common + ["--output-dir", str(blocker / "out")])
    captured = capsys.readouterr()
    assert "--output-dir" in captured.err and "cannot be created or written" in captured.err
    assert "k-NN" not in captured.out  # stopped before evaluating
    out = tmp_path / "out"
    for which in ("teacher", "student"):
        eval_linear.main(common + ["--which", which, "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert "--nb-knn 100 exceeds the 15 readable training images" in captured.err
    assert captured.err.count("exceeds") == 2  # once per evaluation, not again for its baseline
    assert last_json(captured.out)["knn"]["100"]["k_used"] == 15
    assert sorted(os.listdir(out)) == ["eval_knn_model_a_student.json", "eval_knn_model_a_teacher.json"]


# ============================================================================= numbers in edge cases
def test_knn_top5_counts_only_classes_that_received_votes():
    """k = 1: each test image votes for one class; top-5 must not add classes without a vote (DINO's min(5, k))."""
    f = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10)
    res = eval_linear.knn_classify(f, y, f, (y + 1) % 10, ks=(1, 2, 20), num_classes=10)
    assert res[1] == (0.0, 0.0)
    assert res[2][1] <= 100.0 and res[20][1] >= res[2][1]
    few = eval_linear.knn_classify(f, y % 3, f, y % 3, ks=(1,), num_classes=3)  # 3 classes: top-5 says nothing
    assert few[1] == (100.0, None)
    assert eval_linear.accuracy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))[1] is None


@pytest.mark.slow
def test_lr_never_rises_after_warmup_at_small_batches_and_the_summary_names_the_real_peak(tmp_path):
    cfg = parse("--recipe", "cifar10", "--batch-size-per-gpu", "8", "--epochs", "4", "--warmup-epochs", "1")
    S = mokd.build_schedules(cfg, 3, 1)
    for m in "ab":
        for sched in ("main", "thead"):
            lr = S[m][sched][0]
            assert np.all(np.diff(lr[3:]) <= 1e-15), (m, sched)  # warm-up is the first 3 steps (1 epoch)
    warnings = mokd.lr_floor_warnings(cfg, 1)
    assert len(warnings) == 3  # A (ResNet), B (ViT) and the CNN's T-head
    assert "--min-lr-a 0.0048 is above the scaled peak lr 0.003125 (--lr-a 0.1 x global batch 8 / 256)" in warnings[0]
    assert mokd.lr_floor_warnings(parse("--recipe", "cifar10"), 1) == []  # batch 256: nothing to say
    r = run_cli([*TINY, "--arch-a", "resnet18", "--arch-b", "vit_tiny", "--batch-size-per-gpu", "2", "--max-steps", "1",
                 "--output-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "peak lr A 0.00234 (sgd)" in r.stdout
    assert "--min-lr-a 0.0048 is above the scaled peak lr 0.002344" in r.stdout


def test_a_recipes_warmups_follow_the_chosen_epochs_unless_set(capsys):
    short = parse("--recipe", "cifar10", "--epochs", "3")
    assert (short["warmup_epochs"], short["warmup_teacher_temp_epochs_a"], short["warmup_teacher_temp_epochs_b"],
            short["cross_warmup_teacher_temp_epochs"]) == (1, 2, 1, 1)  # 10 %, 50 %, 30 %, 30 % of 3, at least 1
    assert parse("--recipe", "cifar10", "--epochs", "20")["warmup_teacher_temp_epochs_a"] == 10
    assert parse("--recipe", "cifar10", "--epochs", "3", "--warmup-epochs", "2")["warmup_epochs"] == 2
    assert parse("--recipe", "cifar10")["warmup_epochs"] == 10 and parse("--epochs", "8")["warmup_epochs"] == 2
    S = mokd.build_schedules(short, 5, 1)
    assert S["a"]["tau"][-1] == short["teacher_temp"] and S["tau_cross"][-1] == short["teacher_temp"]
    assert S["a"]["main"][0][-1] < S["a"]["main"][0].max()  # the lr decays within the run
    assert re.search(r"--warmup-epochs WARMUP_EPOCHS [^(]*\(default: 1\)", help_text(capsys, "--recipe", "cifar10",
                                                                                       "--epochs", "3"))


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_images_are_scaled_by_their_mode_not_their_content(mode):
    def ramp(top):
        img = Image.fromarray(np.linspace(0, top, 32 * 32).reshape(32, 32).astype(np.uint16))
        return np.asarray(mokd.to_rgb(img if mode == "I;16" else img.convert("I")))
    dark, darker = ramp(300), ramp(200)
    assert dark.max() == round(300 * 255 / 65535) and darker.max() == round(200 * 255 / 65535)  # 1 and 1
    assert np.asarray(mokd.to_rgb(Image.fromarray(np.full((2, 2), 65535, np.uint16)))).min() == 255


def test_a_float64_step_runs_and_its_gradients_pass_a_finite_difference_check():
    torch.manual_seed(0)
    head = mokd.DINOHead(16, 32, True, 64, 8).double()
    assert head(torch.randn(4, 16, dtype=torch.float64)).dtype == torch.float64
    cfg = make_cfg("vit_tiny", "resnet18", drop_path=0.0)
    run, S = make_run(cfg)
    for m in "ab":
        run.students[m].double()
        run.teachers[m].double()
    run.centres.double()
    crops = [c.double() for c in make_crops()]
    glob, loc = torch.cat(crops[:2]), torch.cat(crops[2:])
    with torch.no_grad():  # the targets: teachers and the search, fixed (the query path is cut by design)
        t = {m: run.teachers[m](glob) for m in "ab"}
        srch = mokd.search(run.teachers["b"], t["b"]["g1"], run.students["a"](glob, loc)["query"], 2)

    def loss_a():  # L_A = L_sm + L_st + lambda (L_cm + L_ct) as a function of student A's parameters
        return mokd.model_losses("a", "b", run.students["a"](glob, loc), t["a"], t["b"], srch, run.centres, 0.04,
                                 0.05, 0.1)[0]
    loss = loss_a()
    assert loss.dtype == torch.float64
    params = [p for p in run.students["a"].parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(1)
    directions = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    norm = torch.sqrt(sum((d * d).sum() for d in directions))
    directions = [d / norm for d in directions]  # one unit step in parameter space
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, directions):
            p.add_(eps * d)
        up = loss_a()
        for p, d in zip(params, directions):
            p.sub_(2 * eps * d)
        down = loss_a()
        for p, d in zip(params, directions):
            p.add_(eps * d)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, directions))
    assert ((up - down) / (2 * eps)).item() == pytest.approx(analytic.item(), rel=1e-5)
    values = run.step(crops, 1, 0, S)  # a whole optimiser step, centres and EMA included
    assert values.dtype == torch.float64 and torch.isfinite(values).all()
    assert run.centres.sm_a.dtype == torch.float64


@pytest.mark.slow
def test_console_log_and_errors_count_steps_alike(tmp_path):
    r = run_cli([*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--max-steps", "3", "--log-every", "1",
                 "--output-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    printed = [int(s) for s in re.findall(r"^step (\d+)/2 ", r.stdout, re.M)]
    assert printed == log_steps(tmp_path) == [0, 1, 2]


def test_a_validation_folder_with_fewer_classes_is_mapped_by_name(trained, tmp_path, capsys):
    val = tmp_path / "val"
    make_folder(val, 2, seed=1)
    import shutil
    shutil.rmtree(val / "class0")  # the validation set lacks a class: its labels map by name
    common = ["--checkpoint", trained["ckpt"], "--train-path", trained["train"], "--num-workers", "0", "--device",
              "cpu",
              "--knn", "--nb-knn", "1"]
    res = eval_linear.main(common + ["--val-path", str(val)])
    assert res["num_classes"] == 3 and res["val_size"] == 4
    f = torch.eye(3)
    sub = eval_linear.knn_classify(f, torch.arange(3), f[1:], torch.arange(1, 3), ks=(1,), num_classes=3)
    assert sub[1][0] == 100.0
    (val / "zebra").mkdir()
    Image.new("RGB", (16, 16)).save(val / "zebra" / "z.png")
    with pytest.raises(SystemExit):
        eval_linear.main(common + ["--val-path", str(val)])
    err = capsys.readouterr().err
    assert "--val-path has class folders that --train-path lacks: ['zebra']" in err and "class1" not in err


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to view
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert mokd.read_rgb(tmp_path / "phone.jpg").size == (10, 30)


def test_a_dataset_root_is_not_taken_for_a_class_folder(tmp_path, capsys):
    make_folder(tmp_path / "data" / "train", 2)
    make_folder(tmp_path / "data" / "test", 1)
    err = cli_error(capsys, *TINY, "--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "o"))
    assert "named like dataset splits (test, train)" in err and os.path.join(str(tmp_path / "data"), "test") in err


def test_export_writes_what_which_asks_for(trained, tmp_path):
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    for which in ("teacher", "student"):
        out = tmp_path / f"{which}.pth"
        eval_linear.main(["--checkpoint", trained["ckpt"], "--model", "b", "--which", which, "--export", str(out)])
        exported = torch.load(out, weights_only=True)
        assert exported["meta"]["which"] == which
        assert torch.equal(exported["state_dict"]["pos_embed"], ckpt["models"]["b"][which]["backbone.pos_embed"])
    s, t = (torch.load(tmp_path / f"{w}.pth", weights_only=True)["state_dict"] for w in ("student", "teacher"))
    assert any(not torch.equal(s[k], t[k]) for k in s)


@pytest.mark.slow
def test_a_resume_names_changed_settings_and_refuses_those_it_cannot_honour(tmp_path, capsys):
    base = [*TINY, "--arch-a", "vit_tiny", "--arch-b", "resnet18", "--output-dir", str(tmp_path)]
    mokd.main(base + ["--max-steps", "1"])
    capsys.readouterr()
    mokd.main(base + ["--max-steps", "2", "--lr-a", "0.002"])
    out = capsys.readouterr().out
    assert "settings that differ from its own" in out and "lr_a 0.001 -> 0.002" in out and "max_steps" not in out
    err = cli_error(capsys, *base, "--optimizer-b", "adamw")
    assert "optimizer_b: checkpoint 'sgd' vs requested 'adamw'" in err


@pytest.mark.slow
def test_a_full_disk_during_a_save_ends_with_one_message(tmp_path, capsys, monkeypatch):
    base = [*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--output-dir", str(tmp_path)]
    mokd.main(base + ["--max-steps", "2"])

    def full(obj, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mokd, "atomic_save", full)
    err = cli_error(capsys, *base, "--max-steps", "4")
    assert f"cannot write a checkpoint into {str(tmp_path)!r} at step 4: No space left on device" in err
    assert f"Still good: {tmp_path / 'checkpoint.pth'}" in err and "Traceback" not in err
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_cifar10_pair_script_reports_a_run_stopped_before_its_first_step(tmp_path):
    wrapper = tmp_path / "python.sh"
    wrapper.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *independent*) exit 0;;  # ends at once, as a run killed during start-up would
  *) exec {sys.executable} "$@";;
esac
""")
    wrapper.chmod(0o755)
    data = tmp_path / "data"
    make_folder(data / "train", 4, size=32)
    script = os.path.join(HERE, "experiments", "cifar10_pair.sh")
    small = ["--batch-size-per-gpu", "4", "--out-dim", "64", "--head-hidden-dim", "64", "--bottleneck-dim", "32",
             "--local-crops-number", "2", "--thead-depth", "1", "--num-workers", "0", "--device", "cpu"]
    r = run_proc(["bash", script, str(data), str(tmp_path / "out"), "1", *small], timeout=600,
                 env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": str(wrapper)})
    assert r.returncode == 1 and "the independent run was stopped before its first step" in r.stderr


# ============================================================================= named datasets, views, long evaluations
def fake_cifar10(root, n_train=20, n_test=10):
    """CIFAR-10's files as torchvision reads them (pickled batches of uint8 rows), with random pixels and labels."""
    import pickle
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train // 5
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


@pytest.fixture
def offline(monkeypatch):
    """A download attempt fails as it would without network (torchvision's download() first checks the files)."""
    import urllib.error

    def download(self):
        if not self._check_integrity():
            raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", download)


@pytest.fixture
def no_download(monkeypatch, offline):
    """As offline, and torchvision's md5 checks accept the fake files."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


@pytest.mark.slow
def test_a_named_dataset_trains_resumes_and_evaluates(tmp_path, capsys, no_download):
    fake_cifar10(tmp_path / "d")
    base = [*TINY, "--arch-a", "vit_tiny", "--arch-b", "resnet18", "--data-path", "cifar10", "--data-root",
            str(tmp_path / "d"), "--global-crop-size", "32", "--local-crop-size", "16", "--output-dir",
            str(tmp_path / "o")]
    mokd.main(base + ["--max-steps", "3"])
    mokd.main(base)  # resumes to the end: 5 steps of 4 images
    out = capsys.readouterr().out
    assert "data: cifar10 (from" in out and "20 images" in out and "resumed from" in out
    full = tmp_path / "full"
    mokd.main([*base[:-1], str(full)])
    a, _ = checkpoint_tensors(tmp_path / "o" / "checkpoint.pth")
    b, _ = checkpoint_tensors(full / "checkpoint.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume on a named dataset
    res = eval_linear.main(["--checkpoint", str(full / "checkpoint.pth"), "--train-path", "cifar10", "--val-path",
                            "cifar10", "--data-root", str(tmp_path / "d"), "--knn", "--nb-knn", "3", "--num-workers",
                            "0", "--device", "cpu"])
    assert res["train_size"] == 20 and res["val_size"] == 10 and res["num_classes"] == 10
    assert "features of the training images: 20/20 images" in capsys.readouterr().out


def test_a_named_dataset_without_its_files_or_network_says_where_they_go(tmp_path, capsys, offline):
    err = cli_error(capsys, *TINY, "--data-path", "cifar10", "--data-root", str(tmp_path / "d"), "--output-dir",
                    str(tmp_path / "o"))
    assert "--data-path cifar10: URLError" in err and repr(str(tmp_path / "d" / "cifar-10-batches-py")) in err
    assert "download=True" in err and "--data-root" in err and "Traceback" not in err


def test_views_png_shows_every_crop_in_one_grid(tmp_path, capsys):
    mokd.main([*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--max-steps", "1", "--output-dir",
               str(tmp_path)])
    img = Image.open(tmp_path / "views.png")
    cell = 64 + 2  # 16 px crops drawn x4 (issue 28.9) and torchvision's 2 px padding; local crops centred in a cell
    assert img.size == (4 * cell + 2, 4 * cell + 2)  # 4 images x (2 global + 2 local crops)
    g1 = torch.from_numpy(np.asarray(img)[2:66, 2:66]).permute(2, 0, 1)  # (3, 64, 64): nearest neighbour, 4x4 blocks
    assert torch.equal(g1, g1[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2))
    local = np.asarray(img)[2:66, 2 + 2 * cell:66 + 2 * cell]
    assert (local[:16] == 0).all() and (local[16:48, 16:48] != 0).any()  # 8 px x4, centred on black
    assert "views.png: per image g1, g2 (16 px), 2 local crops (8 px), drawn x4" in capsys.readouterr().out


@pytest.mark.slow
def test_a_long_evaluation_shows_progress_and_stops_on_a_signal_without_a_traceback(trained):
    with started([sys.executable, os.path.join(HERE, "eval_linear.py"), "--checkpoint", trained["ckpt"], "--knn",
                  "--num-workers", "2", "--device", "cpu", "--batch-size-per-gpu", "4"]) as proc:
        for line in proc.stdout:  # wait for the first progress line: the extraction is under way
            if line.startswith("features of"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "evaluation interrupted" in err and "Traceback" not in err, err[-2000:]


def test_eval_help_gives_every_flag_a_text_and_its_real_default():
    parser = eval_linear.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text
    assert all(a.help for a in parser._actions)
    assert f"(default: {min(8, os.cpu_count() or 1)})" in text


# ============================================================================= experiments/authors_parity.py
# The script runs by hand against a checkout of the authors' code; these tests pin what needs none of it: the name map
# covers every parameter and buffer of our models once, the comparison's arithmetic, the drop-path tape, and
# resize_pos_embed (the authors' arithmetic).
def load_script():
    spec = importlib.util.spec_from_file_location("authors_parity", os.path.join(HERE, "experiments",
                                                                                 "authors_parity.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ap = load_script()
PAIRS = ["vit_tiny", "vit_small"]


def shapes_for(arch_vit):
    """{model: {our state-dict name: shape}} at the sizes the fingerprints were recorded at."""
    cfg = ap.our_config(mokd, arch_vit, 4, 2, ap.FINGERPRINT_SETUP["out_dim"], 100)
    assert cfg["global_crop_size"] == ap.FINGERPRINT_SETUP["global_px"]
    assert cfg["patch_size"] == ap.FINGERPRINT_SETUP["patch"]
    return ap.our_shapes(mokd, cfg)


@pytest.mark.parametrize("arch_vit", PAIRS)
def test_name_map_covers_every_parameter_and_buffer_once(arch_vit):
    for m, shapes in shapes_for(arch_vit).items():
        pairs, problems = ap.name_map(shapes)
        assert problems == []
        assert set(pairs) == set(shapes)  # every parameter and buffer of ours has an image
        theirs = [their for their, _ in pairs.values()]
        assert len(theirs) == len(set(theirs))  # no name of theirs is the image of two of ours


@pytest.mark.parametrize("arch_vit", PAIRS)
def test_name_map_lands_on_the_recorded_authors_names_and_shapes(arch_vit):
    """The images of our names, with shapes in the authors' layout, are exactly their state dict's entries (the
    fingerprints were measured on their code at AUTHORS_COMMIT by the script's run)."""
    for m, shapes in shapes_for(arch_vit).items():
        assert ap.fingerprint(ap.mapped_shapes(shapes)) == ap.AUTHORS_FINGERPRINTS[arch_vit][m]


def test_every_name_rule_is_used():
    used = {ap.rule_for(name) for arch_vit in PAIRS for shapes in shapes_for(arch_vit).values() for name in shapes}
    assert used == set(ap.NAME_RULES)


def test_first_matching_rule_wins_and_unknown_names_are_reported():
    assert ap.authors_name("backbone.net.layer1.0.bn1.running_mean") == ("backbone.layer1.0.bn1.running_mean", "same")
    assert ap.authors_name("backbone.blocks.0.attn.qkv.weight") == ("backbone.blocks.0.attn.qkv.weight", "same")
    assert ap.authors_name("thead.proj.weight") == ("transhead.patch_embed.weight", "conv1x1")
    assert ap.authors_name("thead.unknown") is None
    pairs, problems = ap.name_map({"thead.unknown": (1,), "head.mlp.0.weight": (2, 3)})
    assert list(pairs) == ["head.mlp.0.weight"] and len(problems) == 1 and "thead.unknown" in problems[0]


def test_check_against_authors_names_what_does_not_match():
    ours = {"head.mlp.0.weight": (4, 3), "thead.proj.weight": (5, 4)}
    pairs, _ = ap.name_map(ours)
    live = {"head.mlp.0.weight": (4, 3), "transhead.patch_embed.weight": (5, 4, 1, 1)}
    assert ap.check_against_authors(pairs, ours, live, "a student") == []
    live_extra = {**live, "head.extra": (1,)}
    assert any("head.extra" in p for p in ap.check_against_authors(pairs, ours, live_extra, "a student"))
    live_shape = {**live, "head.mlp.0.weight": (4, 4)}
    assert any("head.mlp.0.weight" in p for p in ap.check_against_authors(pairs, ours, live_shape, "a student"))


def test_conv1x1_layout():
    w = torch.randn(5, 4, 1, 1)
    assert torch.equal(ap.to_ours(w, "conv1x1"), w[:, :, 0, 0])
    assert ap.their_shape((5, 4), "conv1x1") == (5, 4, 1, 1)
    with pytest.raises(ap.ParityError):
        ap.to_ours(torch.randn(5, 4, 3, 3), "conv1x1")


def test_git_blob_id():
    assert ap.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`


def test_tensor_diff():
    t = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    assert ap.tensor_diff(t, t.clone()) == (0.0, 0.0)
    assert ap.tensor_diff(t + torch.tensor([0.0, 0.0, 1e-3], dtype=torch.float64), t) == pytest.approx((1e-3, 2.5e-4))
    assert ap.tensor_diff(None, None) == (0.0, 0.0)
    assert ap.tensor_diff(t, None) == (math.inf, math.inf)
    assert ap.tensor_diff(t[:2], t) == (math.inf, math.inf)
    assert ap.tensor_diff(torch.full((3,), float("nan"), dtype=torch.float64), t) == (math.inf, math.inf)
    zero = torch.zeros(3, dtype=torch.float64)
    assert ap.tensor_diff(zero, zero) == (0.0, 0.0)
    assert ap.tensor_diff(zero + 1e-30, zero) == (1e-30, math.inf)


def test_compare_and_record():
    ref = ap.Record()
    ref.put(0, "x", [torch.ones(2), torch.zeros(3)])
    ref.put(0, "d", {"a": torch.ones(2), "b": torch.ones(1)})
    run = ap.Record(ref)
    run.put(0, "x", [torch.ones(2), torch.zeros(3)])
    run.put(0, "d", {"a": torch.ones(2) * 1.5})  # b missing on our side
    assert run.result(0, "x") == (0.0, 0.0)
    assert run.result(0, "d") == {"a": (0.5, 0.5), "b": (math.inf, math.inf)}
    assert run.result(0, "never put") == (math.inf, math.inf)
    rows = ap.table_rows(0, ref, {"ours64": run, "ours32": run, "theirs32": run})
    assert [label for label, _ in rows] == ["d (2)", "x"]
    assert rows[0][1]["ours64"] == (math.inf, math.inf) and ap.verdict(rows[0][1]) == "DIFFERS"


def test_rows_split_by_part():
    ref = ap.Record()
    grads = {"backbone.w": torch.ones(1), "head.mlp.0.weight": torch.ones(1), "thead.norm.weight": torch.ones(1)}
    ref.put(0, "A gradients before clipping", grads)
    run = ap.Record(ref)
    run.put(0, "A gradients before clipping", {**grads, "thead.norm.weight": torch.ones(1) * 2})
    rows = dict(ap.table_rows(0, ref, {"ours64": run, "ours32": run, "theirs32": run}))
    assert rows["A gradients before clipping: backbone (1)"]["ours64"] == (0.0, 0.0)
    assert rows["A gradients before clipping: T-head (1)"]["ours64"] == (1.0, 1.0)


def test_frozen_tensor_rows_count_the_frozen_ones():
    ref = ap.Record()
    ref.put(0, "A tensors without gradient", {"a": 1.0, "b": 0.0, "c": 1.0})
    run = ap.Record(ref)
    run.put(0, "A tensors without gradient", {"a": 1.0, "b": 1.0, "c": 1.0})  # b frozen on our side only
    rows = ap.table_rows(0, ref, {"ours64": run, "ours32": run, "theirs32": run})
    assert rows[0][0] == "A tensors without gradient (2 of 3)" and ap.verdict(rows[0][1]) == "DIFFERS"


def test_tolerance_follows_the_authors_float32_error_within_bounds():
    quiet = {"ours64": (0.0, 5e-10), "ours32": (0.0, 0.0), "theirs32": (0.0, 1e-7)}
    assert ap.tolerance(quiet) == ap.TOL_F64 and ap.verdict(quiet) == "equal"
    loud = {"ours64": (0.0, 5e-9), "ours32": (0.0, 1.0), "theirs32": (0.0, 1.0)}  # AdamW-like amplification
    assert ap.tolerance(loud) == pytest.approx(ap.NOISE_FACTOR * 2.0 ** -29) and ap.verdict(loud) == "equal"
    assert ap.tolerance({**loud, "theirs32": (0.0, 1e9)}) == ap.TOL_CAP
    assert ap.tolerance({**loud, "theirs32": (math.inf, math.inf)}) == ap.TOL_F64
    assert ap.verdict({**loud, "ours64": (1.0, 1e-3)}) == "DIFFERS"


def test_command_line():
    args = ap.build_parser().parse_args(["--authors-dir", "x"])
    assert (args.arch_vit, args.steps, args.epoch, args.batch, args.local_crops, args.out_dim) == \
        ("vit_tiny", 1, 1, 4, 2, 256)
    assert os.path.samefile(args.mokd, os.path.join(HERE, "mokd.py"))


def test_drop_path_tape_records_without_disturbing_the_rng_and_replays_exactly():
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    torch.manual_seed(1)
    plain = [mokd.drop_path(x, 0.3, True) for _ in range(3)] + [torch.rand(2)]  # the stream without the tape
    tape = ap.DropPathTape()
    tape.start_step(0)
    record = tape.recorder(mokd.drop_path)
    torch.manual_seed(1)
    recorded = [record(x, 0.3, True) for _ in range(3)] + [torch.rand(2)]
    for a, b in zip(plain, recorded):
        assert torch.equal(a, b)
    assert record(x, 0.0, True) is x and record(x, 0.3, False) is x  # no draw, no mask
    assert len(tape.masks[0]) == 3 and torch.equal(tape.calls(0), torch.tensor([[0.3, 6.0]] * 3, dtype=torch.float64))
    tape.start_step(0)
    replay = tape.replayer(mokd.drop_path)
    torch.manual_seed(123)  # replaying draws nothing: the RNG no longer matters
    for a in recorded[:3]:
        assert torch.equal(replay(x, 0.3, True), a)
    assert torch.equal(replay(x, 0.3, True), x / 0.7)  # a fourth call has no mask: nothing dropped
    assert len(tape.calls(0)) == 4


def test_patched_restores_own_and_inherited_attributes():
    class Base:
        def f(self):
            return "base"

    class Child(Base):
        g = 1
    with ap.patched(Child, "f", lambda self: "patched"), ap.patched(Child, "g", 2):
        assert Child().f() == "patched" and Child.g == 2
    assert Child().f() == "base" and "f" not in vars(Child) and Child.g == 1
    d = {"k": 1}
    with ap.patched(d, "k", 2, item=True), ap.patched(d, "new", 3, item=True):
        assert d == {"k": 2, "new": 3}
    assert d == {"k": 1}


def test_make_batches():
    a = ap.make_batches(2, 3, 2, 32, 16, seed=5)
    b = ap.make_batches(2, 3, 2, 32, 16, seed=5)
    assert len(a) == 2 and [tuple(c.shape) for c in a[0]] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    assert all(torch.equal(x, y) for s, t in zip(a, b) for x, y in zip(s, t))
    assert not torch.equal(a[0][0], a[1][0])


@pytest.mark.parametrize("arch_vit", PAIRS)
def test_our_config_has_every_compared_key(arch_vit):
    cfg = ap.our_config(mokd, arch_vit, 4, 2, 256, 100)
    assert cfg["arch_a"] == "resnet18" and cfg["arch_b"] == arch_vit and cfg["precision"] == "fp32"
    for ours, _ in ap.CONFIG_PAIRS:
        assert isinstance(cfg[ours], (int, float))
    assert cfg["optimizer_a"] == "sgd" and cfg["optimizer_b"] == "adamw"


# ---- resize_pos_embed: the authors' (DINO's) arithmetic ----
def dino_resize(pos, grid, new_grid):
    """The reference: bicubic with scale factors (new + 0.1) / old, rows then columns. (1, h*w, D) -> (1, h'*w', D)."""
    D = pos.shape[-1]
    x = pos.reshape(1, *grid, D).permute(0, 3, 1, 2)
    factors = ((new_grid[0] + 0.1) / grid[0], (new_grid[1] + 0.1) / grid[1])
    x = F.interpolate(x, scale_factor=factors, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, -1, D)


@pytest.mark.parametrize("grid,new_grid", [((14, 14), (6, 6)), ((7, 7), (3, 3)), ((4, 4), (2, 2)), ((14, 14), (5, 9)),
                                           ((6, 10), (3, 4)), ((14, 14), (20, 17))])
def test_resize_pos_embed_is_the_authors_arithmetic(grid, new_grid):
    pos = torch.randn(1, grid[0] * grid[1], 8, dtype=torch.float64)
    out = mokd.resize_pos_embed(pos, grid, new_grid)
    assert out.shape == (1, new_grid[0] * new_grid[1], 8) and out.dtype == torch.float64
    assert torch.equal(out, dino_resize(pos, grid, new_grid))


def test_resize_pos_embed_rows_and_columns_are_not_swapped():
    """A pattern that varies along rows only must still vary along rows only after a non-square resize."""
    rows = torch.arange(6, dtype=torch.float64).repeat_interleave(10)  # (6*10,): value = row index
    out = mokd.resize_pos_embed(rows.reshape(1, 60, 1), (6, 10), (3, 7)).reshape(3, 7)
    assert torch.allclose(out, out[:, :1].expand(3, 7))  # constant along each row
    assert (out[1:, 0] > out[:-1, 0]).all()


def test_resize_pos_embed_output_grid_is_always_the_requested_one():
    pos = torch.randn(1, 16 * 16, 2)
    for h in range(1, 33):
        for w in (1, 7, h):
            assert mokd.resize_pos_embed(pos, (16, 16), (h, w)).shape == (1, h * w, 2)


def test_resize_pos_embed_unchanged_grid_and_dtypes():
    pos = torch.randn(1, 49, 4)
    assert mokd.resize_pos_embed(pos, (7, 7), (7, 7)) is pos
    assert mokd.resize_pos_embed(pos.bfloat16(), (7, 7), (3, 3)).dtype == torch.bfloat16
    assert mokd.resize_pos_embed(pos, (7, 7), (3, 3)).dtype == torch.float32


# ==== Issue 27: the authors' k-NN feature, protocols named in the JSON, helpers of authors_parity.py ====
def write_backbone(path, arch, seed=0):
    """A backbone file as `eval_linear.py --export` writes it (16 px, patch 4), random weights; returns the model."""
    torch.manual_seed(seed)
    bb = mokd.build_backbone(arch, {"stem": "cifar", "patch_size": 4, "global_crop_size": 16}).eval()
    state = (bb.net if arch in mokd.RESNETS else bb).state_dict()
    meta = {"arch": arch, "patch_size": 4, "stem": "cifar", "image_size": 16, "source": "test", "which": "teacher"}
    torch.save({"state_dict": state, "meta": meta}, path)
    return bb


def test_feature_spec_defaults_are_the_authors_knn_and_dinos_probe():
    knn, probe = (eval_linear.feature_spec("vit_small", 384, p) for p in ("knn", "linear"))
    assert (knn["blocks"], knn["avgpool_patchtokens"], knn["dim"]) == (1, False, 384)  # final CLS
    assert (probe["blocks"], probe["avgpool_patchtokens"], probe["dim"]) == (4, False, 4 * 384)
    base = eval_linear.feature_spec("vit_base", 768, "linear")
    assert (base["blocks"], base["avgpool_patchtokens"], base["dim"]) == (1, True, 2 * 768)
    assert eval_linear.feature_spec("vit_base", 768, "knn")["avgpool_patchtokens"] is False
    assert eval_linear.feature_spec("vit_tiny", 192, "knn", 2, True)["dim"] == 3 * 192  # explicit flags win
    r = eval_linear.feature_spec("resnet18", 512, "knn")
    assert r == eval_linear.feature_spec("resnet18", 512, "linear") and "pooling" in r and r["dim"] == 512


def test_spec_columns_pick_the_final_cls_out_of_the_probe_feature():
    D = 3
    knn = eval_linear.feature_spec("vit_tiny", D, "knn")
    probe = eval_linear.feature_spec("vit_tiny", D, "linear")
    assert eval_linear.spec_columns(knn, probe, D) == [9, 10, 11]  # the last of 4 CLS tokens
    with_avg = eval_linear.feature_spec("vit_tiny", D, "linear", 4, True)
    assert eval_linear.spec_columns(knn, with_avg, D) == [9, 10, 11]
    assert eval_linear.spec_columns(with_avg, knn, D) is None  # a wider feature is not inside a narrower one


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
def test_knn_default_feature_is_the_final_cls_or_pooled_and_the_json_names_it(arch, tmp_path, capsys, monkeypatch):
    bb = write_backbone(tmp_path / "bb.pth", arch)
    seen = []  # the features k-NN receives

    def knn_classify(train_f, train_y, test_f, test_y, *args):
        seen.append((train_f, test_f))
        return original(train_f, train_y, test_f, test_y, *args)
    original = eval_linear.knn_classify
    monkeypatch.setattr(eval_linear, "knn_classify", knn_classify)
    train, val = make_folder(tmp_path / "train", 4), make_folder(tmp_path / "val", 2, seed=1)
    common = ["--backbone", str(tmp_path / "bb.pth"), "--train-path", train, "--val-path", val, "--num-workers", "0",
              "--device", "cpu", "--batch-size-per-gpu", "5", "--nb-knn", "1", "3", "--output-dir",
              str(tmp_path / "out")]
    eval_linear.main(common + ["--knn"])
    res = last_json(capsys.readouterr().out)
    saved = json.load(open(tmp_path / "out" / f"eval_knn_backbone_{arch}.json"))
    assert saved == res and res["knn_temperature"] == 0.07
    tf = eval_linear.eval_transform(16)
    feats = []
    for folder in (train, val):  # the authors' feature: final CLS after the norm (ViT), pooled map (ResNet)
        ds = torchvision.datasets.ImageFolder(folder, transform=tf)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            feats.append((bb(x)[0], torch.tensor(ds.targets)))
    for got, want in zip(seen[0], (feats[0][0], feats[1][0])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    expected = original(feats[0][0], feats[0][1], feats[1][0], feats[1][1], ks=(1, 3), num_classes=3)
    assert {k: v["top1"] for k, v in res["knn"].items()} == {str(k): round(v[0], 3) for k, v in expected.items()}
    if arch == "vit_tiny":
        assert res["knn_feature"] == {"backbone": "vit_tiny", "tokens": "CLS after the final norm", "blocks": 1,
                                      "avgpool_patchtokens": False, "dim": 192}
    else:
        assert res["knn_feature"]["pooling"] and res["knn_feature"]["dim"] == 512
    eval_linear.main(common + ["--knn", "--cached-features", "--epochs", "2", "--lr", "0.5"])
    both = last_json(capsys.readouterr().out)
    assert both["knn"] == res["knn"] and both["knn_feature"] == res["knn_feature"]  # sliced from the probe feature
    probe = both["linear"]
    assert probe["feature"]["dim"] == (4 * 192 if arch == "vit_tiny" else 512)
    assert (probe["base_lr"], probe["lr"], probe["epochs"], probe["batch_size_per_gpu"], probe["global_batch"]) == (
        0.5, 0.5 * 5 / 256, 2, 5, 5)
    if arch == "vit_tiny":
        eval_linear.main(common + ["--knn", "--n-last-blocks", "4"])  # an explicit flag: DINO's probe feature
        four = last_json(capsys.readouterr().out)
        assert four["knn_feature"]["blocks"] == 4 and four["knn_feature"]["dim"] == 4 * 192
        assert seen[-1][0].shape[1] == 4 * 192


def test_gaussian_blur_blurs_when_the_draw_is_at_most_p_as_dino():
    img = Image.fromarray((np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3))
    for seed in range(5):
        torch.manual_seed(seed)
        u = torch.rand(()).item()
        for p, blurred in ((u, True), (np.nextafter(u, 0), False)):  # DINO: random.random() <= p blurs
            torch.manual_seed(seed)
            out = mokd.RandomGaussianBlur(p)(img)
            assert (np.asarray(out) != np.asarray(img)).any() == blurred


def test_torch_random_stand_in_draws_torch_numbers_in_order():
    torch.manual_seed(3)
    expected = torch.rand(3).tolist()  # torch.rand(()) three times gives the same numbers
    torch.manual_seed(3)
    r = ap.TorchRandom()
    got = [r.random(), r.uniform(0.1, 2.0), r.random()]
    assert got == [expected[0], 0.1 + (2.0 - 0.1) * expected[1], expected[2]] and r.draws == 3


def test_fixed_loader_serves_epochs_and_ends_after_the_last_batch():
    batches = [[torch.full((2, 1), float(i))] for i in range(6)]
    seen = []
    loader = ap.FixedLoader(batches, None, lambda i: seen.append(("start", i)), lambda i: seen.append(("end", i)),
                            per_epoch=3)
    assert len(loader) == 3
    assert [float(b[0][0][0, 0]) for b in loader] == [0.0, 1.0, 2.0]  # one epoch: a pass of their loop
    with pytest.raises(ap.LoopEnded):
        for crops, _ in loader:
            pass
    assert seen == [(w, i) for i in range(6) for w in ("start", "end")]


def test_probe_iterations_cover_the_boundaries_and_stay_in_the_run():
    ks = ap.probe_iterations(epochs=100, niter=50, warmup=10)
    assert ks == sorted(set(ks)) and ks[0] == 0 and ks[-1] == 100 * 50 - 1
    assert {499, 500, 501, 49, 50, 2500} <= set(ks) and all(0 <= k < 5000 for k in ks)


def test_unvoted_share_counts_labels_without_a_vote_among_few_voted_classes():
    train_f = torch.eye(3)  # three training images, classes 0, 1, 2
    train_y = torch.tensor([0, 1, 2])
    test_f = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    test_y = torch.tensor([2, 1])  # k=1: image 0's label 2 gets no vote (1 class voted); image 1's gets one
    assert ap.unvoted_share(train_f, train_y, test_f, test_y, 1, 0.07, 6) == 50.0


def test_parity_script_parts_and_flags():
    p = ap.build_parser()
    args = p.parse_args(["--authors-dir", "x", "--all"])
    assert args.all and args.run_epochs == 1 and args.crop_px == [224, 96] and args.eval_images == [200, 100]
    assert set(ap.PART_NAMES) == {"step", "augmentation", "schedules", "boundary", "ddp", "evaluation"}
    with pytest.raises(ap.ParityError, match="run-epochs"):
        ap.step_parity(p.parse_args(["--authors-dir", "x", "--epoch", "99", "--run-epochs", "2"]))


def test_blur_draws_from_torch_have_dinos_distribution(monkeypatch):
    """DEVIATION 8: our blur draws its decision and radius from torch's generator (float32), DINO's from Python's
    random (float64): the same distributions (blur rate p, radius uniform in [0.1, 2.0])."""
    import random
    from PIL import ImageFilter
    radii = []

    class Recorder:
        @staticmethod
        def GaussianBlur(radius):
            radii.append(radius)
            return ImageFilter.BoxBlur(0)
    monkeypatch.setattr(mokd, "ImageFilter", Recorder)
    img = Image.new("RGB", (4, 4))
    torch.manual_seed(0)
    blur, n = mokd.RandomGaussianBlur(0.5), 20000
    for _ in range(n):
        blur(img)
    rng = random.Random(0)  # DINO's GaussianBlur: random.random() <= p, then random.uniform(0.1, 2.0)
    theirs = [rng.uniform(0.1, 2.0) for _ in range(n) if rng.random() <= 0.5]
    assert abs(len(radii) - len(theirs)) < 8 * math.sqrt(n * 0.25)  # both ~ Binomial(n, 0.5)
    ours_sorted, theirs_sorted = np.sort(radii), np.sort(theirs)
    grid = np.linspace(0.1, 2.0, 50)
    ks = np.max(np.abs(np.searchsorted(ours_sorted, grid) / len(ours_sorted) -
                       np.searchsorted(theirs_sorted, grid) / len(theirs_sorted)))
    assert ks < 0.03 and 0.1 <= min(radii) and max(radii) <= 2.0  # two-sample KS distance


# ==== Issue 28: work that survives a cluster's stop, numbers that do not depend on the launch ====

TREE = [*TINY, "--arch-a", "resnet18", "--arch-b", "vit_tiny", "--log-every", "1", "--num-workers", "1"]

def process_tree(pid):
    """pid and every descendant, from /proc (what a cgroup-based scheduler signals)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_every_process_of_the_tree_saves_a_step_boundary_and_the_relaunch_is_bit_identical(tmp_path,
                                                                                                        nproc):
    """Issue 28.1: a scheduler signals every PID of the job, DataLoader workers included (torchrun, 2 ranks, 1 worker
    each: the ranks died with 'DataLoader worker is killed by signal'; 1 process saved a half-applied step)."""
    out = tmp_path / "o"
    args = [os.path.join(HERE, "mokd.py"), *TREE, "--epochs", "50", "--output-dir", str(out)]
    with started(launcher(nproc) + args) as proc:
        wait_for_records(proc, out / "log.jsonl", random.randint(1, 4))
        tree = process_tree(proc.pid)
        assert len(tree) == 1 + (nproc > 1) * nproc + nproc  # torchrun, its ranks, one worker per rank
        for pid in tree:
            os.kill(pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    assert "stopped by signal" in stdout, stderr[-3000:]
    for part in ("teacher A (resnet18) at step", "teacher B (vit_tiny) at step", "evaluate: python eval_linear.py"):
        assert part in stdout, part  # issue 31.4, 31.5: at every end
    assert not re.search(r"^error|RuntimeError|DataLoader worker", stderr, re.M), stderr[-3000:]
    stop = torch.load(out / "checkpoint.pth", weights_only=True)["global_step"]
    assert log_steps(out) == list(range(stop))
    end = ["--max-steps", str(stop + 2)]
    r = run_cli(args[1:] + end, nproc=nproc, torchrun=nproc > 1)  # the relaunch
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"teacher A (resnet18) at step {stop + 1}: " in r.stdout and r.stdout.count("evaluate: ") == 1, r.stdout
    ref = run_cli([*args[1:-1], str(tmp_path / "ref"), *end], nproc=nproc, torchrun=nproc > 1)  # never interrupted
    assert ref.returncode == 0, ref.stderr[-3000:]
    resumed, _ = checkpoint_tensors(out / "checkpoint.pth")
    full, _ = checkpoint_tensors(tmp_path / "ref" / "checkpoint.pth")
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), (stop, k)


def quick_run(out, *extra):
    mokd.main([*TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--log-every", "1", "--output-dir", str(out),
               *extra])


@pytest.mark.slow
def test_a_resume_never_destroys_newer_work_without_overwrite(tmp_path, capsys):
    """Issue 28.2: --resume OLD.pth into a folder with a newer run cut its log from 12 records to 3 and overwrote
    its checkpoint.pth; another run's checkpoint cut the log mid-line."""
    d, other = tmp_path / "d", tmp_path / "other"
    quick_run(d, "--saveckp-freq", "1", "--max-steps", "12")  # 8 steps per epoch: checkpoint0001.pth at step 8
    quick_run(other, "--max-steps", "3")
    before = {f: (d / f).read_bytes() for f in ("checkpoint.pth", "log.jsonl")}
    capsys.readouterr()
    for resume in (d / "checkpoint0001.pth", other / "checkpoint.pth"):
        err = cli_error(capsys, *TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--log-every", "1",
                        "--output-dir", str(d), "--resume", str(resume))
        assert f"{d / 'checkpoint.pth'} and {d / 'log.jsonl'} would be overwritten by resuming {resume}" in err, err
        assert "--overwrite" in err and {f: (d / f).read_bytes() for f in before} == before
    (d / "checkpoint.pth").unlink()  # the log alone is refused too
    err = cli_error(capsys, *TINY, "--arch-a", "vit_tiny", "--arch-b", "vit_tiny", "--output-dir", str(d), "--resume",
                    str(other / "checkpoint.pth"))
    assert f"{d / 'log.jsonl'} would be overwritten" in err and (d / "log.jsonl").read_bytes() == before["log.jsonl"]
    quick_run(d, "--resume", str(d / "checkpoint0001.pth"), "--max-steps", "10", "--overwrite")
    assert log_steps(d) == [8, 9]
    quick_run(tmp_path / "new", "--resume", str(other / "checkpoint.pth"), "--max-steps", "5")  # an empty folder
    assert log_steps(tmp_path / "new") == [3, 4]


@pytest.mark.slow
def test_a_fresh_start_after_a_kill_does_not_append_to_the_dead_runs_log(tmp_path):
    """Issue 28.3: killed before its first checkpoint, the next start's records followed the dead run's (0-4, 0-5)."""
    quick_run(tmp_path, "--max-steps", "5")
    (tmp_path / "checkpoint.pth").unlink()  # what kill -9 before the first save leaves
    quick_run(tmp_path, "--max-steps", "6")
    assert log_steps(tmp_path) == list(range(6))


def test_checkpoints_are_written_mid_epoch_every_saveckp_minutes(tmp_path, monkeypatch):
    """Issue 28.3: a hard kill loses at most --saveckp-minutes of work. Here the clock moves 5 minutes per reading:
    with --saveckp-minutes 25 the run saves within its epoch (8 steps), never sooner than 25 minutes after the last
    save; with 0 only where it ends (step 6)."""
    clock = [0.0]

    def tick():
        clock[0] += 300.0
        return clock[0]
    saves = []  # (step, clock) of each save
    real_save = mokd.save_checkpoint
    monkeypatch.setattr(mokd.time, "time", tick)
    monkeypatch.setattr(mokd, "save_checkpoint", lambda run, log, step, *a: saves.append((step, clock[0])) or
                        real_save(run, log, step, *a))
    for minutes in ("25", "0"):
        saves.clear()
        quick_run(tmp_path / minutes, "--max-steps", "6", "--saveckp-minutes", minutes)
        steps, mid = [s for s, _ in saves], [c for _, c in saves[:-1]]  # the last save: at --max-steps
        assert steps[-1] == 6 and torch.load(tmp_path / minutes / "checkpoint.pth")["global_step"] == 6
        if minutes == "0":
            assert steps == [6], steps
        else:
            assert 1 <= len(mid) < 5 and all(b - a >= 1500 for a, b in zip(mid, mid[1:])), saves


@pytest.mark.parametrize("K, N", [(65536, 64), (65536, 512), (4096, 512), (64, 64)])
def test_the_collapse_verdict_reads_healthy_uniform_and_few_prototypes_at_realistic_batches(K, N):
    """Issue 28.5: the batch-mean entropy is bounded by log N, so against log K a healthy teacher read as collapsing
    (4.16 against 11.09 for the ImageNet recipe on one GPU). Logits as a weight-normalised last layer gives them
    (cosines), centred and sharpened as in Run.losses (tau_t 0.04), N = 2 x the global batch."""
    g = torch.Generator().manual_seed(0)

    def verdict(logits):
        p = F.softmax(logits / 0.04, dim=-1)
        return mokd.collapse_verdict(mokd.entropy(p).mean().item(), mokd.entropy(p.mean(0)).item(), K, N)
    noise = 0.05 * torch.randn(N, K, generator=g)
    healthy = noise.clone()
    healthy[torch.arange(N), torch.randint(K, (N,), generator=g)] += 1.0  # each output confident, prototypes spread
    few = noise.clone()
    few[torch.arange(N), torch.randint(3, (N,), generator=g)] += 1.0  # every output on one of 3 prototypes
    assert verdict(healthy).startswith("healthy"), verdict(healthy)
    assert verdict(0.001 * noise).startswith("uniform"), verdict(0.001 * noise)
    assert verdict(few).startswith("collapsed onto few prototypes (the batch uses about 3)"), verdict(few)
    one = verdict(torch.nn.functional.one_hot(torch.zeros(N, dtype=torch.long), K).float())
    assert one.startswith("collapsed onto few prototypes (the batch uses about 1)"), one
    alike = torch.zeros(N, K)
    alike[:, :40] = 1.0  # every output the same, spread over 40 prototypes: it does not depend on the image
    assert verdict(alike).startswith("uniform (outputs alike, each spread over about 40 prototypes)"), verdict(alike)


def test_the_evaluation_command_fits_the_run():
    """Issue 31.4: one command, with the run's own data where it has some."""
    cmd = mokd.eval_command({"data_path": None, "data_root": "data"}, "out/checkpoint.pth")
    assert cmd.startswith("evaluate: python eval_linear.py --checkpoint out/checkpoint.pth --knn ")
    assert "path" not in cmd
    cmd = mokd.eval_command({"data_path": "cifar10", "data_root": "my data"}, "o/checkpoint.pth")
    assert "--train-path cifar10 --val-path cifar10 --data-root 'my data'" in cmd
    cmd = mokd.eval_command({"data_path": "/img/train", "data_root": "data"}, "o/checkpoint.pth")
    assert "--train-path /img/train --val-path HELD_OUT_FOLDER" in cmd


@pytest.mark.slow
def test_a_resume_with_more_epochs_says_how_the_schedules_change(tmp_path, capsys):
    """Issue 28.6: the lr jumped from 0.0050 to 0.0153 and the momentum fell at the resume step, unsaid."""
    quick_run(tmp_path, "--max-steps", "10")
    capsys.readouterr()
    quick_run(tmp_path, "--max-steps", "11", "--epochs", "4", "--warmup-epochs", "2")
    out = capsys.readouterr().out
    old = mokd.build_schedules(make_cfg("vit_tiny", "vit_tiny"), 8, 1)
    new = mokd.build_schedules(make_cfg("vit_tiny", "vit_tiny", "--epochs", "4", "--warmup-epochs", "2"), 8, 1)
    lr = f"lr_a {old['a']['main'][0][10]:.4g} -> {new['a']['main'][0][10]:.4g}"
    momentum = f"momentum {old['momentum'][10]:.4g} -> {new['momentum'][10]:.4g}"
    assert "at step 10 the new settings change the schedules" in out and lr in out and momentum in out, out
    quick_run(tmp_path, "--max-steps", "12", "--epochs", "4", "--warmup-epochs", "2")
    assert "change the schedules" not in capsys.readouterr().out


@pytest.mark.slow
def test_the_cached_probe_is_the_same_whatever_number_of_processes_extracted_the_features(trained, tmp_path):
    """Issue 28.4: under torchrun the cached probe's lr was multiplied by the number of processes while it trained on
    rank 0 alone (1 process top-1 22.0, 2 processes 21.7)."""
    args = [os.path.join(HERE, "eval_linear.py"), "--checkpoint", trained["ckpt"], "--model", "a", "--cached-features",
            "--epochs", "3", "--train-path", trained["train"], "--val-path", trained["val"], "--num-workers", "0",
            "--device", "cpu", "--batch-size-per-gpu", "4"]
    outs = []
    for n in (1, 2):
        r = run_proc(launcher(n) + args + ["--output-dir", str(tmp_path / str(n))], timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(torch.load(tmp_path / str(n) / "eval_linear_cached_model_a_teacher_linear.pth"))
        probe = json.load(open(tmp_path / str(n) / "eval_linear_cached_model_a_teacher.json"))["linear"]
        assert probe["global_batch"] == 4 and probe["lr"] == probe["base_lr"] * 4 / 256  # one process trains it
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6, msg=k)  # the features: 1e-6 apart


def odd_folder(root):
    """Issue 28.7's folder: 3 classes x 4 PNGs, 50 AppleDouble files sorted first in class0, a .jfif and a .jpe (JPEG
    data), a file PIL refuses as a decompression bomb (under a lowered limit) and a text file."""
    make_folder(root, 4)
    for i in range(50):
        (root / "class0" / f"._{i}.png").write_bytes(b"\x00\x05\x16\x07AppleDouble metadata")
    Image.open(root / "class1" / "0.png").save(root / "class1" / "photo.jfif", format="JPEG")
    Image.open(root / "class2" / "0.png").save(root / "class2" / "photo.jpe", format="JPEG")
    Image.new("RGB", (64, 64)).save(root / "class2" / "huge.png")  # 4096 pixels > 2 x MAX_IMAGE_PIXELS below
    (root / "class0" / "notes.txt").write_text("x")
    return str(root)


def test_appledouble_jfif_and_decompression_bombs_are_read_alike_in_training_and_evaluation(trained, tmp_path,
                                                                                             capfd, monkeypatch):
    """Issue 28.7: AppleDouble files stopped training ('50 unreadable images in a row') and evaluation, .jfif / .jpe
    were dropped unsaid, a decompression bomb was 'unreadable' in training and stopped evaluation."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    root = odd_folder(tmp_path / "data")
    ds = mokd.image_folder(root, "--data-path")
    names = sorted(os.path.basename(p) for p, _ in ds.samples)
    assert len(ds) == 15 and "photo.jfif" in names and "photo.jpe" in names and not any(n[:2] == "._" for n in names)
    err = capfd.readouterr().err
    assert "not read: 50 macOS metadata files (._*: not images), 1 '.txt' files (not images)" in err, err
    aug = mokd.MultiCropDataset(ds, lambda img: [T.PILToTensor()(img.resize((8, 8)))], 0)
    huge = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("huge.png")][0]
    assert aug[(0, huge)] is None  # left out of its batch, never replaced by the next image
    batch = mokd.collate_readable([aug[(0, i)] for i in (huge - 1, huge, huge + 1)])
    assert batch[0].shape[0] == 2 and torch.equal(batch[0][1], aug[(0, huge + 1)][0])
    assert "decompression bombs" in capfd.readouterr().err
    with pytest.raises(mokd.MOKDError, match="all 1 images of a batch are unreadable"):
        mokd.collate_readable([aug[(0, huge)]])
    mokd.main([*TINY, "--arch-b", "vit_tiny", "--data-path", root, "--epochs", "1", "--batch-size-per-gpu", "5",
               "--output-dir", str(tmp_path / "o")])  # 15 images, 3 steps, one batch a image short
    assert torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)["global_step"] == 3
    res = eval_linear.main(["--checkpoint", trained["ckpt"], "--knn", "--nb-knn", "3", "--train-path", root,
                            "--val-path", trained["val"], "--num-workers", "0", "--device", "cpu"])
    out = capfd.readouterr()
    assert "1 of the 15 training images are unreadable and left out" in out.out and "huge.png" in out.err
    assert res["train_size"] == 15 and 0 <= res["knn"]["3"]["top1"] <= 100


def test_our_own_words_where_a_librarys_advice_is_wrong_here(trained, tmp_path, capsys):
    """Issue 28.8: torch.load advises weights_only=False for a refused pickle; a validation set that is the training
    set gives a number that means little, said before it is printed."""
    torch.save({"config": {}, "models": {}, "x": argparse.Namespace()}, tmp_path / "foreign.pth")
    err = cli_error(capsys, *TINY, "--resume", str(tmp_path / "foreign.pth"), "--output-dir", str(tmp_path / "o"))
    assert "is unreadable (truncated, altered, or not a mokd checkpoint): UnpicklingError" in err
    assert "weights_only" not in err
    eval_linear.main(["--checkpoint", trained["ckpt"], "--knn", "--nb-knn", "3", "--train-path", trained["train"],
                      "--val-path", trained["train"], "--num-workers", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert "15 of the 15 validation images are training images too" in err and "overstates" in err


# ==== Issue 31: what a new user meets (baselines, small images, Ctrl-C, help, output folders) ====
def lr0_run(tmp_path):
    """One step of a tiny run with every lr 0: the students keep their step-0 weights."""
    out = tmp_path / "lr0"
    mokd.main(["--arch-a", "vit_tiny", "--arch-b", "resnet18", *TINY, "--seed", "3", "--max-steps", "1", "--lr-a", "0",
               "--lr-b", "0", "--thead-lr", "0", "--output-dir", str(out)])
    return str(out / "checkpoint.pth")


@pytest.mark.slow
def test_the_baseline_is_the_runs_step_0_network_under_the_same_protocol(tmp_path, capsys):
    ckpt = lr0_run(tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    for m in "ab":
        init = eval_linear.initial_backbone(saved["config"], m)
        student = saved["models"][m]["student"]
        assert all(torch.equal(p, student["backbone." + k]) for k, p in init.named_parameters())
        other = eval_linear.initial_backbone({**saved["config"], "seed": 4}, m)
        assert not all(torch.equal(p, q) for p, q in zip(init.parameters(), other.parameters()))
    root = tmp_path / "data"
    common = ["--checkpoint", ckpt, "--model", "a", "--which", "student", "--train-path", make_folder(root / "t", 4),
              "--val-path", make_folder(root / "v", 2, seed=1), "--num-workers", "0", "--device", "cpu", "--knn",
              "--cached-features", "--epochs", "2", "--batch-size-per-gpu", "4"]
    capsys.readouterr()
    eval_linear.main(common)  # the ViT of this checkpoint still has its step-0 weights (no BatchNorm statistics)
    out = capsys.readouterr().out
    r = last_json(out)
    assert r["baseline"]["seed"] == 3 and r["baseline"]["knn"] == r["knn"] and r["baseline"]["linear"] == r["linear"]
    assert "at init: top-1" in out and "the same protocol on vit_tiny at its initialisation" in out
    eval_linear.main(common + ["--baseline", "false"])
    assert last_json(capsys.readouterr().out)["baseline"] is None


def test_the_baseline_of_a_trained_checkpoint_and_of_its_export_and_chance(trained, tmp_path, capsys):
    common = ["--train-path", trained["train"], "--val-path", trained["val"], "--num-workers", "0", "--device", "cpu",
              "--knn", "--model", "b"]
    eval_linear.main(["--checkpoint", trained["ckpt"], *common])
    out = capsys.readouterr().out
    r = last_json(out)
    assert set(r["baseline"]["knn"]) == set(r["knn"]) and r["baseline"]["seed"] == 0
    assert r["chance"]["top1"] == 33.333 and r["chance"]["top5"] is None  # 3 balanced classes
    assert "k-NN k=15 (100 asked)" in out and "k-NN k=200" not in out  # the bank holds 15 images
    assert "backbone_unchanged:" in out
    exported = str(tmp_path / "b.pth")
    eval_linear.main(["--checkpoint", trained["ckpt"], "--model", "b", "--export", exported])
    eval_linear.main(["--backbone", exported, *common])
    assert last_json(capsys.readouterr().out)["baseline"] == r["baseline"]
    obj = torch.load(exported, weights_only=True)
    del obj["meta"]["run_config"]  # as an export written before exports kept it
    torch.save(obj, exported)
    eval_linear.main(["--backbone", exported, *common])
    out = capsys.readouterr().out
    assert "does not say how its run began" in out and last_json(out)["baseline"] is None and "at init" not in out


def test_chance_is_the_share_of_the_most_frequent_classes():
    y = torch.tensor([0, 0, 0, 1, 2])
    assert eval_linear.chance(y, 3) == (60.0, None)
    y = torch.tensor([0] * 4 + [1] * 3 + [2] * 2 + [3, 4, 5, 6])  # 13 labels, 7 classes
    assert eval_linear.chance(y, 7) == (round(100 * 4 / 13, 3), round(100 * 11 / 13, 3))


def test_an_exported_vit_rebuilds_from_its_metadata_alone(trained, tmp_path):
    out = str(tmp_path / "vit.pth")
    eval_linear.main(["--checkpoint", trained["ckpt"], "--model", "b", "--export", out])
    obj = torch.load(out, weights_only=True)
    meta = obj["meta"]
    assert (meta["dim"], meta["heads"], meta["depth"], meta["model"]) == (192, 3, 12, "b")
    vit = mokd.VisionTransformer(meta["dim"], meta["heads"], meta["patch_size"], meta["image_size"], meta["depth"])
    vit.load_state_dict(obj["state_dict"], strict=True)


def test_small_images_are_told_the_recipe_and_the_batch_that_fit_and_a_refusal_leaves_no_folder(tmp_path, capsys):
    folder = make_folder(tmp_path / "small", 10, size=32)  # 30 images of 32 px
    out = tmp_path / "runs" / "mine"
    err = cli_error(capsys, "--data-path", folder, "--output-dir", str(out), "--device", "cpu", "--num-workers", "0")
    assert "the images are about 32 px on their short side, far smaller than the 224 px global crops" in err
    assert "--recipe cifar10 crops 32 px" in err
    assert "30 images are fewer than one global batch (32 x 1 processes); --batch-size-per-gpu 7 gives" in err
    assert err.index("far smaller") < err.index("fewer than one global batch")  # said before anything is built
    assert not os.path.exists(tmp_path / "runs")  # the refused run created no folder
    err = cli_error(capsys, "--data-path", str(tmp_path / "missing"), "--output-dir", str(out))
    assert "--data-path" in err and not os.path.exists(tmp_path / "runs")
    with pytest.raises(SystemExit):
        eval_linear.main(["--checkpoint", str(tmp_path / "none.pth"), "--knn", "--output-dir", str(out)])
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.slow
def test_a_small_folder_runs_under_the_cifar10_recipe_with_the_batch_named(tmp_path, capfd):
    folder = make_folder(tmp_path / "small", 10, size=32)
    out = tmp_path / "run"
    mokd.main(["--recipe", "cifar10", "--data-path", folder, "--batch-size-per-gpu", "7", "--max-steps", "1",
               "--device", "cpu", "--num-workers", "0", "--output-dir", str(out)])
    err = capfd.readouterr().err
    assert "far smaller" not in err and os.path.exists(out / "checkpoint.pth")
    info = json.load(open(out / "config.json"))
    assert info["device"] == "cpu" and info["machine"] == os.uname().machine


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["knn", "full probe"])
def test_ctrl_c_to_the_whole_process_group_during_an_evaluation_prints_one_line(trained, protocol):
    """A terminal's Ctrl-C reaches every process of its group: the evaluation and its DataLoader workers."""
    args = ["--checkpoint", trained["ckpt"], "--num-workers", "2", "--device", "cpu", "--batch-size-per-gpu", "4"]
    args += ["--knn"] if protocol == "knn" else ["--train-path", trained["train"], "--val-path", trained["val"],
                                                  "--epochs", "100000"]
    # started: its own process group, as a terminal gives a command
    with started([sys.executable, os.path.join(HERE, "eval_linear.py"), *args]) as proc:
        for line in proc.stdout:  # the workers are running
            if line.startswith("features of" if protocol == "knn" else "linear probe epoch"):
                break
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.count("evaluation interrupted") == 1 and "Traceback" not in err, err[-2000:]


@pytest.mark.slow
def test_the_interrupt_handler_is_silent_in_a_forked_worker():
    code = ("import os, signal, eval_linear; eval_linear.interrupt(os.getpid() + 1, signal.SIGINT, None); "
            "print('still running')")
    r = run_proc([sys.executable, "-c", code], cwd=HERE, timeout=120)
    assert r.returncode == 0 and "still running" in r.stdout and "interrupted" not in r.stderr, r.stderr[-2000:]


def test_help_opens_with_the_recipe_shown_and_the_cost_of_each_evaluation(capsys):
    top = help_text(capsys).split("options:")[0]  # what a user reads before the flags
    assert "usage: mokd.py [flags]" in top and "Defaults below: recipe 'demo'" in top and "not real data" in top
    assert "`--recipe NAME --help` shows NAME's" in top
    top = " ".join(eval_linear.build_parser().format_help().split()).split("options:")[0]
    assert "--knn passes the training and validation images through the frozen backbone once" in top
    assert "DINO's full linear probe passes the augmented training images" in top and "--epochs (100)" in top


def test_reference_rows_spilled_to_disk_compare_as_kept_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(ap, "SPILL_NUMEL", 10)
    big = {"w": torch.arange(20.0).reshape(4, 5), "b": torch.ones(3)}
    kept, spilled = ap.Record(), ap.Record(spill_dir=str(tmp_path))
    for ref in (kept, spilled):
        ref.put(0, "row", big)
        ref.put(0, "small", {"x": torch.ones(2)})
    assert isinstance(spilled.values[(0, "row")], ap.Spilled) and set(spilled.values[(0, "row")]) == {"w", "b"}
    assert not isinstance(spilled.values[(0, "small")], ap.Spilled) and len(list(tmp_path.iterdir())) == 1
    changed = {"w": big["w"] + 1, "b": big["b"]}
    results = []
    for ref in (kept, spilled):
        run = ap.Record(ref)
        run.put(0, "row", changed)
        results.append(run.result(0, "row"))
    assert results[0] == results[1] and results[0]["w"][0] == 1.0 and results[0]["b"] == (0.0, 0.0)
