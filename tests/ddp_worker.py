"""What tests/test_ddp.py runs under torchrun: the runs of a JSON plan, in order, on every rank.

    python -m torch.distributed.run --nproc_per_node 2 ... tests/ddp_worker.py PLAN.json

A plan is {"log": folder, "runs": [entry, ...]}; an entry is {"name", "config": TrainConfig fields}
(run_train called directly) or {"name", "argv": [...], "exit": code} (`kdcache ...` through the
CLI's own main, which must end with that exit code). For every entry each rank writes
<log>/<name>-rank<r>.json: per step, the samples it trained on and how many rows its held targets
had (read by wrapping CachedTargets.batch in this process only), so the test can check the split.
One launch runs every entry: a torchrun start costs seconds on a small CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kdcache.sources import CachedTargets
from kdcache.train import TrainConfig, run_train


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    rank = int(os.environ["RANK"])
    steps: list[dict] = []
    read = CachedTargets.batch

    def recording(self, idx, views):
        steps.append({"idx": [int(i) for i in idx], "held_rows": {k: int(v.shape[0]) for k, v in self.held.items()}})
        return read(self, idx, views)

    CachedTargets.batch = recording
    for entry in plan["runs"]:
        steps.clear()
        if "argv" in entry:
            from kdcache import cli

            sys.argv = ["kdcache", *entry["argv"]]
            try:
                cli.main()
                code = 0
            except SystemExit as stop:
                code = stop.code or 0
            if code != entry.get("exit", 0):
                raise SystemExit(f"{entry['name']}: exit {code}, expected {entry.get('exit', 0)}")
        else:
            run_train(TrainConfig(**entry["config"]))
        Path(plan["log"], f"{entry['name']}-rank{rank}.json").write_text(json.dumps(steps))


if __name__ == "__main__":
    main(sys.argv[1])
