"""Ulysses sequence parallelism, CFG parallelism and the launch API, on CPU processes (gloo).

Each test forks its ranks (torch.multiprocessing, loopback only); the models and inputs are
built in the parent, so every rank starts from the same weights, and each rank saves what it
computed for the parent to compare with the one-process reference.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import wanstudio as ws
from wanstudio.errors import ConfigError, PipelineError, ShapeError
from wanstudio.offload import FakeTransferBackend, enable_block_swap
from wanstudio.options import ParallelMode, parse_option
from wanstudio.parallel import (
    RankAborted,
    check_heads,
    disable_sequence_parallel,
    enable_sequence_parallel,
    init_parallel,
    plan_sizes,
)
from wanstudio.pipeline.guidance import Condition, Guidance, GuidanceConfig

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not dist.is_available() or not dist.is_gloo_available(),
    reason="forked gloo ranks need Linux and torch.distributed with gloo",
)
TOL = 1e-5  # max |parallel - one process| relative to max |one process|: fp32 rounding


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs, a busy machine, and up to 4 ranks on it
    yield
    torch.set_num_threads(n)


# --- harness -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    fn(rank, *args)


RANK_TIMEOUT_S = 300  # well under pytest's timeout, so a hung rank fails here, not there


def launch(world: int, fn, *args) -> None:
    """Run ``fn(rank, *args)`` in ``world`` forked processes with torchrun's environment.

    Ranks that are still running after RANK_TIMEOUT_S are killed: a hung rank must fail the
    test, never outlive it (orphans holding the output pipe kept a CI run open for hours).
    """
    ctx = mp.start_processes(
        _entry, args=(world, _free_port(), fn, args), nprocs=world, start_method="fork", join=False
    )
    deadline = time.monotonic() + RANK_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {RANK_TIMEOUT_S} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join()


def results(path, world: int) -> list:
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@functools.cache
def _model(preset: str, heads: int) -> ws.WanModel:
    cfg = ws.WanConfig.preset(preset).replace(num_heads=heads)
    torch.manual_seed(0)
    return ws.WanModel(cfg).eval()


def model_for(preset: str, heads: int) -> ws.WanModel:
    model = _model(preset, heads)
    assert "run_blocks" not in vars(model)  # no test left it sequence parallel
    return model


def one_process(model, inputs: ws.ModelInputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs.as_kwargs())


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL, f"relative error {err:.2e} > {TOL:.0e}"


def _ulysses_rank(rank, model, inputs, out_dir, mode="ulysses"):
    with init_parallel(mode, timeout_s=60) as ctx:
        ctx.prepare_model(model)
        hook = model._sequence_parallel
        calls = []
        exchange = hook._tokens_to_heads
        hook._tokens_to_heads = lambda *a: calls.append(1) or exchange(*a)  # proof it was used
        out = one_process(model, inputs)
        assert len(calls) == len(model.blocks)
        torch.save(out, out_dir / f"rank{rank}.pt")


def run_ulysses(world, model, inputs, tmp_path) -> list[torch.Tensor]:
    launch(world, _ulysses_rank, model, inputs, tmp_path)
    return results(tmp_path, world)


# --- Ulysses -------------------------------------------------------------------------------------
CASES = {
    "t2v": ("tiny-t2v", 1),
    "i2v": ("tiny-i2v", 1),
    "infinitetalk-1-speaker": ("tiny-infinitetalk", 1),
    "infinitetalk-2-speakers": ("tiny-infinitetalk", 2),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_ulysses_matches_one_process(case, world, tmp_path):
    """45 tokens (3 x 3 x 5): padded to 46 / 48, latent frames of 15 tokens straddle ranks."""
    preset, speakers = CASES[case]
    model = model_for(preset, heads=world)  # world 4: one head per rank
    inputs = ws.ModelInputs.example(model.config, speakers=speakers)
    ref = one_process(model, inputs)
    for out in run_ulysses(world, model, inputs, tmp_path):
        assert_matches(out, ref)


SIZES = {  # (batch, latent frames, height, width) -> tokens f*h*w with the (1, 2, 2) patch
    "48 tokens, no padding, 16-token frames straddle": (1, 3, 8, 8),
    "12 tokens, 6-token frames": (1, 2, 4, 6),
    "1 token: ranks holding only padding": (1, 1, 2, 2),
    "batch 2, 45 tokens": (2, 3, 6, 10),
}


@pytest.mark.parametrize("size", SIZES)
def test_ulysses_token_counts(size, tmp_path):
    batch, frames, height, width = SIZES[size]
    model = model_for("tiny-infinitetalk", heads=4)
    inputs = ws.ModelInputs.example(
        model.config, batch=batch, frames=frames, height=height, width=width, speakers=2
    )
    ref = one_process(model, inputs)
    for out in run_ulysses(4, model, inputs, tmp_path):
        assert_matches(out, ref)


def _modes_rank(rank, model, inputs, out_dir):
    ws.apply_modes(model, ws.RuntimeModes(quantization="fp8_e4m3fn_scaled_fast", precision="fp32"))
    enable_block_swap(model, 1, backend=FakeTransferBackend())  # each rank swaps its own copy
    ref = one_process(model, inputs)
    with init_parallel("ulysses", timeout_s=60) as ctx, ws.strict_layout():
        ctx.prepare_model(model)
        torch.save((ref, one_process(model, inputs)), out_dir / f"rank{rank}.pt")


def test_ulysses_with_quantization_block_swap_and_strict_layout(tmp_path):
    """A quantized, block-swapped model under strict layout checks: same output as one rank."""
    model = model_for("tiny-infinitetalk", heads=2)
    inputs = ws.ModelInputs.example(model.config, speakers=2)
    launch(2, _modes_rank, model, inputs, tmp_path)
    for ref, out in results(tmp_path, 2):
        assert_matches(out, ref)


def _compiled_rank(rank, model, inputs, out_dir):
    # Inductor's compile pools were created by the parent (earlier tests); a forked rank has
    # the pool objects without their threads and would wait on them forever. Compile inline.
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1
    ws.apply_modes(model, ws.RuntimeModes(precision="fp32", compile=True))
    with init_parallel("ulysses", timeout_s=300) as ctx:
        ctx.prepare_model(model)
        torch.save(one_process(model, inputs), out_dir / f"rank{rank}.pt")


@pytest.mark.slow
def test_ulysses_with_compiled_blocks(tmp_path):
    """The hooks run eagerly inside torch.compile'd blocks (collectives are not traced)."""
    model = model_for("tiny-infinitetalk", heads=2)
    inputs = ws.ModelInputs.example(model.config, speakers=2)
    ref = one_process(model, inputs)
    launch(2, _compiled_rank, model, inputs, tmp_path)
    for out in results(tmp_path, 2):
        assert_matches(out, ref)


