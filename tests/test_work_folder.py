"""The work folder of a run: its lock, manifest checks, fingerprint, temp files and a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import types

import pytest
import torch

from wanstudio.atomic import part_path, remove_stale_parts, stale_parts
from wanstudio.errors import PipelineError
from wanstudio.modes import RuntimeModes
from wanstudio.pipeline.resume import (
    LOCK,
    MANIFEST,
    ClipRecord,
    RunLock,
    WorkFolder,
    check_work_folder,
    environment_fingerprint,
    finished_clips,
)

FP = {"seed": 42, "size": [64, 64], "modes": {"quantization": "disabled", "attention": "sdpa"}}


def record(index: int) -> ClipRecord:
    g = torch.Generator().manual_seed(index)
    return ClipRecord(
        index=index,
        frames=torch.full((4, 8, 8, 3), index, dtype=torch.uint8),
        motion=torch.randn(3, 5, 8, 8, generator=g),
        rng_state=g.get_state(),
        frames_done=4 * (index + 1),
    )


def folder_with_clips(path, n: int, fingerprint=FP, clips: int = 3) -> None:
    work = WorkFolder(path, fingerprint, clips)
    for i in range(n):
        work.save(record(i))
    work.release()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder, **info) -> None:
    folder.mkdir(exist_ok=True)
    (folder / LOCK).write_text(json.dumps(info))


# --- the lock ---------------------------------------------------------------------------------------
def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    first = WorkFolder(tmp_path / "w", FP, 3)
    info = json.loads((tmp_path / "w" / LOCK).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(PipelineError) as err:
        WorkFolder(tmp_path / "w", FP, 3, resume=True)
    msg = str(err.value)
    assert f"pid {os.getpid()} (this process) on {socket.gethostname()}" in msg
    assert f"running since {info['started']}" in msg and "another out= / --out" in msg
    with pytest.raises(PipelineError, match="in use by another run"):
        check_work_folder(tmp_path / "w", resume=True)
    first.release()
    assert not (tmp_path / "w" / LOCK).exists()
    WorkFolder(tmp_path / "w", FP, 3, resume=True).release()  # free again


def test_a_lock_held_by_another_process_is_refused_until_it_dies(tmp_path, caplog):
    folder = tmp_path / "w"
    folder.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom wanstudio.pipeline.resume import RunLock\n"
            f"RunLock({str(folder)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError, match=f"pid {holder.pid} on "):
            WorkFolder(folder, FP, 3)
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release: the lock file stays
        holder.wait()
        holder.stdout.close()
    assert (folder / LOCK).exists()
    with caplog.at_level(logging.WARNING, logger="wanstudio.pipeline.resume"):
        work = WorkFolder(folder, FP, 3)
    assert f"taking over a stale lock (pid {holder.pid}" in caplog.text
    assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    work.release()


def test_a_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path / "w", pid=pid, host=socket.gethostname(), started="2020-01-01 00:00:00")
    with caplog.at_level(logging.WARNING, logger="wanstudio.pipeline.resume"):
        work = WorkFolder(tmp_path / "w", FP, 3)
    assert f"pid {pid}, started 2020-01-01 00:00:00, no longer runs" in caplog.text
    work.release()


def test_a_lock_of_another_host_or_a_live_pid_is_not_taken_over(tmp_path):
    write_lock(tmp_path / "w", pid=dead_pid(), host="elsewhere", started="2020-01-01 00:00:00")
    with pytest.raises(PipelineError, match="on elsewhere, running since 2020-01-01 00:00:00"):
        WorkFolder(tmp_path / "w", FP, 3)
    write_lock(tmp_path / "v", pid=1, host=socket.gethostname(), started="2020-01-01 00:00:00")
    with pytest.raises(PipelineError, match=f"pid 1 on .*If no such run is alive, delete .*{LOCK}"):
        WorkFolder(tmp_path / "v", FP, 3)


def test_a_lock_file_is_created_exclusively(tmp_path):
    lock = RunLock(tmp_path).acquire()
    other = RunLock(tmp_path)
    with pytest.raises(PipelineError, match="in use"):
        other.acquire()
    assert lock.held and not other.held
    lock.release()
    lock.release()  # idempotent
    assert other.acquire().held
    other.release()


# --- finished clips are never deleted silently -------------------------------------------------------
def test_a_run_without_resume_keeps_the_clips_of_an_earlier_run(tmp_path):
    folder_with_clips(tmp_path / "w", 2)
    message = (
        f"{tmp_path / 'w'} holds 2 finished clip(s) of an earlier run: pass resume=True / --resume "
        f"to continue it, or overwrite=True / --overwrite to start again"
    )
    with pytest.raises(PipelineError, match=re.escape(message)):
        WorkFolder(tmp_path / "w", FP, 3)
    with pytest.raises(PipelineError, match=re.escape(message)):
        check_work_folder(tmp_path / "w")
    assert (tmp_path / "w" / "clip_0001.pt").exists() and finished_clips(tmp_path / "w") == 2
    with pytest.raises(PipelineError, match="pass one of them"):
        WorkFolder(tmp_path / "w", FP, 3, resume=True, overwrite=True)
    work = WorkFolder(tmp_path / "w", FP, 3, overwrite=True)
    assert work.finished == 0 and not list((tmp_path / "w").glob("clip_*.pt"))
    work.release()


# --- the manifest -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit, field",
    [
        (dict(finished="x"), "finished"),
        (dict(finished=9), "finished"),
        (dict(finished=True), "finished"),
        (dict(clips=0), "clips"),
        (dict(fingerprint=[1]), "fingerprint"),
        (dict(format="2"), "format"),
    ],
)
def test_a_manifest_edited_by_hand_is_named_with_its_field(tmp_path, edit, field):
    folder_with_clips(tmp_path / "w", 1)
    file = tmp_path / "w" / MANIFEST
    file.write_text(json.dumps({**json.loads(file.read_text()), **edit}))
    with pytest.raises(PipelineError, match=re.escape(f"{file}: field {field!r} must be")) as err:
        WorkFolder(tmp_path / "w", FP, 3, resume=True)
    assert "--overwrite" in str(err.value)
    assert not (tmp_path / "w" / LOCK).exists()  # a refused run does not keep the lock


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path):
    folder_with_clips(tmp_path / "w", 1)
    (tmp_path / "w" / MANIFEST).write_text("[1, 2]")
    with pytest.raises(PipelineError, match=f"{MANIFEST} must hold a JSON object, found list"):
        WorkFolder(tmp_path / "w", FP, 3, resume=True)


# --- the fingerprint --------------------------------------------------------------------------------
def test_resume_with_other_settings_lists_each_difference_and_what_to_do(tmp_path):
    folder_with_clips(tmp_path / "w", 1)
    other = {"seed": 7, "size": [64, 64], "modes": {"quantization": "fp8_e4m3fn", "attention": "sdpa"}}
    with pytest.raises(PipelineError) as err:
        WorkFolder(tmp_path / "w", {**other, "threads": 2}, 3, resume=True)
    msg = str(err.value)
    assert "modes.quantization: 'disabled' -> 'fp8_e4m3fn'; seed: 42 -> 7; threads: (absent) -> 2" in msg
    assert "earlier run's arguments" in msg and "overwrite=True / --overwrite" in msg
    assert (tmp_path / "w" / "clip_0000.pt").exists()


def fake_pipeline(**modes):
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    model.blocks = [types.SimpleNamespace(_wanstudio_compiled=False)]
    return types.SimpleNamespace(
        model=model,
        vae=types.SimpleNamespace(model=torch.nn.Linear(2, 2)),
        text_encoder=None,
        image_encoder=None,
        audio_encoder=None,
        modes=RuntimeModes(**modes),
    )


def test_the_environment_fingerprint_holds_threads_modes_and_dtypes(monkeypatch):
    pipe = fake_pipeline(quantization="fp8_e4m3fn", attention="sdpa", blocks_to_swap=4)
    fp = environment_fingerprint(pipe)
    assert fp["modes"] == {"quantization": "fp8_e4m3fn", "attention": "sdpa", "compiled": False}
    assert fp["dtypes"]["model"] == "bfloat16" and fp["dtypes"]["vae"] == "float32"
    assert fp["device"] == "cpu" and fp["torch"] == torch.__version__
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = environment_fingerprint(pipe)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    two = environment_fingerprint(pipe)
    assert (one["threads"], two["threads"]) == (1, 2)
    pipe.model.blocks[0]._wanstudio_compiled = True
    assert environment_fingerprint(pipe)["modes"]["compiled"] is True
    # block swap moves weights only: a run that ran out of memory resumes with more swap; nor do
    # prefetch and strict layout checks change a number (the precision is in the dtypes)
    plain = {"quantization": "disabled", "attention": "sdpa", "compiled": False}
    assert environment_fingerprint(fake_pipeline())["modes"] == plain
    moved = fake_pipeline(blocks_to_swap=8, prefetch=2, strict_layout=True)
    assert environment_fingerprint(moved)["modes"] == plain


def test_the_fingerprint_holds_the_loras_and_the_text_encoders_storage(tmp_path):
    """Both change the frames: a run resumed with another LoRA strength or an fp8 umT5 is
    another run (and runs without either keep the fingerprint they always had)."""
    from wanstudio.encoders import TextEncoder

    lora = tmp_path / "distill.safetensors"
    lora.write_bytes(b"x" * 123)
    plain = environment_fingerprint(fake_pipeline())
    assert "loras" not in plain and "text_encoder_storage" not in plain
    one = environment_fingerprint(fake_pipeline(loras=[(lora, 1.0)]))
    assert one["loras"] == ["distill.safetensors (123 bytes) x1"]
    assert environment_fingerprint(fake_pipeline(loras=[(lora, 0.5)]))["loras"] != one["loras"]
    pipe = fake_pipeline()
    pipe.text_encoder = TextEncoder.tiny(text_dim=32).quantize("fp8_e4m3fn_scaled")
    assert environment_fingerprint(pipe)["text_encoder_storage"] == ["fp8_e4m3fn_scaled"]


# --- temp files -------------------------------------------------------------------------------------
def test_temp_names_carry_the_pid_and_stale_ones_are_removed_at_start(tmp_path, monkeypatch):
    folder = tmp_path / "w"
    folder.mkdir()
    dead, live = dead_pid(), 1
    stale = folder / f".clip_0000.pt.{dead}.0a1b2c3d.part"
    alive = folder / f".clip_0000.pt.{live}.0a1b2c3d.part"
    mine = part_path(folder / "clip_0001.pt")
    for f in (stale, alive, mine):
        f.write_bytes(b"x" * 100)
    assert re.fullmatch(rf"\.clip_0001\.pt\.{os.getpid()}\.[0-9a-f]{{8}}\.part", mine.name)
    assert stale_parts(folder) == [stale] and stale_parts(folder, "other.pt") == []
    names = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (names.append(f.name), real_save(obj, f)))
    work = WorkFolder(folder, FP, 3)
    assert not stale.exists() and alive.exists() and mine.exists()
    work.save(record(0))
    assert re.fullmatch(rf".*/\.clip_0000\.pt\.{os.getpid()}\.[0-9a-f]{{8}}\.part", names[0])
    work.release()
    assert remove_stale_parts(folder) == []


# --- a full disk ------------------------------------------------------------------------------------
def enospc_in_torch_save(obj, f):
    """torch.save's report of a full disk: a RuntimeError raised while handling ENOSPC."""
    f.write(b"partial")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")  # noqa: B904


def enospc_plain(obj, f):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing_save", [enospc_in_torch_save, enospc_plain])
def test_a_full_disk_while_saving_a_clip_says_how_much_room_is_needed(tmp_path, monkeypatch, failing_save):
    folder = tmp_path / "w"
    work = WorkFolder(folder, FP, 3)
    work.save(record(0))
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(PipelineError) as err:
        work.save(record(1))
    msg = str(err.value)
    per_clip = 4 * 8 * 8 * 3 + 3 * 5 * 8 * 8 * 4 + record(0).rng_state.numel() + 4096
    assert msg.startswith(
        f"no space left on {folder}: need ~{2 * per_clip / 2**20:.1f} MB for the remaining 2"
    )
    assert "1 finished clip(s) are saved" in msg and "continue from clip 2" in msg
    # consistent: the manifest still says 1, no clip 2, no temp file
    assert json.loads((folder / MANIFEST).read_text())["finished"] == 1 and work.finished == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(["clip_0000.pt", LOCK, MANIFEST])
    monkeypatch.undo()
    work.save(record(1))  # space freed: the run goes on
    assert work.finished == 2
    work.release()
