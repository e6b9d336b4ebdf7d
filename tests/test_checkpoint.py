"""Where the parameter server's own state is found when a run resumes (single process)."""

import logging
import os

import torch

from lightning_draco.strategy import checkpoint as ckpt


def _written_by_the_ps(folder, name="epoch=0-step=4.ckpt"):
    """A checkpoint written by rank 0 and the PS's sidecar beside it, as a PS that is not rank 0 writes them."""
    path = folder / name
    torch.save({"state_dict": {}}, path)
    torch.save({"projection_secret": 1234, "aggregator": {}, "decoder": {}}, ckpt.ps_sidecar(path))
    return path


def test_the_sidecar_is_found_beside_the_checkpoint_a_link_points_to(tmp_path):
    """ModelCheckpoint(save_last="link") makes last.ckpt a link: the sidecar has the target's name."""
    target = _written_by_the_ps(tmp_path)
    link = tmp_path / "last.ckpt"
    os.symlink(target.name, link)
    assert not os.path.exists(ckpt.ps_sidecar(link))
    assert ckpt.read_ps_state({}, link)["projection_secret"] == 1234
    assert ckpt.read_ps_state({}, target)["projection_secret"] == 1234


def test_a_checkpoint_copied_without_its_sidecar_resumes_with_a_warning_naming_the_missing_file(tmp_path, caplog):
    target = _written_by_the_ps(tmp_path)
    copy = tmp_path / "copied.ckpt"
    copy.write_bytes(target.read_bytes())
    with caplog.at_level(logging.WARNING):
        assert ckpt.read_ps_state({}, copy) == {}
    assert f"{copy}.ps, the parameter server's state written beside {copy}, is missing" in caplog.text


def test_the_ps_state_inside_rank_zeros_checkpoint_needs_no_sidecar(tmp_path, caplog):
    saved = {"projection_secret": 7, "aggregator": {}, "decoder": {}}
    with caplog.at_level(logging.WARNING):
        assert ckpt.read_ps_state(saved, tmp_path / "nowhere.ckpt") is saved
    assert caplog.text == ""
