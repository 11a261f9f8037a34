"""The Colab notebooks: outputs stripped, and each executes headless on the CPU.

quickstart runs the demo pipeline on the tiny preset; llamagen_dd and train_on_tpu run in their
dry mode on tiny random checkpoints made here.
"""

from __future__ import annotations

import json
import os

import jax
import pytest
from conftest import ROOT, random_params, tiny_gpt_config

NB_DIR = os.path.join(ROOT, "experiments", "notebooks")
NOTEBOOKS = ("quickstart", "llamagen_dd", "train_on_tpu")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_outputs_are_stripped(name):
    with open(os.path.join(NB_DIR, name + ".ipynb")) as f:
        nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "install" in "".join(code[0]["source"]).lower()  # the first cell installs


def _execute(name: str, workdir: str, env: dict[str, str]) -> None:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(os.path.join(NB_DIR, name + ".ipynb"), as_version=4)
    os.makedirs(workdir, exist_ok=True)
    old = dict(os.environ)
    os.environ.update({"DDJAX_NOTEBOOK_CI": "1", "DDJAX_WORKDIR": workdir, "JAX_PLATFORMS": "cpu",
                       "PYTHONPATH": ROOT, **env})
    try:
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": workdir}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_quickstart_executes(tmp_path):
    _execute("quickstart", str(tmp_path), {"DDJAX_PRESET": "tiny"})
    assert os.path.exists(tmp_path / "report" / "report.md")


def test_train_on_tpu_executes_dry(tmp_path):
    _execute("train_on_tpu", str(tmp_path), {"DDJAX_DRY_RUN": "1"})
    assert os.path.isdir(tmp_path / "student" / "checkpoints")


def test_llamagen_dd_executes_dry(tmp_path):
    from ddjax.convert.api import export_torch
    from ddjax.student.model import dd_config
    from ddjax.student.model import init_params as dd_init
    from ddjax.teacher.llamagen.gpt import init_params as gpt_init
    from ddjax.teacher.llamagen.vq import init_params as vq_init
    from ddjax.teacher.llamagen.vq import vq_config

    over = dict(n_layer=2, dim=64, n_head=4, n_kv_head=2, vocab_size=64, block_size=16, num_classes=10,
                multiple_of=32)
    vq_over = dict(codebook_size=64, ch=32, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], z_channels=32)
    gcfg = tiny_gpt_config()
    vcfg = vq_config("VQ-16", **vq_over)
    dcfg = dd_config(gcfg, 8)
    paths = {k: str(tmp_path / f"{k}.safetensors") for k in ("gpt", "vq", "dd")}
    export_torch(random_params(gpt_init(gcfg, jax.random.PRNGKey(0))), "gpt", paths["gpt"])
    export_torch(vq_init(vcfg, jax.random.PRNGKey(1)), "vq", paths["vq"])
    export_torch(dd_init(dcfg, jax.random.PRNGKey(2)), "dd", paths["dd"])
    _execute("llamagen_dd", str(tmp_path / "work"), {
        "DDJAX_DRY_RUN": "1", "DDJAX_TEACHER_CKPT": paths["gpt"], "DDJAX_VQ_CKPT": paths["vq"],
        "DDJAX_DD_CKPT": paths["dd"], "DDJAX_GPT_OVERRIDES": json.dumps(over),
        "DDJAX_VQ_OVERRIDES": json.dumps(vq_over)})
    exported = [f for f in os.listdir(tmp_path / "work") if f.startswith("dd_export")]
    assert exported
