"""Model factory: DINO ViT-S/16 (timm) with a new classification head, and a tiny ViT.

Both are timm ``VisionTransformer`` instances, so the tiny one exercises the same code
path (state dicts, masks, Fisher) in tests and on a CPU. Only the server loads
pretrained weights; clients build the architecture and receive weights in messages.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from flower_app.perf.fast_import import without_optional_modules

with without_optional_modules("wandb"):  # timm's optional extra (see there)
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from flower_app.models.network import reachable
from flower_app.models.specs import MODEL_SPECS
from strategies import protocol

HF_ENDPOINT = "https://huggingface.co"
DINO_VITS16_URL = (
    "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
)


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights could not be obtained; the message says where to put them."""


def build_model(name: str, num_classes: int, image_size: int) -> VisionTransformer:
    """The architecture with timm's random initialisation (seed torch first for determinism)."""
    spec = MODEL_SPECS[name]
    return VisionTransformer(
        img_size=image_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        num_classes=num_classes,
    )


def create_initial_model(
    name: str,
    num_classes: int,
    image_size: int,
    weights: str,
    pretrained_path: str,
    seed: int,
    pretrained_head: bool = False,
) -> VisionTransformer:
    """The global model at round 0: seeded head, backbone pretrained unless asked for random.

    With ``pretrained_head`` the head comes from ``pretrained_path`` too (a file this app
    wrote, such as a run's ``final_model.safetensors``), so a sparse run can keep a
    trained head frozen without warm-up rounds.
    """
    torch.manual_seed(seed)
    model = build_model(name, num_classes, image_size)
    if weights == "pretrained":
        if pretrained_path:
            state = read_checkpoint(Path(os.path.expanduser(pretrained_path)))
        else:
            state = _download_hub_weights(name)
        load_backbone(model, state)
        if pretrained_head:
            load_head(model, state, pretrained_path)
    elif weights != "random":
        raise ValueError(f"weights={weights!r}: must be 'pretrained' or 'random'")
    return model


def load_head(model: VisionTransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy the classifier head from a checkpoint; a missing or mis-shaped head is an error."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith(protocol.HEAD_PREFIX)}
    for key, tensor in own.items():
        if key not in state:
            raise WeightsNotFoundError(
                f"pretrained-path {source}: no {key} (pretrained-head=true needs a file with a "
                "trained head, e.g. a run's final_model.safetensors)"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsNotFoundError(
                f"pretrained-path {source}: {key} has shape {tuple(state[key].shape)}, "
                f"the model's head needs {tuple(tensor.shape)}"
            )
    model.load_state_dict({k: state[k] for k in own}, strict=False)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a timm file (.safetensors/.pth/.bin) or an original DINO checkpoint."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsNotFoundError(
            f"pretrained-path {path}: cannot read a checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept {'state_dict': ...}, {'model': ...}, DINO's {'teacher': ...} and prefixed keys."""
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WeightsNotFoundError(f"pretrained-path {path}: not a state dict of tensors")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def hub_endpoint() -> str:
    """The Hugging Face endpoint timm downloads from (``HF_ENDPOINT`` overrides it)."""
    return os.environ.get("HF_ENDPOINT", HF_ENDPOINT)


def hub_weights_cached(name: str) -> bool:
    """Whether timm's weights for ``name`` are in the local Hugging Face cache already."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg(MODEL_SPECS[name].hub_id).hf_hub_id
    files = ("model.safetensors", "pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def hub_offline() -> bool:
    """The hub cannot be used: told so (``HF_HUB_OFFLINE``) or not reachable."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    return not reachable(hub_endpoint())


def offline_weights_message() -> str:
    """What to do when the hub weights cannot be fetched (one line)."""
    return (
        f"offline, download {DINO_VITS16_URL} elsewhere and set pretrained-path to the "
        "file, or set weights=random to train from scratch"
    )


def hub_weights_problem(
    name: str,
    cached: Callable[[str], bool] | None = None,
    offline: Callable[[], bool] | None = None,
) -> str:
    """Why timm's weights for ``name`` cannot be had from the hub, or "": neither in the
    cache nor reachable. One connection attempt, not the hub client's minute of retries;
    the prerequisites check and the download ask the same question here."""
    if (cached or hub_weights_cached)(name) or not (offline or hub_offline)():
        return ""
    return (
        f"the {name} weights are not in the Hugging Face cache and {hub_endpoint()} is "
        f"unreachable: {offline_weights_message()}"
    )


def _download_hub_weights(name: str) -> dict[str, torch.Tensor]:
    """Fetch timm's weights from the Hugging Face hub; offline this is a clear, quick error."""
    spec = MODEL_SPECS[name]
    problem = hub_weights_problem(name)
    if problem:
        raise WeightsNotFoundError(problem)
    try:
        import timm

        hub_model = timm.create_model(spec.hub_id, pretrained=True, num_classes=0)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsNotFoundError(
            f"could not download {spec.hub_id} from the Hugging Face hub ({reason}); "
            f"{offline_weights_message()}"
        ) from exc
    return hub_model.state_dict()


def load_backbone(model: VisionTransformer, state: dict[str, torch.Tensor]) -> None:
    """Load every backbone tensor; the classification head stays freshly initialised.

    timm's filter resamples position embeddings to the model's image size. Any backbone
    tensor missing from the checkpoint is an error, so a wrong file is never half-loaded.
    """
    state = {k: v for k, v in state.items() if not k.startswith(protocol.HEAD_PREFIX)}
    try:
        filtered = checkpoint_filter_fn(state, model)
        missing, unexpected = model.load_state_dict(filtered, strict=False)
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise WeightsNotFoundError(f"checkpoint does not match the model: {reason}") from exc
    missing_backbone = [k for k in missing if not k.startswith(protocol.HEAD_PREFIX)]
    if missing_backbone or unexpected:
        raise WeightsNotFoundError(
            "checkpoint does not match the model: missing "
            f"{missing_backbone[:5]}, unexpected {list(unexpected)[:5]}"
        )
