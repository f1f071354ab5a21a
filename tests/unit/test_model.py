"""Model factory: architectures, loading local checkpoints, clear errors without weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flower_app.models.factory import (
    WeightsNotFoundError,
    build_model,
    create_initial_model,
    load_backbone,
    read_checkpoint,
)


def test_vit_s16_architecture_has_dino_shapes():
    model = build_model("vit_small_patch16_224.dino", num_classes=100, image_size=224)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    assert backbone == 21_665_664  # ViT-S/16: 12 blocks, width 384, 6 heads
    assert model.head.weight.shape == (100, 384)
    assert model.pos_embed.shape == (1, 197, 384)


def _backbone_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    source = build_model("vit_tiny_test", num_classes=100, image_size=32)
    return {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}


@pytest.mark.parametrize("layout", ["dino-pth", "dino-teacher", "timm-safetensors"])
def test_local_checkpoint_loads_backbone_and_keeps_new_head(tmp_path, layout):
    state = _backbone_state(seed=1)
    if layout == "dino-pth":
        path = tmp_path / "dino.pth"
        torch.save(state, path)
    elif layout == "dino-teacher":
        path = tmp_path / "checkpoint.pth"
        torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_initial_model("vit_tiny_test", 100, 32, "pretrained", str(path), seed=0)
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    random_init = create_initial_model("vit_tiny_test", 100, 32, "random", "", seed=0)
    assert torch.equal(loaded["head.weight"], random_init.state_dict()["head.weight"])


def test_pretrained_head_loads_the_files_head(tmp_path):
    torch.manual_seed(5)
    trained = build_model("vit_tiny_test", num_classes=100, image_size=32).state_dict()
    path = tmp_path / "final_model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.items()}, str(path))
    model = create_initial_model("vit_tiny_test", 100, 32, "pretrained", str(path), 0, True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key  # backbone and head from the file


def test_pretrained_head_missing_or_mis_shaped_is_refused(tmp_path):
    backbone_only = tmp_path / "dino.pth"
    torch.save(_backbone_state(seed=1), backbone_only)
    with pytest.raises(WeightsNotFoundError, match=r"no head\.weight \(pretrained-head=true"):
        create_initial_model("vit_tiny_test", 100, 32, "pretrained", str(backbone_only), 0, True)
    ten_classes = tmp_path / "ten.pth"
    ten_class_model = build_model("vit_tiny_test", num_classes=10, image_size=32)
    torch.save(ten_class_model.state_dict(), ten_classes)
    with pytest.raises(WeightsNotFoundError, match=r"head\.weight has shape \(10, 64\)"):
        create_initial_model("vit_tiny_test", 100, 32, "pretrained", str(ten_classes), 0, True)


def test_position_embeddings_are_resampled_to_the_image_size(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(_backbone_state(seed=2), path)  # 32 px: 8x8 patches
    model = create_initial_model("vit_tiny_test", 10, 48, "pretrained", str(path), seed=0)
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 64)


def test_wrong_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    model = build_model("vit_tiny_test", 100, 32)
    with pytest.raises(WeightsNotFoundError, match="does not match the model"):
        load_backbone(model, read_checkpoint(path))


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match="cannot read a checkpoint"):
        read_checkpoint(path)


def test_offline_hub_download_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(WeightsNotFoundError) as info:
        create_initial_model("vit_small_patch16_224.dino", 100, 224, "pretrained", "", seed=0)
    message = str(info.value)
    assert "pretrained-path" in message and "weights=random" in message and "\n" not in message


def test_initial_model_is_seeded():
    a = create_initial_model("vit_tiny_test", 100, 32, "random", "", seed=3).state_dict()
    b = create_initial_model("vit_tiny_test", 100, 32, "random", "", seed=3).state_dict()
    c = create_initial_model("vit_tiny_test", 100, 32, "random", "", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
