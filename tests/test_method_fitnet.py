"""FitNet: regressor sizes, resize onto the cached grid, MSE against direct loops, gradients, needs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcache.errors import KDCacheError
from kdcache.methods import METHODS, TeacherInfo, TeacherTargets, build_options
from kdcache.methods.fitnet import FitNet
from kdcache.methods.functional import kl_div, resize_to
from kdcache.models import ModelInfo, ModelOutputs

B, C = 3, 5
S_SHAPES = ((4, 16, 16), (6, 8, 8), (8, 4, 4), (10, 2, 2))  # CNN student at 32 input
T_SHAPES = ((12, 8, 8), (12, 8, 8), (12, 8, 8), (12, 8, 8))  # token teacher: one 8x8 grid


def _method(t_shapes=T_SHAPES, **overrides) -> FitNet:
    s = ModelInfo("s", "cnn", 32, C, 10, S_SHAPES)
    t = TeacherInfo("t", "vit", C, 12, 32, t_shapes)
    return FitNet(build_options(FitNet, overrides), s, t)


def _student(seed: int = 0, grad: bool = False) -> ModelOutputs:
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(B, *shape, generator=g).requires_grad_(grad) for shape in S_SHAPES]
    return ModelOutputs(torch.randn(B, C, generator=g).requires_grad_(grad), torch.zeros(B, 10), maps)


def _teacher(grids: dict[int, int], seed: int = 1, grad: bool = False) -> TeacherTargets:
    g = torch.Generator().manual_seed(seed)
    stages = {k: torch.randn(B, 12, n, n, generator=g).requires_grad_(grad) for k, n in grids.items()}
    return TeacherTargets(logits=torch.randn(B, C, generator=g).requires_grad_(grad), stages=stages)


def _call(m, s, t, labels=None):
    labels = torch.zeros(B, dtype=torch.long) if labels is None else labels
    return m(s, t, labels, epoch=0, step=0, total_epochs=1)


def _reference_hint(conv: torch.nn.Conv2d, fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Conv first, then average onto ft's grid, then MSE, all with explicit loops."""
    w, bias = conv.weight[:, :, 0, 0].detach().double(), conv.bias.detach().double()
    fs, ft = fs.detach().double(), ft.detach().double()
    (b_, _, hs, ws), (_, ct, ht, wt) = fs.shape, ft.shape
    kh, kw = hs // ht, ws // wt
    total = 0.0
    for b in range(b_):
        for o in range(ct):
            for i in range(ht):
                for j in range(wt):
                    acc = 0.0
                    for di in range(kh):
                        for dj in range(kw):
                            pix = fs[b, :, i * kh + di, j * kw + dj]
                            acc += float((w[o] * pix).sum() + bias[o])
                    total += (acc / (kh * kw) - float(ft[b, o, i, j])) ** 2
    return total / (b_ * ct * ht * wt)


def test_regressors_sized_from_shapes():
    m = _method(stages=(1, 2, 3, 4))
    for s in (1, 2, 3, 4):
        conv = m.regressors[str(s)]
        assert conv.in_channels == S_SHAPES[s - 1][0] and conv.out_channels == 12 and conv.kernel_size == (1, 1)
    assert set(_method().regressors) == {"3"}


def test_hint_matches_direct_loops_on_a_pooled_grid():
    m = _method(stages=(1, 2))
    with torch.no_grad():
        for conv in m.regressors.values():
            conv.bias.normal_()
    s, t = _student(), _teacher({1: 4, 2: 2})  # cache pooled stage 1 to 4x4, stage 2 to 2x2
    out = _call(m, s, t)
    assert set(out) == {"loss_ce", "loss_hint_stage1", "loss_hint_stage2"}
    for k in (1, 2):
        ref = _reference_hint(m.regressors[str(k)], s.stages[k - 1], t.stages[k])
        assert out[f"loss_hint_stage{k}"].item() == pytest.approx(ref, rel=1e-5)


def test_upsamples_when_the_teacher_grid_is_finer():
    m = _method(stages=(4,))  # student 2x2, teacher 8x8
    out = _call(m, _student(), _teacher({4: 8}))
    assert torch.isfinite(out["loss_hint_stage4"])
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(resize_to(x, (8, 8), "pool"), F.interpolate(x, size=(8, 8), mode="bilinear"))
    assert torch.equal(resize_to(x, (2, 2)), x)


