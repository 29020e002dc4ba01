"""The pipeline's memory settings on the tiny preset: encoders on the "device" only while they
run, the text encoder on the CPU when it does not fit, the VAE tiled when it would not fit, the
DiT's share of a budget, an fp8 text encoder.

The device is simulated on the CPU by test_encoder_placement's CloneMover (a device copy is a
clone whose storage it can recognise); budgets are simulated by patching what is left.
"""

from __future__ import annotations

import pytest
import torch
from test_encoder_placement import CloneMover
from test_pipeline import speech

from wanstudio.encoders import VAE, AudioEncoder, ImageEncoder, TextEncoder
from wanstudio.errors import ConfigError, PipelineError
from wanstudio.offload.planner import DEFAULT_RESERVE_BYTES, ENCODER_ACTIVATION_BYTES, GiB, module_bytes
from wanstudio.pipeline import InfiniteTalkPipeline
from wanstudio.pipeline.memory import EncoderRunner, check_text_device, check_tiled, dit_budget_gb
from wanstudio.quant import QuantizedLinear

ARGS = dict(steps=3, text_scale=2.0, audio_scale=2.0, progress=False, seed=3, max_frames=17)


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_parked_encoders_are_on_the_device_only_while_they_run_and_change_nothing(image):
    wave = speech(0.7)
    resident = InfiniteTalkPipeline.tiny(seed=0)(image, wave, **ARGS).frames

    pipe = InfiniteTalkPipeline.tiny(seed=0)
    pipe.encoders = EncoderRunner("cpu", offload=True)  # what a small card gets by default
    pipe.encoders.prepare(pipe.text_encoder, pipe.image_encoder, pipe.audio_encoder)
    mover = CloneMover()
    pipe.encoders.placement.mover = mover
    at_first_step = {}

    def progress(event):
        if event.kind == "step" and not at_first_step:
            at_first_step["log"] = list(pipe.encoders.placement.log())
            for name in ("text_encoder", "image_encoder", "audio_encoder"):
                at_first_step[name] = mover.on_host(getattr(pipe, name).model)

    parked = pipe(image, wave, **dict(ARGS, progress=progress)).frames
    assert torch.equal(parked, resident)
    # every encoder went in, ran, came out, before the first sampling step
    assert at_first_step["log"] == [
        (name, action)
        for name in ("text", "image", "audio")
        for action in ("to_device", "run", "done", "drop")
    ]
    assert all(at_first_step[n] for n in ("text_encoder", "image_encoder", "audio_encoder"))
    assert mover.uploads == sum(
        len(list(getattr(pipe, n).model.parameters())) + len(list(getattr(pipe, n).model.buffers()))
        for n in ("text_encoder", "image_encoder", "audio_encoder")
    )


def test_text_encoder_runs_on_the_cpu_when_it_does_not_fit(monkeypatch):
    text = TextEncoder.tiny()
    runner = EncoderRunner("cpu", offload=True)
    runner.placement.mover = CloneMover()
    runner.prepare(text)
    need = module_bytes(text.model) + ENCODER_ACTIVATION_BYTES
    reference = text.encode(["a person talking"])[0]

    monkeypatch.setattr(runner, "left_bytes", lambda: need + 2**30)  # fits: moved in and out
    fits = runner.run(text, ["a person talking"])[0]
    assert runner.placement.log("text") == [("text", a) for a in ("to_device", "run", "done", "drop")]
    assert runner.text_ran_on == "cpu"  # the simulated device is the CPU
    runner.placement.events.clear()

    monkeypatch.setattr(runner, "left_bytes", lambda: need - 1)  # does not fit: runs where it waits
    squeezed = runner.run(text, ["a person talking"])[0]
    assert runner.placement.log("text") == [("text", "run"), ("text", "done")]
    assert torch.equal(fits, reference) and torch.equal(squeezed, reference)


def test_text_encoder_device_cpu_without_offload_moves_it_once():
    text, image = TextEncoder.tiny(), ImageEncoder.tiny()
    runner = EncoderRunner("cpu", offload=False, text_device="cpu")
    runner.prepare(text, image)
    assert runner.placement is None
    out = runner.run(text, ["hello"])[0]
    assert runner.text_ran_on == "cpu" and out.device.type == "cpu"


