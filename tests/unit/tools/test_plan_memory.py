"""tools/plan_memory.py: the command line prints the breakdown and the largest num_classes
(the planner's scaling laws: tests/unit/trainer/test_memory_plan.py)."""

import re

from tools import plan_memory


def test_cli_prints_breakdown_and_max_classes(capsys):
    rc = plan_memory.main(
        ["--network", "r18", "--model-kwargs", '{"base_width": 8}', "--embedding-size", "64",
         "--num-classes", "100000", "--batch-size", "4", "--world-size", "2",
         "--device-memory-gb", "2"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "| **peak per device**" in out
    found = re.search(r"Largest num_classes fitting 2 GiB per device: ([\d,]+)", out)
    assert found and int(found.group(1).replace(",", "")) > 100000
    assert plan_memory.main(["--network", "r18", "--sample-rate", "2"]) == 2
    assert plan_memory.main(
        ["--network", "r18", "--model-kwargs", '{"base_width": 8}', "--num-subcenters", "3"]
    ) == 0  # fmt: skip
    assert "3 sub-centers per class" in capsys.readouterr().out