def test_resize_before_conv_equals_conv_before_resize():
    conv = torch.nn.Conv2d(4, 6, 1)
    x = torch.randn(2, 4, 12, 12)
    for size, mode in [((4, 4), "pool"), ((3, 5), "pool"), ((5, 5), "bilinear"), ((20, 20), "pool")]:
        torch.testing.assert_close(conv(resize_to(x, size, mode)), resize_to(conv(x), size, mode),
                                   rtol=1e-5, atol=1e-5)


def test_zero_when_regressed_student_equals_teacher():
    m = _method(stages=(2, 3), w_hint=7.0)
    s = _student()
    with torch.no_grad():
        t = TeacherTargets(stages={k: m.regress(k, s.stages[k - 1], (2, 2)) for k in (2, 3)})
    out = _call(m, s, t)
    assert out["loss_hint_stage2"].item() == pytest.approx(0.0, abs=1e-10)
    assert out["loss_hint_stage3"].item() == pytest.approx(0.0, abs=1e-10)


def test_gradients_reach_regressor_and_student_not_teacher():
    m = _method(stages=(1, 3), w_kd=1.0)
    s, t = _student(grad=True), _teacher({1: 4, 3: 4}, grad=True)
    out = _call(m, s, t)
    assert set(out) == {"loss_ce", "loss_hint_stage1", "loss_hint_stage3", "loss_kd"}
    sum(out.values()).backward()
    for k in ("1", "3"):
        assert m.regressors[k].weight.grad.abs().sum() > 0 and m.regressors[k].bias.grad.abs().sum() > 0
    for k in (1, 3):
        assert s.stages[k - 1].grad.abs().sum() > 0
    assert s.stages[1].grad is None and s.stages[3].grad is None  # stages without a hint
    assert s.logits.grad.abs().sum() > 0
    assert t.logits.grad is None and all(v.grad is None for v in t.stages.values())


def test_optional_kd_and_weights():
    s, t = _student(), _teacher({3: 4})
    labels = torch.tensor([0, 3, 1])
    plain = _call(_method(), s, t, labels)
    assert "loss_kd" not in plain
    m0, m = _method(), _method(w_kd=0.5, T=2.0, w_hint=3.0, w_gt=0.1)
    m.regressors.load_state_dict(m0.regressors.state_dict())
    base, out = _call(m0, s, t, labels), _call(m, s, t, labels)
    assert out["loss_kd"].item() == pytest.approx(0.5 * 4 * kl_div(t.logits, s.logits, 2.0).item(), rel=1e-6)
    assert out["loss_hint_stage3"].item() == pytest.approx(3.0 * base["loss_hint_stage3"].item(), rel=1e-6)
    assert out["loss_ce"].item() == pytest.approx(0.1 * base["loss_ce"].item(), rel=1e-6)


def test_needs_defaults_and_presets():
    opts = build_options(FitNet)
    assert (opts.stages, opts.w_hint, opts.w_gt, opts.w_kd) == ((3,), 1.0, 1.0, 0.0)
    n = FitNet.needs(opts)
    assert n.stages == (3,) and n.student_stages and not n.logits and n.teacher
    n = FitNet.needs(build_options(FitNet, ["stages=1,2", "w_kd=1"]))
    assert n.stages == (1, 2) and n.logits
    assert build_options(FitNet, FitNet.PRESETS["ofa"]).stages == (1, 2, 3, 4)
    assert METHODS.get("fitnet") is FitNet


def test_user_mistakes_are_reported():
    with pytest.raises(KDCacheError, match="stages"):
        _method(stages=(5,))
    with pytest.raises(KDCacheError, match="resize"):
        _method(resize="nearest")
    with pytest.raises(KDCacheError, match="stage shapes"):
        _method(t_shapes=())
    with pytest.raises(KDCacheError, match="stage-3"):
        _call(_method(), _student(), _teacher({1: 4}))
    with pytest.raises(KDCacheError, match="does not match"):
        t = _teacher({3: 4})
        t.stages[3] = t.stages[3][:, :7]
        _call(_method(), _student(), t)
