"""kernels.py — fused CPU kernels for the additive attention's energies and greedy search's choice of token, built
from kernels.c on first use.

Outside its matmuls, Bahdanau attention works on [rows, S, A] tensors: u = tanh(q + keys) and the energies v·u,
and in training's backward u², the keys' Σ_t d·u² and the queries' Σ_s d·u². Eager PyTorch writes and reads each
whole, about 3 passes over such a tensor per step forward and 9 backward (nmt.bptt); the kernels make one pass
each way without storing u, skip padded source positions, and compute tanh as a rational function that
vectorizes (within a few float32 ulps of torch.tanh). Measured on one thread at [70, 55, 512]: forward 0.56 ms
against eager's 1.45, backward 0.69 against 2.9 (Xeon with AVX-512; bench/bench_core.py for the step).
Greedy search needs of each row of scores only its best allowed token and that token's log-probability: one
kernel finds both without writing the row's log-softmax (bench/bench_speedup.py measures a greedy decode).

Compiled with the system's C compiler (`CC`, default `cc`) for this CPU (-march=native, OpenMP on PyTorch's
thread count) into `$XDG_CACHE_HOME/nmt` (default ~/.cache/nmt), one file per source, flags, compiler and CPU,
written atomically; loaded with ctypes. Where that fails, or NMT_KERNELS=0, `library()` is None and callers use
their eager code; `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-ffast-math", "-march=native", "-fopenmp", "-shared", "-fPIC"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")  # gcc stops at 256 bits on AVX-512 CPUs otherwise
_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGNATURES = {
    "attention_energies": [_P, _P, _P, _P, _P, _L, _L, _L, _L, _I],
    "attention_energies_backward": [_P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _I],
    "greedy_choice": [_P, _P, _P, _P, _L, _L, _L, _L, _P, _P, _I],
}
_why_not = ""


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    """The shared library for this source, flags, compiler and CPU, compiled into the cache unless it is there."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nmt"
    target = cache / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        built = Path(work) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(built, target)  # atomic: concurrent builders (torchrun ranks) each leave a whole file
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (why: `status()`)."""
    global _why_not
    if os.environ.get("NMT_KERNELS", "1") == "0":
        _why_not = "off (NMT_KERNELS=0)"
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        _why_not = f"no C compiler ({compiler!r} not found)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        _why_not = f"not built: {error}"
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    return lib


def status() -> str:
    return "fused attention kernels" if library() is not None else f"eager attention ({_why_not})"


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: float32 on the CPU, and the library built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and library() is not None


def attention_energies(query: torch.Tensor, keys: torch.Tensor, weight: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
    """v · tanh(q + keys) for queries [N, A] (N = B × K: K rows per key row) and keys [B, S, A], over the first
    lengths[b] positions of key row b; the float32 minimum (a masked energy) beyond them → [N, S]."""
    (batch, steps, size), rows = keys.shape, query.size(0)
    query, keys, weight, lengths = _contiguous(query, keys, weight, lengths.long())
    energy = query.new_empty(rows, steps)
    library().attention_energies(query.data_ptr(), keys.data_ptr(), weight.data_ptr(), lengths.data_ptr(),
                                 energy.data_ptr(), rows, rows // batch, steps, size, torch.get_num_threads())
    return energy


def attention_energies_backward(query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
                                grad_energy: torch.Tensor, grad_weight: torch.Tensor,
                                keys_minus: torch.Tensor) -> torch.Tensor:
    """For d(energy) [n, S] of `attention_energies` (one query per key row; rows n of keys [≥ n, S, A] used):
    adds Σ d·u to grad_weight [A] and d·u² to keys_minus [≥ n, S, A] (both contiguous, updated in place) and
    returns Σ_s d·u² [n, A]."""
    rows, (steps, size) = query.size(0), keys.shape[1:]
    query, keys, lengths, grad_energy = _contiguous(query, keys, lengths.long(), grad_energy)
    assert grad_weight.is_contiguous() and keys_minus.is_contiguous() and keys_minus.shape[1:] == keys.shape[1:]
    query_minus = query.new_empty(rows, size)
    library().attention_energies_backward(query.data_ptr(), keys.data_ptr(), lengths.data_ptr(),
                                          grad_energy.data_ptr(), grad_weight.data_ptr(), keys_minus.data_ptr(),
                                          query_minus.data_ptr(), rows, steps, size, torch.get_num_threads())
    return query_minus


def greedy_choice(scores: torch.Tensor, no_eos: torch.Tensor, only_eos: torch.Tensor, never: tuple[int, ...],
                  eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For unnormalized scores [N, V] (finite): each row's allowed token of highest score (the first of equal
    ones) and its log-probability (the row's log-softmax there) → values [N], tokens [N]. Not allowed: `never`;
    eos where no_eos [N]; anything but eos where only_eos [N] (bool)."""
    rows, vocab = scores.shape
    scores, no_eos, only_eos = _contiguous(scores, no_eos.to(torch.uint8), only_eos.to(torch.uint8))
    never_ids = torch.tensor(never, dtype=torch.long)
    values, tokens = scores.new_empty(rows), torch.empty(rows, dtype=torch.long)
    library().greedy_choice(scores.data_ptr(), no_eos.data_ptr(), only_eos.data_ptr(), never_ids.data_ptr(),
                            len(never), eos, rows, vocab, values.data_ptr(), tokens.data_ptr(), torch.get_num_threads())
    return values, tokens


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]