def _seam_rank(rank, model, inputs, out_dir):
    with init_parallel("ulysses", timeout_s=60) as ctx, torch.no_grad():
        ctx.prepare_model(model)
        tokens, state = model.embed(inputs)
        split = model.run_blocks(model.run_blocks(tokens, state, 0, 1), state, 1)
        whole = model.run_blocks(tokens, state)
        disable_sequence_parallel(model)
        after = one_process(model, inputs)
        torch.save((split, whole, "run_blocks" in vars(model), after), out_dir / f"rank{rank}.pt")


def test_ulysses_run_blocks_ranges_and_disable(tmp_path):
    """The wrapper keeps run_blocks' contract (ranges compose); disabling restores the model."""
    model = model_for("tiny-infinitetalk", heads=2)
    inputs = ws.ModelInputs.example(model.config, speakers=2)
    with torch.no_grad():
        tokens, state = model.embed(inputs)
        ref_tokens = model.run_blocks(tokens, state)
    ref = one_process(model, inputs)
    launch(2, _seam_rank, model, inputs, tmp_path)
    for split, whole, wrapped, after in results(tmp_path, 2):
        assert_matches(split, ref_tokens)
        assert_matches(whole, ref_tokens)
        assert not wrapped
        assert torch.equal(after, ref)


def test_heads_must_split_evenly():
    for world in (2, 4, 5, 8):
        check_heads(40, world)
    with pytest.raises(ConfigError, match=r"40 % 3 = 1.*2, 4, 5, 8"):
        check_heads(40, 3)
    ctx = init_parallel("none")
    ctx.check_model(ws.WanConfig.preset("t2v-14b"))  # one process: nothing to split
    ctx.sequence_size = 6
    with pytest.raises(ConfigError, match="40 % 6 = 4"):
        ctx.check_model(ws.WanConfig.preset("t2v-14b"))  # before any weight is read


def _heads_rank(rank, model, out_dir):
    with init_parallel("ulysses", timeout_s=60) as ctx:
        with pytest.raises(ConfigError, match=r"4 % 3 = 1") as caught:
            ctx.prepare_model(model)
        assert "run_blocks" not in vars(model)
        torch.save(str(caught.value), out_dir / f"rank{rank}.pt")


def test_heads_error_on_three_ranks(tmp_path):
    launch(3, _heads_rank, model_for("tiny-t2v", heads=4), tmp_path)
    assert all("4 attention heads" in msg for msg in results(tmp_path, 3))


