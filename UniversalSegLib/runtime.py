"""Where a window's forward runs: PyTorch, or OpenVINO on the CPU.

OpenVINO runs the same network about three times as fast as PyTorch on a CPU (2.0 against 6.4 s per 96^3
window of the full Swin UNETR on a 2-core VM, 2026-12-01: ``benchmarks/benchmark_runtimes.py``) with the same
float32 arithmetic up to summation order. Only the forward of a window moves: the sliding
window, the blending and the post-processing stay PyTorch/numpy code.

The OpenVINO network is converted from the loaded PyTorch model (``openvino.convert_model`` on a trace of
the model with the class subset fixed) the first time a model, class set and window size are used, and
kept in ``$UNIVERSALSEG_HOME/openvino/<key>/`` (the key hashes the weights, the classes, the window
size and the versions of OpenVINO, PyTorch and UniversalSeg). Each entry also holds OpenVINO's own cache
of the compiled network (``CACHE_DIR``), so a later run skips both conversion and compilation. Entries are
written atomically (a temporary folder renamed into place) and checked against their recorded checksums
before use; a damaged entry is removed and rebuilt.

The network runs with ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bfloat16 or float16 units OpenVINO
would otherwise compute in reduced precision by default, which moves logits (and labels) visibly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import __version__
from .errors import InferenceError, RuntimeUnavailableError
from .helpers import sha256_file
from .memory import drop_mapped_pages, trim_heap
from .settings import OPENVINO_INSTALL_HINT, RUNTIME_ENV, RUNTIMES, choose_runtime, requested_runtime

__all__ = ["RUNTIMES", "RUNTIME_ENV", "requested_runtime", "resolve_runtime", "openvino_version",
           "OpenVINOWindowNetwork", "prepare_openvino", "openvino_cache_dir", "model_digest", "prune_cache",
           "MAX_CACHE_ENTRIES"]

log = logging.getLogger(__name__)

#: Bump when the traced forward changes in a way the other key parts do not capture.
_CONVERSION_FORMAT = 3
_MANIFEST = "manifest.json"
_FILES = ("model.xml", "model.bin")
#: Cache entries kept (the most recently used): one full-size Swin UNETR entry takes about 0.6 GB of disk
#: (the 0.28 GB network plus OpenVINO's compiled form of it).
MAX_CACHE_ENTRIES = 3


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed or does not import."""
    try:
        import openvino
    except Exception:  # noqa: BLE001 - a broken install counts as not installed for "auto"
        return None
    return openvino.__version__


def resolve_runtime(name: str | None, device: torch.device, mode: str = "default") -> str:
    """``"torch"`` or ``"openvino"`` for the runtime choice ``name`` on ``device`` in ``mode``: the rule of
    :func:`~UniversalSegLib.settings.choose_runtime`, with whether OpenVINO imports here."""
    return choose_runtime(name, device.type, mode, lambda: openvino_version() is not None)


