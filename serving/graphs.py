"""graphs.py — what an export folder holds and how its two graphs are named and shaped: file names per precision,
input and output names, output shapes from model.json alone, and reading model.json. Shared by the exporter and
the backends; imports neither ONNX nor a runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nmt.errors import NMTError

FORMAT = "nmt-export-v1"
OPSET = 17  # parsed by TensorRT 8.6-11 and every ONNX Runtime since 1.14
ENCODER_INPUTS = ["src", "src_lengths"]
STEP_INPUTS = ["prev_tokens", "hidden", "att_vec", "memory", "keys", "src_mask"]
STEP_OUTPUTS = ["log_probs", "new_hidden", "new_att_vec", "weights"]
PRECISION_SUFFIX = {"fp32": "", "fp16": ".fp16", "int8": ".int8"}
SIZE_KEYS = ("decoder_layers", "decoder_hidden", "memory_size", "attention_dim", "att_vec_size", "tgt_vocab_size",
             "src_vocab_size")


def graph_file(kind: str, precision: str = "fp32") -> str:
    """encoder / decoder_step file name for a precision: encoder.onnx, decoder_step.fp16.onnx, ..."""
    return f"{kind}{PRECISION_SUFFIX[precision]}.onnx"


def io_names(lstm: bool) -> dict[str, list[str]]:
    """Input and output names of both graphs (LSTMs add the cell state)."""
    encoder_outputs = ["memory", "keys", "src_mask", "hidden", "att_vec"] + (["cell"] if lstm else [])
    return {"encoder_inputs": list(ENCODER_INPUTS), "encoder_outputs": encoder_outputs,
            "step_inputs": STEP_INPUTS + (["cell"] if lstm else []),
            "step_outputs": STEP_OUTPUTS + (["new_cell"] if lstm else [])}


def output_shapes(info: dict[str, Any], kind: str, batch: int, src_len: int, rows: int = 0) -> dict[str, tuple]:
    """Output shapes of a graph ("encoder" or "decoder_step") for B sentences of S pieces and N hypothesis rows,
    from model.json alone: what a backend allocates before running the graph."""
    layers, hidden = info["decoder_layers"], info["decoder_hidden"]
    if kind == "encoder":
        shapes = {"memory": (batch, src_len, info["memory_size"]), "keys": (batch, src_len, info["attention_dim"]),
                  "src_mask": (batch, src_len), "hidden": (batch, layers, hidden),
                  "att_vec": (batch, info["att_vec_size"]), "cell": (batch, layers, hidden)}
        names = info["encoder_outputs"]
    else:
        shapes = {"log_probs": (rows, info["tgt_vocab_size"]), "new_hidden": (rows, layers, hidden),
                  "new_att_vec": (rows, info["att_vec_size"]), "weights": (rows, src_len),
                  "new_cell": (rows, layers, hidden)}
        names = info["step_outputs"]
    return {name: shapes[name] for name in names}


def read_model_json(model_dir: str | Path) -> dict[str, Any]:
    """model.json of an export folder, checked for its format; one NMTError line when it is not one."""
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise NMTError(f"{model_dir}: not an export folder (no model.json; create one with `nmt export`)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NMTError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise NMTError(f"{path}: not an nmt export (format {info.get('format') if isinstance(info, dict) else None!r}, "
                       f"expected {FORMAT!r})")
    for key in SIZE_KEYS:
        value = info.get(key)
        if type(value) is not int or value < 1:
            raise NMTError(f"{path}: {key} must be a positive integer, got {value!r}")
    lstm = info.get("rnn_type") == "lstm"
    for key, names in io_names(lstm).items():
        if info.get(key) != names:
            raise NMTError(f"{path}: {key} must be {names} for a {info.get('rnn_type')!r} model, got {info.get(key)!r}")
    files = info.get("files")
    if not isinstance(files, dict) or "fp32" not in files or not all(
            isinstance(f, dict) and all(isinstance(f.get(kind), str) and Path(f[kind]).name == f[kind]
                                        for kind in ("encoder", "decoder_step"))
            for f in files.values()):
        raise NMTError(f"{path}: files must map each precision to its encoder and decoder_step graphs (file names "
                       f"in the export folder)")
    return info


def check_graph_outputs(info: dict[str, Any], kind: str, declared: dict[str, list], where: str) -> None:
    """One NMTError line unless a graph's outputs are the ones model.json describes: the same names, and every
    fixed size (not batch, source length or rows) as model.json says. `declared`: output name → shape, dims as
    ints or symbolic names, as ONNX Runtime or TensorRT report them."""
    expected = output_shapes(info, kind, -1, -1, -1)  # -1: the dynamic axes
    if sorted(declared) != sorted(expected):
        raise NMTError(f"{where}: not the {kind} graph of this export (outputs {sorted(declared)}, model.json says "
                       f"{sorted(expected)})")
    for name, shape in declared.items():
        if len(shape) != len(expected[name]) or any(
                isinstance(got, int) and got >= 0 and want >= 0 and got != want
                for got, want in zip(shape, expected[name])):
            raise NMTError(f"{where}: output {name} has shape {list(shape)}, model.json says "
                           f"{[d if d >= 0 else '?' for d in expected[name]]} (graphs and model.json of different "
                           f"models?)")
