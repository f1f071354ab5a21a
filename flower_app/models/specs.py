"""The models a run-config may name, as data: the run-config's checks read them without
importing timm (about 2 s of imports, torchvision's among them), which only the processes
that build a model pay."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a timm VisionTransformer and where its weights come from."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    hub_id: str  # timm name with weights on the Hugging Face hub ("" = none published)


MODEL_SPECS: dict[str, ModelSpec] = {
    "vit_small_patch16_224.dino": ModelSpec(16, 384, 12, 6, 4.0, "vit_small_patch16_224.dino"),
    "vit_tiny_test": ModelSpec(4, 64, 2, 4, 2.0, ""),
}
