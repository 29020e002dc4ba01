"""Step caches (TeaCache, MagCache) on the tiny InfiniteTalk model in a real Euler loop.

Every skip pattern is checked against the cache's rule recomputed here, independently, on the
inputs the cached run actually saw; every skipped output against head(tokens + the residual of
that condition's last computed step), recomputed here from the model's own stages.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wanstudio as ws
from wanstudio.cache import (
    MAGCACHE_RATIOS,
    MIN_CACHE_STEPS,
    TEACACHE_COEFFICIENTS,
    MagCache,
    NoCache,
    StepCache,
    TeaCache,
    check_cache_for_steps,
    mag_ratios_for,
    make_cache,
    rescale,
)
from wanstudio.offload import FakeTransferBackend, disable_block_swap, enable_block_swap
from wanstudio.options import CacheMode, SizeClass, TeaCacheIndicator, parse_option
from wanstudio.pipeline.sampler import EulerSampler

STEPS = 10
KEYS = ("cond", "uncond")
LINEAR = (1.0, 0.0)  # rescale(x) = x: the raw relative L1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: one thread is faster on a busy machine
    yield
    torch.set_num_threads(n)


def _model(layers: int = 2, quant: str | None = None) -> ws.WanModel:
    torch.manual_seed(0)
    model = ws.WanModel(ws.WanConfig.preset("tiny-infinitetalk").replace(num_layers=layers)).eval()
    if quant:
        ws.quantize(model, quant)
    return model


def _inputs_for(model, key: str, x: torch.Tensor, t: torch.Tensor) -> ws.ModelInputs:
    """cond: prompt + audio; uncond: another prompt, silent audio (as the pipeline's ¬T, ¬A)."""
    base = ws.ModelInputs.example(model.config, seed=1)
    other = ws.ModelInputs.example(model.config, seed=2)
    cond = key == "cond"
    return ws.ModelInputs(
        x,
        t.reshape(1),
        base.context if cond else other.context,
        base.clip_fea,
        base.y,
        base.audio if cond else torch.zeros_like(base.audio),
    )


def sample(model, cache=None, steps: int = STEPS, after=None):
    """An Euler loop with two guidance keys. Returns (final latents, [(key, step, inputs, out)]).

    ``after()`` runs after each model call."""
    sampler = EulerSampler(steps, 7.0)
    x = ws.ModelInputs.example(model.config, seed=1).x
    calls = []
    with torch.inference_mode():
        for i, t in enumerate(sampler.timesteps):
            v = {}
            for key in KEYS:
                inputs = _inputs_for(model, key, x, t)
                out = (
                    model(**inputs.as_kwargs())
                    if cache is None
                    else cache.forward(model, inputs, key, i, steps)
                )
                calls.append((key, i, inputs, out))
                if after is not None:
                    after()
                v[key] = out
            x = sampler.step(v["uncond"] + 3.0 * (v["cond"] - v["uncond"]), i, x)
    return x, calls


# --- independent references ------------------------------------------------------------------
def indicator(model, inputs: ws.ModelInputs, kind: TeaCacheIndicator) -> torch.Tensor:
    """The TeaCache signal written out from the block's definition (not TeaCache.indicator_of)."""
    with torch.inference_mode():
        tokens, state = model.embed(inputs)
        if kind is TeaCacheIndicator.E0:
            return state.e0
        if kind is TeaCacheIndicator.E:
            return state.e
        mod = model.blocks[0].modulation.float() + state.e0  # (B, 6, D)
        normed = F.layer_norm(tokens.float(), (model.config.dim,), eps=model.config.eps)
        return torch.addcmul(mod[:, 0:1], normed, 1 + mod[:, 1:2]).to(
            tokens.dtype
        )  # shift + LN(x) (1 + scale)


def teacache_rule(signals: list[torch.Tensor], coefficients, threshold, start, steps) -> list[int]:
    """Skipped steps of one key: accumulate polyval(rel L1) from ``start``; reset on compute."""
    skipped, acc = [], 0.0
    for step in range(steps):
        if step < start or step == steps - 1:
            acc = 0.0
            continue
        cur, prev = signals[step].double(), signals[step - 1].double()
        rel = ((cur - prev).abs().mean() / prev.abs().mean()).item()
        acc += float(np.polyval(coefficients, rel))
        if acc < threshold:
            skipped.append(step)
        else:
            acc = 0.0
    return skipped


def magcache_rule(ratios, threshold, k, retention, steps) -> list[int]:
    skipped, ratio, err, run = [], 1.0, 0.0, 0
    for step in range(math.ceil(retention * steps - 1e-9), steps - 1):
        ratio *= ratios[step]
        run += 1
        err += abs(1 - ratio)
        if err < threshold and run <= k:
            skipped.append(step)
        else:
            ratio, err, run = 1.0, 0.0, 0
    return skipped


def check_outputs(model, calls, skipped: dict[str, list[int]]) -> None:
    """Computed calls equal the plain forward bitwise; skipped ones equal head(tokens + residual
    of the key's last computed call), recomputed from the model's stages."""
    last = {}
    with torch.inference_mode():
        for key, step, inputs, out in calls:
            tokens, state = model.embed(inputs)
            if step in skipped[key]:
                expected = model.run_head(tokens + last[key], state)
            else:
                expected = model(**inputs.as_kwargs())
                last[key] = model.run_blocks(tokens, state) - tokens
            assert torch.equal(out, expected), (key, step)


# --- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [NoCache(), TeaCache(0.0), MagCache(0.0), make_cache("none")])
def test_no_skip_is_bitwise_the_uncached_loop(cache):
    model = _model()
    x_ref, ref = sample(model)
    x, calls = sample(model, cache)
    assert torch.equal(x, x_ref)
    assert all(torch.equal(a[3], b[3]) for a, b in zip(calls, ref))
    summary = cache.summary()
    assert summary.skipped_calls == 0 and summary.computed == {"cond": STEPS, "uncond": STEPS}
    assert isinstance(cache, StepCache)


@pytest.mark.parametrize(
    "kind, start, scale",
    [(TeaCacheIndicator.E0, 5, 1.6), (TeaCacheIndicator.E, 1, 2.2), (TeaCacheIndicator.MODULATED, 1, 2.5)],
)
def test_teacache_skips_exactly_what_its_rule_says(kind, start, scale):
    model = _model()
    # a threshold between one and a few steps' change, from the uncached run's own signals
    _, ref = sample(model)
    sig = [indicator(model, inp, kind) for key, _, inp, _ in ref if key == "cond"]
    rel = [((b - a).abs().mean() / a.abs().mean()).item() for a, b in zip(sig, sig[1:])]
    threshold = scale * float(np.median(rel))
    cache = TeaCache(threshold, indicator=kind, coefficients=LINEAR)
    assert cache.start_step == start  # the published retention: 5 steps with e0, else 1
    _, calls = sample(model, cache)
    expected = {}
    for key in KEYS:
        signals = [indicator(model, inp, kind) for k, _, inp, _ in calls if k == key]
        expected[key] = teacache_rule(signals, LINEAR, threshold, start, STEPS)
        assert list(cache.summary().skipped_steps(key)) == expected[key], key
    assert 0 < len(expected["cond"]) < STEPS - 1 - start  # the test sees skips and computes
    check_outputs(model, calls, expected)
    decisions = cache.summary().decisions
    assert [d.computed for d in decisions if d.step == STEPS - 1] == [True, True]  # last step


def test_teacache_uses_the_published_polynomial():
    for (kind, size), coefficients in TEACACHE_COEFFICIENTS.items():
        cache = TeaCache(indicator=kind, size_class=size)
        assert cache.coefficients == coefficients
        for x in (0.0, 0.013, 0.05, 0.2):
            assert rescale(coefficients, x) == pytest.approx(np.polyval(coefficients, x), rel=1e-12)
    # InfiniteTalk's teacache_init, infinitetalk-480 with use_ret_steps: e0
    e0 = TEACACHE_COEFFICIENTS[TeaCacheIndicator.E0, SizeClass.P480]
    assert e0 == (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01)
    assert TeaCache().coefficients == e0 and TeaCache().threshold == 0.2
    assert TeaCache(indicator="modulated").coefficients == LINEAR  # none published for it


@pytest.mark.parametrize("quant", [None, "fp8_e4m3fn_scaled"])
def test_modulated_indicator_is_what_block_0_receives(quant):
    model = _model(quant=quant)
    seen = []
    handle = model.blocks[0].self_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    inputs = _inputs_for(model, "cond", ws.ModelInputs.example(model.config).x, torch.tensor(700.0))
    cache = TeaCache(indicator="modulated")
    with torch.inference_mode():
        model(**inputs.as_kwargs())
        tokens, state = model.embed(inputs)
        signal = cache.indicator_of(model, tokens, state)
    handle.remove()
    assert torch.equal(signal, seen[0])
    assert torch.equal(signal, indicator(model, inputs, TeaCacheIndicator.MODULATED))


def test_each_key_keeps_its_own_state():
    """'still' sees the same inputs every step, 'moving' new latents every step."""
    model = _model()
    cache = TeaCache(0.05, indicator="modulated", coefficients=LINEAR)
    still = _inputs_for(model, "cond", ws.ModelInputs.example(model.config, seed=3).x, torch.tensor(500.0))
    outs = {"still": [], "moving": []}
    with torch.inference_mode():
        for step in range(STEPS):
            moving = _inputs_for(
                model, "uncond", ws.ModelInputs.example(model.config, seed=10 + step).x, torch.tensor(500.0)
            )
            outs["moving"].append(cache.forward(model, moving, "moving", step, STEPS))
            outs["still"].append(cache.forward(model, still, "still", step, STEPS))
            assert torch.equal(outs["moving"][-1], model(**moving.as_kwargs()))
    summary = cache.summary()
    assert summary.skipped_steps("still") == tuple(range(1, STEPS - 1))  # nothing changed
    assert summary.skipped_steps("moving") == ()
    assert summary.computed == {"moving": STEPS, "still": 2} and summary.skipped == {"still": STEPS - 2}
    for out in outs["still"][1:]:  # tokens + (out - tokens): its own residual, not the other key's
        torch.testing.assert_close(out, outs["still"][0], rtol=0, atol=1e-5)


def test_reset_clears_everything():
    model = _model()
    cache = MagCache()
    _, first = sample(model, cache)
    with pytest.raises(ws.PipelineError, match="reset"):  # a new clip without reset
        sample(model, cache)
    cache.reset()
    assert cache.summary().decisions == () and not cache._keys
    _, second = sample(model, cache)
    _, fresh = sample(model, MagCache())
    assert all(torch.equal(a[3], b[3]) for a, b in zip(second, fresh))  # as a new cache
    summary = cache.summary()
    assert summary.clips == 2 and summary.calls == 2 * len(KEYS) * STEPS  # totals keep counting
    assert len(summary.decisions) == len(KEYS) * STEPS


@pytest.mark.parametrize("steps, threshold, k", [(10, 0.12, 2), (12, 0.24, 6)])
def test_magcache_skips_exactly_what_its_rule_says(steps, threshold, k):
    model = _model()
    cache = MagCache(threshold, max_skip_steps=k)
    _, calls = sample(model, cache, steps)
    cond, uncond = mag_ratios_for(steps, "480")
    expected = {
        "cond": magcache_rule(cond, threshold, k, 0.2, steps),  # the first key: cond ratios
        "uncond": magcache_rule(uncond, threshold, k, 0.2, steps),
    }
    for key in KEYS:
        assert list(cache.summary().skipped_steps(key)) == expected[key]
    assert expected["cond"] and steps - 1 not in expected["cond"]
    check_outputs(model, calls, expected)


def test_mag_ratios_mapping():
    published = MAGCACHE_RATIOS[SizeClass.P480]
    assert len(published) == 78 and published[:4] == (0.98783, 0.98993, 0.97559, 0.97593)
    cond, uncond = mag_ratios_for(40)
    assert cond == (1.0, *published[0::2]) and uncond == (1.0, *published[1::2])  # 40: as published
    # 14 steps: u = k / 13 lands on every 3rd published step, so each ratio spans exactly 3
    cond14, _ = mag_ratios_for(14)
    for k in range(1, 14):
        assert cond14[k] == pytest.approx(math.prod(cond[3 * k - 2 : 3 * k + 1]), rel=1e-12)
    for steps in (10, 25, 50, 60):  # the whole trajectory's magnitude change is kept
        for mapped, orig in zip(mag_ratios_for(steps, "720"), mag_ratios_for(40, "720")):
            assert len(mapped) == steps and mapped[0] == 1.0
            assert math.prod(mapped) == pytest.approx(math.prod(orig), rel=1e-12)


@pytest.mark.parametrize("swapped, wasted", [(2, 0), (4, 1)])
def test_block_swap_copies_nothing_on_a_skipped_step(swapped, wasted):
    """Blocks 2, 3 swapped: a skipped step copies nothing. All 4 swapped: block 0's copy starts
    at the model's pre-hook, before the cache decides (documented), and is the only one."""
    reference_model = _model(layers=4)
    _, reference = sample(reference_model, MagCache())
    model = _model(layers=4)
    backend = FakeTransferBackend()
    enable_block_swap(model, swapped, prefetch=1, backend=backend)
    cache, made = MagCache(), [0]
    made_per_call = []

    def count():
        made_per_call.append(len(backend.copies()) - made[0])
        made[0] = len(backend.copies())

    _, calls = sample(model, cache, after=count)
    assert all(torch.equal(a[3], b[3]) for a, b in zip(calls, reference))
    used = [s.copies for s in model.block_swap_stats.steps]  # units that ran from a copy
    computed = [d.computed for d in cache.summary().decisions]
    assert len(used) == len(computed) == len(KEYS) * STEPS  # one block swap step per call
    assert not all(computed)
    assert used == [swapped if c else 0 for c in computed]
    # copies made during each call (a step start drops the previous call's unused copy)
    assert made_per_call == [swapped if c else wasted for c in computed]
    disable_block_swap(model)
    assert "run_blocks" not in model.__dict__


def test_an_instance_wrapper_is_wrapped_and_restored():
    """Sequence parallelism wraps run_blocks on the instance: the cache goes around it."""
    model = _model()
    inner, seen = model.run_blocks, []

    def parallel(tokens, state, start=0, stop=None):
        seen.append(tokens.shape)
        return inner(tokens, state, start, stop)

    model.run_blocks = parallel
    cache = MagCache()
    sample(model, cache)
    assert model.__dict__["run_blocks"] is parallel
    assert len(seen) == sum(cache.summary().computed.values()) > 0  # once per computed call
    assert cache.summary().skipped_calls > 0


def test_distilled_step_counts_are_refused():
    for mode in ("teacache", "magcache"):
        with pytest.raises(ws.PipelineError, match=r"at least 10 sampling steps, got 4.*distilled"):
            check_cache_for_steps(mode, 4)
        check_cache_for_steps(mode, MIN_CACHE_STEPS)
    check_cache_for_steps("none", 4)
    model = _model()
    with pytest.raises(ws.PipelineError, match="got 4"):
        sample(model, TeaCache(), steps=4)
    sample(model, NoCache(), steps=4)


def test_options_and_make_cache():
    assert CacheMode.names() == ("none", "teacache", "magcache")
    assert [m.default_threshold for m in CacheMode] == [0.0, 0.2, 0.12]
    assert parse_option(CacheMode, "TeaCache") is CacheMode.TEACACHE
    assert TeaCacheIndicator.names() == ("e0", "e", "modulated")
    assert isinstance(make_cache("none"), NoCache)
    tea = make_cache("teacache", indicator="e", size_class="720")
    assert isinstance(tea, TeaCache) and tea.threshold == 0.2 and tea.start_step == 1
    assert tea.coefficients == TEACACHE_COEFFICIENTS[TeaCacheIndicator.E, SizeClass.P720]
    mag = make_cache(CacheMode.MAGCACHE, 0.24, max_skip_steps=6)
    assert (mag.threshold, mag.max_skip_steps, mag.retention_ratio) == (0.24, 6, 0.2)
    assert make_cache("magcache").threshold == 0.12 and make_cache("magcache").max_skip_steps == 2
    with pytest.raises(ws.UnknownOptionError, match="teacache"):
        make_cache("teacahce")
    with pytest.raises(ws.PipelineError, match="no options"):
        make_cache("none", indicator="e0")
    with pytest.raises(ws.PipelineError, match="unexpected keyword"):
        make_cache("magcache", indicator="e0")
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ws.PipelineError, match="threshold"):
            make_cache("teacache", bad)


def test_summary_says_what_was_skipped():
    model = _model()
    cache = MagCache()
    sample(model, cache)
    summary = cache.summary()
    skipped = summary.skipped_calls
    assert skipped == len(summary.skipped_steps("cond")) + len(summary.skipped_steps("uncond")) > 0
    text = str(summary)
    assert f"{2 * STEPS - skipped} of {2 * STEPS} DiT calls computed, {skipped} skipped" in text
    assert "cond " in text and "step schedule only" in text
    assert "step schedule only" not in str(TeaCache(indicator="modulated").summary())
