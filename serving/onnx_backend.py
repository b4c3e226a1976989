"""onnx_backend.py — the decoder-step interface over ONNX Runtime sessions of an export folder's two graphs.

Takes and returns torch tensors; inputs and outputs are bound to torch-owned buffers with IOBinding (no copies,
on CPU and on CUDA alike). Only `encode` and `step`: the search stays in `nmt.search`.
Precision: "fp32" (default), "int8" (the dynamically quantized CPU copy) or "fp16" (for the CUDA provider).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from nmt.errors import NMTError
from nmt.search import State
from serving.graphs import check_graph_outputs, output_shapes

ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
             "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}
NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
               torch.bool: np.bool_}
ROW_KEYS = {"hidden": "new_hidden", "att_vec": "new_att_vec", "cell": "new_cell"}


def providers_for(device: str, available: list[str]) -> list[Any]:
    """ONNX Runtime execution providers for `device` (cpu, cuda, cuda:N), or one NMTError line."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not device.startswith("cuda"):
        raise NMTError(f"--device {device}: expected cpu, cuda or cuda:N")
    if "CUDAExecutionProvider" not in available:
        raise NMTError(f"--device {device}: this onnxruntime has no CUDA execution provider "
                       f"(pip install onnxruntime-gpu)")
    index = int(device.split(":")[1]) if ":" in device else 0
    options = {"device_id": index}
    if torch.cuda.is_available():  # run on torch's stream, so no synchronization is needed at the edge
        options["user_compute_stream"] = str(torch.cuda.current_stream(index).cuda_stream)
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


class OnnxRuntimeStep:
    """`DecoderStep` over encoder.onnx + decoder_step.onnx (or their .int8 / .fp16 copies)."""

    def __init__(self, model_dir: str | Path, info: dict[str, Any], precision: str = "fp32", device: str = "cpu",
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        if precision not in info["files"]:
            raise NMTError(f"{model_dir}: no {precision} graphs in this export (it has: {', '.join(info['files'])}; "
                           f"`nmt export --{precision}` adds them)")
        self.info, self.device = info, torch.device(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # The search runs torch ops between graph calls; ORT's pool spinning meanwhile steals the cores from them
        # (measured on 2 threads: greedy 3.1x, beam 5 2.4x faster without spinning).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        providers = providers_for(device, ort.get_available_providers())
        self.sessions = {}
        for kind in ("encoder", "decoder_step"):
            path = Path(model_dir) / info["files"][precision][kind]
            if not path.is_file():
                raise NMTError(f"{path}: missing from the export folder")
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as err:  # ORT raises its own exception types for files it cannot parse
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                raise NMTError(f"{path}: not an ONNX graph ONNX Runtime can load ({reason})") from None
            inputs = sorted(i.name for i in session.get_inputs())
            wanted = sorted(info["encoder_inputs" if kind == "encoder" else "step_inputs"])
            if inputs != wanted:
                raise NMTError(f"{path}: not the {kind} graph of this export (inputs {inputs}, expected {wanted})")
            check_graph_outputs(info, kind, {o.name: o.shape for o in session.get_outputs()}, str(path))
            unknown = {t.type for t in session.get_inputs() + session.get_outputs()} - set(ORT_TYPES)
            if unknown:
                raise NMTError(f"{path}: not the {kind} graph of this export (tensor types {sorted(unknown)})")
            self.sessions[kind] = session
        self.input_types = {kind: {i.name: ORT_TYPES[i.type] for i in s.get_inputs()}
                            for kind, s in self.sessions.items()}
        self.output_types = {kind: {o.name: ORT_TYPES[o.type] for o in s.get_outputs()}
                             for kind, s in self.sessions.items()}

    def _run(self, kind: str, inputs: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """Bind torch inputs (cast to the graph's types, made contiguous) and freshly allocated torch outputs."""
        session = self.sessions[kind]
        binding = session.io_binding()
        device_type, device_id = self.device.type, self.device.index or 0
        kept = []
        for name, tensor in inputs.items():
            tensor = tensor.to(self.device, self.input_types[kind][name]).contiguous()
            kept.append(tensor)
            binding.bind_input(name, device_type, device_id, NUMPY_TYPES[tensor.dtype], list(tensor.shape),
                               tensor.data_ptr())
        outputs = {}
        for name, shape in shapes.items():
            tensor = torch.empty(shape, dtype=self.output_types[kind][name], device=self.device)
            outputs[name] = tensor
            binding.bind_output(name, device_type, device_id, NUMPY_TYPES[tensor.dtype], list(shape), tensor.data_ptr())
        session.run_with_iobinding(binding)
        return outputs

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> State:
        batch, src_len = src.shape
        out = self._run("encoder", {"src": src, "src_lengths": src_lengths},
                        output_shapes(self.info, "encoder", batch, src_len))
        rows = {key: out[key] for key in ("hidden", "att_vec", "cell") if key in out}
        return State(rows=rows, sentences={key: out[key] for key in ("memory", "keys", "src_mask")})

    def step(self, prev_tokens: torch.Tensor, state: State, normalize: bool = True) -> tuple[torch.Tensor, State]:
        """The graph's log-probabilities, whatever `normalize` asks (they are their own log-softmax)."""
        memory = state.sentences["memory"]
        out = self._run("decoder_step", {"prev_tokens": prev_tokens, **state.rows, **state.sentences},
                        output_shapes(self.info, "decoder_step", memory.size(0), memory.size(1), prev_tokens.size(0)))
        rows = {key: out[new] for key, new in ROW_KEYS.items() if new in out}
        return out["log_probs"], State(rows=rows, sentences=state.sentences, attention=out.get("weights"))