def test_sequence_parallel_needs_a_process_group():
    with pytest.raises(ConfigError, match="init_parallel"):
        enable_sequence_parallel(model_for("tiny-t2v", heads=2))


# --- CFG ---------------------------------------------------------------------------------------
GUIDANCE = {  # conditions per step: 3, 2 (text scale 1), 1 (distilled)
    3: GuidanceConfig(),
    2: GuidanceConfig(text_scale=1.0, audio_scale=2.0),
    1: GuidanceConfig(text_scale=1.0, audio_scale=1.0),
}


def _predictor(model, inputs):
    null_context = torch.zeros_like(inputs.context)
    null_audio = torch.zeros_like(inputs.audio)

    def predict(c: Condition) -> torch.Tensor:
        kw = inputs.as_kwargs()
        kw["context"] = inputs.context if c.text else null_context
        kw["audio"] = inputs.audio if c.audio else null_audio
        with torch.no_grad():
            return model(**kw)

    return predict


def _cfg_rank(rank, model, inputs, mode, cfg_size, calls, out_dir):
    with init_parallel(mode, cfg_size=cfg_size, timeout_s=60) as ctx:
        ctx.prepare_model(model)
        guidance = Guidance(GUIDANCE[calls])
        made = []
        predict = _predictor(model, inputs)
        v = ctx.predict_conditions(lambda c: made.append(c) or predict(c), guidance.conditions)
        torch.save((v, guidance.combine(v), made), out_dir / f"rank{rank}.pt")


@pytest.mark.parametrize(
    "world, mode, calls",
    [
        (2, "cfg", 3),
        (2, "cfg", 2),
        (2, "cfg", 1),
        (3, "cfg", 3),
        (3, "cfg", 2),
        (4, "ulysses+cfg", 3),
        (4, "ulysses+cfg", 2),
    ],
)
def test_cfg_split_matches_one_process(world, mode, calls, tmp_path):
    model = model_for("tiny-infinitetalk", heads=2)
    inputs = ws.ModelInputs.example(model.config, speakers=2)
    guidance = Guidance(GUIDANCE[calls])
    predict = _predictor(model, inputs)
    ref = {c: predict(c) for c in guidance.conditions}
    ref_v = guidance.combine(ref)
    launch(world, _cfg_rank, model, inputs, mode, 2 if world == 4 else None, calls, tmp_path)
    made = []
    for v, combined, mine in results(tmp_path, world):
        assert list(v) == list(guidance.conditions)
        for c in guidance.conditions:
            assert_matches(v[c], ref[c])
        assert_matches(combined, ref_v)
        made.append(mine)
    cfg_size = 2 if world == 4 else world
    sequence = world // cfg_size if mode == "ulysses+cfg" else 1
    for rank, mine in enumerate(made):  # condition i ran on the ranks of CFG slot i % cfg_size
        slot = rank // sequence
        assert mine == list(guidance.conditions[slot::cfg_size])


# --- launch API ----------------------------------------------------------------------------------
def test_parallel_mode_option():
    assert ParallelMode.names() == ("none", "ulysses", "cfg", "ulysses+cfg")
    assert parse_option(ParallelMode, "ulysses+cfg").splits_tokens
    assert parse_option(ParallelMode, "ulysses+cfg").splits_guidance
    assert not ParallelMode.CFG.splits_tokens and not ParallelMode.ULYSSES.splits_guidance


def test_plan_sizes():
    assert plan_sizes("none", 1) == (1, 1)
    assert plan_sizes("ulysses", 8) == (8, 1)
    assert plan_sizes("cfg", 3) == (1, 3)
    assert plan_sizes("ulysses+cfg", 4) == (2, 2)
    assert plan_sizes("ulysses+cfg", 6, 3) == (2, 3)
    for mode, world, cfg_size in [("none", 2, None), ("cfg", 4, None), ("cfg", 2, 3), ("ulysses+cfg", 6, 4)]:
        with pytest.raises(ConfigError):
            plan_sizes(mode, world, cfg_size)


def test_init_parallel_outside_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_parallel("none")
    assert ctx.is_writer and ctx.world_size == 1 and ctx.device is None
    assert ctx.run(lambda a, b=0: a + b, 1, b=2) == 3
    assert ctx.predict_conditions(lambda c: torch.tensor(float(c)), [1, 2, 3]) == {
        1: torch.tensor(1.0),
        2: torch.tensor(2.0),
        3: torch.tensor(3.0),
    }
    with pytest.raises(ConfigError, match="torchrun"):
        init_parallel("ulysses")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="'none' runs one process"):
        init_parallel("none")  # refused before joining any process group
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        init_parallel("cfg")
    assert not dist.is_initialized()


