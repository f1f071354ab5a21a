"""Diagonal Fisher: equals a brute-force per-example loop; differs from a squared batch gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from timm.models.vision_transformer import VisionTransformer

from clients.fisher import diagonal_fisher, fisher_labels
from flower_app import client_app
from flower_app.config import RunConfig
from flower_app.models.factory import create_initial_model
from strategies import protocol
from strategies.sparse_codec import encode_mask
from tests.conftest import InProcessGrid, quick_run_config


def _tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=5, **kwargs
    )


def _data(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]  # embeddings, LayerNorms, head: all


def _brute_force(model, images, labels, names):
    """One backward per example, the textbook definition."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in zip(images, labels, strict=True):
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        for n in names:
            sums[n] += params[n].grad.detach() ** 2
    return {n: s / len(images) for n, s in sums.items()}


def _brute_force_logit(model, images, labels, names):
    """TaLoS's score, one example at a time: the squared gradient of the raw logit z_y."""
    model.eval()
    params = dict(model.named_parameters())
    wanted = [params[n] for n in names]
    sums = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in zip(images, labels, strict=True):
        logit = model(x[None])[0, y]
        for n, g in zip(names, torch.autograd.grad(logit, wanted), strict=True):
            sums[n] += g.detach() ** 2
    return {n: s / len(images) for n, s in sums.items()}


@pytest.mark.parametrize("label_mode", ["empirical", "sampled"])
def test_fisher_equals_per_example_loop(label_mode):
    model = _tiny_vit()
    images, labels = _data()
    names = _names(model)
    fisher = diagonal_fisher(model, images, labels, names, label_mode, 4, _gen())
    # the same seed draws the same labels, in the one place they are drawn
    used = fisher_labels(model, images, labels, label_mode, 4, _gen())
    if label_mode == "sampled":
        assert not torch.equal(used, labels)  # the draw really is not the data
    expected = _brute_force(model, images, used, names)
    assert list(fisher) == names
    for n in names:
        assert fisher[n].dtype == torch.float32 and not fisher[n].requires_grad
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("label_mode", ["empirical", "sampled"])
def test_logit_score_equals_per_example_loop(label_mode):
    model = _tiny_vit()
    images, labels = _data()
    names = _names(model)
    fisher = diagonal_fisher(model, images, labels, names, label_mode, 4, _gen(), score="logit")
    used = fisher_labels(model, images, labels, label_mode, 4, _gen())
    expected = _brute_force_logit(model, images, used, names)
    assert list(fisher) == names
    for n in names:
        assert fisher[n].dtype == torch.float32 and not fisher[n].requires_grad
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10)
    # the head's bias gets d z_y / d b = one-hot(y): its score counts how often y was drawn
    counts = torch.bincount(used, minlength=5).float() / len(used)
    torch.testing.assert_close(fisher["head.bias"], counts)


@pytest.mark.parametrize("label_mode", ["empirical", "sampled"])
def test_log_likelihood_is_the_default_score(label_mode):
    model = _tiny_vit()
    images, labels = _data()
    names = ["head.weight", "blocks.0.attn.qkv.weight"]
    a = diagonal_fisher(model, images, labels, names, label_mode, 4, _gen())
    b = diagonal_fisher(model, images, labels, names, label_mode, 4, _gen(), score="log-likelihood")
    for n in names:
        assert torch.equal(a[n], b[n])


@pytest.mark.parametrize("label_mode", ["empirical", "sampled"])
def test_logit_and_log_likelihood_scores_differ(label_mode):
    model = _tiny_vit()
    images, labels = _data()
    names = ["head.bias", "head.weight", "blocks.0.mlp.fc1.weight"]
    ll = diagonal_fisher(model, images, labels, names, label_mode, 6, _gen())
    logit = diagonal_fisher(model, images, labels, names, label_mode, 6, _gen(), score="logit")
    for n in names:
        assert not torch.allclose(ll[n], logit[n], rtol=1e-2), n


def test_sampled_and_empirical_fisher_differ():
    model = _tiny_vit()
    images, labels = _data()
    a = diagonal_fisher(model, images, labels, ["head.weight"], "sampled", 6, _gen())
    b = diagonal_fisher(model, images, labels, ["head.weight"], "empirical", 6, _gen())
    assert not torch.allclose(a["head.weight"], b["head.weight"])


