"""Label embeddings: text encoders that turn class names into the vectors the model's head is driven by.

Inference for the classes a checkpoint already knows never needs this module: the embeddings travel in
the checkpoint. It is needed to add classes by name (fine-tuning, open-vocabulary experiments) and to
regenerate the official embeddings.

The official embeddings are CLIP ViT-B/32 (OpenAI weights) text features, not L2-normalised, of the prompt
"A computerized tomography of a {name}" with the official prompt names, typos included ("Arota",
"Celiac Truck"); they were computed on a GPU in float16, so a CPU float32 run differs from the shipped
file in the third decimal.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from .errors import TextEncoderUnavailable
from .taxonomy import PROMPT_TEMPLATE

__all__ = [
    "PROMPT_TEMPLATE", "TextEncoder", "TextEncoderUnavailable", "ClipTextEncoder", "OneHotEncoder",
    "find_clip_weights", "prompts_for",
]


CLIP_ARCH = "ViT-B-32"
CLIP_WEIGHTS_HELP = (
    "CLIP ViT-B/32 (OpenAI) weights are needed to embed new class names; classes a checkpoint already "
    "knows do not need them. Install the text encoder with: pip install 'universalseg[clip]', then either "
    "download the weights once on a machine with internet access with\n"
    "    python -c \"import open_clip; open_clip.create_model('ViT-B-32', pretrained='openai')\"\n"
    "(they land in the Hugging Face cache, where UniversalSeg finds them), or pass the file explicitly "
    "(open_clip_model.safetensors, open_clip_pytorch_model.bin or OpenAI's ViT-B-32.pt)."
)
# Keys of the text tower; a weights file may hold only these (the vision tower is never used here).
_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection", "attn_mask")


class TextEncoder(Protocol):
    """Anything that maps class names to fixed-size vectors."""

    name: str
    dim: int

    def encode(self, names: Sequence[str]) -> np.ndarray:  # (N, dim) float32
        ...


def prompts_for(names: Sequence[str], template: str = PROMPT_TEMPLATE) -> list[str]:
    return [template.format(n) for n in names]


def _default_cache_roots() -> list[Path]:
    home = Path.home()
    hf_home = Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", hf_home / "hub")))
    universal = Path(os.environ.get("UNIVERSALSEG_HOME", home / ".cache" / "universalseg"))
    return [universal / "clip", hub, home / ".cache" / "clip"]


def find_clip_weights(search_roots: Sequence[str | os.PathLike] | None = None) -> Path | None:
    """First CLIP ViT-B/32 OpenAI weights file in the user's caches (ours, Hugging Face's, OpenAI clip's)."""
    patterns = [
        "ViT-B-32*.safetensors", "ViT-B-32*.pt",
        "models--timm--vit_base_patch32_clip_224.openai/snapshots/*/open_clip_model.safetensors",
        "models--timm--vit_base_patch32_clip_224.openai/snapshots/*/open_clip_pytorch_model.bin",
    ]
    for root in (Path(r) for r in (search_roots or _default_cache_roots())):
        for pattern in patterns:
            hits = sorted(glob.glob(str(root / pattern)))
            if hits:
                return Path(hits[0])
    return None


def _import_open_clip():
    try:
        import open_clip  # noqa: F401  (heavy: imports torchvision)
    except ImportError as err:
        raise TextEncoderUnavailable(f"The text encoder package open_clip_torch is not installed. {CLIP_WEIGHTS_HELP}") from err
    return open_clip


class ClipTextEncoder:
    """CLIP ViT-B/32 text tower through ``open_clip_torch``, loaded from a local file only (no network)."""

    name = "clip-vit-b32-openai"
    dim = 512

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 template: str = PROMPT_TEMPLATE) -> None:
        open_clip = _import_open_clip()
        path = Path(weights) if weights is not None else find_clip_weights()
        if path is None:
            raise TextEncoderUnavailable(f"No CLIP ViT-B/32 weights found in the local caches. {CLIP_WEIGHTS_HELP}")
        if not path.is_file():
            raise TextEncoderUnavailable(f"CLIP weights file not found: {path}. {CLIP_WEIGHTS_HELP}")
        self.weights_path = path
        self.template = template
        self.device = torch.device(device)
        self.tokenizer = open_clip.get_tokenizer(CLIP_ARCH)
        self.model = self._load(open_clip, path).to(self.device).eval()

    @staticmethod
    def _load(open_clip, path: Path) -> torch.nn.Module:
        if path.suffix == ".pt":
            # OpenAI's original TorchScript archive; open_clip rebuilds a plain module from its weights.
            try:
                return open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
            except Exception as err:
                raise TextEncoderUnavailable(f"Could not read {path} as OpenAI CLIP weights: {err}") from err
        model = open_clip.create_model(CLIP_ARCH, pretrained=None)
        state = _read_state_dict(path)
        expected_text = [k for k in model.state_dict() if k.startswith(_TEXT_PREFIXES)]
        missing = [k for k in expected_text if k not in state]
        if missing:
            raise TextEncoderUnavailable(
                f"{path} is not a CLIP ViT-B/32 checkpoint: {len(missing)} text-encoder weights missing "
                f"(e.g. {missing[0]}). {CLIP_WEIGHTS_HELP}")
        shapes = model.state_dict()
        wrong = [k for k in expected_text if tuple(state[k].shape) != tuple(shapes[k].shape)]
        if wrong:
            raise TextEncoderUnavailable(f"{path} holds a different CLIP architecture ({wrong[0]} has shape "
                                         f"{tuple(state[wrong[0]].shape)}); ViT-B/32 is required.")
        model.load_state_dict(state, strict=False)  # the vision tower may be absent; it is never used
        return model

    @torch.no_grad()
    def encode(self, names: Sequence[str]) -> np.ndarray:
        """Raw (not normalised) text features of the prompts for ``names``: ``(N, 512)`` float32."""
        if not names:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(prompts_for(names, self.template)).to(self.device)
        features = self.model.encode_text(tokens, normalize=False)
        return features.float().cpu().numpy()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .bin/.pth file (no pickled code), as float32, 'module.' stripped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as err:
        raise TextEncoderUnavailable(f"Could not read CLIP weights from {path}: {err}") from err
    if not isinstance(state, dict):
        raise TextEncoderUnavailable(f"{path} does not hold a state dict of CLIP weights.")
    return {k.removeprefix("module."): v.float() for k, v in state.items() if isinstance(v, torch.Tensor)}


class OneHotEncoder:
    """The paper's baseline: class i of a fixed vocabulary gets the i-th unit vector (no text semantics)."""

    name = "one-hot"

    def __init__(self, vocabulary: Sequence[str], dim: int = 512) -> None:
        if len(vocabulary) > dim:
            raise ValueError(f"A one-hot embedding of dimension {dim} holds at most {dim} classes, got {len(vocabulary)}.")
        self.vocabulary = [v.casefold() for v in vocabulary]
        self.dim = dim

    def encode(self, names: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(names), self.dim), dtype=np.float32)
        for row, name in enumerate(names):
            try:
                out[row, self.vocabulary.index(name.casefold())] = 1.0
            except ValueError:
                raise ValueError(f"{name!r} is not in the one-hot vocabulary; one-hot embeddings cannot name new classes.") from None
        return out
