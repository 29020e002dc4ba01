"""Encoders on the device only while they run: event order, identity, identical features, no leaks.

The "device" is simulated on the CPU by :class:`CloneMover`: moving to it makes a real copy (a
clone), whose storage the mover can recognise later, so a test can tell a device copy from the
host weights without a GPU.
"""

from __future__ import annotations

import gc

import numpy as np
import psutil
import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from wanstudio.encoders import VAE, AudioEncoder, EncoderPlacement, ImageEncoder, TextEncoder, on_device
from wanstudio.encoders.placement import TensorMover, module_of, weights_of
from wanstudio.errors import ConfigError


class CloneMover(TensorMover):
    """'Device' copies are clones on the CPU; host copies of them are clones again."""

    def __init__(self):
        super().__init__("cpu")
        self.copies: list[StorageWeakRef] = []  # weak: keeps no copy alive
        self.uploads = 0

    def to_device(self, t):
        copy = t.clone()
        self.copies.append(StorageWeakRef(copy.untyped_storage()))
        self.uploads += 1
        return copy

    def to_host(self, t):
        return t.clone()

    def on_device(self, module: nn.Module) -> bool:
        live = {r.cdata for r in self.copies if not r.expired()}
        return all(t.untyped_storage()._cdata in live for t in weights_of(module))

    def on_host(self, module: nn.Module) -> bool:
        live = {r.cdata for r in self.copies if not r.expired()}
        return not any(t.untyped_storage()._cdata in live for t in weights_of(module))


@pytest.fixture(scope="module")
def encoders() -> dict:
    return {
        "text": TextEncoder.tiny(),
        "image": ImageEncoder.tiny(),
        "audio": AudioEncoder.tiny(),
        "vae": VAE.tiny(),
    }


