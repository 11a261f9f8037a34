"""DD1 for a text-conditional teacher through the entry layer (configs/llamagen_t2i.py:tiny):
pairs carry caption ids, the trainer looks their features up, kill-and-resume repeats the
uninterrupted run, and the main job writes the report. (8 devices: multidevice/test_sharded_t2i.py.)"""

from __future__ import annotations

import json
import os

import chex
import llamagen_t2i
import numpy as np
import pytest

from ddjax.app import build, run
from ddjax.mapper.pairs import PairDataset
from ddjax.student.loading import load_training_run


def tiny_config(mode: str):
    config = llamagen_t2i.get_config(f"tiny,mode={mode}")
    config.teacher.model.n_layer = 1
    config.data.update(num_pairs=64, shard_size=32, batch_size=32)
    config.train.update(num_steps=12, batch_size=16, log_every=6, checkpoint_every=6,
                        warmup_steps=2, lr=1e-3)
    return config


@pytest.fixture(scope="module")
def t2i_pairs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("t2i_pairs"))
    config = tiny_config("generate")
    run(config, workdir)
    return config, build.pairs_dir(config, workdir)


def test_pairs_hold_caption_ids_that_the_flow_map_reproduces(t2i_pairs):
    config, pairs_dir = t2i_pairs
    data = PairDataset(pairs_dir).load_all()
    teacher = build.build_teacher(config)
    assert data["labels"].max() < len(teacher.captions) == config.captions.random
    # The stored tokens are the teacher's flow map of the stored noise under those captions.
    from ddjax.app.settings import from_block
    from ddjax.mapper.flow import FlowSettings
    from ddjax.mapper.sequence import map_noise_to_tokens
    from ddjax.teacher.llamagen.sampling import settings_from_config

    flow = from_block(FlowSettings, config.flow, "flow")
    tokens = map_noise_to_tokens(teacher, data["noise"][:8], data["labels"][:8],
                                 settings_from_config(config.sampling), flow)
    np.testing.assert_array_equal(np.asarray(tokens), data["tokens"][:8])


def test_t2i_training_crash_and_resume_repeats_the_uninterrupted_run(t2i_pairs, tmp_path,
                                                                      monkeypatch):
    config, pairs_dir = t2i_pairs
    config = tiny_config("train")
    config.data.dir = pairs_dir
    ref = run(config, str(tmp_path / "ref"))
    assert sorted(ref["losses"]) == list(range(1, 13))
    crashed = str(tmp_path / "crashed")
    batches = PairDataset.batches

    def crash_before_step_9(self, *args, **kwargs):
        for i, batch in enumerate(batches(self, *args, **kwargs)):
            if kwargs["start_step"] + i == 8:
                raise RuntimeError("simulated crash")
            yield batch

    monkeypatch.setattr(PairDataset, "batches", crash_before_step_9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(config, crashed)
    monkeypatch.setattr(PairDataset, "batches", batches)
    resumed = run(config, crashed)
    assert resumed["start_step"] == 6
    np.testing.assert_allclose([resumed["losses"][s] for s in range(7, 13)],
                               [ref["losses"][s] for s in range(7, 13)], rtol=0, atol=1e-6)
    chex.assert_trees_all_close(load_training_run(str(tmp_path / "ref"), ema=True)[1],
                                load_training_run(crashed, ema=True)[1], rtol=0, atol=1e-6)
    with open(os.path.join(crashed, "student", "ddjax.json")) as f:
        meta = json.load(f)
    assert meta["model_config"]["gpt"]["model_type"] == "t2i"


def test_tiny_t2i_main_job_writes_the_report(tmp_path):
    config = tiny_config("all")
    config.eval.update(num_samples=32, batch_size=32, grid_size=16)
    config.dd.update(num_images=8, batch_size=8)
    out = run(config, str(tmp_path))
    results = out["results"] if "results" in out else out
    report = os.path.join(str(tmp_path), "report", "report.md")
    assert os.path.isfile(report)
    text = open(report).read()
    for name in ("teacher", "DD 1-step", "DD 2-step", "teacher-involved", "onestep*"):
        assert f"| {name} |" in text
    del results


def test_t2i_teacher_without_captions_names_the_key():
    config = llamagen_t2i.get_config("tiny")
    config.captions.random = 0
    with pytest.raises(ValueError, match="config.captions.path"):
        build.build_teacher(config)


def test_pairs_refuse_another_caption_set(t2i_pairs, tmp_path):
    """Pair labels are ids into one caption set: a rerun over another set is refused."""
    config, pairs_dir = t2i_pairs
    other = tiny_config("generate")
    other.data.dir = pairs_dir
    other.seed = 1  # the tiny preset's random captions are drawn from the seed
    with pytest.raises(ValueError, match="captions"):
        run(other, str(tmp_path))


def test_sigkilled_t2i_pair_writing_resumes_to_the_same_dataset(tmp_path):
    """The real generate mode in a subprocess, SIGKILLed once a shard is final, then rerun."""
    import subprocess
    import sys

    from helpers import kill_when

    from ddjax.mapper.pairs import shard_name

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")

    def cmd(workdir):
        return [sys.executable, "-m", "ddjax.main",
                f"--config={root}/configs/llamagen_t2i.py:tiny,mode=generate",
                "--config.teacher.model.n_layer=1", "--config.data.num_pairs=96",
                "--config.data.shard_size=16", "--config.data.batch_size=16",
                f"--workdir={workdir}"]

    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(cmd(ref), env=env, check=True, timeout=300, capture_output=True)
    kill_when(cmd(killed), env, lambda: os.path.exists(
        os.path.join(killed, "pairs", shard_name(0) + ".json")), 240,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = [f for f in os.listdir(os.path.join(killed, "pairs")) if f.startswith("pairs-")
            and f.endswith(".json")]
    assert 1 <= len(done) < 6, done
    subprocess.run(cmd(killed), env=env, check=True, timeout=300, capture_output=True)
    a = PairDataset(os.path.join(ref, "pairs")).load_all()
    b = PairDataset(os.path.join(killed, "pairs")).load_all()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
