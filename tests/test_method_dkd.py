"""DKD: each term against a direct per-sample computation, the KD decomposition, masking, warm-up."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.methods import METHODS, TeacherTargets, build_options
from kdcache.methods.dkd import DKD, nckd_loss, tckd_loss, warmup_factor
from kdcache.methods.functional import kl_div
from kdcache.models import ModelInfo, ModelOutputs

B, C = 6, 10


def _softmax(row: list[float], T: float) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _reference(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, T: float) -> tuple[float, float]:
    """TCKD and NCKD (batch means, no T^2) with explicit loops over samples and classes."""
    tckd = nckd = 0.0
    for b in range(z_s.shape[0]):
        ps, pt = _softmax(z_s[b].tolist(), T), _softmax(z_t[b].tolist(), T)
        k = int(y[b])
        bs, bt = ps[k], pt[k]
        tckd += bt * math.log(bt / bs) + (1 - bt) * math.log((1 - bt) / (1 - bs))
        for c in range(len(ps)):
            if c != k:
                qs, qt = ps[c] / (1 - bs), pt[c] / (1 - bt)
                nckd += qt * math.log(qt / qs)
    n = z_s.shape[0]
    return tckd / n, nckd / n


def _inputs(seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    z_t = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (B,), generator=g)
    return z_s, z_t, y


def _method(**overrides) -> DKD:
    info = ModelInfo("s", "cnn", 32, C, 8, ((4, 8, 8), (8, 4, 4), (16, 2, 2), (32, 1, 1)))
    return DKD(build_options(DKD, overrides), info, None)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_terms_match_direct_loops(T):
    z_s, z_t, y = _inputs(1)
    ref_t, ref_n = _reference(z_s, z_t, y, T)
    assert tckd_loss(z_s, z_t, y, T).item() == pytest.approx(ref_t, rel=1e-5, abs=1e-7)
    assert nckd_loss(z_s, z_t, y, T).item() == pytest.approx(ref_n, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_decomposes_into_tckd_and_weighted_nckd(T):
    # KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD, per sample; check the batch means.
    z_s, z_t, y = _inputs(2)
    p_t_target = torch.softmax(z_t.float() / T, 1).gather(1, y[:, None]).squeeze(1)
    kd = kl_div(z_t, z_s, T)
    parts = []
    for b in range(B):
        sl = slice(b, b + 1)
        parts.append(tckd_loss(z_s[sl], z_t[sl], y[sl], T) + (1 - p_t_target[b]) * nckd_loss(z_s[sl], z_t[sl], y[sl], T))
    assert torch.stack(parts).mean().item() == pytest.approx(kd.item(), rel=1e-5)


def test_method_equals_kd_when_teacher_gives_target_no_mass():
    # alpha = beta = 1, T = 1 and a teacher with p_t[y] -> 0 for every row: DKD's KD part = KD.
    z_s, z_t, y = _inputs(3)
    z_t = z_t.clone()
    z_t[torch.arange(B), y] = -60.0
    m = _method(alpha=1.0, beta=1.0)
    out = m(ModelOutputs(z_s.float(), torch.zeros(B, 8)), TeacherTargets(logits=z_t.float()), y,
            epoch=0, step=0, total_epochs=1)
    assert (out["loss_tckd"] + out["loss_nckd"]).item() == pytest.approx(kl_div(z_t, z_s).item(), rel=1e-4)


def test_masking_removes_the_target_class():
    z_s, z_t, y = _inputs(4)
    base = nckd_loss(z_s, z_t, y, 2.0)
    rows = torch.arange(B)
    for delta in (-20.0, 5.0, 30.0):
        zs2, zt2 = z_s.clone(), z_t.clone()
        zs2[rows, y] += delta
        zt2[rows, y] -= delta
        assert nckd_loss(zs2, zt2, y, 2.0).item() == pytest.approx(base.item(), rel=1e-6)
    # ... while changing a non-target logit does change it
    other = (y + 1) % C
    zs3 = z_s.clone()
    zs3[rows, other] += 5.0
    assert abs(nckd_loss(zs3, z_t, y, 2.0).item() - base.item()) > 1e-3
    # and the student gets no gradient on its target logit from NCKD
    zs4 = z_s.clone().requires_grad_(True)
    nckd_loss(zs4, z_t, y, 2.0).backward()
    assert zs4.grad[rows, y].abs().max().item() < 1e-12
    assert zs4.grad.abs().sum().item() > 0


def test_tckd_stays_finite_for_a_confident_student():
    z_s, z_t, y = _inputs(5)
    z_s = z_s.float()
    z_s[torch.arange(B), y] = 200.0  # p_s[y] rounds to 1 in fp32
    loss = tckd_loss(z_s, z_t.float(), y)
    assert torch.isfinite(loss) and loss.item() > 1.0


def test_warmup_scales_kd_terms_linearly():
    z_s, z_t, y = _inputs(6)
    s, t = ModelOutputs(z_s.float(), torch.zeros(B, 8)), TeacherTargets(logits=z_t.float())
    full = _method()(s, t, y, epoch=0, step=0, total_epochs=30)
    m = _method(warmup_epochs=20.0)
    for epoch, factor in [(0, 1 / 20), (9, 0.5), (19, 1.0), (25, 1.0)]:
        assert warmup_factor(epoch, 20.0) == pytest.approx(factor)
        out = m(s, t, y, epoch=epoch, step=0, total_epochs=30)
        assert out["loss_ce"].item() == pytest.approx(full["loss_ce"].item())
        for k in ("loss_tckd", "loss_nckd"):
            assert out[k].item() == pytest.approx(factor * full[k].item(), rel=1e-6)
    assert warmup_factor(0, 0.0) == 1.0


def test_forward_weights_and_presets():
    z_s, z_t, y = _inputs(7)
    s, t = ModelOutputs(z_s.float(), torch.zeros(B, 8)), TeacherTargets(logits=z_t.float())
    m = _method(**DKD.PRESETS["mdistiller"])
    assert (m.opts.alpha, m.opts.beta, m.opts.T, m.opts.warmup_epochs) == (1.0, 8.0, 4.0, 20.0)
    out = m(s, t, y, epoch=39, step=0, total_epochs=240)
    ref_t, ref_n = _reference(z_s, z_t, y, 4.0)
    assert set(out) == {"loss_ce", "loss_tckd", "loss_nckd"}
    assert out["loss_tckd"].item() == pytest.approx(16 * 1.0 * ref_t, rel=1e-5)
    assert out["loss_nckd"].item() == pytest.approx(16 * 8.0 * ref_n, rel=1e-5)
    default = _method().opts
    assert (default.alpha, default.beta, default.T, default.warmup_epochs) == (1.0, 2.0, 1.0, 0.0)
    assert METHODS.get("dkd") is DKD and DKD.needs(default).logits and not DKD.needs(default).stages


def test_gradients_reach_student_not_teacher():
    z_s, z_t, y = _inputs(8)
    zs = z_s.float().requires_grad_(True)
    zt = z_t.float().requires_grad_(True)
    out = _method()(ModelOutputs(zs, torch.zeros(B, 8)), TeacherTargets(logits=zt), y,
                    epoch=0, step=0, total_epochs=1)
    sum(out.values()).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and torch.isfinite(zs.grad).all()
    assert zt.grad is None


def test_method_presets_from_the_command_line_syntax():
    """`--method dkd:mdistiller` applies the preset; --opt overrides it, even back to a default."""
    from kdcache.errors import KDCacheError
    from kdcache.methods import resolve_method

    cls, opts = resolve_method("dkd:mdistiller")
    assert cls.name == "dkd" and (opts.beta, opts.T, opts.warmup_epochs) == (8.0, 4.0, 20.0)
    _, opts = resolve_method("dkd:mdistiller", ["T=1"])
    assert (opts.beta, opts.T) == (8.0, 1.0)
    _, opts = resolve_method("dkd", ["beta=3"])
    assert (opts.beta, opts.T) == (3.0, 1.0)
    with pytest.raises(KDCacheError, match="no preset 'paper'"):
        resolve_method("dkd:paper")
