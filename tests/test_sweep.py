"""Pipelines and the sweep runner: plan, dry-run, skip-what-is-done, resume after interruption."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

import kdcache.extract
import kdcache.train
from kdcache.errors import KDCacheError
from kdcache.sweep import load_pipeline, plan_sweep, run_sweep

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
SMOKE = PIPELINES / "smoke.toml"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _console() -> Console:
    return Console(file=io.StringIO(), width=250)


def _text(console: Console) -> str:
    return console.file.getvalue()


def _created(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.fixture
def counters(monkeypatch):
    """Count the teacher trainings, extractions and student runs the sweep really starts."""
    counts = {"teacher": 0, "extract": 0, "train": 0, "fail_at": None}
    real_train, real_extract = kdcache.train.run_train, kdcache.extract.run_extract

    def run_train(cfg):
        kind = "teacher" if cfg.save_teacher_to else "train"
        counts[kind] += 1
        if kind == "train" and counts["fail_at"] == counts["train"]:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during this run
        return real_train(cfg)

    def run_extract(cfg):
        counts["extract"] += 1
        return real_extract(cfg)

    monkeypatch.setattr(kdcache.train, "run_train", run_train)
    monkeypatch.setattr(kdcache.extract, "run_extract", run_extract)
    return counts


def test_all_pipelines_load_and_plan():
    """Every shipped pipeline is valid; cifar100 has the table's pairs, methods and 300 views."""
    for path in sorted(PIPELINES.glob("*.toml")):
        load_pipeline(path)
    pipe = load_pipeline(PIPELINES / "cifar100.toml")
    assert pipe.pairs[0] == ("swin_t", "resnet18") and len(pipe.pairs) == 7
    assert pipe.methods == ["ce", "kd", "dkd", "dist", "ofa", "mldr", "hcd", "fbt"]
    assert pipe.views == 300 and pipe.recipe == "ofa_cnn" and pipe.device == "cuda"
    # the papers train token students with another recipe: their own store
    assert pipe.recipe_for("deit_t") == pipe.recipe_for("resmlp_s12") == "ofa_vit"
    assert pipe.recipe_for("resnet18") == "ofa_cnn"
    assert pipe.store_root_for("ofa_vit") == pipe.store_root / "ofa_vit"
    assert set(pipe.teachers) == {"swin_t", "vit_s", "mixer_b16", "convnext_t"}
    assert all(t.pretrained and t.finetune for t in pipe.teachers.values())


def test_cifar100_dry_run_plan_without_data_or_gpu(tmp_path, monkeypatch):
    """The full cifar100 plan, with forwards saved (epochs x N per run, minus views x N per teacher)
    and storage (views x N x (C + D_t) x 2 bytes); no data, no GPU, nothing written."""
    import kdcache.sweep.plan as sweep_plan
    from kdcache.models import ModelInfo

    widths = {"swin_t": 768, "vit_s": 384, "mixer_b16": 768, "convnext_t": 768}
    stage3 = (384, 14, 14)
    monkeypatch.setattr(sweep_plan, "teacher_shapes", lambda alias, c: ModelInfo(
        alias, "x", 224, c, widths[alias], ((96, 56, 56), (192, 28, 28), stage3, (768, 7, 7))))
    console = _console()
    summary = run_sweep(PIPELINES / "cifar100.toml", dry_run=True, workdir=tmp_path, console=console)
    assert _created(tmp_path) == []
    tasks = {t.id: t for t in summary.tasks}
    trains = [t for t in summary.tasks if t.kind == "train"]
    assert len(trains) == 4 + 7 * 7  # ce once per student, 7 KD methods x 7 pairs
    assert sum(t.kind == "teacher" and t.status == "todo" for t in summary.tasks) == 4
    kd = next(t for t in trains if t.method == "kd" and t.teacher == "swin_t" and t.student == "resnet18")
    assert kd.forwards == 300 * 50000 and kd.deps == ["extract:swin_t"]
    ex = tasks["extract:swin_t"]
    assert ex.config.recipe == "ofa_cnn" and "extract:convnext_t" not in tasks  # convnext_t teaches token students only
    deit = next(t for t in trains if t.method == "kd" and t.student == "deit_t")
    assert deit.config.recipe == "ofa_vit" and deit.deps == ["extract:convnext_t@ofa_vit"]
    assert deit.config.store_root == tasks["extract:convnext_t@ofa_vit"].config.store_root
    assert ex.forwards == -300 * 50000 and ex.deps == ["teacher:swin_t"]
    assert ex.storage == 300 * 50000 * (100 + 768) * 2
    for t in trains:
        assert t.status in ("todo", "unavailable"), t
    text = _text(console)
    # an extraction's forwards are a cost in their own column, never a negative saving
    assert "teacher fwd saved" in text and "teacher fwd cost" in text and "15.00M" in text
    assert "-15.00M" not in text
    assert "train resnet18 <- swin_t, kd, seed 0" in text
    if "fbt" in [t.method for t in trains if t.status != "unavailable"]:
        # FBT, ConvNeXt-T teacher -> token students: its stage-3 maps, counted in the storage
        conv = tasks["extract:convnext_t@ofa_vit"]
        assert conv.config.recipe == "ofa_vit" and conv.config.store_root.endswith("ofa_vit")
        assert 3 in conv.needs.stages
        # int8 (plus an fp16 scale per channel) for a budget of 16 views (pipelines/cifar100.toml)
        assert conv.storage == 300 * 50000 * (100 + 768) * 2 + 16 * 50000 * (384 * 14 * 14 + 2 * 384)


