"""OFA-KD: the loss against explicit loops, the eps=1 reduction, projector shapes, gradients, real students."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.methods import METHODS, TeacherInfo, TeacherTargets, build_options
from kdcache.methods.functional import ofa_loss
from kdcache.methods.ofa import OFA
from kdcache.methods.projectors import (CNNStageProjector, PatchMerging, SepConv, TokenStageProjector,
                                        build_stage_projector, merge_count, token_target_grid)
from kdcache.models import ModelInfo, ModelOutputs
from method_checks import assert_gradients_reach_only_trainables, assert_trains_on_real_student

B, C = 5, 7
CNN = ModelInfo("cnn_s", "cnn", 32, C, 32, ((4, 8, 8), (8, 4, 4), (16, 2, 2), (32, 1, 1)))
TOK = ModelInfo("vit_s", "vit", 32, C, 16, ((16, 4, 4),) * 4)
TEACHER = TeacherInfo("t", "swin", C, 48, 32, ((6, 16, 16), (12, 8, 8), (24, 4, 4), (48, 2, 2)))
SWIN_PICO = TeacherInfo(alias="swin_pico", family="swin", num_classes=10, embed_dim=384, input_size=32,
                        stage_shapes=((48, 16, 16), (96, 8, 8), (192, 4, 4), (384, 2, 2)))


def _reference(z: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, eps: float, T: float) -> float:
    """mean_b -sum_c [(p_t + m)^eps - m]_c * log p_c, by explicit loops in float64 Python."""
    total = 0.0
    for b in range(z.shape[0]):
        row, trow = [v / T for v in z[b].tolist()], [v / T for v in z_t[b].tolist()]
        lse = math.log(sum(math.exp(v) for v in row))
        tsum = sum(math.exp(v) for v in trow)
        for c in range(len(row)):
            m = 1.0 if c == int(y[b]) else 0.0
            p_t = math.exp(trow[c]) / tsum
            total -= ((p_t + m) ** eps - m) * (row[c] - lse)
    return total / z.shape[0]


def _inputs(seed: int, b: int = B, c: int = C):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g) * 3, torch.randn(b, c, generator=g) * 3,
            torch.randint(0, c, (b,), generator=g))


def _stages(info: ModelInfo, b: int = B, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *shape, generator=g, requires_grad=True) for shape in info.stage_shapes]


@pytest.mark.parametrize("eps,T", [(1.0, 1.0), (1.5, 1.0), (0.8, 2.0), (2.0, 4.0)])
def test_loss_matches_explicit_loops(eps, T):
    z, z_t, y = _inputs(1)
    assert ofa_loss(z, z_t, y, eps, T).item() == pytest.approx(_reference(z, z_t, y, eps, T), rel=1e-5)


def test_eps_one_is_soft_label_ce_with_teacher_probs():
    z, z_t, y = _inputs(2)
    soft_ce = F.cross_entropy(z, torch.softmax(z_t, 1))  # probability targets
    assert ofa_loss(z, z_t, y, 1.0).item() == pytest.approx(soft_ce.item(), rel=1e-6)
    # ... independent of the labels when eps = 1, but not otherwise
    assert ofa_loss(z, z_t, (y + 1) % C, 1.0).item() == pytest.approx(soft_ce.item(), rel=1e-6)
    assert abs(ofa_loss(z, z_t, (y + 1) % C, 1.5).item() - ofa_loss(z, z_t, y, 1.5).item()) > 1e-4


def test_loss_is_fp32_and_teacher_gets_no_gradient():
    z, z_t, y = _inputs(3)
    zs, zt = z.half().requires_grad_(True), z_t.half().requires_grad_(True)
    loss = ofa_loss(zs, zt, y, 1.5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None


def test_cnn_projector_follows_measured_shapes():
    W = max(CNN.embed_dim, TEACHER.embed_dim)
    for s in (1, 2, 3, 4):
        p = build_stage_projector(CNN, TEACHER, s)
        assert isinstance(p, CNNStageProjector) and p.out_dim == W
        seps = [m for m in p.modules() if isinstance(m, SepConv)]
        assert len(seps) == (4 - s if s < 4 else 0)
        if s < 4:  # channels double along the stack, the last block ends at W
            outs = [blk[5].out_channels for blk in seps]
            c = CNN.stage_shapes[s - 1][0]
            assert outs == [c * 2 ** (j + 1) for j in range(len(outs) - 1)] + [W]
            assert seps[0][0].stride == (2, 2) and seps[0][0].groups == c and seps[0][4].stride == (1, 1)
        else:
            convs = [m for m in p.modules() if isinstance(m, nn.Conv2d)]
            assert len(convs) == 1 and convs[0].kernel_size == (1, 1) and convs[0].out_channels == W
        x = torch.randn(2, *CNN.stage_shapes[s - 1])
        assert p(x).shape == (2, W)
    # W comes from the teacher only when it is wider
    wide = ModelInfo("w", "cnn", 32, C, 64, CNN.stage_shapes)
    assert build_stage_projector(wide, TEACHER, 4).out_dim == 64


def test_token_projector_merges_to_the_stage4_grid():
    assert merge_count((14, 14), (7, 7)) == 1
    assert merge_count((8, 8), (2, 2)) == 2
    assert merge_count((8, 8), (1, 1)) == 3
    assert merge_count((7, 7), (1, 1)) == 3  # 7 -> 4 -> 2 -> 1 (odd sides padded)
    assert merge_count((8, 8), (3, 3)) == 1  # never below the target
    assert merge_count((2, 2), (2, 2)) == 0
    assert token_target_grid(TOK, TEACHER) == (2, 2)  # the hierarchical teacher's stage-4 grid
    vit_teacher = TeacherInfo("vt", "vit", C, 48, 32, ((48, 4, 4),) * 4)
    assert token_target_grid(TOK, vit_teacher) == (1, 1)  # fallback: input_size // 32
    paper = ModelInfo("deit_t", "vit", 224, 100, 192, ((192, 14, 14),) * 4)
    swin_t = TeacherInfo("swin_t", "swin", 100, 768, 224, ((96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)))
    assert token_target_grid(paper, swin_t) == (7, 7) and merge_count((14, 14), (7, 7)) == 1
    from timm.models.vision_transformer import Block
    for s in (1, 2, 3, 4):
        p = build_stage_projector(TOK, TEACHER, s)
        assert isinstance(p, TokenStageProjector) and p.out_dim == TOK.embed_dim and p.num_merges == 1
        assert sum(isinstance(m, Block) for m in p.modules()) == max(4 - s, 1)
        assert all(m.attn.num_heads == 4 for m in p.modules() if isinstance(m, Block))
        assert p(torch.randn(3, 16, 4, 4)).shape == (3, 16)
    # no merge needed: a Linear takes the first merge's projection to D_s
    narrow = ModelInfo("mlp_s", "mlp", 32, C, 24, ((12, 2, 2),) * 4)
    p = build_stage_projector(narrow, TEACHER, 2)
    assert p.num_merges == 0 and isinstance(p.merge[0], nn.Linear) and p.merge[0].in_features == 12
    assert not any(isinstance(m, PatchMerging) for m in p.modules()) and p(torch.randn(2, 12, 2, 2)).shape == (2, 24)


def test_patch_merging_groups_2x2_neighbours():
    pm = PatchMerging(1, 4, act=False)
    with torch.no_grad():
        pm.norm.weight.fill_(1), pm.norm.bias.zero_()
        pm.reduction.weight.copy_(torch.eye(4))
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    out = pm(x)
    assert out.shape == (1, 2, 2, 4)
    for i in range(2):
        for j in range(2):  # each output cell is the normalised 2x2 block it came from
            block = x[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 0].flatten()
            ref = (block - block.mean()) / torch.sqrt(block.var(unbiased=False) + 1e-5)
            assert torch.allclose(out[0, i, j].sort().values, ref.sort().values, atol=1e-5)
    assert PatchMerging(3, 5, act=True)(torch.randn(2, 5, 7, 3)).shape == (2, 3, 4, 5)


def test_init_is_trunc_normal_and_kaiming():
    m = OFA(build_options(OFA), CNN, TEACHER)
    lin = m.heads["1"]
    assert torch.all(lin.bias == 0) and lin.weight.std().item() == pytest.approx(0.02, rel=0.3)
    conv = m.projectors["4"].body[0]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.3)


def test_forward_matches_the_formula_with_weights_and_stage_eps():
    torch.manual_seed(0)
    opts = build_options(OFA, {"w_gt": 0.5, "w_kd": 2.0, "w_ofa": 0.1, "eps": 1.3,
                               "stage_eps": (1.0, 1.5, 2.0, 1.2), "T": 2.0})
    m = OFA(opts, CNN, TEACHER).eval()
    z, z_t, y = _inputs(4)
    stages = _stages(CNN)
    out = m(ModelOutputs(z, torch.zeros(B, 32), stages), TeacherTargets(logits=z_t), y, epoch=0, step=0, total_epochs=1)
    assert set(out) == {"loss_ce", "loss_kd"} | {f"loss_ofa_stage{s}" for s in (1, 2, 3, 4)}
    ls = 0.1
    ce = -(torch.log_softmax(z.double(), 1) * ((1 - ls) * F.one_hot(y, C) + ls / C)).sum(1).mean()
    assert out["loss_ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-5)
    assert out["loss_kd"].item() == pytest.approx(2.0 * _reference(z, z_t, y, 1.3, 2.0), rel=1e-5)
    for s, e in zip((1, 2, 3, 4), (1.0, 1.5, 2.0, 1.2)):
        with torch.no_grad():
            z_i = m.heads[str(s)](m.projectors[str(s)](stages[s - 1]))
        assert out[f"loss_ofa_stage{s}"].item() == pytest.approx(0.1 * _reference(z_i, z_t, y, e, 2.0), rel=1e-5)
    # a subset of stages
    m2 = OFA(build_options(OFA, ["stages=2,4"]), CNN, TEACHER)
    assert sorted(m2.projectors) == ["2", "4"]
    out2 = m2(ModelOutputs(z, torch.zeros(B, 32), stages), TeacherTargets(logits=z_t), y, epoch=0, step=0, total_epochs=1)
    assert {k for k in out2 if "stage" in k} == {"loss_ofa_stage2", "loss_ofa_stage4"}


def test_options_presets_and_errors():
    o = OFA.Options()
    assert (o.stages, o.T, o.w_gt, o.w_kd, o.w_ofa, o.eps, o.stage_eps, o.label_smoothing) == \
        ((1, 2, 3, 4), 1.0, 1.0, 1.0, 1.0, 1.0, (), 0.1)
    assert build_options(OFA, OFA.PRESETS["authors_cifar"]).w_ofa == 0.1
    assert build_options(OFA, OFA.PRESETS["imagenet"]).eps == 1.5
    assert build_options(OFA, OFA.PRESETS["cifar"]).eps == 1.0
    assert METHODS.get("ofa") is OFA
    n = OFA.needs(o)
    assert n.logits and n.student_stages and not n.embed and not n.stages
    with pytest.raises(KDCacheError):
        OFA(build_options(OFA, {"stage_eps": (1.0, 2.0)}), CNN, TEACHER)
    with pytest.raises(KDCacheError):
        OFA(build_options(OFA, {"stages": (0, 5)}), CNN, TEACHER)


@pytest.mark.parametrize("info", [CNN, TOK], ids=["cnn", "token"])
def test_gradients_reach_projectors_and_student_not_teacher(info):
    torch.manual_seed(0)
    m = OFA(build_options(OFA, {"eps": 1.5}), info, TEACHER)
    z, z_t, y = _inputs(5)
    zs, zt = z.clone().requires_grad_(True), z_t.clone().requires_grad_(True)
    stages = _stages(info)
    t = TeacherTargets(logits=zt)
    out = m(ModelOutputs(zs, torch.zeros(B, info.embed_dim), stages), t, y, epoch=0, step=0, total_epochs=1)
    assert_gradients_reach_only_trainables(m, out, stages + [zs], t)


@pytest.mark.parametrize("alias", ["resnet18_32", "deit_pico"])
def test_real_students_give_finite_losses(alias):
    assert_trains_on_real_student(lambda info: OFA(build_options(OFA), info, SWIN_PICO), alias,
                                  TeacherTargets(logits=torch.randn(4, 10)), n_losses=6)


@pytest.mark.parametrize("n,acts", [(1, ["GELU"]), (2, ["GELU", "Identity"]), (3, ["GELU", "GELU", "Identity"])])
def test_gelu_follows_the_first_merge_even_when_it_is_the_only_one(n, acts):
    """OFAKD distillers/ofa.py lines 74-86: act_layer=nn.GELU for the first merge, then GELU for all
    but the last."""
    grid = {1: 4, 2: 8, 3: 16}[n]
    info = ModelInfo("vit_x", "vit", 32, C, 16, ((16, grid, grid),) * 4)
    p = build_stage_projector(info, TEACHER, 1)  # target grid 2x2 (the Swin teacher's stage 4)
    assert p.num_merges == n
    assert [type(m.act).__name__ for m in p.merge] == acts
    # the first merge's output is GELU(Linear(LayerNorm(2x2 neighbours))), not the raw projection
    pm = p.merge[0]
    x = torch.randn(2, grid, grid, 16)
    assert torch.allclose(pm(x), F.gelu(pm.reduction(pm.norm(
        x.reshape(2, grid // 2, 2, grid // 2, 2, 16).permute(0, 1, 3, 4, 2, 5).reshape(2, grid // 2, grid // 2, 64)))))


def test_vit_students_keep_their_class_token_through_the_projector():
    """OFAKD distillers/ofa.py lines 91-103: prefix tokens skip the merging, go through the blocks and
    the class token is the descriptor."""
    from kdcache.models import build_model, describe

    torch.manual_seed(0)
    net = build_model("deit_pico", 10)
    info = describe(net)
    assert info.prefix_tokens == 1
    out = net(torch.randn(4, 3, 32, 32), stages=True)
    assert [tuple(p.shape) for p in out.prefix] == [(4, 1, 192)] * 4
    m = OFA(build_options(OFA), info, SWIN_PICO)
    proj = m.projectors["2"]
    assert proj.prefix_tokens == 1 and isinstance(proj.prefix_proj, nn.Identity)
    with torch.no_grad():  # the descriptor is the class token after the blocks
        merged = proj.merge(out.stages[1].permute(0, 2, 3, 1)).flatten(1, 2)
        ref = proj.blocks(torch.cat([out.prefix[1], merged], 1))[:, 0]
        assert torch.allclose(proj(out.stages[1], out.prefix[1]), ref, atol=1e-6)
        assert not torch.allclose(proj(out.stages[1], out.prefix[1] + 1), ref, atol=1e-3)
    # with the patch maps detached, the stage losses still reach the student's cls_token through the
    # prefix tokens alone
    cut = ModelOutputs(out.logits.detach(), out.embed.detach(), [s.detach() for s in out.stages], out.prefix)
    losses = m(cut, TeacherTargets(logits=torch.randn(4, 10)), torch.randint(0, 10, (4,)),
               epoch=0, step=0, total_epochs=1)
    sum(v for k, v in losses.items() if "stage" in k).backward()
    assert net.net.cls_token.grad is not None and net.net.cls_token.grad.abs().sum() > 0
    # a projector built for a class token refuses maps without it (and the other way round)
    with pytest.raises(KDCacheError, match="prefix"):
        proj(out.stages[1].detach())
    with pytest.raises(KDCacheError, match="prefix"):
        build_stage_projector(TOK, TEACHER, 2)(torch.randn(2, 16, 4, 4), torch.randn(2, 1, 16))


@pytest.mark.parametrize("alias", ["mixer_pico", "swin_pico", "resnet18_32"])
def test_other_families_have_no_prefix_tokens(alias):
    from kdcache.models import build_model, describe

    net = build_model(alias, 10)
    assert describe(net).prefix_tokens == 0
    assert net(torch.randn(2, 3, 32, 32), stages=True).prefix is None
    assert net(torch.randn(2, 3, 32, 32)).prefix is None


def test_training_presets_match_the_ofakd_configs():
    """configs/cifar/cnn.yaml and vit_mlp.yaml field by field (train.py defaults where they are silent)."""
    from kdcache.presets import PRESETS
    from kdcache.train import TrainConfig

    cnn = PRESETS.get("ofa_cifar_cnn")
    assert {k: cnn[k] for k in ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
                                "warmup_epochs", "schedule", "min_lr", "input_size", "recipe")} == dict(
        epochs=300, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=2e-3,
        warmup_epochs=3, schedule="cosine", min_lr=1e-3, input_size=224, recipe="ofa_cnn")
    assert cnn["warmup_lr"] == 1e-4  # timm train.py's --warmup-lr default
    assert PRESETS.get("ofa_cifar_cnn_authors") == {**cnn, "lr": 0.1}
    vit = PRESETS.get("ofa_cifar_vit")
    assert {k: vit[k] for k in ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs",
                                "schedule", "min_lr", "input_size")} == dict(
        epochs=300, batch_size=128, optimizer="adamw", lr=5e-4, weight_decay=0.05, warmup_epochs=20,
        schedule="cosine", min_lr=1e-5, input_size=224)
    assert (vit["warmup_lr"], vit["clip_grad"], vit["recipe"]) == (5e-7, 5.0, "ofa_vit")
    assert vit.get("drop_path", 0.0) == 0.0  # train.py's --drop-path default (None: the model's own, 0)
    for name, student in (("ofa_cifar_cnn", "resnet18"), ("ofa_cifar_cnn_authors", "resnet18"),
                          ("ofa_cifar_vit", "deit_t")):
        TrainConfig.from_preset(name, student=student, dataset="cifar100")  # every field exists
    assert OFA.Options().label_smoothing == 0.1  # the configs' smoothing 0.1
    assert build_options(OFA, OFA.PRESETS["authors_cifar"]).w_ofa == 0.1