def _layout_rank(rank, out_dir):
    with init_parallel("ulysses+cfg", cfg_size=2, timeout_s=60) as ctx:
        ranks = dist.get_process_group_ranks
        info = (ctx.is_writer, ranks(ctx.sequence_group), ranks(ctx.cfg_group), ctx.device, ctx.backend)
        latent = torch.full((2,), float(rank))
        info += (ctx.broadcast(latent).tolist(),)
        torch.save(info, out_dir / f"rank{rank}.pt")


def test_groups_writer_and_broadcast(tmp_path):
    launch(4, _layout_rank, tmp_path)
    got = results(tmp_path, 4)
    assert [g[0] for g in got] == [True, False, False, False]
    assert [g[1] for g in got] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # sequence groups: CFG slots
    assert [g[2] for g in got] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # CFG groups
    assert all(g[3] == torch.device("cpu") and g[4] == "gloo" for g in got)
    assert all(g[5] == [0.0, 0.0] for g in got)


# --- failures ------------------------------------------------------------------------------------
def _failing_rank(rank, failing, out_dir):
    def step():
        if rank in failing:
            raise ShapeError(f"bad shape on rank {rank}")
        return rank

    with init_parallel("cfg", timeout_s=60, failure_grace_s=30) as ctx:
        assert ctx.run(lambda: rank) == rank  # a step that works on every rank
        try:
            ctx.run(step)
            outcome = ("returned", "")
        except Exception as e:
            outcome = (type(e).__name__, str(e))
        torch.save(outcome, out_dir / f"rank{rank}.pt")


def test_one_rank_fails_every_rank_stops_rank_0_reports(tmp_path):
    launch(2, _failing_rank, {1}, tmp_path)
    (kind0, msg0), (kind1, msg1) = results(tmp_path, 2)
    assert kind0 == "PipelineError" and "rank 1 of 2 failed: ShapeError: bad shape on rank 1" in msg0
    assert "Traceback of rank 1" in msg0 and "raise ShapeError" in msg0
    assert kind1 == "RankAborted" and "rank 0 shows the error" in msg1
    assert issubclass(RankAborted, PipelineError)


def test_every_rank_fails_rank_0_raises_its_own_error(tmp_path):
    launch(3, _failing_rank, {0, 1, 2}, tmp_path)
    got = results(tmp_path, 3)
    assert got[0] == ("ShapeError", "bad shape on rank 0")  # the original exception, once
    assert [kind for kind, _ in got[1:]] == ["RankAborted", "RankAborted"]


def _stuck_rank(rank, out_dir):
    def step():
        if rank == 1:
            raise ShapeError("rank 1 cannot go on")
        dist.all_reduce(torch.ones(1))  # rank 0 waits here for rank 1, which never comes
        torch.save("rank 0 was not stopped", out_dir / "rank0.pt")

    ctx = init_parallel("ulysses", timeout_s=60, failure_grace_s=1)
    ctx.run(step)


def test_a_rank_failing_inside_a_collective_stops_every_rank(tmp_path, capfd):
    with pytest.raises(mp.ProcessExitedException, match="exit code 1"):
        launch(2, _stuck_rank, tmp_path)
    err = capfd.readouterr().err
    assert err.count("wanstudio: rank 1 of 2 failed") == 1
    assert "ShapeError: rank 1 cannot go on" in err
    assert not (tmp_path / "rank0.pt").exists()


# --- a real torchrun launch ----------------------------------------------------------------------
RANKS_SCRIPT = os.path.join(os.path.dirname(__file__), "parallel_ranks.py")


def torchrun(world: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node world tests/parallel_ranks.py args`` on loopback."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), RANKS_SCRIPT, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ulysses", "cfg"])
def test_torchrun_launch(mode, tmp_path):
    """init_parallel under torchrun itself (env://, gloo): the guided velocities of a step."""
    out = tmp_path / "result.pt"
    run = torchrun(2, "--mode", mode, "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(out)
    assert_matches(result["parallel"], result["reference"])


@pytest.mark.slow
def test_torchrun_failure_is_shown_once(tmp_path):
    run = torchrun(2, "--mode", "ulysses", "--out", str(tmp_path / "r.pt"), "--fail-rank", "1")
    assert run.returncode != 0
    assert run.stderr.count("error: rank 1 of 2 failed: ShapeError: rank 1 was told to fail") == 1, run.stderr
    assert run.stderr.count("Traceback of rank 1") == 1  # rank 1 itself printed nothing
