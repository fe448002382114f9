"""OpenVINO as the CPU runtime: the choice of runtime, the converted network's fidelity, its on-disk cache.

One full-size forward (the fidelity fixture, ~1 min on 2 CPU cores with the conversion); everything else runs
reduced-width models. Each test gets its own cache folder (``UNIVERSALSEG_HOME``), so conversions are real.
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import fixture_input, require_shared, small_checkpoint, write_released_style_checkpoint
from UniversalSegLib.checkpoints import load_checkpoint
from UniversalSegLib.errors import RuntimeUnavailableError
from UniversalSegLib.model import ModelConfig, UniversalModel, swin_unetr
from UniversalSegLib.memory import drop_mapped_pages
from UniversalSegLib.runtime import RUNTIME_ENV, prepare_openvino, prune_cache, resolve_runtime

openvino = pytest.importorskip("openvino")

# OpenVINO float32 against the official logits. PyTorch's bar is 2e-4 (test_model_fidelity.py); OpenVINO
# measured 1.0e-4 on the fixture (AMD EPYC, AVX-512), the same size as PyTorch's own error: both are float32
# summation-order differences. The margin allows other CPUs' kernels (AVX2 blockings) to sum in other orders.
# A silent bfloat16/float16 run is three orders of magnitude off (~0.1-1), so this still catches it.
OPENVINO_ATOL = 3e-4
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_runtime_choice(monkeypatch):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    assert resolve_runtime("auto", CPU) == "openvino"  # installed here
    assert resolve_runtime(None, CPU, "fast") == "openvino"
    assert resolve_runtime("auto", CPU, "reference") == "torch"  # the official PyTorch pipeline
    assert resolve_runtime("auto", torch.device("cuda")) == "torch"
    assert resolve_runtime("torch", CPU) == "torch"
    assert resolve_runtime(" OpenVINO ", CPU, "reference") == "openvino"  # explicit: any mode
    with pytest.raises(RuntimeUnavailableError, match="runs on the CPU"):
        resolve_runtime("openvino", torch.device("cuda"))
    with pytest.raises(ValueError, match="Unknown runtime 'onnx'"):
        resolve_runtime("onnx", CPU)
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    assert resolve_runtime(None, CPU) == "torch"
    assert resolve_runtime("openvino", CPU) == "openvino"  # an explicit choice wins over the environment


def test_runtime_choice_without_openvino(monkeypatch):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now fails as if not installed
    assert resolve_runtime("auto", CPU) == "torch"
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'universalseg\[openvino\]'") as info:
        resolve_runtime("openvino", CPU)
    assert info.value.exit_code == 6


def _small_model(backbone: str, seed: int = 3) -> UniversalModel:
    """A reduced-width model with seeded random weights."""
    torch.manual_seed(seed)
    model = UniversalModel(ModelConfig.small(backbone)).eval()
    model.organ_embedding.normal_()
    return model


def test_converted_swin_equals_pytorch():
    """Swin UNETR converts through the fused-attention forward; 64^3 windows exercise the shifted-window
    masks and the padding of the token grid to whole attention windows."""
    model = _small_model("swinunetr")
    window = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    channels = [5, 0, 31]  # any subset, any order
    with torch.no_grad():
        expected = model(window, channels=channels).numpy()
    network = prepare_openvino(model, channels, (64, 64, 64), threads=2)
    assert network.converted
    assert network.compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32  # never bf16/fp16
    got = network(window).numpy()
    assert got.shape == expected.shape == (1, 3, 64, 64, 64)
    # Logits of order 1; float32 summation order only (measured 4e-6 here).
    assert np.abs(got - expected).max() < 1e-4, np.abs(got - expected).max()


@pytest.mark.parametrize("k", [1, 3])
def test_composed_upsampling_equals_upsample_then_convolve(k):
    """A k^3 convolution of a 2x2x2 stride-2 transposed convolution is one stride-2 transposed convolution
    (the exported decoder's last stage); odd sizes and unequal channel counts check the borders and layouts."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 5, 3, 4, 5, generator=g, dtype=torch.float64)
    upsample = torch.randn(5, 4, 2, 2, 2, generator=g, dtype=torch.float64)
    kernel = torch.randn(3, 4, k, k, k, generator=g, dtype=torch.float64)
    expected = torch.nn.functional.conv3d(torch.nn.functional.conv_transpose3d(x, upsample, stride=2), kernel,
                                          padding=k // 2)
    composed = swin_unetr._compose_up(kernel, upsample)
    assert composed.shape == (5, 3, k + 1, k + 1, k + 1)
    got = torch.nn.functional.conv_transpose3d(x, composed, stride=2, padding=k // 2)
    assert got.shape == expected.shape == (2, 3, 6, 8, 10)
    assert (got - expected).abs().max() < 1e-10  # float64 throughout: equal up to rounding


def test_export_form_equals_the_backbone():
    """The graph the converter traces (no upsampled map, no concatenation at full resolution; the first
    encoder block late) computes what the backbone computes."""
    model = _small_model("swinunetr").backbone
    window = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lean = model(window)
        export = model._forward_blocks(window, export=True)
    for got, expected in zip(export, lean):
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-4


def test_attention_export_form_equals_monai():
    """The traced attention (one fused 4-D call; the shift mask as a region term on queries and keys) against
    MONAI's window attention, for two samples of shifted windows (windows laid out sample by sample)."""
    from monai.networks.nets.swin_unetr import WindowAttention, compute_mask

    torch.manual_seed(5)
    attention = swin_unetr.ChunkedWindowAttention(24, 3, (7, 7, 7), qkv_bias=True).eval()
    torch.nn.init.normal_(attention.relative_position_bias_table, std=0.5)
    mask = compute_mask([14, 14, 14], (7, 7, 7), (3, 3, 3), torch.device("cpu"))  # 8 windows, 3 shift regions
    x = torch.randn(2 * mask.shape[0], 343, 24)
    with torch.no_grad():
        for m in (mask, None):
            expected = WindowAttention.forward(attention, x, m)
            got = attention._attend_all(x, m, attention.position_bias(343))
            assert (got - expected).abs().max() < 1e-5


def test_mapped_weights_leave_resident_memory(tmp_path):
    """OpenVINO keeps its weights file mapped beside the kernels' copies: a compiled network's mapped pages
    leave the process at once, dropping them again after a window changes no result, and private or
    writable mappings are never touched."""
    import ctypes
    import mmap

    model = _small_model("unet")
    window = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    network = prepare_openvino(model, [0, 2], (32, 32, 32), threads=1)  # converted and compiled
    entry = network.path.parent
    assert _resident_kb(entry) in (0, None)  # None: no smaps here
    before = network(window).numpy()
    assert drop_mapped_pages(entry) > 0  # the weights (and OpenVINO's compiled cache file) are mapped
    assert _resident_kb(entry) in (0, None)
    assert np.array_equal(network(window).numpy(), before)  # read again from the file where needed
    network.release()
    assert drop_mapped_pages(entry) == 0  # released: nothing of the entry is mapped any more

    scratch = tmp_path / "scratch.bin"
    scratch.write_bytes(b"\0" * mmap.PAGESIZE)
    with open(scratch, "r+b") as f, mmap.mmap(f.fileno(), 0) as shared:
        shared[:5] = b"keep!"
        assert drop_mapped_pages(tmp_path) == 0  # writable
        assert shared[:5] == b"keep!"
    with open(scratch, "r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as private:
        private[:5] = b"mine!"  # this process's own copy of the page, not in the file
        address = ctypes.addressof(ctypes.c_char.from_buffer(private))
        libc = ctypes.CDLL(None)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ) == 0  # now read-only, changes kept
        assert drop_mapped_pages(tmp_path) == 0  # private: dropping would lose them
        assert ctypes.string_at(address, 5) == b"mine!"
        assert libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) == 0


def _resident_kb(folder) -> int | None:
    """Resident kB of this process's mappings of files under ``folder`` (None without /proc/self/smaps)."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    prefix = str(folder.resolve()) + "/"
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:  # a mapping's header
            inside = len(fields) >= 6 and fields[5].startswith(prefix)
        elif inside and fields and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_cache_reuses_entries_and_rebuilds_damaged_ones(cache_home):
    model = _small_model("unet")
    window = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))  # two windows at once
    with torch.no_grad():
        expected = model(window, channels=[3, 1]).numpy()
    first = prepare_openvino(model, [3, 1], (32, 32, 32), threads=1)
    got = first(window).numpy()
    assert first.converted and got.shape == (2, 2, 32, 32, 32)
    assert np.abs(got - expected).max() < 1e-4

    again = prepare_openvino(model, [3, 1], (32, 32, 32), threads=1)
    assert not again.converted and again.key == first.key
    assert np.array_equal(again(window).numpy(), got)
    again.release()  # frees the compiled network (memory); the next call compiles it again from the entry
    assert again._compiled is None
    shared = again(window[:1], share_output=True)  # the request's own output buffer, not a copy
    assert np.array_equal(shared.numpy(), got[:1])
    other = prepare_openvino(model, [3], (32, 32, 32), threads=1)  # another class set: another entry
    assert other.converted and other.key != first.key
    root = cache_home / "openvino"
    assert sorted(p.name for p in root.iterdir()) == sorted([first.key, other.key])  # no temporary folders left
    entry = root / first.key
    assert (entry / "compiled").is_dir()  # OpenVINO's own compiled-network cache

    weights = entry / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # same size, wrong values
    weights.write_bytes(bytes(data))
    rebuilt = prepare_openvino(model, [3, 1], (32, 32, 32), threads=1)
    assert rebuilt.converted
    assert np.array_equal(rebuilt(window).numpy(), got)
    assert json.loads((entry / "manifest.json").read_text())["sha256"]["model.bin"]

    prune_cache(root, keep=1)  # only the most recently used entry stays (the rebuilt one)
    assert [p.name for p in root.iterdir()] == [first.key]


def test_full_size_fidelity_on_the_official_fixture(tmp_path):
    """The converted full-size Swin UNETR against the official logits (one 96^3 forward)."""
    path = write_released_style_checkpoint("swinunetr", tmp_path / "released.pth")
    model = load_checkpoint(path).build_model()
    network = prepare_openvino(model, list(range(32)), (96, 96, 96), threads=torch.get_num_threads())
    del model
    logits = network(fixture_input())[0].numpy()
    expected = dict(np.load(require_shared("reference/fixture/expected_swinunetr.npz")))
    p = expected["points"].astype(np.int64)
    got = logits[:, p[:, 0], p[:, 1], p[:, 2]].T
    err = np.abs(got - expected["logits_at_points"]).max()
    print(f"OpenVINO float32: max |delta logit| at 4096 points x 32 classes = {err:.3g}")
    assert err < OPENVINO_ATOL
    np.testing.assert_allclose(logits[5, ::4, ::4, ::4], expected["liver_logits_stride4"], atol=OPENVINO_ATOL, rtol=0)


def test_segmenter_labels_equal_pytorch_with_trained_weights(cache_home):
    """The packaged demo model on 3 fresh phantoms, default mode: OpenVINO's labels equal PyTorch's."""
    from UniversalSegLib.demo import demo_checkpoint_path
    from UniversalSegLib.phantom import generate_phantom
    from UniversalSegLib.pipeline import Segmenter

    checkpoint = load_checkpoint(demo_checkpoint_path())
    settings = checkpoint.metadata.provenance["phantom"]
    pytorch = Segmenter(checkpoint, device="cpu", runtime="torch")
    fast = Segmenter(checkpoint, device="cpu", runtime="openvino")
    assert (pytorch.runtime, fast.runtime) == ("torch", "openvino")
    for n, seed in enumerate((4100, 4101, 4102)):
        phantom = generate_phantom(seed, shape=tuple(settings["shape"]), spacing=tuple(settings["spacing"]),
                                   orientation=settings["orientation"])
        stages = []
        expected = pytorch.segment(phantom.volume)
        got = fast.segment(phantom.volume, progress=lambda stage, fraction: stages.append(stage))
        # The conversion is its own stage, before the windows, on the first run of a class set only.
        assert ("convert" in stages) == (n == 0) and ("convert" in got.timings) == (n == 0)
        if n == 0:
            assert stages.index("convert") < stages.index("inference")
        assert got.windows == expected.windows
        for index, mask in expected.masks.items():
            agreement = np.mean(got.masks[index] == mask)
            assert agreement >= 0.999, (seed, index, agreement)
    # Once compiled, the PyTorch model is released (memory); a class set not converted yet reads it from
    # the checkpoint file again and converts it, with the same labels.
    assert fast._model is None
    expected = pytorch.segment(phantom.volume, "liver")
    got = fast.segment(phantom.volume, "liver")
    assert "convert" in got.timings and fast._model is None
    (index,) = expected.masks
    assert np.mean(got.masks[index] == expected.masks[index]) >= 0.999
    # After a run the compiled network is released (memory) and compiled again by the next run; if its
    # cache entry was pruned meanwhile (another process), the next run converts again.
    assert fast._openvino._compiled is None
    shutil.rmtree(cache_home / "openvino" / fast._openvino.key)
    again = fast.segment(phantom.volume, "liver")
    assert "convert" in again.timings and np.array_equal(again.masks[index], got.masks[index])
    # A cancelled run releases it too (the worker keeps its segmenter between runs).
    windows = []

    def cancel_after_first_window(stage, fraction):
        if stage == "inference" and fraction > 0:
            windows.append(fraction)

    from UniversalSegLib.errors import InferenceCancelled

    with pytest.raises(InferenceCancelled):
        fast.segment(phantom.volume, "liver", progress=cancel_after_first_window, cancel=lambda: bool(windows))
    assert windows and fast._openvino._compiled is None and fast._openvino._request is None


def test_cli_runtime_option(tmp_path, capsys):
    from UniversalSegLib.cli import main

    ct = require_shared("data/totalsegmentator/example_ct.nii.gz")
    model = small_checkpoint(tmp_path / "small.safetensors")
    code = main(["segment", str(ct), "-o", str(tmp_path / "out"), "--classes", "liver", "--model", str(model),
                 "--device", "cpu", "--runtime", "openvino", "--json"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "openvino runtime" in err
    assert json.loads((tmp_path / "out" / "example_ct_summary.json").read_text())["timings_s"]["convert"] > 0
    with pytest.raises(SystemExit) as info:
        main(["segment", str(ct), "-o", str(tmp_path / "out2"), "--runtime", "onnx"])
    assert info.value.code == 2
