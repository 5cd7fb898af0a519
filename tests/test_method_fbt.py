"""FBT: InfoNCE against loops, which modules the fusion runs through, what trains and what does not."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.methods import METHODS, TeacherInfo, TeacherTargets, build_options
from kdcache.methods.fbt import FBT, info_nce
from kdcache.methods.functional import ce_ls, ofa_loss
from kdcache.models import build_model, describe
from kdcache.models.tails import load_tail, save_tail

B, NC = 8, 10
NAMES = {"loss_ce", "loss_ts_nce", "loss_ts_ofa", "loss_tf_nce", "loss_tf_ofa", "loss_fs_nce", "loss_fs_ofa"}


def _teacher_info(model) -> TeacherInfo:
    i = describe(model)
    return TeacherInfo(i.alias, i.family, i.num_classes, i.embed_dim, i.input_size, i.stage_shapes)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, NC, (B,), generator=g)


@pytest.fixture(scope="module")
def swin_teacher(tmp_path_factory):
    """A swin_pico teacher's info, its tail as the trainer gets it (saved and re-loaded), and
    cached-style targets for one batch."""
    torch.manual_seed(0)
    teacher = build_model("swin_pico", NC).eval()
    path = save_tail(teacher, NC, tmp_path_factory.mktemp("tail") / "tail.safetensors")
    x, y = _batch()
    with torch.no_grad():
        out = teacher(x)
    g = torch.Generator().manual_seed(1)  # sharper logits than a random net's, as a trained teacher's
    logits = out.logits + 3 * torch.randn(out.logits.shape, generator=g)
    return _teacher_info(teacher), path, x, y, logits, out.embed


@pytest.fixture(scope="module")
def convnext_teacher():
    torch.manual_seed(0)
    teacher = build_model("convnext_pico", NC).eval()
    x, y = _batch(2)
    with torch.no_grad():
        out = teacher(x, stages=True)
    return _teacher_info(teacher), x, y, out


def _student(alias: str = "resnet18_32", seed: int = 1):
    torch.manual_seed(seed)
    s = build_model(alias, NC)
    return s, describe(s)


def _fbt(sinfo, tinfo, tail=None, seed: int = 2, student=None, **opts) -> FBT:
    """Build, then attach as the trainer does (the student module, and the teacher tail if any);
    with neither given the method is left unattached."""
    torch.manual_seed(seed)
    m = FBT(build_options(FBT, opts), sinfo, tinfo)
    if student is not None or tail is not None:
        m.attach(student, tail)
    return m


def _targets(logits, embed, stages=None, grad: bool = False) -> TeacherTargets:
    t = TeacherTargets(logits.clone().requires_grad_(grad), embed.clone().requires_grad_(grad),
                       {k: v.clone().requires_grad_(grad) for k, v in (stages or {}).items()})
    return t


def _run(method, student, x, y, targets, stages=True):
    return method(student(x, stages=stages), targets, y, epoch=0, step=0, total_epochs=1)


# --- InfoNCE -------------------------------------------------------------------------------------

def _nce_loop(target, pred, scale, symmetric, intra):
    """InfoNCE with explicit loops over anchors and candidates."""
    def cos(a, b):
        return sum(u * v for u, v in zip(a, b)) / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))

    def one_way(anchors, others):
        total = 0.0
        for b, a in enumerate(anchors):
            cands = [scale * cos(a, o) for o in others]
            if intra:
                cands += [scale * cos(a, o) for k, o in enumerate(anchors) if k != b]
            total += -cands[b] + math.log(sum(math.exp(c) for c in cands))
        return total / len(anchors)

    t, p = target.tolist(), pred.tolist()
    return 0.5 * (one_way(p, t) + one_way(t, p)) if symmetric else one_way(p, t)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("intra", [False, True])
def test_info_nce_matches_a_loop(symmetric, intra):
    g = torch.Generator().manual_seed(3)
    target = torch.randn(6, 5, generator=g, dtype=torch.float64)
    pred = target + 0.8 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    scale = 1 / 0.07
    got = info_nce(target, pred, scale, symmetric=symmetric, intra=intra)
    assert got.item() == pytest.approx(_nce_loop(target, pred, scale, symmetric, intra), rel=1e-5)
    if not symmetric:  # one direction: the second model's rows pick their targets
        assert got.item() != pytest.approx(info_nce(pred, target, scale, symmetric=False, intra=intra).item(),
                                           rel=1e-3)


def test_info_nce_stays_fp32_under_autocast():
    g = torch.Generator().manual_seed(4)
    target, pred = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    want = info_nce(target, pred, 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = info_nce(target, pred, 100.0)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)


# --- needs and construction ----------------------------------------------------------------------

def test_needs_depend_on_the_teacher_family():
    opts = build_options(FBT)
    assert METHODS.get("fbt") is FBT
    for family in ("swin", "vit", "mlp", None):
        n = FBT.needs(opts, family, "cnn")
        assert n.logits and n.embed and n.tail and n.student_stages and not n.stages
    n = FBT.needs(opts, "cnn", "vit")
    assert n.logits and n.embed and n.stages == (3,) and not n.tail and not n.student_stages


def test_construction_errors(swin_teacher):
    tinfo = swin_teacher[0]
    student, sinfo = _student()
    with pytest.raises(KDCacheError, match="frozen teacher tail"):
        _fbt(sinfo, tinfo, student=student, tail=None)
    with pytest.raises(KDCacheError, match="negatives"):
        _fbt(sinfo, tinfo, tail=load_tail(swin_teacher[1]), negatives="queue")


# --- transformer teacher -> CNN student (teacher tail) -------------------------------------------

def test_tail_direction_gradients(swin_teacher):
    tinfo, path, x, y, logits, embed = swin_teacher
    student, sinfo = _student()
    tail = load_tail(path)
    tail_before = {k: v.clone() for k, v in tail.state_dict().items()}
    m = _fbt(sinfo, tinfo, tail, student=student)
    assert not set(map(id, tail.parameters())) & set(map(id, m.parameters()))
    assert not any("tail" in k for k in m.state_dict())  # checkpoints never hold teacher weights
    t = _targets(logits, embed, grad=True)
    out = _run(m, student, x, y, t)
    assert set(out) == NAMES and all(torch.isfinite(v) for v in out.values())
    opt = torch.optim.SGD(list(student.parameters()) + list(m.parameters()), lr=0.1)
    sum(out.values()).backward()
    for name, p in m.named_parameters():  # L2G, the three projections, the temperatures
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.log_scale.grad.ne(0).all()
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(not p.requires_grad and p.grad is None for p in tail.parameters())
    assert t.logits.grad is None and t.embed.grad is None
    opt.step()
    for k, v in tail.state_dict().items():
        assert torch.equal(v, tail_before[k]), k


def test_fusion_runs_student_stages_then_l2g_then_teacher_tail(swin_teacher):
    tinfo, path, x, y, logits, embed = swin_teacher
    student, sinfo = _student()
    m = _fbt(sinfo, tinfo, load_tail(path), student=student)
    out = _run(m, student, x, y, _targets(logits, embed))
    out["loss_tf_ofa"].backward()  # the fusion's logits only
    net = student.net
    assert net.conv1.weight.grad.abs().sum() > 0 and net.layer3[0].downsample[0].weight.grad.abs().sum() > 0
    assert net.layer4[0].conv1.weight.grad is None and net.fc.weight.grad is None  # replaced by the tail
    assert m.l2g.proj.weight.grad.abs().sum() > 0 and m.l2g.block.attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("target, l2g_learns", [("first", False), ("mutual", True)])
def test_first_model_of_a_pair_is_the_detached_target(swin_teacher, target, l2g_learns):
    tinfo, path, x, y, logits, embed = swin_teacher
    student, sinfo = _student()
    m = _fbt(sinfo, tinfo, load_tail(path), student=student, target=target)
    out = _run(m, student, x, y, _targets(logits, embed))
    (out["loss_fs_nce"] + out["loss_fs_ofa"]).backward()  # fusion -> student: fusion is the target
    grad = m.l2g.proj.weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == l2g_learns
    assert m.proj["f"].weight.grad.abs().sum() > 0  # the target's projection still trains
    assert student.net.fc.weight.grad.abs().sum() > 0


def test_losses_are_the_documented_terms(swin_teacher):
    tinfo, path, x, y, logits, embed = swin_teacher
    student, sinfo = _student()
    m = _fbt(sinfo, tinfo, load_tail(path), student=student, w_nce=0.5, w_ofa=2.0, eps=1.5)
    s = student(x, stages=True)
    out = m(s, _targets(logits, embed), y, epoch=0, step=0, total_epochs=1)
    assert out["loss_ce"].item() == pytest.approx(ce_ls(s.logits, y).item(), rel=1e-6)
    assert out["loss_ts_ofa"].item() == pytest.approx(2.0 * ofa_loss(s.logits, logits, y, 1.5).item(), rel=1e-6)
    nce = info_nce(m.proj["t"](embed), m.proj["s"](s.embed), 1 / 0.07)
    assert out["loss_ts_nce"].item() == pytest.approx(0.5 * nce.item(), rel=1e-5)
    f_f, z_f = m.fuse(s, None)
    assert out["loss_tf_ofa"].item() == pytest.approx(2.0 * ofa_loss(z_f, logits, y, 1.5).item(), rel=1e-5)
    assert out["loss_fs_ofa"].item() == pytest.approx(2.0 * ofa_loss(s.logits, z_f, y, 1.5).item(), rel=1e-5)


def test_drop_teacher_fusion_removes_the_term(swin_teacher):
    tinfo, path, x, y, logits, embed = swin_teacher
    tail = load_tail(path)
    results = {}
    for drop in (False, True):
        student, sinfo = _student()
        m = _fbt(sinfo, tinfo, tail, student=student, drop_teacher_fusion=drop)
        out = _run(m, student, x, y, _targets(logits, embed))
        sum(out.values()).backward()
        results[drop] = (m, out)
    (full, o_full), (dropped, o_drop) = results[False], results[True]
    assert set(o_full) == NAMES and set(o_drop) == NAMES - {"loss_tf_nce", "loss_tf_ofa"}
    for k, v in full.l2g.state_dict().items():  # same initial weights ...
        assert torch.equal(v, dropped.l2g.state_dict()[k])
    total_full, total_drop = sum(o_full.values()).item(), sum(o_drop.values()).item()
    tf = (o_full["loss_tf_nce"] + o_full["loss_tf_ofa"]).item()
    assert abs(total_full - total_drop) > 0.1  # ... a detectably different loss ...
    assert total_drop == pytest.approx(total_full - tf, rel=1e-5)
    g_full, g_drop = full.l2g.proj.weight.grad, dropped.l2g.proj.weight.grad
    assert g_full is not None and g_full.abs().sum() > 0  # ... and L2G gradients: only the teacher term
    assert g_drop is None or g_drop.abs().sum() == 0  # trains the fusion (it is the target for the student)


def test_teacher_to_fusion_term_trains(swin_teacher):
    tinfo, path, x, y, logits, embed = swin_teacher
    student, sinfo = _student()
    tail = load_tail(path)
    m = _fbt(sinfo, tinfo, tail, student=student)
    opt = torch.optim.AdamW(list(student.parameters()) + list(m.parameters()), lr=2e-3, weight_decay=0.0)
    t = _targets(logits, embed)
    history = []
    for _ in range(8):
        out = _run(m, student, x, y, t)
        history.append((out["loss_tf_ofa"].item(), out["loss_tf_nce"].item()))
        opt.zero_grad()
        sum(out.values()).backward()
        opt.step()
    (ofa0, nce0), (ofa1, nce1) = history[0], history[-1]
    assert ofa1 < ofa0 - 0.1 and nce1 < nce0


# --- CNN teacher -> transformer student (student tail) -------------------------------------------

def test_cnn_teacher_direction_uses_the_students_tail(convnext_teacher):
    tinfo, x, y, tout = convnext_teacher
    student, sinfo = _student("deit_pico")
    m = _fbt(sinfo, tinfo, tail=None)
    t = _targets(tout.logits, tout.embed, {3: tout.stages[2]}, grad=True)
    with pytest.raises(KDCacheError, match="attach"):
        _run(m, student, x, y, t, stages=False)
    m.attach(student)
    assert not set(map(id, student.parameters())) & set(map(id, m.parameters()))  # no double registration
    out = _run(m, student, x, y, t, stages=False)
    assert set(out) == NAMES and all(torch.isfinite(v) for v in out.values())
    out["loss_tf_ofa"].backward()  # the fusion: teacher stage 3 -> L2G -> the student's last blocks + head
    net = student.net
    assert m.l2g.proj.weight.grad.abs().sum() > 0
    assert net.head.weight.grad.abs().sum() > 0 and net.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0
    assert net.patch_embed.proj.weight.grad is None and net.blocks[0].attn.qkv.weight.grad is None
    assert all(v.grad is None for v in (t.logits, t.embed, t.stages[3]))


def test_cnn_teacher_direction_full_step(convnext_teacher):
    tinfo, x, y, tout = convnext_teacher
    student, sinfo = _student("deit_pico")
    torch.manual_seed(2)
    m = FBT(build_options(FBT), sinfo, tinfo)
    m.attach(student, None)  # as the trainer calls it: no teacher tail for a CNN teacher
    out = _run(m, student, x, y, _targets(tout.logits, tout.embed, {3: tout.stages[2]}), stages=False)
    sum(out.values()).backward()
    for name, p in list(m.named_parameters()) + list(student.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert set(out) == NAMES and all(torch.isfinite(v) for v in out.values())


def test_method_moves_but_never_trains_the_teacher_tail(swin_teacher):
    tinfo, path, *_ = swin_teacher
    student, sinfo = _student()
    tail = load_tail(path)
    m = _fbt(sinfo, tinfo, tail, student=student)
    m.train()
    assert not tail.training  # the frozen tail stays in eval mode whatever the method's mode
    m.to(torch.float64)  # .to()/.cuda() on the method carry the (unregistered) tail along
    assert all(p.dtype == torch.float64 for p in tail.parameters())
    assert m.l2g.proj.weight.dtype == torch.float64


def test_attach_is_required_and_checks_the_student(swin_teacher, convnext_teacher):
    tinfo, path, x, y, logits, embed = swin_teacher
    student, sinfo = _student()
    m = _fbt(sinfo, tinfo)  # not attached: the fusion has no teacher tail to run
    with pytest.raises(KDCacheError, match="attach"):
        _run(m, student, x, y, _targets(logits, embed))
    ctinfo = convnext_teacher[0]
    vit, vinfo = _student("deit_pico")
    m = _fbt(vinfo, ctinfo)
    with pytest.raises(KDCacheError, match="built for student deit_pico"):
        m.attach(student)  # a different student than the method was built for


def test_attach_after_to_moves_the_teacher_tail_to_the_method(swin_teacher):
    """The trainer moves the method to its device, then attaches the tail loaded on the CPU."""
    tinfo, path, *_ = swin_teacher
    student, sinfo = _student()
    tail = load_tail(path)
    m = _fbt(sinfo, tinfo).to(torch.float64)
    m.attach(student, tail)
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in tail.parameters())
