"""Every config file, preset and mode builds, is plain data, and has every field its stages read."""

from __future__ import annotations

import ast
import dataclasses
import json
import os

import digits
import llamagen
import pytest
import var
from conftest import ROOT

from ddjax.app import ALL_MODES, read_settings, run
from ddjax.app.build import gpt_config, vae_config, var_config, vq_config
from ddjax.mapper.flow import FlowSettings
from ddjax.utils.paths import resolve_path

CONFIG_DIR = os.path.join(ROOT, "configs")
LLAMAGEN_PRESETS = ["digits", "digits,size=small", "tiny", "B", "L", "XL", "XXL", "XXXL"]


@pytest.mark.parametrize("preset", LLAMAGEN_PRESETS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_llamagen_preset_and_mode_reads_into_settings(preset, mode):
    config = llamagen.get_config(f"{preset},mode={mode}")
    settings = read_settings(config)  # raises on a missing or unknown field of any stage
    assert settings.dd.resolved_teacher_split_t >= 0 or not settings.dd.teacher_involved
    gpt_config(config), vq_config(config)
    for block in ("teacher", "vq"):  # what ddjax.app.build reads
        for field in ("variant", "checkpoint", "weights_key", "random_init", "dtype", "model"):
            assert field in config[block], (block, field)
    assert config.teacher.family == "llamagen" and "init_from_teacher" in config.student


@pytest.mark.parametrize("arg", ["train_vq", "train_teacher", "evaluate_vq", "evaluate_teacher",
                                 "sample_teacher", "info", "train_teacher,tiny=True"])
def test_digits_config_builds(arg):
    config = digits.get_config(arg)
    read_settings(config)
    gpt_config(config), vq_config(config)
    assert "export_dir" in config and "digits" in config


@pytest.mark.parametrize("arg", ["digits", "tiny", "d16", "d20", "d24", "d30", "digits,mode=info",
                                 "digits,mode=train_vae", "digits,mode=train_var", "tiny,mode=evaluate_var"])
def test_var_config_builds(arg):
    config = var.get_config(arg)
    read_settings(config)
    cfg, vcfg = var_config(config), vae_config(config)
    assert cfg.patch_nums == vcfg.patch_nums and cfg.vocab_size == vcfg.vocab_size
    assert config.teacher.family == "var" and config.mode in ALL_MODES


def test_var_presets_have_the_released_shapes():
    for depth in (16, 20, 24, 30):  # parameter counts: tests/test_var_model.py
        cfg = var_config(var.get_config(f"d{depth}"))
        assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.seq_len) == (depth, 64 * depth, depth, 680)
    assert vae_config(var.get_config("d16")).image_size == 256


def test_official_teacher_split_t_per_teacher_start():
    config = llamagen.get_config("L")
    for start, want in ((60, 180), (40, 180), (0, 220)):
        config.dd.teacher_start = start
        assert read_settings(config).dd.resolved_teacher_split_t == want
    config.dd.teacher_start = 30
    with pytest.raises(ValueError, match="teacher_split_t"):
        read_settings(config).dd.resolved_teacher_split_t  # noqa: B018
    config.dd.teacher_split_t = 200  # an explicit value always wins
    assert read_settings(config).dd.resolved_teacher_split_t == 200


def test_bad_fields_are_named_before_any_stage_runs(tmp_path):
    config = llamagen.get_config("tiny,mode=all")
    config.train.batch_size = -5
    with pytest.raises(ValueError, match=r"config\.train\.batch_size=-5"):
        run(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "pairs")  # failed before generating anything
    config = llamagen.get_config("tiny")
    with config.unlocked():
        config.flow.typo = 1
    with pytest.raises(ValueError, match=r"config\.flow has unknown fields \['typo'\]"):
        read_settings(config)


def test_digits_blocks_agree_with_the_shipped_meta_json():
    config = llamagen.get_config("digits")
    with open(resolve_path("ddjax:assets/digits/meta.json")) as f:
        meta = json.load(f)
    for block, key in (("teacher", "gpt"), ("vq", "vq")):
        assert config[block].variant == meta[key]["variant"]
        for k, v in meta[key]["model"].items():
            got = config[block].model[k]
            assert (list(got) if isinstance(got, tuple) else got) == v, (block, k)
        assert os.path.exists(resolve_path(config[block].checkpoint))
    assert config.vq.image_size == meta["image_size"]
    for k, v in meta["sampling"].items():
        assert config.sampling[k] == v, k


def test_flow_defaults_are_flow_settings_defaults():
    # the released presets integrate over the sampler's top-k support only (exact)
    released = dict(llamagen.get_config("B").flow)
    assert released == dataclasses.asdict(FlowSettings(support_k=8000))
    assert dict(llamagen.get_config("digits").flow) == dataclasses.asdict(FlowSettings())
    # each config gets its own flow block: a value set on one never reaches another
    first = llamagen.get_config("B")
    first.flow.early_steps = 10
    first.flow.support_k = 512
    again = llamagen.get_config("B")
    assert again.flow.early_steps is None and again.flow.support_k == 8000
    assert llamagen.get_config("digits").flow.support_k is None


@pytest.mark.parametrize("name", ["llamagen.py", "llamagen_t2i.py", "digits.py", "var.py", "common.py"])
def test_configs_are_plain_data(name):
    """No library imports, file reads or sys.path edits inside a config file."""
    tree = ast.parse(open(os.path.join(CONFIG_DIR, name)).read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(m.startswith("ddjax") or m == "sys" for m in mods), (name, mods)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", name
