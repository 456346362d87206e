"""Issue 26: every file read through the project's loaders (a path that is not a regular file named for what it
is), outputs that are valid (finite scores, JSON without NaN, a finished command not failed by its terminal)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh

from lift3d.errors import UserError
from lift3d.utils.inputs import file_kind, read_json, read_json_object, require_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_path_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path):
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert file_kind(str(tmp_path / "file")) is None
    expected = {"pipe": "is a named pipe (FIFO)", "loop": "is a symbolic-link loop", ".": "is a directory",
                "dangling": "is a broken symbolic link", "missing": "not found: ", "file/x": "not found: "}
    for name, words in expected.items():
        with pytest.raises(UserError) as e:
            require_file(str(tmp_path / name), "image", "pass a PNG")
        assert words in str(e.value) and str(e.value).endswith("; pass a PNG") and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no image given"):
        require_file("", "image")


def test_read_json_says_where_a_file_stops_being_json(tmp_path):
    (tmp_path / "good.json").write_text('{"a": [1, 2]}')
    (tmp_path / "cut.json").write_text('{"a": [1, ')
    (tmp_path / "list.json").write_text('[1]')
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    assert read_json(str(tmp_path / "good.json")) == {"a": [1, 2]}
    with pytest.raises(UserError, match=r"cut.json: not valid JSON at line 1, column 11"):
        read_json(str(tmp_path / "cut.json"), "model config")
    with pytest.raises(UserError, match="not a JSON object"):
        read_json_object(str(tmp_path / "list.json"))
    with pytest.raises(UserError, match="no 'b'"):
        read_json_object(str(tmp_path / "good.json"), keys=("b",))
    with pytest.raises(UserError, match="not UTF-8"):
        read_json(str(tmp_path / "bin.json"))


def test_the_loaders_refuse_a_fifo_without_waiting_for_a_writer(tmp_path):
    from lift3d.config_files import resolve_config
    from lift3d.mesh.io import load_mesh
    from lift3d.trial import load_checkpoint
    from lift3d.utils.images import open_image
    from lift3d.zero123.loading import read_parts

    pipe = str(tmp_path / "pipe")
    os.mkfifo(pipe)
    for load in (open_image, load_mesh, load_checkpoint, resolve_config, read_parts):
        with pytest.raises(UserError, match="FIFO"):
            load(pipe)


def test_a_broken_model_config_stops_the_preflight_in_one_line(tmp_path):
    from lift3d.priors.zero123 import Zero123Prior

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"block_out_channels": [64, ')
    prior = Zero123Prior({"pretrained_model_name_or_path": str(tmp_path)})
    with pytest.raises(UserError, match=r"vae config .*config.json: not valid JSON.*re-download"):
        prior.part_config("vae")


def test_a_refiner_folder_without_its_layout_is_refused(tmp_path):
    from lift3d.zero123.cascade import CascadeLayout

    assert CascadeLayout.load(str(tmp_path)).nearby == [[0.0, 45.0, 0.0], [0.0, -45.0, 0.0], [30.0, 0.0, 0.0]]
    with pytest.raises(UserError, match="no cascade.json: it looks like a plain Zero123 model"):
        CascadeLayout.load(str(tmp_path), required=True)
    (tmp_path / "cascade.json").write_text('{"nearby": [[0, 45]]}')
    with pytest.raises(UserError, match="triples"):
        CascadeLayout.load(str(tmp_path), required=True)


def test_a_checkpoint_with_nan_weights_is_refused_and_not_called_good(tmp_path):
    from lift3d.trial import load_checkpoint

    path = str(tmp_path / "last.ckpt")
    torch.save({"step": 3, "system": {"geometry.density": torch.tensor([1.0, float("nan")])}}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "not finite (geometry.density)" in str(e.value) and "last good" not in str(e.value)
    assert "learning rate" not in str(e.value)


def test_a_checkpoint_copied_out_of_its_trial_does_not_write_into_its_grandparent(tmp_path):
    from lift3d.config import ExperimentConfig
    from lift3d.trial import trial_dir_for

    inside = ExperimentConfig(resume=str(tmp_path / "trial" / "ckpts" / "last.ckpt"))
    assert trial_dir_for(inside) == str(tmp_path / "trial")
    loose = ExperimentConfig(resume=str(tmp_path / "loose" / "last.ckpt"), exp_root_dir=str(tmp_path / "out"),
                             name="n", tag="t", use_timestamp=False)
    assert trial_dir_for(loose) == str(tmp_path / "out" / "n" / "t")


def _tetra(offset, scale=1.0):
    return trimesh.Trimesh(offset + scale * np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]]),
                           [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]], process=False)


def test_eval_refuses_a_mesh_outside_the_frame_and_never_scores_infinity():
    from lift3d.evaluation.metrics import check_finite, evaluate

    gt = _tetra(-0.3, 0.6)
    with pytest.raises(UserError, match="outside the surface protocol's frame"):
        evaluate(_tetra(1000.0), gt, "surface", n_points=2000, iou_resolutions=(16,), appearance=False)
    wide = evaluate(_tetra(-0.5, 2.0), gt, "surface", n_points=2000, iou_resolutions=(16,), appearance=False)
    assert "reaches outside" in wide["warnings"][0]
    json.dumps(wide, allow_nan=False)
    with pytest.raises(UserError, match=r"not finite \(chamfer_distance = inf\)"):
        check_finite({"chamfer_distance": float("inf"), "f_score": {"0.1": 0.5}})
    with pytest.raises(UserError, match=r"f_score.0.1 = nan"):
        check_finite({"f_score": {"0.1": float("nan")}})


def test_a_mesh_with_overflowing_coordinates_is_refused(tmp_path):
    from lift3d.mesh.io import load_mesh

    _tetra(1e200, 1e200).export(str(tmp_path / "huge.obj"))
    with pytest.raises(UserError, match="coordinates up to [12]e\\+200"):
        load_mesh(str(tmp_path / "huge.obj"))


def test_a_closed_stdout_or_an_ascii_terminal_does_not_fail_a_command(tmp_path):
    r, w = os.pipe()
    os.close(r)
    try:
        closed = subprocess.run([sys.executable, "-m", "lift3d", "configs"], stdout=w, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    finally:
        os.close(w)
    assert closed.returncode == 0 and closed.stderr == ""
    code = ("import sys\nsys.stdout.reconfigure(encoding='ascii')\nfrom lift3d.cli import tolerant_output\n"
            "tolerant_output()\nprint('trial folder: caf\\u00e9')")
    ascii_only = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": ROOT})
    assert ascii_only.returncode == 0 and "caf\\xe9" in ascii_only.stdout and ascii_only.stderr == ""
