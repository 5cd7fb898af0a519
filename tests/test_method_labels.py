"""Soft labels: every method takes int64 (B,) class indices or float (B, C) soft targets (mixed and
smoothed by the trainer). Cross-entropy terms become soft-target CE (timm's SoftTargetCrossEntropy,
no extra smoothing); whatever needs one class per sample uses the argmax (OFA-KD's
`label.argmax(-1)`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcache.errors import KDCacheError
from kdcache.methods import METHODS, TeacherInfo, TeacherTargets, build_options
from kdcache.methods.functional import ce_ls, hard_labels, ofa_loss
from kdcache.models import build_model, describe

B, NC = 8, 10
TEACHER = TeacherInfo("t_cnn", "cnn", NC, 96, 32, ((16, 16, 16), (32, 8, 8), (64, 4, 4), (96, 2, 2)))
# Options per method: CE smoothing off, and label-dependent terms switched on where they are optional.
OPTIONS = {
    "ce": {}, "kd": {}, "dkd": {}, "dist": {}, "rsd": {}, "mldr": {}, "hcd": {},
    "fitnet": {"stages": (2, 3), "w_kd": 1.0},
    "ofa": {"eps": 1.5},  # eps != 1: the target mask matters
    "fbt": {"eps": 1.5},
}
LABEL_DEPENDENT = {"ofa", "dkd", "hcd", "fbt"}  # a term other than CE reads the (hard) label


def _is_ce(key: str) -> bool:
    return key == "loss_ce" or key.startswith("loss_ce_stage")


@pytest.fixture(scope="module")
def batch():
    """A real CNN student's outputs and cached-style teacher targets for one batch."""
    torch.manual_seed(0)
    student = build_model("resnet18_32", NC)
    info = describe(student)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = student(torch.randn(B, 3, 32, 32, generator=g), stages=True)
    targets = TeacherTargets(logits=3 * torch.randn(B, NC, generator=g), embed=torch.randn(B, 96, generator=g),
                             stages={k: torch.randn(B, *TEACHER.stage_shapes[k - 1], generator=g)
                                     for k in (1, 2, 3, 4)})
    y1 = torch.randint(0, NC, (B,), generator=g)
    y2 = (y1 + torch.randint(1, NC, (B,), generator=g)) % NC  # a different class in every row
    return student, info, out, targets, y1, y2


def _method(name, student, info, smoothing=0.0):
    cls = METHODS.get(name)
    torch.manual_seed(2)
    m = cls(build_options(cls, {**OPTIONS[name], "label_smoothing": smoothing}), info, TEACHER)
    m.attach(student)  # FBT binds the student's tail (CNN teacher); the others ignore it
    return m


def _run(m, out, targets, labels):
    with torch.no_grad():
        return {k: v.item() for k, v in m(out, targets, labels, epoch=0, step=0, total_epochs=1).items()}


def test_every_method_is_covered():
    assert set(OPTIONS) == set(METHODS.names())


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_one_hot_soft_labels_equal_int_labels(name, batch):
    student, info, out, targets, y1, _ = batch
    m = _method(name, student, info)
    hard = _run(m, out, targets, y1)
    soft = _run(m, out, targets, F.one_hot(y1, NC).float())
    assert soft.keys() == hard.keys()
    for k in hard:
        assert soft[k] == pytest.approx(hard[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_mixed_labels_mix_the_ce_and_take_the_argmax_elsewhere(name, batch):
    student, info, out, targets, y1, y2 = batch
    lam = 0.35  # the argmax of the mixed target is y2
    mixed = lam * F.one_hot(y1, NC).float() + (1 - lam) * F.one_hot(y2, NC).float()
    m = _method(name, student, info)
    l1, l2, soft = _run(m, out, targets, y1), _run(m, out, targets, y2), _run(m, out, targets, mixed)
    for k in soft:
        want = lam * l1[k] + (1 - lam) * l2[k] if _is_ce(k) else l2[k]
        assert soft[k] == pytest.approx(want, rel=1e-5, abs=1e-6), k
    if name in LABEL_DEPENDENT:  # the argmax path is exercised: some non-CE term depends on the label
        assert any(abs(l1[k] - l2[k]) > 1e-4 for k in soft if not _is_ce(k))
    # the method's own smoothing option does not smooth soft targets again
    smoothed = _run(_method(name, student, info, smoothing=0.1), out, targets, mixed)
    assert smoothed == pytest.approx(soft, rel=1e-6, abs=1e-7)


def test_ce_ls_on_timm_mixup_targets():
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(B, NC, generator=g) * 2, torch.randint(0, NC, (B,), generator=g)
    for lam, s in ((1.0, 0.0), (1.0, 0.1), (0.7, 0.1), (0.3, 0.0)):
        target = mixup_target(y, NC, lam, s)  # timm mixes with the flipped batch, then smooths
        loss = ce_ls(z, target, smoothing=0.1)  # the smoothing argument is ignored for soft targets
        assert loss.item() == pytest.approx(SoftTargetCrossEntropy()(z, target).item(), rel=1e-6)
        want = lam * ce_ls(z, y, s) + (1 - lam) * ce_ls(z, y.flip(0), s)
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_hard_labels_and_dtypes():
    y = torch.tensor([3, 0, 2])
    assert hard_labels(y) is y
    soft = torch.tensor([[0.1, 0.2, 0.0, 0.7], [0.6, 0.4, 0.0, 0.0], [0.3, 0.0, 0.45, 0.25]])
    assert hard_labels(soft).tolist() == [3, 0, 2]
    z = torch.randn(3, 4)
    for dtype in (torch.float16, torch.bfloat16):  # logits under autocast; the loss stays fp32
        assert ce_ls(z.to(dtype), soft).dtype == torch.float32
        assert ofa_loss(z.to(dtype), z, soft, 1.5).dtype == torch.float32
    assert ofa_loss(z, z * 2, soft, 1.5).item() == pytest.approx(ofa_loss(z, z * 2, y, 1.5).item(), rel=1e-6)


@pytest.mark.parametrize("labels", [torch.zeros(2, 4), torch.zeros(3, 5), torch.zeros(3, 4, dtype=torch.long),
                                    torch.zeros(3, 4, 1), torch.zeros(2, dtype=torch.long)],
                         ids=["soft-batch", "soft-classes", "int-2d", "3d", "int-batch"])
def test_labels_that_do_not_fit_are_refused(labels):
    with pytest.raises(KDCacheError, match="labels of shape"):
        ce_ls(torch.randn(3, 4), labels)
