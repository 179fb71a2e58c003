"""What `ar iterate` prints when its output is not a terminal: one plain line per experiment."""

from __future__ import annotations

from autoresearch_cli.display import Display
from autoresearch_cli.doors.records import Run
from autoresearch_cli.research.evidence import CommitEvidence
from autoresearch_cli.research.keeprule import Noise


def evidence_of(sha: str, *values: float) -> CommitEvidence:
    runs = tuple(Run(id=i, kind="experiment", status="ok", started_at="", sha=sha, val_bpb=v)
                 for i, v in enumerate(values))
    return CommitEvidence(sha, "cpu:2", runs, Noise(0.01, 10, 3))


def test_plain_lines_and_counts(capsys):
    standing = {"now": (evidence_of("a", 2.0, 2.02), evidence_of("a", 2.0, 2.02))}
    with Display(live=False, standing=lambda: standing["now"], cost=lambda: 0.25) as display:
        display("start", exp_id=1, index=0, total=1, description="baseline", sha="a" * 40)
        display("done", exp_id=1, result={"status": "ok", "val_bpb": 2.0}, action="record",
                measure=True)
        display("start", exp_id=2, index=0, total=3, description="(proposing)", sha="a" * 40)
        display("proposed", exp_id=2, description="MATRIX_LR 0.04 -> 0.05")
        standing["now"] = (evidence_of("a", 2.0, 2.02), evidence_of("b", 1.9, 1.92))
        display("done", exp_id=2, result={"status": "ok", "val_bpb": 1.9}, action="keep")
        display("done", exp_id=3, result={"status": "timeout", "val_bpb": None, "reason": "killed at 85 s"},
                action="repair")
        display("done", exp_id=4, result={"status": "ok", "val_bpb": 1.95}, action="discard")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("#1") and "measured" in lines[0] and "2.000000" in lines[0]
    assert "MATRIX_LR 0.04 -> 0.05" in lines[1] and "keep" in lines[1] and "1.900000" in lines[1]
    assert "timeout" in lines[2] and "killed at 85 s" in lines[2]
    assert "discard" in lines[3]
    status = display.status_line()
    assert "best 1.910000 ± 0.0158 (2 runs), -0.100000 vs baseline 2.010000 ± 0.0158 (2 runs)" in status
    assert "keep 1  discard 1  crash 1  invalid 0" in status and "cost $0.2500" in status


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_plain_output_shows_the_model_answering_every_few_seconds(capsys, monkeypatch):
    from autoresearch_cli import display as display_mod

    clock = FakeClock()
    monkeypatch.setattr(display_mod, "time", clock)
    with Display(live=False) as display:
        display("start", exp_id=2, index=0, total=3, description="(proposing)", sha="a" * 40)
        display("answering", tokens=0, seconds=5.0)  # reading the prompt
        clock.now += 1
        display("answering", tokens=1, seconds=6.0)  # the first token is shown at once
        for _ in range(10):  # then at most a line every 5 s
            clock.now += 1
            display("answering", tokens=int(clock.now - 100) * 10, seconds=clock.now - 94)
        display("start", exp_id=3, index=1, total=3, description="(proposing)", sha="a" * 40)
        display("answering", tokens=1, seconds=0.4)  # a new proposal starts over
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "  waiting for the model: 5 s, no token yet",
        "  model answering: 1 token, 6 s",
        "  model answering: 60 tokens, 12 s",
        "  model answering: 110 tokens, 17 s",
        "  model answering: 1 token, 0 s",
    ]


def test_live_panel_shows_the_model_answering():
    with Display(live=True) as display:
        display("start", exp_id=2, index=0, total=3, description="(proposing)", sha="a" * 40)
        display("answering", tokens=312, seconds=14.2)
        assert display.answer == "model answering: 312 tokens, 14 s"
        display("proposed", exp_id=2, description="MATRIX_LR 0.04 -> 0.05")
        assert display.answer == ""
