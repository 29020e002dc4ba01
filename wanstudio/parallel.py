"""Several processes, one video: Ulysses sequence parallelism and CFG parallelism.

Launched by ``torchrun --nproc-per-node N ...`` (one process per GPU; NCCL on GPUs, gloo on
CPUs). Every rank holds a whole model (with its own block swap) and the same inputs and seed;
the collectives leave every rank with bitwise the same velocities, so every rank's sampler
keeps the same latents.

* **Ulysses** (:func:`enable_sequence_parallel`): after ``embed`` each rank keeps a run of
  L/n tokens (L padded to a multiple of n; the padding never reaches a real token) and its
  rows of the RoPE tables. Around self-attention an all-to-all trades tokens for heads (each
  rank attends over all tokens with H/n heads), and a second one trades back; text, image and
  audio cross-attention stay local (the audio attention groups the rank's tokens by latent
  frame, frames may straddle ranks); the two-speaker reference map is computed per head group
  over all tokens and summed across ranks. ``run_blocks`` gathers the tokens before the head.
* **CFG** (:func:`predict_conditions`): the 2 or 3 guidance calls of a step run on different
  ranks (or groups of ranks, each sequence parallel) and are all-gathered.

Wiring (the pipeline and CLI; every call below is in this module)::

    with init_parallel(mode, cfg_size=2) as ctx:     # reads RANK / WORLD_SIZE / LOCAL_RANK
        ctx.check_model(cfg)                          # head-count error before any file is read
        model = load_model(..., device=ctx.device or device)
        ctx.prepare_model(model)                      # after apply_modes, before a step cache
        try:
            result = ctx.run(generate, ...)           # one rank's error stops every rank
        except RankAborted:
            return 1                                  # rank 0 reports the error; say nothing
        except WanstudioError as e:                   # rank 0: print *inside* the with block,
            print(e); return 1                        # so the others wait until it is shown
    # in the sampling loop: the same seed on every rank, and instead of guidance(predict):
    v = guidance.combine(ctx.predict_conditions(lambda c: predict(c).float(), guidance.conditions))
    # files (video, work folder, progress) only where ctx.is_writer; ctx.barrier() before
    # other ranks read what rank 0 wrote; ctx.broadcast(latent) after per-rank VAE work.

``ctx.run`` may wrap one step or a whole clip: it ends with one tiny all-reduce on a gloo
control group. With mode 'none' every method runs locally, so the pipeline needs no branches.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import traceback
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import WanConfig
from .errors import ConfigError, PipelineError
from .model.audio import reference_attention_map
from .options import AttentionMode, ParallelMode, parse_option

__all__ = [
    "ParallelContext",
    "RankAborted",
    "SequenceParallel",
    "check_heads",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "init_parallel",
    "plan_sizes",
    "predict_conditions",
]

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


# --- Ulysses sequence parallelism --------------------------------------------------------------
def check_heads(num_heads: int, size: int) -> None:
    """Raise ConfigError unless ``size`` ranks can split ``num_heads`` attention heads evenly."""
    if size < 1 or num_heads % size:
        divisors = [n for n in range(2, num_heads + 1) if num_heads % n == 0]
        raise ConfigError(
            f"Ulysses sequence parallelism gives each of the {size} ranks of a sequence group "
            f"the same number of the model's {num_heads} attention heads, but {num_heads} % "
            f"{size} = {num_heads % max(size, 1)}. Launch a number of sequence-parallel ranks "
            f"that divides {num_heads} ({', '.join(map(str, divisors[:8]))}), or use "
            f"parallel mode 'cfg'."
        )


class SequenceParallel:
    """The Ulysses hook one model's attention modules share (see :func:`enable_sequence_parallel`).

    Attributes:
        group: the sequence group (None: the default group); size, rank: within it.
        token_range: (start, stop, total) while blocks run: this rank holds global tokens
            start .. stop - 1 of ``total``; rows at or past ``total`` are padding. None otherwise.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.token_range: tuple[int, int, int] | None = None

    def run_blocks(self, inner: Callable, tokens: torch.Tensor, state, start: int = 0, stop=None):
        """tokens [B, L, D] (the same on every rank) -> [B, L, D]: shard, run ``inner``, gather."""
        B, L, D = tokens.shape
        per = -(-L // self.size)  # tokens per rank: L padded up to a multiple of the size
        lo = self.rank * per
        real = max(0, min(lo + per, L) - lo)  # the last ranks may hold padding (or only padding)
        local = tokens[:, lo : lo + real]
        cos, sin = (table[lo : lo + real] for table in state.rope)  # (real, d/2) rows of the tokens
        if real < per:  # padding rows: zero tokens, identity rotation
            local = F.pad(local, (0, 0, 0, per - real))
            cos = F.pad(cos, (0, 0, 0, per - real), value=1.0)
            sin = F.pad(sin, (0, 0, 0, per - real))
        self.token_range = (lo, lo + per, L)
        try:
            out = inner(local.contiguous(), dataclasses.replace(state, rope=(cos, sin)), start, stop)
        finally:
            self.token_range = None
        parts = [torch.empty_like(out) for _ in range(self.size)]
        dist.all_gather(parts, out.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :L]  # (B, L, D), rank order is token order

    @torch.compiler.disable  # collectives stay eager inside a compiled block (fusion.py)
    def self_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ref_masks: torch.Tensor | None,
        *,
        mode: AttentionMode | str,
        where: str | nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k, v [B, L/n, H, d] (this rank's tokens, post-RoPE) -> (out [B, L/n, H, d],
        two-speaker map [B, 3, total] over every token, or None without ref_masks)."""
        total = self.token_range[2]
        padded = q.shape[1] * self.size
        q, k, v = self._tokens_to_heads(q, k, v)  # (B, padded, H/n, d) each
        if total < padded:  # padding keys would take part in every softmax: drop them
            q, k, v = (t[:, :total].contiguous() for t in (q, k, v))
        ref_map = None
        if ref_masks is not None:
            with torch.no_grad():  # the mean over this rank's heads, then over the rank groups
                ref_map = reference_attention_map(q, k, ref_masks, ref_masks.shape[-1])
                dist.all_reduce(ref_map, group=self.group)
                ref_map /= self.size
        out = attention(q, k, v, mode=mode, where=where)  # (B, total, H/n, d)
        return self._heads_to_tokens(out, padded), ref_map

    def _tokens_to_heads(self, q, k, v) -> tuple[torch.Tensor, ...]:
        """[B, L/n, H, d] x 3 -> [B, L_padded, H/n, d] x 3 in one all-to-all."""
        n = self.size
        B, per, H, d = q.shape
        send = q.new_empty(n, 3, B, per, H // n, d)  # chunk j: heads of rank j, our tokens
        for i, t in enumerate((q, k, v)):
            send[:, i] = t.unflatten(2, (n, H // n)).permute(2, 0, 1, 3, 4)  # (n, B, per, H/n, d)
        recv = torch.empty_like(send)  # chunk j: rank j's tokens, our heads
        dist.all_to_all_single(recv, send, group=self.group)
        both = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, B, n * per, H // n, d)  # (3, B, L_pad, H/n, d)
        return both.unbind(0)

    def _heads_to_tokens(self, out: torch.Tensor, padded: int) -> torch.Tensor:
        """[B, total, H/n, d] -> [B, L/n, H, d]: back to our tokens, all heads."""
        n = self.size
        B, total, h, d = out.shape
        if total < padded:
            out = F.pad(out, (0, 0, 0, 0, 0, padded - total))
        send = out.reshape(B, n, padded // n, h, d).transpose(0, 1).contiguous()  # (n, B, per, h, d)
        recv = torch.empty_like(send)  # chunk j: our tokens, heads of rank j
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(B, padded // n, n * h, d)  # (B, per, H, d)


def enable_sequence_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard ``model``'s token stream across the ranks of ``group`` (Ulysses). In place; returns it.

    Replaces ``model.run_blocks`` on the instance by a wrapper that keeps this rank's tokens
    and RoPE rows, runs the blocks and all-gathers the tokens, and points every self-attention
    and audio attention at one :class:`SequenceParallel` hook. Every rank must call the model
    with the same inputs. Quantization, attention backends, block swap and compiled blocks
    are unaffected (call this after :func:`wanstudio.apply_modes`, before a step cache wraps
    ``run_blocks``). Raises ConfigError when the heads do not split evenly or ``run_blocks``
    is already wrapped.
    """
    if not dist.is_initialized():
        raise ConfigError(
            "sequence parallelism needs torch.distributed: call init_parallel() first "
            "(in a process started by torchrun)"
        )
    check_heads(model.config.num_heads, dist.get_world_size(group))
    if getattr(model, "_sequence_parallel", None) is not None:
        raise ConfigError("sequence parallelism is already enabled on this model")
    if "run_blocks" in vars(model):
        raise ConfigError(
            "model.run_blocks is already wrapped (a step cache?): enable sequence parallelism "
            "first, so the wrapper above it sees every token"
        )
    hook = SequenceParallel(group)
    inner = model.run_blocks

    def run_blocks(tokens, state, start=0, stop=None):
        return hook.run_blocks(inner, tokens, state, start, stop)

    run_blocks.__doc__ = f"Sequence-parallel run_blocks over {hook.size} ranks (wanstudio.parallel)."
    model.run_blocks = run_blocks
    model._sequence_parallel = hook
    for block in model.blocks:
        block.self_attn.sequence_parallel = hook
        if getattr(block, "has_audio", False):
            block.audio_cross_attn.sequence_parallel = hook
    return model


def disable_sequence_parallel(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_sequence_parallel` (a no-op on a model without it). Returns model."""
    hook = getattr(model, "_sequence_parallel", None)
    if hook is None:
        return model
    wrapper = vars(model).get("run_blocks")
    if wrapper is None or "wanstudio.parallel" not in (wrapper.__doc__ or ""):
        raise ConfigError("model.run_blocks was wrapped again after sequence parallelism: unwrap that first")
    del model.run_blocks  # the class method is back
    model._sequence_parallel = None
    for block in model.blocks:
        block.self_attn.sequence_parallel = None
        if getattr(block, "has_audio", False):
            block.audio_cross_attn.sequence_parallel = None
    return model


# --- CFG parallelism ---------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def predict_conditions(
    predict: Callable[[K], torch.Tensor], conditions: Sequence[K], group: dist.ProcessGroup | None
) -> dict[K, torch.Tensor]:
    """Every condition's prediction on every rank of ``group``, each computed on one rank.

    Condition i runs on the rank of index i % size in ``group`` (the CFG group; None: no
    split, every condition runs here); the results (one shape and dtype, e.g. the velocities
    [B, C, F, H, W] fp32) are all-gathered. Returns {condition: prediction} in the given order.
    With Ulysses as well, every rank of a sequence group has the same index in its CFG group,
    so they run the same conditions together.
    """
    conditions = list(conditions)
    if group is None:
        return {c: predict(c) for c in conditions}
    size, me, n = dist.get_world_size(group), dist.get_rank(group), len(conditions)
    mine = [predict(conditions[i]) for i in range(me, n, size)]
    if not n:
        return {}
    if n < size:  # some ranks run nothing: the group's rank 0 tells them the shape and dtype
        device = mine[0].device if mine else _group_device(group)
        header = torch.zeros(9, dtype=torch.int64, device=device)  # [ndim, dtype code, shape...]
        if mine:
            shape = mine[0].shape
            header[: 2 + len(shape)] = torch.tensor([len(shape), _DTYPES.index(mine[0].dtype), *shape])
        dist.broadcast(header, src=dist.get_global_rank(group, 0), group=group)
        ndim, code = int(header[0]), int(header[1])
        shape, dtype = tuple(int(s) for s in header[2 : 2 + ndim]), _DTYPES[code]
    else:
        shape, dtype, device = mine[0].shape, mine[0].dtype, mine[0].device
    slots = -(-n // size)
    send = torch.zeros(slots, *shape, dtype=dtype, device=device)  # unused slots stay zero
    for j, value in enumerate(mine):
        send[j] = value
    parts = [torch.empty_like(send) for _ in range(size)]
    dist.all_gather(parts, send, group=group)
    return {conditions[i]: parts[i % size][i // size] for i in range(n)}


def _group_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- launch, groups, failures ------------------------------------------------------------------
class RankAborted(PipelineError):
    """Raised on the other ranks when a rank failed: rank 0 raises (and shows) the error itself."""


@dataclass
class ParallelContext:
    """This process's place in a parallel launch (:func:`init_parallel` makes it).

    Ranks are laid out as rank = c * sequence_size + s: ranks c * sequence_size .. form
    sequence group c (CFG slot c); ranks with the same s form a CFG group.

    Attributes:
        mode: the :class:`ParallelMode`.
        rank, world_size, local_rank: torchrun's numbering (0, 1, 0 for one process).
        device: the device this rank computes on (cuda:LOCAL_RANK with NCCL, cpu with gloo;
            None for one process: the caller's choice).
        sequence_size / sequence_group: Ulysses group size (1: off) and this rank's group.
        cfg_size / cfg_group: ranks sharing a step's guidance calls (1: off) and this rank's.
        failure_grace_s: how long a failed rank waits for the others to reach the end of the
            step before it stops every rank (they may be waiting for it in a collective).
    """

    mode: ParallelMode = ParallelMode.NONE
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None
    sequence_size: int = 1
    sequence_group: dist.ProcessGroup | None = None
    cfg_size: int = 1
    cfg_group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None
    failure_grace_s: float = 60.0
    owns_process_group: bool = False

    @property
    def is_writer(self) -> bool:
        """True on the one rank that writes files (video, work folder, logs): rank 0."""
        return self.rank == 0

    def check_model(self, cfg: WanConfig) -> None:
        """Raise ConfigError when the model's heads do not split over the sequence group."""
        if self.sequence_size > 1:
            check_heads(cfg.num_heads, self.sequence_size)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Enable sequence parallelism on ``model`` when the mode has it. Returns model."""
        if self.sequence_size > 1:
            enable_sequence_parallel(model, self.sequence_group)
        return model

    def predict_conditions(self, predict: Callable[[K], torch.Tensor], conditions: Sequence[K]):
        """:func:`predict_conditions` over this rank's CFG group (every call here without one)."""
        return predict_conditions(predict, conditions, self.cfg_group if self.cfg_size > 1 else None)

    def barrier(self) -> None:
        """Wait until every rank is here (e.g. before reading what rank 0 wrote)."""
        if self.world_size > 1:
            dist.barrier(group=self.control_group)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (in place; on ``device``). Returns it."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def run(self, fn: Callable[..., R], *args, **kwargs) -> R:
        """``fn(*args, **kwargs)`` on every rank; when it raises on any rank, every rank raises.

        After ``fn`` the ranks agree on success over a gloo control group: on a failure rank 0
        raises the error (its own exception unchanged, or a PipelineError quoting the failed
        rank's traceback) and the other ranks raise :class:`RankAborted`, which callers should
        not print. A failed rank whose peers do not arrive within ``failure_grace_s`` (they
        wait for it inside a collective) prints its error and ends its process: the launcher
        (torchrun) then stops the others.
        """
        if self.world_size == 1:
            return fn(*args, **kwargs)
        error, result = None, None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # KeyboardInterrupt reaches every rank from the launcher
            error = exc
        failures = self._agree(error)
        if not failures:
            return result
        if not self.is_writer:
            ranks = ", ".join(str(r) for r, _, _ in failures)
            raise RankAborted(f"rank {self.rank} stopped: rank(s) {ranks} failed; rank 0 shows the error")
        first_rank, summary, trace = failures[0]
        if first_rank == self.rank:
            raise error
        others = "".join(f"\n  rank {r} also failed: {s}" for r, s, _ in failures[1:])
        raise PipelineError(
            f"rank {first_rank} of {self.world_size} failed: {summary}; every rank stopped."
            f"{others}\nTraceback of rank {first_rank}:\n{trace}"
        )

    def _agree(self, error: Exception | None) -> list[tuple[int, str, str]]:
        """All-reduce a failure flag; -> [(rank, summary, traceback)] of the failed ranks."""
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group, async_op=True)
        try:
            if error is None:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.failure_grace_s))
        except RuntimeError as lost:
            if error is not None:
                self._stop_everyone(error)
            raise RankAborted(f"rank {self.rank} lost contact with the other ranks: {lost}") from lost
        if not int(flag.item()):
            return []
        mine = None
        if error is not None:
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            mine = (self.rank, f"{type(error).__name__}: {error}", trace)
        reports: list = [None] * self.world_size
        dist.all_gather_object(reports, mine, group=self.control_group)
        return [r for r in reports if r is not None]

    def _stop_everyone(self, error: Exception) -> None:
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        sys.stderr.write(
            f"wanstudio: rank {self.rank} of {self.world_size} failed and the other ranks did not "
            f"reach the end of the step within {self.failure_grace_s:g} s (they wait for this rank "
            f"inside a collective); stopping every rank.\n{trace}"
        )
        sys.stderr.flush()
        os._exit(1)  # the launcher sees the failure and stops the other ranks

    def close(self, *, failed: bool = False) -> None:
        """Wait for every rank, then leave the process group (when init_parallel made it)."""
        if self.world_size > 1 and dist.is_initialized():
            work = dist.barrier(group=self.control_group, async_op=True)
            try:  # after an error, a rank that never comes back must not hold this one forever
                if failed:
                    work.wait(timeout=datetime.timedelta(seconds=self.failure_grace_s))
                else:
                    work.wait()
            except RuntimeError:
                pass
            if self.owns_process_group:
                dist.destroy_process_group()

    def __enter__(self) -> ParallelContext:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def __str__(self) -> str:
        if self.world_size == 1:
            return "one process"
        return (
            f"{self.mode.value}: rank {self.rank} of {self.world_size} ({self.backend}), "
            f"sequence groups of {self.sequence_size}, CFG groups of {self.cfg_size}"
        )


def _torchrun_env() -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from torchrun's environment, or None outside it."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not any(n in os.environ for n in names):
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"torchrun's environment is incomplete or not numbers ({e}): RANK, WORLD_SIZE and "
            f"LOCAL_RANK must all be set; launch with `torchrun --nproc-per-node N ...`"
        ) from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} must lie in [0, WORLD_SIZE {world})")
    return rank, world, local


def plan_sizes(mode: ParallelMode | str, world_size: int, cfg_size: int | None = None) -> tuple[int, int]:
    """(sequence_size, cfg_size) of ``mode`` on ``world_size`` ranks; ConfigError if it cannot run."""
    mode = parse_option(ParallelMode, mode)
    if mode is ParallelMode.NONE:
        if world_size != 1:
            raise ConfigError(
                f"parallel mode 'none' runs one process, but {world_size} were launched: every "
                f"rank would compute the same video. Pick 'ulysses', 'cfg' or 'ulysses+cfg', or "
                f"launch one process"
            )
        return 1, 1
    if mode is ParallelMode.ULYSSES:
        return world_size, 1
    if mode is ParallelMode.CFG:
        cfg_size = world_size if cfg_size is None else cfg_size
        if cfg_size != world_size or world_size not in (2, 3):
            raise ConfigError(
                f"parallel mode 'cfg' puts each guidance call of a step (2 or 3) on its own "
                f"process: launch 2 or 3 processes (found {world_size}, cfg_size {cfg_size}), or "
                f"use 'ulysses+cfg' for more"
            )
        return 1, cfg_size
    cfg_size = 2 if cfg_size is None else cfg_size
    if cfg_size not in (2, 3) or world_size % cfg_size or world_size < 2 * cfg_size:
        raise ConfigError(
            f"parallel mode 'ulysses+cfg' needs cfg_size 2 or 3 (got {cfg_size}) and a process "
            f"count that is a multiple of it, at least 2 x cfg_size (found {world_size}): e.g. "
            f"4 processes as 2 x 2"
        )
    return world_size // cfg_size, cfg_size


def init_parallel(
    mode: ParallelMode | str = ParallelMode.NONE,
    *,
    cfg_size: int | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
    failure_grace_s: float = 60.0,
) -> ParallelContext:
    """Join the launch torchrun started and build the process groups of ``mode``.

    Args:
        mode: a :class:`ParallelMode` (or its name). 'none' needs no torchrun and returns a
            one-process context whose methods run everything locally.
        cfg_size: ranks per CFG group ('cfg': the process count, 2 or 3; 'ulysses+cfg': 2 by
            default, the rest of each group of processes is sequence parallel).
        backend: 'nccl' or 'gloo'; default nccl when CUDA is available, else gloo.
        timeout_s: collective timeout (torch's default when None).
        failure_grace_s: see :meth:`ParallelContext.run`.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT, through torch's env://);
    uses a process group that is already initialised. With NCCL, selects cuda:LOCAL_RANK.
    Raises ConfigError when the mode cannot run on this launch.
    """
    mode = parse_option(ParallelMode, mode)
    env = _torchrun_env()
    if dist.is_available() and dist.is_initialized():
        env = (dist.get_rank(), dist.get_world_size(), env[2] if env else dist.get_rank())
    if env is None:
        if mode is not ParallelMode.NONE:
            raise ConfigError(
                f"parallel mode {mode.value!r} needs several processes, but this one was not "
                f"started by torchrun (RANK / WORLD_SIZE are not set): launch with "
                f"`torchrun --nproc-per-node N ...`, or use parallel mode 'none'"
            )
        return ParallelContext(mode, failure_grace_s=failure_grace_s)
    rank, world, local = env
    seq, cfg = plan_sizes(mode, world, cfg_size)
    if world == 1:
        return ParallelContext(mode, failure_grace_s=failure_grace_s)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    owns = not dist.is_initialized()
    if owns:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local)
        kw = {"timeout": timeout} if timeout else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    backend = dist.get_backend()
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    kw = {"timeout": timeout} if timeout else {}
    # every rank creates every group, in the same order (torch.distributed's rule)
    seq_group = cfg_group = None
    for c in range(cfg if seq > 1 else 0):
        g = dist.new_group([c * seq + s for s in range(seq)], **kw)
        seq_group = g if rank // seq == c else seq_group
    for s in range(seq if cfg > 1 else 0):
        g = dist.new_group([c * seq + s for c in range(cfg)], **kw)
        cfg_group = g if rank % seq == s else cfg_group
    control = dist.new_group(backend="gloo", **kw)  # failure flags: CPU, apart from the data
    return ParallelContext(
        mode,
        rank,
        world,
        local,
        device,
        backend,
        seq,
        seq_group,
        cfg,
        cfg_group,
        control,
        failure_grace_s,
        owns,
    )
