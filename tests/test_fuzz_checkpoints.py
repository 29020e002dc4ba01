"""Seeded structural fuzzing of checkpoint files, the ``safetensors`` library as the oracle.

The rule (``checkpoint_fuzzer.py``): what the library refuses, wanstudio refuses with a
``CheckpointError`` naming the file; what it loads, wanstudio loads bitwise alike (or refuses
for a documented stricter reason); ``load_model`` lets nothing but ``CheckpointError`` escape,
and its errors name the file too (model-fit ones included). Refusals take under a second.
``benchmarks/fuzz_checkpoints.py`` runs the same fuzzer for thousands of cases.
"""

from __future__ import annotations

import random

import checkpoint_fuzzer as fuzz
import pytest

from wanstudio.errors import CheckpointError

_READER_CASES = 400
_LOADER_CASES = 40


@pytest.fixture(scope="module")
def tiny_model_state():
    return fuzz.tiny_model_state()


def test_the_reader_refuses_what_the_library_refuses_and_loads_the_rest_alike(tmp_path):
    report = fuzz.run(fuzz.small_state(), tmp_path, _READER_CASES, seed=0, loader=False, report=fuzz.Report())
    assert report.cases == _READER_CASES
    # the mutations reach every side of the rule, not only the refusals
    assert report.outcomes["refused by both"] > _READER_CASES // 2
    assert report.outcomes["loaded by both, same tensors"] > 20
    assert report.slowest_s < 1.0, report.slowest_case  # a small file: decided within a second
    assert report.slowest_refusal_s < 1.0, report.slowest_refusal


def test_load_model_lets_only_checkpoint_errors_escape(tmp_path, tiny_model_state):
    report = fuzz.run(tiny_model_state, tmp_path, _LOADER_CASES, seed=0, loader=True, report=fuzz.Report())
    assert report.cases == _LOADER_CASES
    # every load_model error named the file (run() raises FuzzFailure on the first that does not)
    assert report.outcomes["load_model: CheckpointError"] > 0
    assert report.outcomes["load_model: loaded, same tensors"] > 0
    assert report.slowest_refusal_s < 1.0, report.slowest_refusal  # refused from the header


def test_a_loader_error_that_does_not_name_the_file_breaks_the_rule(tmp_path, monkeypatch):
    path = tmp_path / "dit.safetensors"
    path.write_bytes(fuzz.save(fuzz.small_state()))

    def refuse(p, **kwargs):
        raise CheckpointError("1 tensors have the wrong shape: blocks.0.ffn.0.weight")

    monkeypatch.setattr(fuzz, "load_model", refuse)
    with pytest.raises(fuzz.FuzzFailure, match="does not name the file"):
        fuzz.check_loader(path, None)

    def refuse_naming_it(p, **kwargs):
        raise CheckpointError(f"{p}: blocks.0.ffn.0.weight: expected (512, 256), found (256, 512)")

    monkeypatch.setattr(fuzz, "load_model", refuse_naming_it)
    assert fuzz.check_loader(path, None)[0] == "load_model: CheckpointError"


def test_the_fuzzer_is_deterministic():
    state = fuzz.save(fuzz.small_state())
    a = [fuzz.mutate(state, random.Random(f"x-{i}")).build() for i in range(20)]
    b = [fuzz.mutate(state, random.Random(f"x-{i}")).build() for i in range(20)]
    assert a == b
