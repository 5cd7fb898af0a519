"""`kdcache bench` end to end at a tiny size: every mode measured, ratios derived, one Parquet row."""

from __future__ import annotations

import math

import pyarrow.parquet as pq

from kdcache.bench import BenchConfig, run_bench


def test_bench_measures_every_mode_and_appends_a_row(tmp_path):
    results = tmp_path / "bench.parquet"
    row = run_bench(BenchConfig(teacher="resnet10t", student="resnet10t", dataset="synthetic", subset=256,
                                batch_size=32, steps=3, views=2, topk=3, device="cpu", results=str(results),
                                workdir=str(tmp_path / "work")))
    for mode in ("ce", "cached", "online", "teacher"):
        assert row[f"{mode}_step_s"] > 0 and row[f"{mode}_images_per_s"] > 0, mode
    assert row["extract_images_per_s"] > 0 and row["extract_topk_images_per_s"] > 0
    # the ratios are the measured quantities divided, not constants
    assert math.isclose(row["cached_over_ce"], row["cached_step_s"] / row["ce_step_s"])
    assert math.isclose(row["ideal_online_over_cached"], 1 + row["teacher_step_s"] / row["ce_step_s"])
    assert math.isclose(row["extract_over_teacher"], row["extract_images_per_s"] / row["teacher_images_per_s"])
    # DDP on the CPU: 2 torchrun ranks against one process at the same global batch, both measured
    assert row["ddp_ranks"] == 2 and row["ddp_one_images_per_s"] > 0 and row["ddp_ranks_images_per_s"] > 0
    assert math.isclose(row["ddp_speedup"], row["ddp_ranks_images_per_s"] / row["ddp_one_images_per_s"])
    # synthetic has 10 classes: fp16 dense logits 20 bytes + chunk overhead; top-3 ids/values/lse below that
    assert 20 <= row["logits_bytes_per_view"] < 22
    assert 0 < row["topk_bytes_per_view"] < row["logits_bytes_per_view"]
    table = pq.read_table(results).to_pylist()
    assert len(table) == 1 and table[0]["teacher"] == "resnet10t" and table[0]["device"] == "cpu"
