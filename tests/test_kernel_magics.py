"""The magics in a real Jupyter kernel: a notebook built with nbformat, run by nbclient.

The kernel runs this interpreter (a kernelspec written to a temporary JUPYTER_PATH), trains
ZeRO-3 in two CPU processes with the live dashboard, inherits %nexa_config defaults in a
second run, draws the first run again from its record (%nexa_attach), shows the dashboard while
--batch-size auto searches, and shows a bad flag as one UsageError line.
"""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from nexa_nb.hardware import probe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(probe().has_cuda, reason="checks the CPU fallback of fp16"),
]

TASK_CELL = """\
import json
import torch
import nexa_nb

g = torch.Generator().manual_seed(0)
x = torch.randn(64, 4, generator=g)
y = x @ torch.tensor([[1.0], [2.0], [-1.0], [0.5]])

def mse(outputs, batch):
    return torch.nn.functional.mse_loss(outputs.float(), batch[-1].float())

task = nexa_nb.Task(lambda: torch.nn.Linear(4, 1), list(zip(x, y)), loss_fn=mse)
"""

CELLS = [
    "%load_ext nexa_nb",
    TASK_CELL,
    "res = %nexa_train --zero 3 --fp16 --procs 2 --max-steps 6 --batch-size 32 --lr 0.05",
    "print(res.distributed_type, res.num_processes, res.status)\n"
    "print(json.dumps(res.losses))\n"
    "assert res.losses[-1] < res.losses[0]",
    "again = %nexa_attach {res.run_dir}\nassert again.losses == res.losses",
    "%nexa_config --grad-accum 2 --batch-size 4",
    "%config NexaMagics.dashboard = False\nres2 = %nexa_train --max-steps 3",
    "print(res2.plan.grad_accum, res2.plan.micro_batch, len(res2.history), res2.distributed_type)\n"
    "assert nexa_nb.last_result() is res2",
    "%config NexaMagics.dashboard = True\nres3 = %nexa_train --batch-size auto --max-steps 2",
    "%nexa_train --zero 7",
]


def stream(cell, name: str = "stdout") -> str:
    return "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == name)


def test_notebook_trains_with_the_magics(tmp_path, kernel_name):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS])
    nb.cells[-1].metadata["tags"] = ["raises-exception"]
    work = tmp_path / "work"
    work.mkdir()
    NotebookClient(nb, kernel_name=kernel_name, timeout=600, resources={"metadata": {"path": str(work)}}).execute()
    load, _, train, check, attach, config, train2, check2, auto, bad = nb.cells

    assert load.outputs == []
    plan = stream(train).splitlines()
    assert plan[0] == "DeepSpeed ZeRO-3, bf16, 2 x CPU (DEEPSPEED)"
    assert plan[2] == "note: fp16 needs a CUDA GPU; this run trains in bf16 on the CPU instead"
    pictures = [o for o in train.outputs if "image/svg+xml" in o.get("data", {})]
    assert len(pictures) == 1 and pictures[0]["data"]["image/svg+xml"].lstrip().startswith("<svg")
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in train.outputs)
    summary = [o["data"]["text/markdown"] for o in train.outputs if "text/markdown" in o.get("data", {})]
    assert summary and summary[0].startswith("Trained 6 steps with ZeRO-3 (bf16, 2 processes")

    # the run's record draws the same picture in another cell
    assert [o["data"]["image/svg+xml"] for o in attach.outputs if "image/svg+xml" in o.get("data", {})] == [
        pictures[0]["data"]["image/svg+xml"]
    ]

    kind, losses = stream(check).splitlines()
    assert kind == "DEEPSPEED 2 completed"
    assert len(json.loads(losses)) == 6

    assert stream(config).startswith("defaults: batch_size=4, grad_accum=2\n")
    assert "batch: micro 4 x accumulation 2 x 1 procs = effective 8" in stream(train2)
    assert "completed at step 3" in stream(train2)
    assert stream(check2).split() == ["2", "4", "3", "NO"]

    # --batch-size auto: the dashboard is on screen while the search runs, before the plan is
    # printed; its picture took the widget's place, and the summary says what the search chose
    first, *rest = auto.outputs
    assert "image/svg+xml" in first.get("data", {}), [o["output_type"] for o in auto.outputs]
    assert "batch: micro" in stream(auto) and "batch size auto:" in stream(auto)  # the plan, printed after
    summary = next(o["data"]["text/markdown"] for o in rest if "text/markdown" in o.get("data", {}))
    assert "batch size auto:" in summary and "chose" in summary

    errors = [o for o in bad.outputs if o["output_type"] == "error"]
    text = stream(bad, "stderr") + "".join("\n".join(o.get("traceback", [])) for o in errors)
    assert "argument --zero: '7' is not a ZeRO stage" in text and "Fix:" in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
