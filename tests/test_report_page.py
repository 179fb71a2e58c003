"""`ar report`: the page in a real headless Chromium (no console error, the numbers of `ar
log --json`, one point per run, the live page updating when a row lands), and the
Markdown summary."""

from __future__ import annotations

import json
import os
import threading

import pytest
from browser import Page, chromium_path
from reportdata import BASELINE, CLASS, HOSTILE, STEP_A, STEP_B, add_run, night

from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.report import write
from autoresearch_cli.report.serve import open_server


@pytest.fixture
def page():
    binary = chromium_path()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI must test the page in Chromium: .ci/run installs it (apt)")
        pytest.skip("no Chromium on this machine (apt-get install chromium): the page is not tested")
    opened = Page(binary)
    yield opened
    opened.close()


@pytest.fixture
def researched(micro_ws):
    return micro_ws, night(micro_ws)


def _log_json(cli, *args):
    result = cli("log", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _values(page, field):
    return page.evaluate(f"Array.from(document.querySelectorAll('[data-field=\"{field}\"]'))"
                         ".map(e => e.dataset.value === undefined ? null : Number(e.dataset.value))")


def test_the_page_shows_the_numbers_of_ar_log(researched, cli, page, tmp_path):
    ws, made = researched
    result = cli("report", "--out", tmp_path / "night.html")
    assert result.exit_code == 0, result.output
    page.open((tmp_path / "night.html").as_uri())
    assert page.errors == []
    assert page.evaluate("document.title").startswith("autoresearch/test")

    rows = _log_json(cli)
    scored = {row["id"]: row["val_bpb"] for row in rows
              if row["status"] == "ok" and row["val_bpb"] is not None}
    drawn = page.evaluate("Array.from(document.querySelectorAll('circle.run'))"
                          ".map(c => [Number(c.dataset.id), Number(c.dataset.val)])")
    assert dict(drawn) == pytest.approx(scored) and len(drawn) == len(scored) == 12
    failed = page.evaluate("Array.from(document.querySelectorAll('path.failed')).map(p => Number(p.dataset.id))")
    assert failed == [made.ids["crash"]]

    chain = _log_json(cli, "--best")
    assert _values(page, "val_baseline") == [pytest.approx(chain[0]["val_bpb"])]
    assert _values(page, "val_best") == [pytest.approx(chain[-1]["val_bpb"])]
    assert _values(page, "val_gain") == [pytest.approx(chain[-1]["cumulative_improvement"])]
    assert _values(page, "step_gain") == pytest.approx([step["improvement"] for step in chain[1:]])
    commits = page.evaluate("Array.from(document.querySelectorAll('g.commit[data-kind=keep]'))"
                            ".map(g => Number(g.dataset.mean))")
    assert commits == pytest.approx([step["val_bpb"] for step in chain[1:]])
    # the holdout: scored, never decided on, gaining less than val (the optimism)
    holdout = _values(page, "holdout_gain")[0]
    assert 0 < holdout < chain[-1]["cumulative_improvement"]
    assert _values(page, "optimism") == [pytest.approx(chain[-1]["cumulative_improvement"] - holdout)]
    # a model's description is text, never markup
    assert page.evaluate("document.querySelectorAll('script').length") == 0
    assert HOSTILE in page.evaluate("document.body.innerText")
    assert page.evaluate("document.querySelectorAll('tr.failure').length") == 2


def test_the_markdown_summary(researched, tmp_path):
    ws, made = researched
    html_path, md_path = write.write(ws, tmp_path / "r.html")
    text = md_path.read_text()
    paired = sum(a - b for a, b in zip(BASELINE, STEP_B, strict=False)) / 3
    assert f"+{paired:.6f}" in text and "3 seeds paired" in text
    assert "| val |" in text and "| holdout |" in text and "optimism" in text
    assert "\\<script\\>" in text and "<script>" not in text  # escaped in the table
    assert "-MATRIX_LR = 0.04" in text and "+WEIGHT_DECAY = 0.3" in text  # the whole diff
    assert "5 model calls, 5,000 prompt and 1,000 completion tokens, $0.0500" in text
    assert "| 1 | crash | train.py exited with code 1 |" in text
    assert f"{STEP_A[0]:.6f}" not in text  # a mean is shown, never one lucky run
    assert html_path.read_text().startswith("<!doctype html>")


def test_the_live_page_updates_when_a_row_lands(researched, page):
    ws, made = researched
    server, live, url = open_server(ws)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        page.open(url)
        assert page.evaluate("document.querySelectorAll('circle.run').length") == 12
        assert "nothing running" in page.evaluate("document.getElementById('running').innerText")
        with Ledger.for_workspace(ws.root) as ledger:  # `ar iterate` in another terminal
            running = ledger.start_experiment("experiment", made.shas["b"], "try GELU", "llm",
                                              status="running")
            run_dir = ws.runs_dir / str(running)
            run_dir.mkdir(parents=True)
            (run_dir / "train.log").write_text("step 00012 (40.0%) | loss: 3.141500 | remaining: 2s\n")
            assert page.wait_for(f"document.querySelector('tr.running[data-id=\"{running}\"]') !== null")
            assert page.evaluate("document.getElementById('running').innerText").count("40.0") == 1
            landed = add_run(ledger, "experiment", made.shas["b"], made.shas["c"], 1.925, 1,
                             description="a new row")
        assert page.wait_for("document.querySelectorAll('circle.run').length === 13")
        assert page.wait_for(f"document.querySelector('tr.decision[data-id=\"{landed}\"]') !== null")
        assert page.errors == []
    finally:
        server.shutdown()
        server.server_close()
        live.ledger.close()


def test_the_server_answers_only_its_own_host(researched):
    import http.client

    ws, _ = researched
    server, live, url = open_server(ws)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/state.json", headers={"Host": f"evil.example:{port}"})
        assert connection.getresponse().status == 403
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/state.json")
        state = json.loads(connection.getresponse().read())
        assert {"summary", "plot", "running", "decisions"} <= set(state["sections"])
        assert state["sections"]["plot"].count('class="run"') == 12
    finally:
        server.shutdown()
        server.server_close()
        live.ledger.close()


def test_report_says_clearly_when_there_is_nothing(micro_ws, cli):
    result = cli("report")
    assert result.exit_code == 1 and "no ledger" in result.output
    with Ledger.for_workspace(micro_ws.root) as ledger:
        add_run(ledger, "baseline", micro_ws.tip(), micro_ws.tip(), 2.0, 0, slot_class=CLASS)
    result = cli("report")
    assert result.exit_code == 0, result.output
    text = (micro_ws.state_dir / "report" / "report.md").read_text()
    assert "No kept step" in text
