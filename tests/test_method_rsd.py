"""RSD: the loss against direct loops, the projector, options, gradients, and a short cached run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods import METHODS, Needs, TeacherInfo, TeacherTargets, build_options, resolve_method
from kdcache.methods.rsd import RSD, cross_correlation, rsd_loss, standardise
from kdcache.models import ModelInfo, ModelOutputs
from method_checks import assert_gradients_reach_only_trainables, assert_trains_on_real_student

B, C, D_S, D_T = 6, 5, 4, 3


def _reference(s: list[list[float]], t: list[list[float]], kappa: float, eps: float = 1e-5) -> tuple[float, float]:
    """(sum_i (C_ii - 1)^2, sum_{i != j} C_ij^2) written with plain loops; returns both parts."""
    n = len(s)

    def norm(x: list[list[float]]) -> list[list[float]]:
        d = len(x[0])
        out = [[0.0] * d for _ in range(n)]
        for k in range(d):
            col = [x[b][k] for b in range(n)]
            mu = sum(col) / n
            sd = math.sqrt(sum((v - mu) ** 2 for v in col) / n)
            for b in range(n):
                out[b][k] = (col[b] - mu) / (sd + eps)
        return out

    ns, nt = norm(s), norm(t)
    d = len(s[0])
    on, off = 0.0, 0.0
    for i in range(d):
        for j in range(d):
            c = sum(nt[b][i] * ns[b][j] for b in range(n)) / n
            if i == j:
                on += (c - 1) ** 2
            else:
                off += c**2
    return on, off


def _inputs(seed: int, d: int = D_T, b: int = B):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, d, generator=g, dtype=torch.float64) * 2 + 0.5
    t = 0.7 * s + torch.randn(b, d, generator=g, dtype=torch.float64)  # correlated, not identical
    return s, t


def _infos(d_s: int = D_S, d_t: int = D_T):
    student = ModelInfo("s", "cnn", 32, C, d_s, ((4, 8, 8), (8, 4, 4), (16, 2, 2), (d_s, 1, 1)))
    teacher = TeacherInfo("t", "cnn", C, d_t, 32)
    return student, teacher


def _method(**overrides) -> RSD:
    student, teacher = _infos()
    return RSD(build_options(RSD, overrides), student, teacher)


def _batch(seed: int, b: int = B):
    g = torch.Generator().manual_seed(seed)
    out = ModelOutputs(torch.randn(b, C, generator=g), torch.randn(b, D_S, generator=g))
    targets = TeacherTargets(logits=torch.randn(b, C, generator=g), embed=torch.randn(b, D_T, generator=g))
    return out, targets, torch.randint(0, C, (b,), generator=g)


@pytest.mark.parametrize("kappa", [0.01, 0.0, 1.0])
def test_loss_matches_direct_loops(kappa):
    s, t = _inputs(0)
    on, off = _reference(s.tolist(), t.tolist(), kappa)
    assert rsd_loss(s, t, kappa).item() == pytest.approx(on + kappa * off, rel=1e-10, abs=1e-12)
    # fp32 inputs give the same value to fp32 precision
    assert rsd_loss(s.float(), t.float(), kappa).item() == pytest.approx(on + kappa * off, rel=1e-5)


def test_cross_correlation_matches_einsum():
    s, t = _inputs(1, d=4)
    zs = (s - s.mean(0)) / (s.var(0, unbiased=False).sqrt() + 1e-5)
    zt = (t - t.mean(0)) / (t.var(0, unbiased=False).sqrt() + 1e-5)
    ref = torch.einsum("bi,bj->ij", zt, zs) / s.shape[0]
    assert torch.allclose(cross_correlation(s, t), ref, rtol=1e-12, atol=1e-12)
    # rows are teacher dimensions, columns student dimensions
    assert torch.allclose(cross_correlation(t, s), ref.T, rtol=1e-12, atol=1e-12)
    assert torch.allclose(standardise(s), zs)


def test_kappa_zero_drops_off_diagonal_and_is_linear_in_kappa():
    s, t = _inputs(2)
    on, off = _reference(s.tolist(), t.tolist(), 0.0)
    assert off > 1e-3  # the inputs do have off-diagonal correlation
    assert rsd_loss(s, t, 0.0).item() == pytest.approx(on, rel=1e-10)
    l0, l1, l3 = (rsd_loss(s, t, k).item() for k in (0.0, 1.0, 3.0))
    assert l3 - l0 == pytest.approx(3 * (l1 - l0), rel=1e-9)


def test_zero_for_identical_features_without_decorrelation():
    s, _ = _inputs(3)
    assert abs(rsd_loss(s, s.clone(), 0.0).item()) < 1e-6  # C_ii = var / (std + eps)^2 ~ 1
    # a per-dimension positive affine map of either side changes nothing (batch standardisation;
    # exactly so when eps is negligible against the stds)
    s2, t2 = _inputs(4)
    a, b = torch.tensor([0.5, 3.0, 7.0], dtype=torch.float64), torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64)
    base = rsd_loss(s2, t2, 0.0, eps=1e-12).item()
    assert rsd_loss(a * s2 + b, t2, 0.0, eps=1e-12).item() == pytest.approx(base, rel=1e-9)
    assert rsd_loss(s2, a * t2 + b, 0.0, eps=1e-12).item() == pytest.approx(base, rel=1e-9)
    # a negative scale flips the sign of that dimension's correlations
    assert rsd_loss(-s2, t2, 0.0, eps=1e-12).item() > base


def test_projector_shapes_and_init():
    m = _method()
    layers = list(m.projector)
    assert [type(x) for x in layers] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear]
    assert layers[0].in_features == D_S and layers[0].out_features == 2 * D_S and layers[0].bias is None
    assert layers[1].num_features == 2 * D_S
    assert layers[3].in_features == 2 * D_S and layers[3].out_features == D_T and layers[3].bias is None
    big = RSD(RSD.Options(), *_infos(64, 48)).projector  # init: normal std 0.02 (truncated at +-2, absolute)
    for w in (big[0].weight, big[3].weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.1) and abs(w.mean().item()) < 2e-3
    assert torch.equal(layers[1].weight, torch.ones(2 * D_S)) and torch.equal(layers[1].bias, torch.zeros(2 * D_S))
    wide = _method(gamma=4)
    assert wide.projector[0].out_features == 4 * D_S and wide.projector[1].num_features == 4 * D_S


def test_forward_is_ce_plus_weighted_loss_on_projected_student():
    out, targets, y = _batch(5)
    m = _method(w_rsd=0.3, kappa=0.2, label_smoothing=0.2, w_gt=0.5)
    losses = m(out, targets, y, epoch=0, step=0, total_epochs=1)
    assert set(losses) == {"loss_ce", "loss_rsd"}
    s = m.projector(out.embed).detach().double()  # train-mode BN: the same batch statistics
    on, off = _reference(s.tolist(), targets.embed.double().tolist(), 0.2)
    assert losses["loss_rsd"].item() == pytest.approx(0.3 * (on + 0.2 * off), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(out.logits, y, label_smoothing=0.2)
    assert losses["loss_ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-6)
    # the projected feature is not the raw one: the projector is really used
    assert s.shape == (B, D_T)


def test_defaults_needs_and_registry():
    o = _method().opts
    assert (o.gamma, o.kappa, o.w_rsd, o.w_gt, o.eps, o.label_smoothing) == (2, 0.01, 0.1, 1.0, 1e-5, 0.1)
    assert METHODS.get("rsd") is RSD
    assert RSD.needs(o) == Needs(embed=True) and not RSD.needs(o).logits
    cls, opts = resolve_method("rsd", ["kappa=0", "gamma=3", "w_rsd=1"])
    assert cls is RSD and (opts.kappa, opts.gamma, opts.w_rsd) == (0.0, 3, 1.0)


def test_options_change_the_result():
    out, targets, y = _batch(6)
    torch.manual_seed(0)
    base = _method()(out, targets, y, epoch=0, step=0, total_epochs=1)["loss_rsd"].item()
    torch.manual_seed(0)
    doubled = _method(w_rsd=0.2)(out, targets, y, epoch=0, step=0, total_epochs=1)["loss_rsd"].item()
    assert doubled == pytest.approx(2 * base, rel=1e-6)
    torch.manual_seed(0)
    m0 = _method(kappa=0.0)
    got = m0(out, targets, y, epoch=0, step=0, total_epochs=1)["loss_rsd"].item()
    s = m0.projector(out.embed).detach().double()
    on, _ = _reference(s.tolist(), targets.embed.double().tolist(), 0.0)
    assert got == pytest.approx(0.1 * on, rel=1e-5) and got < base


def test_gradients_reach_projector_and_student_not_teacher():
    out, targets, y = _batch(7)
    logits, embed = out.logits.requires_grad_(True), out.embed.requires_grad_(True)
    targets.embed.requires_grad_(True)
    targets.logits.requires_grad_(True)
    m = _method()
    losses = m(ModelOutputs(logits, embed), targets, y, epoch=0, step=0, total_epochs=1)
    (g,) = torch.autograd.grad(losses["loss_rsd"], embed, retain_graph=True)
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # the RSD term alone reaches the student
    assert_gradients_reach_only_trainables(m, losses, [logits, embed], targets)


def test_batch_of_one_gives_zero_rsd():
    out, targets, y = _batch(8, b=1)
    losses = _method()(out, targets, y, epoch=0, step=0, total_epochs=1)
    assert losses["loss_rsd"].item() == 0.0 and torch.isfinite(losses["loss_ce"])


def test_fp16_teacher_embedding():
    out, targets, y = _batch(9)
    targets.embed = targets.embed.half()
    losses = _method()(out, targets, y, epoch=0, step=0, total_epochs=1)
    assert losses["loss_rsd"].dtype == torch.float32 and torch.isfinite(losses["loss_rsd"])


def test_errors():
    student, teacher = _infos()
    with pytest.raises(KDCacheError, match="none was described"):
        RSD(RSD.Options(), student, None)
    for bad in ({"gamma": 0}, {"kappa": -1.0}, {"eps": 0.0}):
        with pytest.raises(KDCacheError):
            _method(**bad)
    out, targets, y = _batch(10)
    with pytest.raises(KDCacheError, match="embedding"):
        _method()(out, TeacherTargets(logits=targets.logits), y, epoch=0, step=0, total_epochs=1)
    with pytest.raises(KDCacheError, match="does not match"):
        _method()(out, TeacherTargets(embed=torch.randn(B, D_T + 1)), y, epoch=0, step=0, total_epochs=1)


@pytest.mark.parametrize("alias", ["resnet10t", "deit_pico"])
def test_trains_on_real_student(alias):
    g = torch.Generator().manual_seed(11)
    targets = TeacherTargets(logits=torch.randn(4, 10, generator=g), embed=torch.randn(4, 24, generator=g))
    teacher = TeacherInfo("t", "cnn", 10, 24, 32)
    assert_trains_on_real_student(lambda info: RSD(RSD.Options(), info, teacher), alias, targets, n_losses=2)


def test_cached_run_from_store(synth_pipeline):
    """Three steps of rsd from the synthetic resnet10t store: the run completes, terms are finite."""
    from kdcache.train import TrainConfig, run_train

    root, _ = synth_pipeline
    result = run_train(TrainConfig(student="deit_pico", teacher="resnet10t", method="rsd", dataset="synthetic",
                                   epochs=1, batch_size=64, optimizer="sgd", lr=0.02, max_steps=3,
                                   store_root=str(root / "cache"), out_dir=str(root / "runs"), run_name="rsd-e2e",
                                   results=None, progress=False, device="cpu"))
    assert result.steps == 3 and result.method == "rsd" and result.mode == "cached"
    row = torch.load(result.checkpoint, weights_only=False)["history"][-1]
    assert {"loss_ce", "loss_rsd"} <= set(row)
    assert all(math.isfinite(row[k]) for k in ("loss_ce", "loss_rsd")) and row["loss_rsd"] > 0