def openvino_cache_dir() -> Path:
    """Where converted networks are kept: ``$UNIVERSALSEG_HOME/openvino``."""
    from .model_store import cache_home

    return cache_home() / "openvino"


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's tensors (names, shapes, dtypes, values): what a checkpoint's weights and label
    embeddings are, whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class _FixedClassNetwork(nn.Module):
    """The model's forward with the class channels fixed: one input (the window), one output (logits)."""

    def __init__(self, model: nn.Module, channels: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.channels = [int(c) for c in channels]

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.model(window, channels=self.channels)


class OpenVINOWindowNetwork:
    """An OpenVINO network compiled from ``path`` (an IR ``.xml``) with PyTorch's window-forward signature:
    ``(B, 1, *roi) -> (B, K, *roi)``.

    ``converted`` says whether preparing it converted the model (first use) or read the cache; ``seconds`` is
    the time the preparation took. For the full Swin UNETR the compiled network holds about 0.4 GB of weights
    in its kernels' layouts (the mapped cache file's pages are dropped once compiled: :func:`.memory.
    drop_mapped_pages`; about 35 MB of them are read in place and come back at the first window) and, from the first window on, 0.65 GB of buffers for a window's intermediates and
    logits; :meth:`release` frees both between runs, and the next window compiles the network again from
    ``path`` (and OpenVINO's compiled-network cache in ``cache_dir``) in about a second.
    """

    def __init__(self, path: str | os.PathLike, threads: int, key: str = "", converted: bool = False,
                 seconds: float = 0.0, cache_dir: str | os.PathLike | None = None) -> None:
        self.path, self.threads, self.cache_dir = Path(path), int(threads), cache_dir
        self.key, self.converted, self.seconds = key, converted, seconds
        self._compiled = None
        self._request = None  # made at the first window, dropped by release()

    @property
    def compiled(self):
        """The compiled network (compiled again if :meth:`release` dropped it)."""
        if self._compiled is None:
            try:  # in use: the cache's pruning (oldest entries first) must not take it from a long session
                os.utime(self.path.parent)
            except OSError:
                pass
            try:
                self._compiled = _compile(self.path, self.threads, self.cache_dir)
            except Exception as error:  # e.g. the entry was removed by another process since this run checked it
                raise InferenceError(f"The converted OpenVINO network in {self.path.parent} could not be loaded "
                                     f"({error}); run again (it is converted anew if it is gone).") from error
            # Most weights now live in the kernels' own copies; the few read in place come back when read.
            drop_mapped_pages(self.path.parent)
        return self._compiled

    def available(self) -> bool:
        """False when the files it compiles from are gone (another process pruned the cache entry)."""
        return self._compiled is not None or (self.path.is_file() and self.path.with_suffix(".bin").is_file())

    def release(self) -> None:
        """Free the compiled network and its infer request (weights and a window's intermediates) until
        the next window, e.g. for a run's post-processing."""
        if self._request is None and self._compiled is None:
            return
        self._request = self._compiled = None
        trim_heap(collect=False)  # no reference cycles here: freed at once; a collection would cost 0.1-0.2 s

    def __call__(self, windows: torch.Tensor, share_output: bool = False) -> torch.Tensor:
        """Logits of ``windows``; a new tensor, or with ``share_output`` (one window) the request's own output
        buffer, which the next call overwrites: for a caller that is done with it by then (the streaming
        sliding window), it saves a copy of the logits (113 MB for 32 classes of a 96^3 window)."""
        if self._request is None:
            self._request = self.compiled.create_infer_request()
        share = share_output and len(windows) == 1
        outputs = []
        for window in windows.detach().cpu().float():  # the network is compiled for one window
            array = window[None].contiguous().numpy()
            outputs.append(torch.from_numpy(self._request.infer([array], share_outputs=share)[0]))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _cache_key(model: nn.Module, digest: str, channels: Sequence[int], roi_size: Sequence[int]) -> str:
    import openvino

    parts = {"weights": digest, "config": model.config.to_dict(), "channels": [int(c) for c in channels],
             "roi_size": [int(s) for s in roi_size], "openvino": openvino.__version__, "torch": torch.__version__,
             "universalseg": __version__, "format": _CONVERSION_FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _entry_is_intact(entry: Path) -> bool:
    """True when every file of a cache entry is there with the checksum its manifest recorded."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        return all(sha256_file(entry / name) == manifest["sha256"][name] for name in _FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert(model: nn.Module, channels: Sequence[int], roi_size: Sequence[int]):
    """Trace the model's inference forward for one window of ``roi_size`` and convert it to OpenVINO."""
    import openvino
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    example = torch.zeros((1, 1, *roi_size), dtype=torch.float32)
    network = _FixedClassNetwork(model, channels).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The trace fixes the window size and the class set; both are part of the cache key.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace: still what OpenVINO converts from
        # OpenVINO's own tracing (its decoder patches what TorchScript cannot trace), without the trace
        # check, which would run the window forward twice more.
        decoder = TorchScriptPythonDecoder(network, example_input=(example,), trace_kwargs={"check_trace": False})
        return openvino.convert_model(decoder, input=[openvino.PartialShape([1, 1, *roi_size])])


def _save_entry(ov_model, root: Path, entry: Path) -> None:
    """Write a converted network to ``entry`` atomically: into a temporary folder, then renamed into place."""
    import openvino

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
    try:
        openvino.save_model(ov_model, tmp / "model.xml", compress_to_fp16=False)  # keep float32 weights
        manifest = {"sha256": {name: sha256_file(tmp / name) for name in _FILES}, "openvino": openvino.__version__}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:
            if not _entry_is_intact(entry):  # not another process's complete entry: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prune_cache(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used cache entries (temporary folders are left alone: they may
    be another process's entry being written)."""
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _compile(path: Path, threads: int, cache_dir: str | os.PathLike | None = None):
    """``path`` (IR .xml) compiled for the CPU in float32; OpenVINO keeps its compiled form in ``cache_dir``."""
    import openvino

    core = openvino.Core()
    config = {
        "INFERENCE_NUM_THREADS": int(threads),
        "INFERENCE_PRECISION_HINT": "f32",  # never bf16/fp16 behind our back (module doc)
        "PERFORMANCE_HINT": "LATENCY",  # one window at a time, all threads on it
    }
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    compiled = core.compile_model(str(path), "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    if precision != openvino.Type.f32:
        raise RuntimeUnavailableError(f"OpenVINO compiled the network in {precision}, not float32.")
    return compiled


def prepare_openvino(model: nn.Module, channels: Sequence[int], roi_size: Sequence[int], threads: int,
                     cache_dir: str | os.PathLike | None = None, digest: str | None = None) -> OpenVINOWindowNetwork:
    """The OpenVINO form of ``model`` for windows of ``roi_size`` and the class ``channels``.

    Read from the cache when an intact entry exists; otherwise converted, saved and compiled. ``digest`` is
    :func:`model_digest` of ``model`` when the caller has it already.
    """
    if openvino_version() is None:
        raise RuntimeUnavailableError(f"OpenVINO is not installed; {OPENVINO_INSTALL_HINT}.")
    t0 = time.perf_counter()
    root = Path(cache_dir) if cache_dir is not None else openvino_cache_dir()
    key = _cache_key(model, digest or model_digest(model), channels, roi_size)
    entry = root / key
    if entry.exists():
        if _entry_is_intact(entry):
            try:
                network = _entry_network(entry, threads, key, converted=False)
                network.compiled  # compiled now: a failure means the entry is rebuilt
                os.utime(entry)  # most recently used: pruned last
                network.seconds = time.perf_counter() - t0
                return network
            except RuntimeUnavailableError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure to load an entry means: rebuild it
                log.warning("OpenVINO cache entry %s could not be loaded (%s); converting again.", entry, err)
        else:
            log.warning("OpenVINO cache entry %s is incomplete or damaged; converting again.", entry)
        shutil.rmtree(entry, ignore_errors=True)
    ov_model = _convert(model, channels, roi_size)
    _save_entry(ov_model, root, entry)
    del ov_model
    prune_cache(root, MAX_CACHE_ENTRIES)
    network = _entry_network(entry, threads, key, converted=True)
    network.compiled  # compiled now, so the preparation's time and errors are the convert stage's
    network.seconds = time.perf_counter() - t0
    return network


def _entry_network(entry: Path, threads: int, key: str, converted: bool) -> OpenVINOWindowNetwork:
    return OpenVINOWindowNetwork(entry / "model.xml", threads, key, converted, cache_dir=entry / "compiled")