def test_cifar100_without_data_or_gpu_fails_at_once(tmp_path, monkeypatch):
    import torch

    import kdcache.sweep.plan as sweep_plan
    import kdcache.sweep.run as sweep_run

    monkeypatch.setattr(sweep_run, "execute_task", lambda *a: pytest.fail("a task started"))
    monkeypatch.setattr(sweep_plan, "teacher_shapes", lambda *a: pytest.fail("estimated before checking"))
    with pytest.raises(KDCacheError) as err:
        run_sweep(PIPELINES / "cifar100.toml", workdir=tmp_path, console=_console())
    msg = err.value.message
    assert "cannot start sweep cifar100" in msg
    # the pipeline downloads CIFAR-100 itself (download = true): missing data is no reason to stop;
    # without a GPU the device is
    assert "cifar-100-python" not in msg
    if not torch.cuda.is_available():
        assert "CUDA device" in msg and "--device cpu" in msg
    assert _created(tmp_path) == []


def test_smoke_dry_run_does_nothing(tmp_path, counters):
    console = _console()
    summary = run_sweep(SMOKE, dry_run=True, workdir=tmp_path, console=console)
    assert counters["teacher"] == counters["extract"] == counters["train"] == 0
    assert _created(tmp_path) == []
    assert [t.status for t in summary.tasks] == ["todo"] * 6
    # 2 KD runs x (2 steps x batch 32) forwards saved, one extraction of 2 views x 512 samples spent
    assert summary.forwards_saved == 2 * 2 * 32 - 2 * 512
    assert summary.storage == 2 * 512 * (10 + 512) * 2  # resnet10t: 10 classes + 512-wide embedding, fp16
    text = _text(console)
    assert "extract resnet10t" in text and "1.0 MB" in text and "1.02k" in text and "-1.02k" not in text
    assert "net cost 896" in text  # 128 forwards saved, 1024 spent: a cost, not a negative saving


def test_only_and_unavailable_methods(tmp_path):
    pipe = load_pipeline(SMOKE, tmp_path)
    tasks = plan_sweep(pipe, ["kd", "student=deit_pico"], estimate=False)
    assert [t.id.split(":")[0] for t in tasks] == ["teacher", "extract", "train"]
    assert tasks[-1].student == "deit_pico" and tasks[-1].method == "kd"
    assert [t.student for t in plan_sweep(pipe, ["ce"], estimate=False)] == ["resmlp_pico", "deit_pico"]
    with pytest.raises(KDCacheError, match="unknown key"):
        plan_sweep(pipe, ["colour=red"], estimate=False)
    # a method that is not registered (yet) is planned as unavailable, never a crash
    text = SMOKE.read_text().replace('methods = ["ce", "kd"]', 'methods = ["ce", "kd", "notyet"]')
    (tmp_path / "p.toml").write_text(text)
    tasks = plan_sweep(load_pipeline(tmp_path / "p.toml", tmp_path), estimate=False)
    notyet = [t for t in tasks if t.method == "notyet"]
    assert len(notyet) == 2 and all(t.status == "unavailable" and "not registered" in t.note for t in notyet)
    # a pair can be limited to some methods
    text = SMOKE.read_text().replace('["resnet10t", "deit_pico"]',
                                     '{ teacher = "resnet10t", students = ["deit_pico"], methods = ["ce"] }')
    (tmp_path / "q.toml").write_text(text)
    tasks = plan_sweep(load_pipeline(tmp_path / "q.toml", tmp_path), estimate=False)
    assert [(t.student, t.method) for t in tasks if t.kind == "train"] == [
        ("resmlp_pico", "ce"), ("deit_pico", "ce"), ("resmlp_pico", "kd")]


def test_pipeline_problems_reported_together(tmp_path):
    (tmp_path / "bad.toml").write_text('pairs = [["nosuch", "resnet18"]]\n[dataset]\nname = "synthetic"\n'
                                       '[train]\nepoch = 3\n')
    with pytest.raises(KDCacheError) as err:
        load_pipeline(tmp_path / "bad.toml", tmp_path)
    msg = err.value.message
    assert "'nosuch'" in msg and "'epoch' is not a training setting" in msg and "problem(s)" in msg


