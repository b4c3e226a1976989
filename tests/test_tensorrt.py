"""Tests for serving/tensorrt_backend.py: everything that needs no TensorRT (profiles, plan names, dtypes), and the
one-line refusal where TensorRT is missing."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from nmt.cli import main
from nmt.errors import NMTError
from serving.graphs import io_names, output_shapes
from serving.tensorrt_backend import (
    EngineLimits,
    network_flags,
    plan_path,
    profile_shapes,
    require_tensorrt,
    safe_name,
    torch_dtype,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
INFO = {"decoder_layers": 2, "decoder_hidden": 64, "memory_size": 128, "attention_dim": 32, "att_vec_size": 64,
        "tgt_vocab_size": 100, **io_names(lstm=True)}


def test_profiles_cover_batch_times_beam_and_source_length():
    limits = EngineLimits(max_batch=8, max_beam=4, max_src_len=50, opt_batch=4, opt_src_len=20)
    encoder = profile_shapes(INFO, "encoder", limits)
    assert encoder == {"src": ((1, 1), (4, 20), (8, 50)), "src_lengths": ((1,), (4,), (8,))}
    step = profile_shapes(INFO, "decoder_step", limits)
    assert list(step) == INFO["step_inputs"]
    assert step["prev_tokens"] == ((1,), (16,), (32,))  # N = batch × beam
    assert step["hidden"] == step["cell"] == ((1, 2, 64), (16, 2, 64), (32, 2, 64))
    assert step["memory"] == ((1, 1, 128), (4, 20, 128), (8, 50, 128))
    assert step["keys"][2] == (8, 50, 32) and step["src_mask"][2] == (8, 50) and step["att_vec"][2] == (32, 64)
    for low, opt, high in step.values():
        assert all(a <= b <= c for a, b, c in zip(low, opt, high))


def test_limits_follow_the_decode_defaults_and_refuse_larger_shapes():
    limits = EngineLimits.for_decode({"batch_size": 50, "beam_size": 12, "max_input_len": 250})
    assert (limits.max_batch, limits.max_beam, limits.max_src_len) == (50, 12, 250) and limits.opt_batch == 16
    limits.check(batch=50, rows=600, src_len=250)
    with pytest.raises(NMTError, match="at most 50 sentences"):
        limits.check(batch=51, rows=51, src_len=10)
    with pytest.raises(NMTError, match="250 pieces"):
        limits.check(batch=1, rows=1, src_len=251)


def test_plan_names_hold_version_gpu_and_profile(tmp_path):
    limits = EngineLimits(max_batch=64, max_beam=8, max_src_len=256)
    path = plan_path(tmp_path, "decoder_step", "fp16", "10.3.0", "NVIDIA H100 80GB HBM3", limits)
    assert path.parent == tmp_path
    assert path.name == "decoder_step.fp16.trt10.3.0.NVIDIA-H100-80GB-HBM3.b64k8s256.plan"
    assert safe_name("  ") == "unknown" and safe_name("GeForce RTX/4090") == "GeForce-RTX-4090"


def test_io_buffers_match_engine_dtypes_and_output_shapes():
    kinds = types.SimpleNamespace
    assert torch_dtype(kinds(name="HALF")) == torch.float16 and torch_dtype(kinds(name="BOOL")) == torch.bool
    assert torch_dtype("DataType.INT64") == torch.int64
    with pytest.raises(RuntimeError):
        torch_dtype(kinds(name="FP8"))
    shapes = output_shapes(INFO, "decoder_step", batch=3, src_len=7, rows=15)
    assert shapes == {"log_probs": (15, 100), "new_hidden": (15, 2, 64), "new_att_vec": (15, 64), "weights": (15, 7),
                      "new_cell": (15, 2, 64)}
    assert output_shapes(INFO, "encoder", 3, 7)["keys"] == (3, 7, 32)


def test_strongly_typed_flag_where_the_api_has_it():
    ten = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    assert network_flags(ten) == 2
    assert network_flags(types.SimpleNamespace()) == 0  # TensorRT 11: always strongly typed


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_stops_with_one_line_saying_what_to_install(tmp_path, capsys):
    with pytest.raises(NMTError, match="pip install tensorrt"):
        require_tensorrt()
    assert main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "x"), "--tensorrt"]) == 2
    assert main(["translate", "--model", str(tmp_path), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("pip install tensorrt" in line for line in err)
