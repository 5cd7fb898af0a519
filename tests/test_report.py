"""`kdcache report`: the papers' table from a hand-made results Parquet whose numbers we know."""

from __future__ import annotations

import json
import math

import pytest

from kdcache.errors import KDCacheError
from kdcache.report import Cell, load_published, make_report
from kdcache.results import RunResult, append_result


def _row(tmp_path, *, dataset="cifar100", teacher="swin_t", student="resnet18", method="kd", seed=0, top1=0.0,
         teacher_acc=88.0, subset=0, curve=(), finished="2026-01-01T00:00:00"):
    name = f"{dataset}-{teacher or 'none'}-{student}-{method}-s{seed}"
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for e, a in enumerate(curve, 1):
            f.write(json.dumps({"epoch": e, "step": 10 * e, "top1": a, "seconds": 1.0}) + "\n")
    return RunResult(run_id=f"{name}@{finished}", finished=finished, dataset=dataset, subset=subset, student=student, method=method,
                     mode="cached" if teacher else "none", teacher=teacher, teacher_acc=teacher_acc if teacher
                     else math.nan, preset="p", options="{}", train_config=json.dumps({"run_name": name}),
                     epochs=len(curve) or 1, steps=10, top1=top1, best_top1=top1, train_seconds=1.0,
                     seconds_per_epoch=1.0, seed=seed, store="", checkpoint=str(run_dir / "last.pt"), device="cpu",
                     commit="x")


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "runs.parquet"
    rows = [
        _row(tmp_path, method="kd", seed=0, top1=78.0, curve=(50.0, 70.0, 78.0)),
        _row(tmp_path, method="kd", seed=1, top1=79.0, curve=(52.0, 71.0, 79.0)),
        _row(tmp_path, method="kd", seed=2, top1=80.0, curve=(54.0, 72.0, 80.0)),
        _row(tmp_path, method="ofa", top1=80.0, curve=(60.0, 80.0)),
        _row(tmp_path, teacher="", method="ce", top1=74.5, curve=(40.0, 74.5)),
        _row(tmp_path, teacher="vit_s", student="mobilenetv2", method="kd", top1=70.0, teacher_acc=91.0),
        _row(tmp_path, dataset="fashion-mnist", teacher="resnet18_32", student="resmlp_pico", method="kd", top1=85.25,
             teacher_acc=90.5, subset=10000, curve=(80.0, 85.25)),
    ]
    for r in rows:
        append_result(path, r)
    return path


def test_cell_mean_and_sample_std():
    c = Cell([78.0, 79.0, 80.0])
    assert c.mean == pytest.approx(79.0) and c.std == pytest.approx(1.0)  # sample std (ddof=1)
    assert c.text() == "79.00 ± 1.00"
    assert Cell([74.5]).text() == "74.50" and Cell().text() == ""


def test_published_csv_is_shipped():
    pub = load_published()
    assert pub[("swin_t", "-", "teacher")] == 89.26
    assert pub[("-", "resnet18", "ce")] == 74.01
    assert pub[("convnext_t", "resmlp_s12", "fbt")] == 78.03


