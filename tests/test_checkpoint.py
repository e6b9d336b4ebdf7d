"""Where the parameter server's own state is found when a run resumes (single process)."""

import logging
import os
import struct
import zipfile

import torch

from lightning_draco.codes import make_code
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


def _as_written_on_gpu(path, device=b"cuda:7"):
    """Rewrite a ``torch.save`` file so that its tensors say they were saved from ``device``: a sidecar that a PS
    on a GPU wrote, made without one (the storage location is a string in the archive's pickle)."""
    with zipfile.ZipFile(path) as archive:
        entries = [(item, archive.read(item.filename)) for item in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for item, data in entries:
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X" + struct.pack("<I", len(device)) + device)
            archive.writestr(item, data)


def test_a_sidecar_written_on_a_gpu_resumes_where_that_gpu_is_not(tmp_path):
    """Before: torch.load failed on the PS ("Attempting to deserialize object on a CUDA device ...") when the PS
    resumed on a machine without the GPU the sidecar was written from (fewer GPUs per node, another ps_rank).
    Rank 0's checkpoint is loaded onto the CPU by Lightning; the sidecar is too, and the rule moves its state."""
    path = tmp_path / "epoch=0-step=4.ckpt"
    torch.save({"state_dict": {}}, path)
    anchor = torch.arange(3.0)
    torch.save({"projection_secret": 1234, "aggregator": {"anchor": anchor}, "decoder": {}}, ckpt.ps_sidecar(path))
    _as_written_on_gpu(ckpt.ps_sidecar(path))
    state = ckpt.read_ps_state({}, path)
    assert state["projection_secret"] == 1234
    assert state["aggregator"]["anchor"].device.type == "cpu" and torch.equal(state["aggregator"]["anchor"], anchor)


def test_a_sidecar_written_at_another_step_than_its_checkpoint_is_not_loaded_and_says_so(tmp_path, caplog):
    """The PS writes its sidecar apart from rank 0's checkpoint: a process killed between the two writes leaves a
    checkpoint of step 5 beside the state of step 4, which loaded silently would put centred clipping's anchor one
    step behind the model."""
    code = make_code("frc", 3, 1)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 5}, path)
    torch.save(ckpt.ps_state(1234, code, global_step=4), ckpt.ps_sidecar(path))
    with caplog.at_level(logging.WARNING):
        assert ckpt.read_ps_state({}, path, global_step=5) == {}
    assert f"{path}.ps, the parameter server's state, was written at step 4, but {path} at step 5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ckpt.read_ps_state({}, path, global_step=4)["projection_secret"] == 1234
    assert caplog.text == ""
