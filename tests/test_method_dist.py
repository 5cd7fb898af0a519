"""DIST: both relation terms against direct loops, their invariances, rows vs columns, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.methods import METHODS, TeacherTargets, build_options
from kdcache.methods.dist import DIST, dist_relations, inter_class_relation, intra_class_relation, pearson
from kdcache.models import ModelInfo, ModelOutputs

B, C = 7, 9


def _pearson_list(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = math.sqrt(sum((x - ma) ** 2 for x in a))
    vb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (va * vb)


def _softmax_rows(z: torch.Tensor, T: float) -> list[list[float]]:
    rows = []
    for row in z.tolist():
        e = [math.exp(v / T) for v in row]
        rows.append([v / sum(e) for v in e])
    return rows


def _reference(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> tuple[float, float]:
    ps, pt = _softmax_rows(z_s, T), _softmax_rows(z_t, T)
    n, c = len(ps), len(ps[0])
    inter = 1 - sum(_pearson_list(ps[i], pt[i]) for i in range(n)) / n
    intra = 1 - sum(_pearson_list([ps[i][k] for i in range(n)], [pt[i][k] for i in range(n)])
                    for k in range(c)) / c
    return inter, intra


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g, dtype=torch.float64) * 2,
            torch.randn(B, C, generator=g, dtype=torch.float64) * 2,
            torch.randint(0, C, (B,), generator=g))


def _method(**overrides) -> DIST:
    info = ModelInfo("s", "cnn", 32, C, 8, ((4, 8, 8), (8, 4, 4), (16, 2, 2), (32, 1, 1)))
    return DIST(build_options(DIST, overrides), info, None)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_relations_match_direct_loops(T):
    z_s, z_t, _ = _inputs(0)
    inter, intra = dist_relations(z_s, z_t, T)
    ref_inter, ref_intra = _reference(z_s, z_t, T)
    assert inter.item() == pytest.approx(ref_inter, rel=1e-5, abs=1e-6)
    assert intra.item() == pytest.approx(ref_intra, rel=1e-5, abs=1e-6)


def test_forward_weights_and_names():
    z_s, z_t, y = _inputs(1)
    m = _method(beta=2.0, gamma=0.5, T=3.0)
    out = m(ModelOutputs(z_s.float(), torch.zeros(B, 8)), TeacherTargets(logits=z_t.float()), y,
            epoch=0, step=0, total_epochs=1)
    ref_inter, ref_intra = _reference(z_s, z_t, 3.0)
    assert set(out) == {"loss_ce", "loss_inter", "loss_intra"}
    assert out["loss_inter"].item() == pytest.approx(2.0 * 9 * ref_inter, rel=1e-5)
    assert out["loss_intra"].item() == pytest.approx(0.5 * 9 * ref_intra, rel=1e-5)
    d = _method().opts
    assert (d.beta, d.gamma, d.T, d.w_gt) == (1.0, 1.0, 1.0, 1.0)
    assert METHODS.get("dist") is DIST and DIST.needs(d).logits


def test_zero_when_student_equals_teacher():
    z, _, y = _inputs(2)
    out = _method(T=2.0)(ModelOutputs(z.float(), torch.zeros(B, 8)), TeacherTargets(logits=z.float()), y,
                         epoch=0, step=0, total_epochs=1)
    assert abs(out["loss_inter"].item()) < 1e-5 and abs(out["loss_intra"].item()) < 1e-5


def test_pearson_is_invariant_to_positive_affine_maps():
    g = torch.Generator().manual_seed(3)
    p_s = torch.softmax(torch.randn(B, C, generator=g, dtype=torch.float64), 1)
    p_t = torch.softmax(torch.randn(B, C, generator=g, dtype=torch.float64), 1)
    base_inter, base_intra = inter_class_relation(p_s, p_t), intra_class_relation(p_s, p_t)
    moved = 3.5 * p_s + 0.2
    assert inter_class_relation(moved, p_t).item() == pytest.approx(base_inter.item(), rel=1e-6)
    assert intra_class_relation(moved, p_t).item() == pytest.approx(base_intra.item(), rel=1e-6)
    # a negative scale flips the correlation
    assert pearson(-p_s, p_t).numpy() == pytest.approx(-pearson(p_s, p_t).numpy(), rel=1e-9)


def test_inter_uses_rows_and_intra_uses_columns():
    g = torch.Generator().manual_seed(4)
    p_t = torch.rand(B, C, generator=g, dtype=torch.float64) + 0.1
    # a different positive affine map per row: rows correlate perfectly, columns do not
    a, b = torch.rand(B, 1, generator=g, dtype=torch.float64) * 5 + 0.1, torch.randn(B, 1, generator=g, dtype=torch.float64)
    per_row = a * p_t + b
    assert inter_class_relation(per_row, p_t).item() == pytest.approx(0.0, abs=1e-7)
    assert intra_class_relation(per_row, p_t).item() > 1e-2
    # a different positive affine map per column: the reverse
    a, b = torch.rand(1, C, generator=g, dtype=torch.float64) * 5 + 0.1, torch.randn(1, C, generator=g, dtype=torch.float64)
    per_col = a * p_t + b
    assert intra_class_relation(per_col, p_t).item() == pytest.approx(0.0, abs=1e-7)
    assert inter_class_relation(per_col, p_t).item() > 1e-2
    # intra is inter on the transposed matrices
    p_s = torch.rand(B, C, generator=g, dtype=torch.float64)
    assert intra_class_relation(p_s, p_t).item() == pytest.approx(inter_class_relation(p_s.T, p_t.T).item())


def test_gradients_reach_student_not_teacher():
    z_s, z_t, y = _inputs(6)
    zs, zt = z_s.float().requires_grad_(True), z_t.float().requires_grad_(True)
    out = _method()(ModelOutputs(zs, torch.zeros(B, 8)), TeacherTargets(logits=zt), y,
                    epoch=0, step=0, total_epochs=1)
    for key in ("loss_inter", "loss_intra"):
        (g,) = torch.autograd.grad(out[key], zs, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    sum(out.values()).backward()
    assert zs.grad is not None and zt.grad is None
