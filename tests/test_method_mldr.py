"""MLDR-KD: DFRA against explicit loops, relation shapes, the zero case, MSDF fusion, gradients, real students."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods import METHODS, TeacherInfo, TeacherTargets, build_options
from kdcache.methods.mldr import (MLDR, class_relation, dfra_loss, dfra_terms, fuse_stage_logits,
                                  sample_relation)
from kdcache.models import ModelInfo, ModelOutputs
from method_checks import assert_gradients_reach_only_trainables, assert_trains_on_real_student

B, C = 5, 6
CNN = ModelInfo("cnn_s", "cnn", 32, C, 32, ((4, 8, 8), (8, 4, 4), (16, 2, 2), (32, 1, 1)))
TOK = ModelInfo("vit_s", "vit", 32, C, 16, ((16, 4, 4),) * 4)
TEACHER = TeacherInfo("t", "swin", C, 48, 32, ((6, 16, 16), (12, 8, 8), (24, 4, 4), (48, 2, 2)))
SWIN_PICO = TeacherInfo(alias="swin_pico", family="swin", num_classes=10, embed_dim=384, input_size=32,
                        stage_shapes=((48, 16, 16), (96, 8, 8), (192, 4, 4), (384, 2, 2)))


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _reference(z: torch.Tensor, z_t: torch.Tensor, T: float) -> tuple[float, float, float]:
    """(L_cls, L_smp, L_prob) with explicit loops over samples, classes and relation rows."""
    s = [[v / T for v in r] for r in z.tolist()]
    t = [[v / T for v in r] for r in z_t.tolist()]
    nb, nc = len(s), len(s[0])
    scale = nc ** -0.5
    l_cls = 0.0
    for b in range(nb):
        for i in range(nc):
            rs = [s[b][i] * s[b][j] * scale for j in range(nc)]
            rt = [t[b][i] * t[b][j] * scale for j in range(nc)]
            l_cls += _kl(_softmax(rt), _softmax(rs))
    l_smp = 0.0
    for c in range(nc):
        for i in range(nb):
            rs = [s[i][c] * s[j][c] * scale for j in range(nb)]
            rt = [t[i][c] * t[j][c] * scale for j in range(nb)]
            l_smp += _kl(_softmax(rt), _softmax(rs))
    l_prob = sum(_kl(_softmax(t[b]), _softmax(s[b])) for b in range(nb)) / nb
    return l_cls / (nb * nc), l_smp / (nc * nb), l_prob


def _inputs(seed: int, b: int = B, c: int = C):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=torch.float64) * 2, torch.randn(b, c, generator=g, dtype=torch.float64) * 2


def _stages(info: ModelInfo, b: int = B, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *shape, generator=g, requires_grad=True) for shape in info.stage_shapes]


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_dfra_terms_match_explicit_loops(T):
    z, z_t = _inputs(1)
    ref = _reference(z, z_t, T)
    got = dfra_terms(z, z_t, T)
    for g, r in zip(got, ref):
        assert g.item() == pytest.approx(r, rel=1e-5, abs=1e-8)
    assert dfra_loss(z, z_t, T, alpha=2.0).item() == pytest.approx(ref[0] + ref[1] + 2 * ref[2], rel=1e-5)
    assert dfra_loss(z, z_t, T, alpha=0.5).item() == pytest.approx(ref[0] + ref[1] + 0.5 * ref[2], rel=1e-5)


@pytest.mark.parametrize("b,c", [(3, 5), (7, 4)])
def test_relation_shapes_follow_batch_and_classes(b, c):
    s = torch.randn(b, c)
    rc, rs = class_relation(s), sample_relation(s)
    assert rc.shape == (b, c, c) and rs.shape == (c, b, b)
    # entries: s_bi s_bj / sqrt(C) for the class relation, s_ic s_jc / sqrt(C) (still C) for the sample one
    assert rc[1, 2, 3].item() == pytest.approx(s[1, 2].item() * s[1, 3].item() / math.sqrt(c), rel=1e-5)
    assert rs[2, 0, b - 1].item() == pytest.approx(s[0, 2].item() * s[b - 1, 2].item() / math.sqrt(c), rel=1e-5)


def test_relation_loss_is_zero_when_student_equals_teacher():
    z, _ = _inputs(2)
    for term in dfra_terms(z, z.clone()):
        assert abs(term.item()) < 1e-7
    z2, z_t = _inputs(3)
    assert all(t.item() > 1e-4 for t in dfra_terms(z2, z_t))


def test_sample_relation_couples_the_batch():
    # the batch's DFRA is not the mean of per-sample DFRAs: the sample relation sees the whole batch
    z, z_t = _inputs(4)
    whole = dfra_terms(z, z_t)[1].item()
    singles = sum(dfra_terms(z[b:b + 1], z_t[b:b + 1])[1].item() for b in range(B)) / B
    assert singles == pytest.approx(0.0, abs=1e-9) and whole > 1e-4


def test_fusion_matches_explicit_softmax_over_stages():
    g = torch.Generator().manual_seed(5)
    S = 3
    z, gate = torch.randn(B, S, C, generator=g), torch.randn(B, S, C, generator=g)
    fused, w = fuse_stage_logits(z, gate)
    assert w.shape == (B, S, C) and torch.allclose(w.sum(1), torch.ones(B, C))
    for b in range(B):
        for c in range(C):
            e = [math.exp(gate[b, i, c].item()) for i in range(S)]
            ref = sum(e[i] / sum(e) * z[b, i, c].item() for i in range(S))
            assert fused[b, c].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    fused_eq, _ = fuse_stage_logits(z, torch.zeros(B, S, C))  # equal gates: the plain mean
    assert torch.allclose(fused_eq, z.mean(1), atol=1e-6)


@pytest.mark.parametrize("info,width", [(CNN, 48), (TOK, 16)], ids=["cnn", "token"])
def test_modules_are_sized_from_shapes(info, width):
    m = MLDR(build_options(MLDR), info, TEACHER)
    assert sorted(m.projectors) == ["1", "2", "3", "4"]
    assert all(p.out_dim == width for p in m.projectors.values())
    assert all(h.in_features == width and h.out_features == C for h in m.heads.values())
    lin = [x for x in m.gate if isinstance(x, nn.Linear)]
    assert isinstance(m.gate[1], nn.GELU)
    assert (lin[0].in_features, lin[0].out_features, lin[1].in_features, lin[1].out_features) == (width, 4 * C, 4 * C, C)
    assert MLDR(build_options(MLDR, ["gate_hidden=9"]), info, TEACHER).gate[0].out_features == 9


def test_forward_matches_the_formula():
    torch.manual_seed(0)
    m = MLDR(build_options(MLDR, {"w_gt": 0.5, "w_stage": 0.25, "alpha": 1.5}), CNN, TEACHER).eval()
    z, z_t = (x.float() for x in _inputs(6))
    y = torch.randint(0, C, (B,))
    stages = _stages(CNN)
    out = m(ModelOutputs(z, torch.zeros(B, 32), stages), TeacherTargets(logits=z_t), y, epoch=0, step=0, total_epochs=1)
    assert set(out) == {"loss_ce", "loss_dfra", "loss_dfra_fused"} | {f"loss_dfra_stage{s}" for s in (1, 2, 3, 4)}
    r = _reference(z, z_t, 1.0)
    assert out["loss_dfra"].item() == pytest.approx(r[0] + r[1] + 1.5 * r[2], rel=1e-4)
    with torch.no_grad():
        d = [m.projectors[str(s)](stages[s - 1]) for s in (1, 2, 3, 4)]
        zi = [m.heads[str(s)](d[s - 1]) for s in (1, 2, 3, 4)]
        gates = [m.gate[2](torch.nn.functional.gelu(m.gate[0](x))) for x in d]
    for s in (1, 2, 3, 4):
        r = _reference(zi[s - 1], z_t, 1.0)
        assert out[f"loss_dfra_stage{s}"].item() == pytest.approx(0.25 * (r[0] + r[1] + 1.5 * r[2]), rel=1e-4)
    w = torch.softmax(torch.stack(gates, 1), 1)
    fused = (w * torch.stack(zi, 1)).sum(1)
    r = _reference(fused, z_t, 1.0)
    assert out["loss_dfra_fused"].item() == pytest.approx(r[0] + r[1] + 1.5 * r[2], rel=1e-4)


def test_options_and_errors():
    o = MLDR.Options()
    assert (o.stages, o.T, o.alpha, o.w_gt, o.w_logit, o.w_stage, o.w_fused, o.label_smoothing) == \
        ((1, 2, 3, 4), 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.1)
    assert METHODS.get("mldr") is MLDR
    n = MLDR.needs(o)
    assert n.logits and n.student_stages and not n.embed
    with pytest.raises(KDCacheError):
        MLDR(build_options(MLDR, {"stages": (1, 1)}), CNN, TEACHER)
    with pytest.raises(KDCacheError):
        MLDR(o, CNN, None)


@pytest.mark.parametrize("info", [CNN, TOK], ids=["cnn", "token"])
def test_gradients_reach_projectors_gates_and_student_not_teacher(info):
    torch.manual_seed(0)
    m = MLDR(build_options(MLDR), info, TEACHER)
    z, z_t = (x.float() for x in _inputs(7))
    zs, zt = z.clone().requires_grad_(True), z_t.clone().requires_grad_(True)
    stages = _stages(info)
    t = TeacherTargets(logits=zt)
    out = m(ModelOutputs(zs, torch.zeros(B, info.embed_dim), stages), t, torch.randint(0, C, (B,)),
            epoch=0, step=0, total_epochs=1)
    assert_gradients_reach_only_trainables(m, out, stages + [zs], t)


@pytest.mark.parametrize("alias", ["resnet18_32", "deit_pico"])
def test_real_students_give_finite_losses(alias):
    assert_trains_on_real_student(lambda info: MLDR(build_options(MLDR), info, SWIN_PICO), alias,
                                  TeacherTargets(logits=torch.randn(4, 10)), n_losses=7)


def test_stage4_conv_has_no_bias_and_the_preset_decays_everything():
    """MLDR-KD's projector: stage-4 1x1 conv without bias (OFA's has one); its optimiser decays every
    parameter (decay_all) on top of the OFA CNN recipe."""
    from kdcache.presets import PRESETS
    from kdcache.methods.ofa import OFA
    from kdcache.train import TrainConfig

    conv = MLDR(build_options(MLDR), CNN, TEACHER).projectors["4"].body[0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert OFA(build_options(OFA), CNN, TEACHER).projectors["4"].body[0].bias is not None
    preset = PRESETS.get("mldr_cifar_cnn")
    assert preset == {**PRESETS.get("ofa_cifar_cnn"), "decay_all": True}
    assert preset["nesterov"] is True and preset["min_lr"] == 1e-3 and preset["lr"] == 0.05
    assert TrainConfig.from_preset("mldr_cifar_cnn", student="resnet18", dataset="cifar100").decay_all is True