def _calls(encoders: dict) -> dict:
    """What a clip asks of each encoder (the pipeline's calls, small sizes)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    wave = (torch.randn(16000, generator=g) * 0.1).numpy().astype(np.float32)
    latents = torch.randn(1, 16, 1, 4, 6, generator=g)
    return {
        "text": lambda p: p.run(encoders["text"], ["a person talking", "blurry"]),
        "image": lambda p: p.run(encoders["image"], image),
        "audio": lambda p: p.run(encoders["audio"], wave, sample_rate=16000, num_frames=9),
        "vae": lambda p: p.run(encoders["vae"], image[:, :, None]),
        "vae_decode": lambda p: p.run(encoders["vae"], latents, method="decode"),
    }


@pytest.mark.parametrize("park", ["cpu", "free"])
def test_each_encoder_is_on_the_device_only_while_it_runs(encoders, park):
    mover = CloneMover()
    placement = EncoderPlacement("cpu", park=park, mover=mover)
    seen = []

    def check(name):
        def hook(module, args):
            assert mover.on_device(module_of(encoders[name])), f"{name} runs on host weights"
            others = [n for n in encoders if n != name]
            assert all(mover.on_host(module_of(encoders[n])) for n in others), (
                f"others on device while {name} runs"
            )
            if not seen or seen[-1] != name:
                seen.append(name)

        return hook

    vae = encoders["vae"].model  # the VAE runs its encoder / decoder, not its forward
    targets = [(n, module_of(e)) for n, e in encoders.items() if n != "vae"]
    targets += [("vae", vae.encoder), ("vae", vae.decoder)]
    handles = [m.register_forward_pre_hook(check(n)) for n, m in targets]
    try:
        for call in _calls(encoders).values():
            call(placement)
    finally:
        for h in handles:
            h.remove()
    away = "to_host" if park == "cpu" else "drop"
    expected = []
    for name in ("text", "image", "audio", "vae", "vae"):
        expected += [(name, "to_device"), (name, "run"), (name, "done"), (name, away)]
    assert placement.log() == expected
    assert [e.index for e in placement.events] == list(range(len(expected)))
    assert seen == ["text", "image", "audio", "vae"]  # every check ran (the vae twice in a row)
    assert all(mover.on_host(module_of(e)) for e in encoders.values())


@pytest.mark.slow
@pytest.mark.parametrize("park", ["cpu", "free"])
def test_moved_away_and_back_gives_identical_features_and_the_same_parameters(encoders, park):
    placement = EncoderPlacement("cpu", park=park, mover=CloneMover())
    calls = _calls(encoders)
    reference = {name: call(EncoderPlacement("cpu")) for name, call in calls.items()}  # no moves
    params = {n: [id(t) for t in weights_of(module_of(e))] for n, e in encoders.items()}
    masters = {n: [t.data_ptr() for t in weights_of(module_of(e))] for n, e in encoders.items()}
    for _ in range(2):
        for name, call in calls.items():
            out = call(placement)
            if name == "text":
                assert all(torch.equal(a, b) for a, b in zip(out, reference[name]))
            else:
                assert torch.equal(out, reference[name]), name
    for n, e in encoders.items():
        assert [id(t) for t in weights_of(module_of(e))] == params[n]  # the same Parameter objects
        if park == "free":  # the host copy never moved
            assert [t.data_ptr() for t in weights_of(module_of(e))] == masters[n]


def test_the_text_encoder_can_stay_on_the_cpu(encoders):
    mover = CloneMover()
    placement = EncoderPlacement("cpu", text_device="cpu", mover=mover)
    calls = _calls(encoders)
    calls["text"](placement)
    calls["image"](placement)
    assert mover.uploads == len(weights_of(module_of(encoders["image"])))  # only CLIP was copied
    assert placement.log() == [
        ("text", "run"),
        ("text", "done"),
        ("image", "to_device"),
        ("image", "run"),
        ("image", "done"),
        ("image", "to_host"),
    ]
    assert placement.events[0].device == "cpu"


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("park", ["cpu", "free"])
def test_repeated_moves_keep_host_memory_flat(park):
    """128 MiB of weights moved 12 times: a leaked copy per move would add 1.5 GiB.

    Each weight is 64 MiB, above glibc's largest mmap threshold (32 MiB), so a freed copy goes
    back to the system at once and RSS measures live copies, not heap fragmentation.
    """
    model = nn.Sequential(nn.Linear(4096, 4096), nn.Linear(4096, 4096))
    placement = EncoderPlacement("cpu", park=park, mover=CloneMover())
    x = torch.randn(4, 4096)
    for _ in range(2):  # warm-up: allocator pools reach their working size
        with placement.use(model, name="enc"):
            model[0](x)
    before = _rss()
    for _ in range(12):
        with placement.use(model, name="enc"):
            model[0](x)
    assert _rss() - before < 16 * 2**20
    assert len(placement.events) == 14 * 4


def test_on_device_is_one_use(encoders):
    placement = EncoderPlacement("cpu", mover=CloneMover())
    with on_device(encoders["audio"], "cpu", placement=placement) as enc:
        assert enc is encoders["audio"]
    assert placement.log("audio") == [
        ("audio", "to_device"),
        ("audio", "run"),
        ("audio", "done"),
        ("audio", "to_host"),
    ]
    with on_device(nn.Linear(2, 2), "cpu", park="free") as layer:  # a plain module, own placement
        assert isinstance(layer, nn.Linear)


def test_weights_go_back_even_when_the_call_fails():
    layer = nn.Linear(4, 4)
    mover = CloneMover()
    placement = EncoderPlacement("cpu", mover=mover)
    with pytest.raises(RuntimeError), placement.use(layer, name="bad"):
        layer(torch.randn(2, 3))  # wrong width
    assert placement.log() == [("bad", "to_device"), ("bad", "run"), ("bad", "to_host")]
    assert mover.on_host(layer)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="park must be one of"):
        EncoderPlacement("cpu", park="disk")
    with pytest.raises(ConfigError, match="cannot place"), EncoderPlacement("cpu").use(object()):
        pass


def test_free_masters_share_one_page_locked_buffer_of_their_exact_size():
    """Pinned one by one, each weight would be rounded up to a power of two by torch's host
    allocator (2.9 GiB for umT5 fp8 + CLIP + wav2vec2); packed, the encoder takes its own size."""
    from wanstudio.encoders.placement import EncoderPlacement
    from wanstudio.offload import FakeTransferBackend

    encoder = ImageEncoder.tiny()
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = {n: t.clone() for n, t in encoder.model.state_dict().items()}
    reference = encoder.encode(image)
    backend = FakeTransferBackend()
    mover = TensorMover("cpu", pin=True, backend=backend)
    placement = EncoderPlacement("cpu", park="free", mover=mover)
    first, second = placement.run(encoder, image), placement.run(encoder, image)
    allocs = [op[1] for op in backend.ops if op[0] == "alloc_host"]
    assert len(allocs) == 1  # packed at the first use, reused after
    tensors = weights_of(encoder.model)
    data = sum(t.nbytes for t in tensors)
    assert data <= allocs[0] < data + 512 * len(tensors)  # the weights and alignment, nothing more
    flat = mover._buffers[0].flat
    assert all(flat.data_ptr() <= t.data_ptr() < flat.data_ptr() + flat.numel() for t in tensors)
    for name, t in encoder.model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert torch.equal(first, reference) and torch.equal(second, reference)


def test_packing_releases_each_host_original_before_the_buffer_is_locked():
    """A freshly loaded encoder lives in pageable host memory; packing it must not hold it twice
    (umT5 fp8: +7.2 GiB host peak when every original lived until the buffer was complete)."""
    from wanstudio.offload import FakeTransferBackend

    encoder = ImageEncoder.tiny()
    tensors = weights_of(encoder.model)
    originals = [StorageWeakRef(t.data.untyped_storage()) for t in tensors]
    values = [t.detach().clone() for t in tensors]
    alive_when_locked = []

    class Backend(FakeTransferBackend):
        def alloc_host(self, nbytes, fill=None):
            buffer = super().alloc_host(nbytes, fill=fill)  # fill runs before the pages are locked
            gc.collect()
            alive_when_locked.append(sum(not ref.expired() for ref in originals))
            return buffer

    mover = TensorMover("cpu", pin=True, backend=Backend())
    mover.pack(tensors)
    assert alive_when_locked == [0]
    assert all(torch.equal(t, v) for t, v in zip(tensors, values))
    assert all(mover._is_master(t.data) for t in tensors)


def test_a_new_mover_keeps_masters_that_are_page_locked_already(monkeypatch):
    """A new EncoderRunner (another budget, a second pipeline) must not copy the encoders into a
    second buffer: memory that CUDA reports page-locked is a master already."""
    from wanstudio.offload import FakeTransferBackend, transfer

    encoder = ImageEncoder.tiny()
    tensors = weights_of(encoder.model)
    first = TensorMover("cpu", pin=True, backend=FakeTransferBackend())
    first.pack(tensors)
    pointers = [t.data_ptr() for t in tensors]
    monkeypatch.setattr(transfer, "is_page_locked", first._is_master)  # what CUDA would answer
    backend = FakeTransferBackend()
    TensorMover("cpu", pin=True, backend=backend).pack(tensors)
    assert [op for op in backend.ops if op[0] == "alloc_host"] == []
    assert [t.data_ptr() for t in tensors] == pointers