def test_interrupted_sweep_finishes_only_the_missing_runs(tmp_path, counters):
    # 1. Ctrl-C during the second student run: teacher, extraction and one run are done
    counters["fail_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SMOKE, workdir=tmp_path, progress=False, console=_console())
    assert counters == {"teacher": 1, "extract": 1, "train": 2, "fail_at": 2}
    # 2. a limited re-run: one more student run
    counters.update(teacher=0, extract=0, train=0, fail_at=None)
    s = run_sweep(SMOKE, workdir=tmp_path, progress=False, max_runs=1, console=_console())
    assert s.ran == {"teacher": 0, "extract": 0, "train": 1} and s.stopped_early
    assert counters["train"] == 1
    # 3. the full re-run trains only the two runs still missing; no teacher, no extraction
    counters.update(train=0)
    s = run_sweep(SMOKE, workdir=tmp_path, progress=False, console=_console())
    assert (counters["teacher"], counters["extract"], counters["train"]) == (0, 0, 2)
    assert s.ok and s.count("done", "train") == 4
    # 4. everything done: nothing runs
    counters.update(train=0)
    s = run_sweep(SMOKE, workdir=tmp_path, progress=False, console=_console())
    assert counters["train"] == 0 and all(t.status == "done" for t in s.tasks)
    from kdcache.results import read_results

    rows = read_results(tmp_path / "results" / "smoke.parquet")
    assert len(rows) == 4 and {r["method"] for r in rows} == {"ce", "kd"}
    # a run whose checkpoint is gone is not done any more
    kd = next(r for r in rows if r["method"] == "kd")
    Path(kd["checkpoint"]).unlink()
    tasks = plan_sweep(load_pipeline(SMOKE, tmp_path), estimate=False)
    assert [t.label for t in tasks if t.status == "todo"] == [f"train {kd['student']} <- resnet10t, kd, seed 0"]
    # and the report reads the pipeline's runs
    from kdcache.report import make_report

    r = make_report(SMOKE, workdir=tmp_path)
    assert (tmp_path / "results" / "smoke" / "report.md").is_file()
    assert "| resnet10t -> resmlp_pico |" in r.markdown and "published" not in r.markdown.split("<details>")[0]


def test_family_recipes_get_their_own_store(tmp_path, counters):
    """[recipes] vit = ...: the token student's runs read a second store of the same teacher, extracted
    over that recipe's views; the other runs keep [views] recipe's store; a re-run does nothing."""
    from kdcache.results import read_results
    from kdcache.store import Store, store_path

    pipe_file = tmp_path / "two-recipes.toml"
    pipe_file.write_text(SMOKE.read_text().replace("[presets]", '[recipes]\nvit = "rrc"\n\n[presets]'))
    pipe = load_pipeline(pipe_file, tmp_path)
    tasks = {t.id: t for t in plan_sweep(pipe, estimate=False)}
    assert {i for i in tasks if i.startswith("extract")} == {"extract:resnet10t", "extract:resnet10t@rrc"}
    assert tasks["teacher:resnet10t"].status == "todo"
    assert tasks["extract:resnet10t"].deps == tasks["extract:resnet10t@rrc"].deps == ["teacher:resnet10t"]
    s = run_sweep(pipe_file, workdir=tmp_path, progress=False, console=_console())
    assert s.ok and (counters["teacher"], counters["extract"], counters["train"]) == (1, 2, 4)
    padcrop = Store.open(store_path(tmp_path / "cache" / "smoke", "synthetic", "train", None))
    rrc = Store.open(store_path(tmp_path / "cache" / "smoke" / "rrc", "synthetic", "train", None))
    assert (padcrop.attrs.recipe, rrc.attrs.recipe) == ("padcrop", "rrc")
    assert padcrop.teacher("resnet10t").done_mask().all() and rrc.teacher("resnet10t").done_mask().all()
    rows = {(r["student"], r["method"]): r for r in read_results(tmp_path / "results" / "smoke.parquet")}
    import json

    recipe_of = {k: json.loads(r["train_config"])["recipe"] for k, r in rows.items()}
    assert recipe_of == {("deit_pico", "kd"): "rrc", ("deit_pico", "ce"): "rrc",
                         ("resmlp_pico", "kd"): "padcrop", ("resmlp_pico", "ce"): "padcrop"}
    counters.update(teacher=0, extract=0, train=0)
    s = run_sweep(pipe_file, workdir=tmp_path, progress=False, console=_console())
    assert (counters["teacher"], counters["extract"], counters["train"]) == (0, 0, 0)
    # an unknown recipe or family is named with the pipeline's other problems
    bad = tmp_path / "bad.toml"
    bad.write_text(SMOKE.read_text().replace("[presets]", '[recipes]\nvit = "nope"\ncnnn = "rrc"\n\n[presets]'))
    with pytest.raises(KDCacheError) as err:
        load_pipeline(bad, tmp_path)
    assert "[recipes] vit = 'nope': unknown recipe" in err.value.message
    assert "[recipes] cnnn: not a model family" in err.value.message


def test_dask_scheduler_runs_the_plan(tmp_path):
    """With a scheduler, tasks go to workers with a GPU resource: teacher, then extraction, then runs."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster:
        s = run_sweep(SMOKE, workdir=tmp_path, scheduler=cluster.scheduler_address, console=_console())
    assert s.ok and s.ran == {"teacher": 1, "extract": 1, "train": 4}
    from kdcache.results import read_results

    assert len(read_results(tmp_path / "results" / "smoke.parquet")) == 4
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(KDCacheError, match="GPU resource"):  # (nothing left to do would not ask)
            run_sweep(SMOKE, workdir=tmp_path / "other", scheduler=cluster.scheduler_address, console=_console())


def test_cli_sweep_dry_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdcache import cli

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli.app, ["sweep", str(SMOKE), "--dry-run", "--only", "method=kd"])
    assert r.exit_code == 0, r.output
    assert "teacher fwd saved" in r.output and "deit_pico <- resnet10t, kd" in r.output
    assert _created(tmp_path) == []


def test_ensemble_pairs_depend_on_each_members_extraction(tmp_path):
    """pairs = [["a,b", "s"]]: logit methods read both teachers' extractions; feature methods are
    planned as unavailable with the reason; a member not among [[teachers]] is named."""
    text = SMOKE.read_text().replace('methods = ["ce", "kd"]', 'methods = ["ce", "kd", "rsd"]').replace(
        'pairs = [["resnet10t", "resmlp_pico"], ["resnet10t", "deit_pico"]]',
        'pairs = [["resnet10t,mixer_pico", "deit_pico"]]')
    text += '\n[[teachers]]\nalias = "mixer_pico"\nfinetune = { preset = "fashion_vit", epochs = 1 }\n'
    path = tmp_path / "ensemble.toml"
    path.write_text(text)
    tasks = {t.id: t for t in plan_sweep(load_pipeline(path, tmp_path), estimate=False)}
    kd = next(t for t in tasks.values() if t.kind == "train" and t.method == "kd")
    assert kd.teacher == "resnet10t,mixer_pico" and kd.deps == ["extract:resnet10t", "extract:mixer_pico"]
    assert kd.forwards == 2 * 2 * 32  # two teachers' forwards per sample seen
    rsd = next(t for t in tasks.values() if t.kind == "train" and t.method == "rsd")
    assert rsd.status == "unavailable" and "logit targets only" in rsd.note
    assert {"extract:resnet10t", "extract:mixer_pico"} <= set(tasks)
    path.write_text(text.replace('alias = "mixer_pico"', 'alias = "vit_pico"'))
    with pytest.raises(KDCacheError, match="pair teacher 'mixer_pico' is not among the"):
        load_pipeline(path, tmp_path)


def test_gpus_per_run_makes_student_runs_ddp(tmp_path):
    """gpus_per_run = 2: each student run is a 2-rank torchrun (gloo here) of the same config: one
    result row per run, its identity recording the world size; a re-run finds it done."""
    import json

    from kdcache.results import read_results

    path = tmp_path / "ddp.toml"
    path.write_text(SMOKE.read_text().replace("max_steps = 2", "max_steps = 2\ngpus_per_run = 2"))
    tasks = plan_sweep(load_pipeline(path, tmp_path), estimate=False)
    assert {t.gpus for t in tasks if t.kind == "train"} == {2}
    s = run_sweep(path, workdir=tmp_path, progress=False, only=["student=deit_pico", "method=kd"],
                  console=_console())
    assert s.ok and s.count("done", "train") == 1
    rows = read_results(tmp_path / "results" / "smoke.parquet")
    assert len(rows) == 1 and rows[0]["method"] == "kd"
    assert json.loads(rows[0]["train_config"])["world_size"] == 2
    again = plan_sweep(load_pipeline(path, tmp_path), only=["student=deit_pico", "method=kd"], estimate=False)
    assert [t.status for t in again if t.kind == "train"] == ["done"]
    bad = tmp_path / "bad.toml"
    bad.write_text(SMOKE.read_text().replace("max_steps = 2", "max_steps = 2\ngpus_per_run = 0"))
    with pytest.raises(KDCacheError, match="gpus_per_run = 0"):
        load_pipeline(bad, tmp_path)
