"""Declarative sweeps: a pipeline TOML -> a plan of tasks -> teachers, extractions, student runs.

`kdcache sweep PIPELINE.toml` runs a whole paper table. One job per file:

- pipeline.py: the pipeline TOML schema (`Pipeline`, `TeacherSpec`, `load_pipeline`, name checks);
- plan.py: the tasks, their status, run identity (`run_key`, `run_name_of`), the configurations they
  run with, the teacher forwards they save or cost and the storage estimate;
- show.py: the plan as a table (`print_plan`, `--dry-run`);
- run.py: preflight, running the tasks here or on Dask workers, `run_sweep`, `SweepSummary`.

This package is a verb (floor 6): it imports the stages (train, extract) and the layers below them,
never another verb. This file only re-exports what the CLI, the report and the tests use.
"""

from kdcache.sweep.pipeline import Pipeline, TeacherSpec, load_pipeline
from kdcache.sweep.plan import Task, dataset_size, estimate_storage, plan_sweep, run_key, run_name_of
from kdcache.sweep.run import SweepSummary, execute_task, preflight, run_sweep
from kdcache.sweep.show import print_plan

__all__ = ["Pipeline", "SweepSummary", "Task", "TeacherSpec", "dataset_size", "estimate_storage", "execute_task",
           "load_pipeline", "plan_sweep", "preflight", "print_plan", "run_key", "run_name_of", "run_sweep"]