def test_vae_tiles_when_the_untiled_working_set_does_not_fit(monkeypatch):
    vae = VAE.tiny()
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 5, 136, 200, generator=g) * 2 - 1  # odd multiples of 8
    runner = EncoderRunner("cpu", offload=False)
    untiled = vae.encode(video)
    # off CUDA "auto" never tiles, whatever the VAE would estimate
    assert torch.equal(runner.vae(vae, "encode", video, "auto"), untiled)

    need = vae.working_set_bytes("encode", tuple(video.shape))
    monkeypatch.setattr(runner, "left_bytes", lambda: DEFAULT_RESERVE_BYTES + 10 * need)
    assert torch.equal(runner.vae(vae, "encode", video, "auto"), untiled)  # fits: untiled, exact
    monkeypatch.setattr(runner, "left_bytes", lambda: DEFAULT_RESERVE_BYTES + need // 2)
    tiled = runner.vae(vae, "encode", video, "auto")
    # it tiled, with the tiles the VAE picks for what is left (the tiling's accuracy is
    # test_vae_tiling's: on random tiny weights no tiling comes within 1e-2, see there)
    assert not torch.equal(tiled, untiled)
    assert torch.equal(tiled, vae.encode(video, tiled="auto", memory_budget_bytes=need // 2))
    z_need = vae.working_set_bytes("decode", tuple(untiled.shape))
    monkeypatch.setattr(runner, "left_bytes", lambda: DEFAULT_RESERVE_BYTES + z_need // 2)
    decoded = runner.vae(vae, "decode", untiled, "auto")
    assert not torch.equal(decoded, vae.decode(untiled))
    assert torch.equal(decoded, vae.decode(untiled, tiled="auto", memory_budget_bytes=z_need // 2))


def test_dit_budget_leaves_room_for_the_vae_and_the_largest_encoder():
    vae, image, audio = VAE.tiny(), ImageEncoder.tiny(), AudioEncoder.tiny()
    got = dit_budget_gb("cpu", 12.0, vae, [image, audio])
    room = max(module_bytes(image.model), module_bytes(audio.model)) + ENCODER_ACTIVATION_BYTES
    assert got == pytest.approx((12 * GiB - module_bytes(vae.model) - room) / GiB)
    with pytest.raises(ConfigError, match="cannot hold the largest encoder"):
        dit_budget_gb("cpu", 0.1, vae, [image, audio])


def test_fp8_text_encoder_keeps_umt5_working():
    ref = TextEncoder.tiny().encode(["a person talking", "blurry"])
    q = TextEncoder.tiny().quantize("fp8_e4m3fn_scaled")
    names = [n for n, m in q.model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(names) == 2 * 6 and not any(n.endswith(".wo") for n in names)  # q k v o wi_0 wi_1
    for a, b in zip(ref, q.encode(["a person talking", "blurry"])):
        sqnr = 10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean())
        assert sqnr > 24, sqnr


def test_bad_settings_are_refused(image):
    with pytest.raises(ConfigError, match="text_encoder_device"):
        check_text_device("cuda:1")
    with pytest.raises(ConfigError, match="tiled_vae"):
        check_tiled("yes")
    pipe = InfiniteTalkPipeline.tiny(seed=0)
    with pytest.raises((ConfigError, PipelineError), match="tiled_vae"):
        pipe(image, speech(0.7), tiled_vae="sometimes", **ARGS)


def test_out_of_memory_advice_names_only_settings_that_would_help():
    from types import SimpleNamespace

    from wanstudio.options import QuantMode
    from wanstudio.pipeline.clips import oom_error

    work = SimpleNamespace(finished=0, path="/tmp/w", resume_args="resume=True")

    def advice(swap, quant=QuantMode.DISABLED, offload=False, vae_hint=True):
        pipe = SimpleNamespace(
            device=torch.device("cpu"),
            modes=SimpleNamespace(blocks_to_swap=swap, quantization=quant),
            config=SimpleNamespace(num_layers=40),
            encoders=EncoderRunner("cpu", offload=offload),
        )
        return str(oom_error(pipe, "clip 1 of 1", work, vae_hint))

    text = advice(0)
    assert "blocks_to_swap=10 (now 0)" in text and "quantization='fp8_e4m3fn_scaled'" in text
    assert "offload_encoders=True" in text and "tiled_vae=True" in text and "resume=True" in text
    assert "blocks_to_swap=40 (now 35)" in advice(35)
    text = advice(40, QuantMode.FP8_E4M3FN_SCALED, offload=True, vae_hint=False)
    assert "blocks_to_swap" not in text and "quantization" not in text and "offload_encoders" not in text
    assert "Try a smaller size." in text


@pytest.mark.parametrize("card_gib, parked", [(24, True), (80, False)])
def test_memory_report_says_what_auto_does_on_this_card(monkeypatch, card_gib, parked):
    from types import SimpleNamespace

    from wanstudio.pipeline import memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=card_gib * GiB)
    )
    monkeypatch.setattr(memory, "free_device_bytes", lambda d: (card_gib - 1) * GiB)
    first, second, _host = memory.memory_report("cuda:0")
    assert f"{card_gib:.1f} GiB, {card_gib - 1:.1f} free" in first
    assert ("only while they run" in first) is parked and ("stay on the GPU" in first) is not parked
    assert f"default the {card_gib - 1:.1f} GiB free" in second