@pytest.mark.parametrize("label_mode", ["empirical", "sampled"])
def test_batch_size_does_not_change_the_result(label_mode):
    model = _tiny_vit()
    images, labels = _data(7)
    names = _names(model)
    a = diagonal_fisher(model, images, labels, names, label_mode, 7, _gen())
    b = diagonal_fisher(model, images, labels, names, label_mode, 3, _gen())
    c = diagonal_fisher(model, images, labels, names, label_mode, 1, _gen())
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(a[n], c[n], rtol=1e-5, atol=1e-10)


def test_fisher_is_not_the_squared_batch_gradient():
    model = _tiny_vit()
    images, labels = _data()
    names = ["head.bias", "blocks.0.mlp.fc1.weight"]
    fisher = diagonal_fisher(model, images, labels, names, "empirical", 6, None)
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    for n in names:
        squared = dict(model.named_parameters())[n].grad ** 2
        assert (fisher[n] >= squared - 1e-9).all()  # E[g^2] >= (E g)^2
        assert not torch.allclose(fisher[n], squared, rtol=1e-2)


def test_scored_in_eval_mode_and_the_mode_is_restored():
    """With dropout everywhere, a training-mode score would differ from the eval brute force."""
    model = _tiny_vit(drop_rate=0.5, proj_drop_rate=0.5, attn_drop_rate=0.5).train()
    images, labels = _data()
    names = ["blocks.0.attn.qkv.weight", "head.weight"]
    fisher = diagonal_fisher(model, images, labels, names, "empirical", 4, None)
    assert model.training
    expected = _brute_force(model, images, labels, names)
    for n in names:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10)
    model.eval()
    diagonal_fisher(model, images, labels, names, "empirical", 4, None)
    assert not model.training


def test_sampled_labels_follow_the_model():
    """Labels drawn from a model that is sure of class 3 are all 3, whatever the data say."""
    model = _tiny_vit()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0, 0.0]))
    images, labels = _data(16)
    drawn = fisher_labels(model, images, labels, "sampled", 5, _gen())
    assert torch.equal(drawn, torch.full((16,), 3))
    assert torch.equal(fisher_labels(model, images, labels, "empirical", 5, _gen()), labels)


def test_bad_arguments_are_named():
    model = _tiny_vit()
    images, labels = _data(4)
    with pytest.raises(ValueError, match=r"label_mode='true' is not one of sampled, empirical"):
        diagonal_fisher(model, images, labels, ["head.bias"], "true", 4, None)
    with pytest.raises(ValueError, match=r"not parameters of the model: head\.b"):
        diagonal_fisher(model, images, labels, ["head.b"], "empirical", 4, None)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        diagonal_fisher(model, images, labels, ["head.bias"], "empirical", 0, None)
    with pytest.raises(ValueError, match=r"score='loss' is not one of log-likelihood, logit"):
        diagonal_fisher(model, images, labels, ["head.bias"], "empirical", 4, None, score="loss")


def _fisher_query(state, mask, score: str) -> Message:
    config = {
        protocol.SERVER_ROUND: 1,
        protocol.MASK_VERSION: 1,
        protocol.FISHER_SAMPLES: 8,
        protocol.FISHER_LABELS: "sampled",
        protocol.FISHER_SCORE: score,
    }
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(state),
            protocol.CONFIG: ConfigRecord(config),
            protocol.MASK: encode_mask(mask),
        }
    )
    return Message(content, dst_node_id=1000, message_type=protocol.QUERY_FISHER)


def test_client_app_scores_as_the_query_says():
    """The Fisher handler passes the query's score on."""
    run_config = quick_run_config(
        strategy="sparse-fedavg", synthetic_train_per_class=4, num_clients=2
    )
    cfg = RunConfig.from_run_config(run_config)
    model = create_initial_model(cfg.model, cfg.num_classes, cfg.image_size, "random", "", 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mask = {
        "blocks.0.mlp.fc1.weight": torch.ones_like(
            state["blocks.0.mlp.fc1.weight"], dtype=torch.bool
        )
    }
    grid = InProcessGrid(client_app.app, run_config, num_nodes=2)
    replies = grid.send_and_receive(
        [_fisher_query(state, mask, score) for score in ("log-likelihood", "logit")]
    )
    for reply in replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    ll, logit = (r.content[protocol.FISHER].to_torch_state_dict() for r in replies)
    name = "blocks.0.mlp.fc1.weight"
    assert not torch.allclose(ll[name], logit[name], rtol=1e-2)
