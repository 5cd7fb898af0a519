"""HCD: each loss against explicit loops, orthogonality edge cases, the [decide] options, gradients, real students."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods import METHODS, TeacherInfo, TeacherTargets, build_options
from kdcache.methods.hcd import (HCD, fuse_sub_logits, orthogonality_loss, sub_logit_ce, sub_logit_kl)
from kdcache.models import ModelInfo, ModelOutputs
from method_checks import assert_gradients_reach_only_trainables, assert_trains_on_real_student

B, C, K, DT = 5, 6, 4, 12
CNN = ModelInfo("cnn_s", "cnn", 32, C, 8, ((4, 8, 8), (8, 4, 4), (8, 2, 2), (8, 1, 1)))
TOK = ModelInfo("vit_s", "vit", 32, C, 16, ((16, 4, 4),) * 4)
TEACHER = TeacherInfo("t", "swin", C, DT, 32, ((3, 16, 16), (6, 8, 8), (9, 4, 4), (12, 2, 2)))
SWIN_PICO = TeacherInfo(alias="swin_pico", family="swin", num_classes=10, embed_dim=384, input_size=32,
                        stage_shapes=((48, 16, 16), (96, 8, 8), (192, 4, 4), (384, 2, 2)))


def _log_softmax(row: list[float], T: float = 1.0) -> list[float]:
    r = [v / T for v in row]
    lse = math.log(sum(math.exp(v) for v in r))
    return [v - lse for v in r]


def _ce_ls(row: list[float], y: int, ls: float = 0.1) -> float:
    lp = _log_softmax(row)
    return -(1 - ls) * lp[y] - ls * sum(lp) / len(lp)


def _kl(t_row: list[float], s_row: list[float], T: float) -> float:
    lt, ls_ = _log_softmax(t_row, T), _log_softmax(s_row, T)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls_))


def _ortho(fused: torch.Tensor, y: torch.Tensor, margin: float = 0.5) -> float:
    total, n = 0.0, 0
    for b in range(fused.shape[0]):
        vecs = []
        for j in range(fused.shape[1]):
            v = [0.0 if c == int(y[b]) else x for c, x in enumerate(fused[b, j].tolist())]
            norm = math.sqrt(sum(x * x for x in v))
            vecs.append([x / norm for x in v])
        for i in range(len(vecs)):
            for j in range(len(vecs)):
                if i != j:
                    cos = sum(a * b for a, b in zip(vecs[i], vecs[j]))
                    total += max(cos - margin, 0.0) ** 2
                    n += 1
    return total / n


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(B, K, C, generator=g, dtype=torch.float64) * 2
    z_s = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (B,), generator=g)
    return fused, z_s, y


def _stages(info: ModelInfo, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *shape, generator=g, requires_grad=True) for shape in info.stage_shapes]


def _teacher(seed: int = 1, grad: bool = False) -> TeacherTargets:
    g = torch.Generator().manual_seed(seed)
    return TeacherTargets(logits=(torch.randn(B, C, generator=g) * 2).requires_grad_(grad),
                          embed=torch.randn(B, DT, generator=g).requires_grad_(grad))


def _run(m: HCD, stages, z_s, t: TeacherTargets, y):
    return m(ModelOutputs(z_s, torch.zeros(B, 8), stages), t, y, epoch=0, step=0, total_epochs=1)


def test_sub_logit_ce_and_kl_match_explicit_loops():
    fused, z_s, y = _inputs(1)
    ref_ce = sum(_ce_ls(fused[b, j].tolist(), int(y[b])) for b in range(B) for j in range(K)) / (B * K)
    assert sub_logit_ce(fused, y).item() == pytest.approx(ref_ce, rel=1e-5)
    for T in (1.0, 3.0):
        ref_kl = T * T * sum(_kl(fused[b, j].tolist(), z_s[b].tolist(), T) for b in range(B) for j in range(K)) / (B * K)
        assert sub_logit_kl(fused, z_s, T).item() == pytest.approx(ref_kl, rel=1e-5)


def test_orthogonality_matches_explicit_loops():
    fused, _, y = _inputs(2)
    fused = fused + 3 * fused[:, :1]  # make some pairs exceed the 0.5 margin
    ref = _ortho(fused, y)
    assert ref > 0 and orthogonality_loss(fused, y).item() == pytest.approx(ref, rel=1e-5)


def test_orthogonality_is_zero_for_orthogonal_and_positive_for_parallel_sub_logits():
    y = torch.tensor([0, 5])
    fused = torch.zeros(2, 4, 8)
    for b in range(2):
        cols = [c for c in range(8) if c != int(y[b])]
        for j in range(4):  # disjoint supports outside the GT column
            fused[b, j, cols[j]] = float(j + 1)
            fused[b, j, int(y[b])] = 100.0 * (j + 1)  # the GT column is zeroed before the cosines
    assert orthogonality_loss(fused, y).item() == 0.0
    parallel = torch.randn(1, 1, 8).expand(2, 4, 8) * torch.tensor([1.0, 2.0, 3.0, 0.5])[None, :, None]
    assert orthogonality_loss(parallel, y).item() == pytest.approx(0.25, rel=1e-5)  # (cos 1 - 0.5)^2


def test_fusion_adds_constant_teacher_logits():
    u = torch.randn(B, K * C)
    z_t = torch.randn(B, C, requires_grad=True)
    f = fuse_sub_logits(u, z_t, K)
    for b in range(B):
        for j in range(K):
            assert torch.allclose(f[b, j], u[b, j * C:(j + 1) * C] + z_t[b])
    assert not f.requires_grad


@pytest.mark.parametrize("layers", [2, 1])
def test_mapper_layers(layers):
    m = HCD(build_options(HCD, {"mapper_layers": layers}), CNN, TEACHER)
    W = max(CNN.embed_dim, DT)
    for mapper in m.mappers.values():
        lin = [x for x in mapper.net if isinstance(x, nn.Linear)]
        if layers == 2:
            assert [(l.in_features, l.out_features) for l in lin] == [(W + DT, DT), (DT, K * C)]
            assert isinstance(mapper.net[1], nn.ReLU)
        else:
            assert [(l.in_features, l.out_features) for l in lin] == [(W + DT, K * C)]
    with pytest.raises(KDCacheError):
        HCD(build_options(HCD, {"mapper_layers": 3}), CNN, TEACHER)


def test_forward_matches_the_formula():
    torch.manual_seed(0)
    opts = build_options(HCD, {"w_gt": 0.5, "w_kd": 2.0, "w_hcd": 6.0, "w_div": 3.0, "T": 2.0})
    m = HCD(opts, CNN, TEACHER).eval()
    _, z_s, y = _inputs(3)
    z_s = z_s.float()
    t = _teacher()
    stages = _stages(CNN)
    out = _run(m, stages, z_s, t, y)
    assert set(out) == {"loss_ce", "loss_kd"} | {f"loss_{n}_stage{s}" for n in ("ce", "hcd", "div") for s in (1, 2, 3, 4)}
    assert out["loss_ce"].item() == pytest.approx(0.5 * sum(_ce_ls(z_s[b].tolist(), int(y[b])) for b in range(B)) / B, rel=1e-5)
    kd = 4.0 * sum(_kl(t.logits[b].tolist(), z_s[b].tolist(), 2.0) for b in range(B)) / B
    assert out["loss_kd"].item() == pytest.approx(2.0 * kd, rel=1e-5)
    for s in (1, 2, 3, 4):
        with torch.no_grad():  # u_i = mapper([h_i ; f_t]) written out layer by layer
            h = m.projectors[str(s)](stages[s - 1])
            net = m.mappers[str(s)].net
            u = net[2](torch.relu(net[0](torch.cat([h, t.embed], 1))))
            fused = u.reshape(B, K, C) + t.logits[:, None, :]
        ce = sum(_ce_ls(fused[b, j].tolist(), int(y[b])) for b in range(B) for j in range(K)) / (B * K)
        kl = 4.0 * sum(_kl(fused[b, j].tolist(), z_s[b].tolist(), 2.0) for b in range(B) for j in range(K)) / (B * K)
        assert out[f"loss_ce_stage{s}"].item() == pytest.approx(0.5 * ce, rel=1e-4)
        assert out[f"loss_hcd_stage{s}"].item() == pytest.approx(6.0 * kl, rel=1e-4)
        assert out[f"loss_div_stage{s}"].item() == pytest.approx(3.0 * _ortho(fused, y), rel=1e-4, abs=1e-7)


def test_stage_reduce_mean_divides_the_stage_terms():
    _, z_s, y = _inputs(4)
    stages, t = _stages(CNN), _teacher()
    torch.manual_seed(0)
    summed = _run(HCD(build_options(HCD), CNN, TEACHER).eval(), stages, z_s.float(), t, y)
    torch.manual_seed(0)
    mean = _run(HCD(build_options(HCD, ["stage_reduce=mean"]), CNN, TEACHER).eval(), stages, z_s.float(), t, y)
    for k, v in summed.items():
        f = 0.25 if "stage" in k else 1.0
        assert mean[k].item() == pytest.approx(f * v.item(), rel=1e-6)
    with pytest.raises(KDCacheError):
        HCD(build_options(HCD, ["stage_reduce=max"]), CNN, TEACHER)


def test_detach_target_stops_kl_gradient_into_the_mapper():
    _, z_s, y = _inputs(5)
    t = _teacher()
    grads = {}
    for detach in (False, True):
        torch.manual_seed(0)
        m = HCD(build_options(HCD, {"detach_target": detach}), CNN, TEACHER)
        zs = z_s.float().requires_grad_(True)
        out = _run(m, _stages(CNN), zs, t, y)
        grads[detach] = out["loss_hcd_stage2"].item()
        out["loss_hcd_stage2"].backward()
        g = [p.grad for p in m.mappers["2"].parameters()]
        assert zs.grad.abs().sum() > 0  # the student is trained by KL_i either way
        if detach:
            assert all(x is None or x.abs().sum() == 0 for x in g)
        else:
            assert all(x is not None and x.abs().sum() > 0 for x in g)
    assert grads[False] == pytest.approx(grads[True], rel=1e-6)  # same value, different gradient


def test_options_needs_and_errors():
    o = HCD.Options()
    assert (o.stages, o.k, o.T, o.w_gt, o.w_kd, o.w_hcd, o.w_div, o.mapper_layers, o.detach_target, o.stage_reduce) == \
        ((1, 2, 3, 4), 4, 1.0, 1.0, 1.0, 6.0, 1.0, 2, False, "sum")
    assert METHODS.get("hcd") is HCD
    n = HCD.needs(o)
    assert n.logits and n.embed and n.student_stages and not n.stages
    m = HCD(o, CNN, TEACHER)
    _, z_s, y = _inputs(6)
    with pytest.raises(KDCacheError):
        _run(m, _stages(CNN), z_s.float(), TeacherTargets(logits=torch.randn(B, C)), y)


@pytest.mark.parametrize("info", [CNN, TOK], ids=["cnn", "token"])
def test_gradients_reach_projectors_mappers_and_student_not_teacher(info):
    torch.manual_seed(0)
    m = HCD(build_options(HCD), info, TEACHER)
    _, z_s, y = _inputs(7)
    zs = z_s.float().requires_grad_(True)
    t = _teacher(grad=True)
    stages = _stages(info)
    out = _run(m, stages, zs, t, y)
    assert_gradients_reach_only_trainables(m, out, stages + [zs], t)


@pytest.mark.parametrize("alias", ["resnet18_32", "deit_pico"])
def test_real_students_give_finite_losses(alias):
    t = TeacherTargets(logits=torch.randn(4, 10), embed=torch.randn(4, 384))
    assert_trains_on_real_student(lambda info: HCD(build_options(HCD), info, SWIN_PICO), alias, t, n_losses=14)