def test_report_table_published_and_plots(results, tmp_path):
    out = tmp_path / "report"
    r = make_report(results=results, out=out)
    md = (out / "report.md").read_text()
    assert md == r.markdown
    # ours: mean ± std over the three kd seeds, ce from the student alone, teacher top-1 from the rows
    assert "| swin_t -> resnet18 | 88.00 | ours | 74.50 | 79.00 ± 1.00 | 80.00 |" in md
    # published numbers from the CSV, then ours - published
    assert "|  | 89.26 | published | 74.01 | 78.74 | 80.54 |" in md
    assert "|  | -1.26 | Δ | +0.49 | +0.26 | -0.54 |" in md
    assert "| vit_s -> mobilenetv2 | 91.00 | ours | 74.50 |" not in md  # ce is per student: mobilenetv2 has none
    assert "| vit_s -> mobilenetv2 | 91.00 | ours |  | 70.00 |  |" in md
    assert "|  | 92.04 | published | 73.68 | 72.77 | 78.45 |" in md
    # another benchmark: ours only, no published line
    fashion = md.split("## fashion-mnist")[1]
    assert "| resnet18_32 -> resmlp_pico | 90.50 | ours | 85.25 |" in fashion
    assert "published" not in fashion.split("<details>")[0].split("|---")[1]
    for name in ("accuracy.png", "curves.png", "summary.parquet"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    import pyarrow.parquet as pq

    summary = {(s["teacher"], s["student"], s["method"]): s for s in pq.read_table(out / "summary.parquet").to_pylist()}
    kd = summary[("swin_t", "resnet18", "kd")]
    assert kd["n"] == 3 and kd["mean"] == pytest.approx(79.0) and kd["std"] == pytest.approx(1.0)
    assert kd["diff"] == pytest.approx(79.0 - 78.74)


def test_rerun_rows_count_once(results, tmp_path):
    """A run that was re-run (same run name) counts with its latest row only."""
    append_result(results, _row(tmp_path / "again", method="ofa", top1=81.0, finished="2026-02-01T00:00:00"))
    md = make_report(results=results, out=tmp_path / "r2").markdown
    assert "| swin_t -> resnet18 | 88.00 | ours | 74.50 | 79.00 ± 1.00 | 81.00 |" in md


def test_report_errors(tmp_path, results):
    with pytest.raises(KDCacheError, match="no results table"):
        make_report(results=tmp_path / "missing.parquet", out=tmp_path / "x")
    with pytest.raises(KDCacheError, match="unknown metric"):
        make_report(results=results, out=tmp_path / "x", metric="top5")


def test_report_shows_last_and_best_and_warns_on_few_seeds(tmp_path):
    path = tmp_path / "runs.parquet"
    for seed, (last, best) in enumerate([(70.0, 72.0), (71.0, 74.0)]):
        r = _row(tmp_path / f"s{seed}", dataset="fashion-mnist", method="kd", seed=seed, top1=last)
        r.best_top1 = best
        append_result(path, r)
    md = make_report(results=path, out=tmp_path / "out").markdown
    last_at, best_at = md.index("Top-1 at the last epoch:"), md.index("Top-1 at the best epoch")
    assert "70.50 ± 0.71" in md[last_at:best_at] and "73.00 ± 1.41" in md[best_at:]
    assert "Seeds per cell: 2 (fewer than 3" in md


def test_separation_marks_only_differences_beyond_the_seed_spread(tmp_path):
    """better/worse only where mean ± std intervals do not overlap; one seed has no spread."""
    from kdcache.report import separation

    assert separation(Cell([80.0, 81.0, 82.0]), Cell([75.0, 76.0, 77.0])) == "better"  # 81±1 vs 76±1
    assert separation(Cell([75.0, 76.0, 77.0]), Cell([80.0, 81.0, 82.0])) == "worse"
    assert separation(Cell([78.0, 79.0, 80.0]), Cell([77.0, 78.0, 79.0])) == "within spread"  # gap 1 <= 1 + 1
    assert separation(Cell([78.0, 79.0, 80.0]), Cell([76.5, 77.0, 77.5])) == "better"  # gap 2 > 1 + 0.5
    assert separation(Cell([80.0]), Cell([75.0, 76.0])) == ""
    path = tmp_path / "runs.parquet"
    cells = {("", "ce"): [74.0, 74.5, 75.0], ("swin_t", "kd"): [76.0, 76.5, 77.0],
             ("swin_t", "ofa"): [76.2, 76.9, 77.6], ("swin_t", "dkd"): [72.0, 72.5, 73.0]}
    for (teacher, method), values in cells.items():
        for seed, top1 in enumerate(values):
            append_result(path, _row(tmp_path / f"{method}{seed}", dataset="fashion-mnist", teacher=teacher,
                                     method=method, seed=seed, top1=top1))
    md = make_report(results=path, out=tmp_path / "out").markdown
    table = md[md.index("Each method against `ce` and `kd`"):]
    assert "| swin_t -> resnet18 | ofa | +2.40 (better) | +0.40 (within spread) |" in table
    assert "| swin_t -> resnet18 | dkd | -2.00 (worse) | -4.00 (worse) |" in table
