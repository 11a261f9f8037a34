"""The main job on a much smaller run of the embedded digits demo: the report and its claims."""

from __future__ import annotations

import json
import os

import llamagen
import pytest

from ddjax.app import run
from ddjax.demo.common import digits_teacher_paths
from ddjax.evaluate.report import slug

# This test trains and samples for real: XLA's optimisations halve its run time.
pytestmark = [pytest.mark.skipif(not os.path.exists(digits_teacher_paths()["gpt"]),
                                 reason="the shipped digits teacher is missing"),
              pytest.mark.usefixtures("optimised_xla")]


def test_small_demo_pipeline_writes_the_report_and_beats_the_baseline(tmp_path):
    config = llamagen.get_config("digits,size=small")
    result = run(config, str(tmp_path))
    report_dir = tmp_path / "report"
    text = (report_dir / "report.md").read_text()
    assert "| method | steps | latency / image (ms) | speed-up | FID vs data | FID vs teacher |" in text
    results = json.loads((report_dir / "results.json").read_text())
    names = ["teacher", "teacher (flow map)", "DD 1-step", "DD 2-step", "teacher-involved", "onestep*"]
    assert list(results) == names
    for name in names:
        assert f"| {name} |" in text
        assert (report_dir / f"{slug(name)}.png").exists(), name
        r = results[name]
        assert r["fid"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["latency_s"] > 0
    assert (report_dir / "quality_vs_steps.png").exists()
    assert "two random halves of the reference data (digits) have FID" in text
    assert 0 < result["fid_floor"] < results["onestep*"]["fid"]
    assert results["teacher (flow map)"]["token_agreement"] == 1.0
    assert results["teacher"]["speedup"] == 1.0
    assert "uint8 PNG quantisation" in results["teacher"]["protocol"]
    assert results["DD 1-step"]["steps"] == 1 and results["teacher"]["steps"] == 64
    # The paper's shape where this short run (400 steps, 200 images) shows it with a wide margin.
    # One run (CI's, this commit): FID teacher 13.0, its flow map 14.5, DD 1-step 23.8, 2-step
    # 23.3, onestep* 39.6. (2-step against 1-step, a few percent apart here, is left to the
    # report's checks.)
    fid = {k: v["fid"] for k, v in results.items()}
    agree = {k: v["token_agreement"] for k, v in results.items()}
    # The teacher (ancestral, and its flow map of the same noise) is the best sampler by a wide
    # margin (the next best 39% worse).
    teachers = ("teacher", "teacher (flow map)")
    others = min(v for k, v in fid.items() if k not in teachers)
    assert max(fid[k] for k in teachers) < 0.8 * others, fid
    # DD 1-step within the paper's 3x of the teacher's FID (1.7x here).
    assert fid["DD 1-step"] <= 3 * fid["teacher"], fid
    # Every distilled sampler beats the best sampler that ignores token dependencies: closer to
    # the data (FID) and to the teacher's own map of the same noise (token agreement).
    for name in ("DD 1-step", "DD 2-step", "teacher-involved"):
        assert fid[name] < 0.8 * fid["onestep*"], (name, fid)
        assert agree[name] > 1.5 * agree["onestep*"], (name, agree)
    assert result["report"].endswith("report.md")
    # a rerun skips the finished stages and rewrites the report
    again = run(config, str(tmp_path))
    assert again["results"]["teacher"]["fid"] == pytest.approx(results["teacher"]["fid"], rel=1e-6)
