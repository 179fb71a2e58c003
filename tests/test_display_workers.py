"""What `ar iterate --workers N` shows: every running experiment, however they interleave."""

from __future__ import annotations

from autoresearch_cli.display import Display
from sandbox.progress import Progress


def test_plain_output_has_a_line_per_start_of_training_and_per_end(capsys):
    with Display(live=False) as display:
        for exp_id in (2, 3):
            display("start", exp_id=exp_id, index=exp_id - 2, total=2, description="(proposing)",
                    sha="a" * 40)
            display("proposed", exp_id=exp_id, description=f"change {exp_id}")
            display("training", exp_id=exp_id, budget=3.0, slot="1 cpu")
        display("progress", exp_id=3, progress=Progress(5, 50.0, 3.2, 1.5))
        display("done", exp_id=3, result={"status": "ok", "val_bpb": 1.9}, action="keep")
        display("done", exp_id=2, result={"status": "ok", "val_bpb": 2.1}, action="discard")
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "#2    training on 1 cpu  change 2",
        "#3    training on 1 cpu  change 3",
        lines[2],
        lines[3],
    ]
    assert lines[2].startswith("#3") and "keep" in lines[2] and "change 3" in lines[2]
    assert lines[3].startswith("#2") and "discard" in lines[3] and "change 2" in lines[3]


def test_the_live_panel_has_a_bar_per_running_experiment():
    with Display(live=True) as display:
        for exp_id in (2, 3):
            display("start", exp_id=exp_id, index=exp_id - 2, total=2, description="(proposing)",
                    sha="a" * 40)
        display("proposed", exp_id=2, description="change 2")
        display("progress", exp_id=2, progress=Progress(5, 40.0, 3.2, 1.5))
        display("progress", exp_id=3, progress=Progress(9, 70.0, 3.0, 0.9))
        tasks = {task.description: task for task in display._progress.tasks}
        assert tasks["#2 change 2"].completed == 40.0 and tasks["#3 (proposing)"].completed == 70.0
        display("done", exp_id=2, result={"status": "ok", "val_bpb": 2.1}, action="discard")
        assert [task.description for task in display._progress.tasks] == ["#3 (proposing)"]
