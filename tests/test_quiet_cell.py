"""What a run prints into the cell: nexa_nb's own lines, what the task prints, and nothing the
libraries say to nobody (DeepSpeed's op banners, peft's guesses, deprecations meant for the
libraries' authors), whatever the number of processes."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest

from nexa_nb.launch import LIBRARY_BANNERS, WithoutLines


def test_without_lines_drops_matching_lines_and_their_newline_only():
    out = io.StringIO()
    stream = WithoutLines(out, LIBRARY_BANNERS)
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", file=stream)
    print("my own line about DeepSpeed", file=stream)
    print("", file=stream)
    assert out.getvalue() == "my own line about DeepSpeed\n\n"


def run_script(code: str) -> str:
    """What a script's training prints, stdout and stderr together: forked workers write to the
    same streams, as they do into a notebook cell (pytest's in-memory capture would lose them)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


@pytest.mark.slow
def test_a_zero_run_in_two_processes_prints_only_nexa_nb_and_the_task():
    printed = run_script("""
        import torch, nexa_nb
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        def loss_fn(out, batch):
            print("the task says hello")
            return torch.nn.functional.mse_loss(out, batch[-1])
        task = nexa_nb.Task(lambda: torch.nn.Linear(4, 1), list(zip(x, x.sum(1, keepdim=True))), loss_fn=loss_fn)
        nexa_nb.train(task, zero=2, procs=2, batch_size=8, max_steps=2)
    """)
    assert "the task says hello" in printed  # the task's own prints still show
    assert "built successfully" not in printed and "Launching training" not in printed
    assert any(line.startswith("nexa: ZeRO-2") for line in printed.splitlines())


@pytest.mark.slow
def test_lora_on_a_gpt2_model_with_gradient_checkpointing_warns_nothing():
    printed = run_script("""
        import torch, nexa_nb
        from transformers import GPT2Config, GPT2LMHeadModel
        def model():
            return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16))
        ids = torch.randint(0, 97, (32, 16), generator=torch.Generator().manual_seed(0))
        task = nexa_nb.Task(model, [{"input_ids": row, "labels": row} for row in ids])
        result = nexa_nb.train(task, zero=3, procs=2, batch_size=4, max_steps=2, lora=True, grad_ckpt=True, sinks=[])
        print("status", result.status)
    """)
    assert "status completed" in printed
    for noise in ("fan_in_fan_out", "is_gradient_checkpointing", "built successfully", "Warning"):
        assert noise not in printed, noise


@pytest.mark.slow
def test_in_a_kernel_a_transformers_run_and_its_reload_print_no_library_noise(tmp_path, kernel_name):
    """In a real kernel: no per-rank load reports, no op banners or DeepSpeed set-up warnings
    in this cell or a later one, and no loading bar when the trained model is read back."""
    import nbformat
    from nbclient import NotebookClient

    cells = [
        "%load_ext nexa_nb",
        textwrap.dedent("""
            import torch, nexa_nb
            from transformers import GPT2Config, GPT2LMHeadModel
            config = GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16, bos_token_id=0, eos_token_id=0
            )
            def model():
                return GPT2LMHeadModel(config)
            ids = torch.randint(0, 97, (32, 16), generator=torch.Generator().manual_seed(0))
            task = nexa_nb.Task(model, [{"input_ids": row, "labels": row} for row in ids])
        """),
        "%config NexaMagics.dashboard = False\nres = %nexa_train --zero 3 --procs 2 --batch-size 4 --max-steps 2",
        "print('next cell')",
        "m = res.trained_model()\nprint(type(m).__name__)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    NotebookClient(nb, kernel_name=kernel_name, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    train, later, reload = nb.cells[2:]

    def printed(cell):
        return "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream")

    for noise in ("LOAD REPORT", "built successfully", "Setting accelerator", "Loading weights", "Warning"):
        assert noise not in printed(train) + printed(later) + printed(reload), noise
    assert "completed at step 2" in printed(train)
    assert printed(later) == "next cell\n"
    assert printed(reload) == "GPT2LMHeadModel\n"
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in reload.outputs)
