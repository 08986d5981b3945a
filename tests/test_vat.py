import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from job.model import ArticleCNN
from job.vat import adversarial_direction, kl_with_logits, l2_normalize, lds_loss


def test_l2_normalize_gives_unit_norm_per_example_even_for_tiny_values():
    d = torch.randn(5, 1, 28, 28)
    d[1] *= 1e-30  # a gradient this small must still give a direction
    d[2] *= 1e20
    norms = l2_normalize(d).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(5))
    assert torch.isfinite(l2_normalize(torch.zeros(2, 1, 28, 28))).all()


def test_kl_is_zero_for_equal_predictions_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert kl_with_logits(logits, logits).abs() < 1e-6
    assert kl_with_logits(logits, logits + torch.randn(8, 10)) > 0


def kl(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
    """KL(q || p), batch mean, by torch's own kl_div (its input is log p, its target q)."""
    return F.kl_div(F.log_softmax(p_logits, dim=1), F.softmax(q_logits, dim=1), reduction="batchmean")


def test_kl_with_logits_is_kl_of_the_first_against_the_second():
    torch.manual_seed(0)
    q, p = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    torch.testing.assert_close(kl_with_logits(q, p), kl(q, p))
    assert not torch.allclose(kl(q, p), kl(p, q), rtol=0.05), "the two directions differ on these logits"


def test_lds_is_kl_from_the_clean_prediction_to_the_perturbed_one():
    """LDS = KL(p(y|x) || p(y|x + r_adv)): the clean prediction is the reference distribution, not the other way.
    A linear softmax whose prediction an epsilon of 3 moves far: the two directions differ about fourfold."""
    torch.manual_seed(0)
    model = linear_softmax(torch.randn(10, 784) * 0.1)
    x = torch.rand(16, 1, 28, 28)
    seen = []

    def forward(z):
        seen.append(z.detach())
        return model(z)

    clean = model(x)
    loss = lds_loss(forward, x, clean, epsilon=3.0, xi=1e-6, power_iterations=1)
    perturbed = model(seen[-1])  # the last pass is the perturbed one
    torch.testing.assert_close(loss, kl(clean, perturbed))
    assert kl(perturbed, clean) < kl(clean, perturbed) / 2


def linear_softmax(weight: torch.Tensor):
    return lambda x: x.flatten(1) @ weight.T


def test_power_iteration_finds_the_dominant_eigenvector_of_the_kl_hessian():
    """For logits Wx the KL's Hessian in r at r=0 is W^T (diag(p) - pp^T) W: VAT's direction is its top eigenvector."""
    torch.manual_seed(0)
    w = torch.randn(10, 16, dtype=torch.float64)
    x = torch.randn(1, 16, dtype=torch.float64)
    forward = linear_softmax(w)
    p = torch.softmax(forward(x), dim=1)[0]
    hessian = (w.T @ (torch.diag(p) - torch.outer(p, p)) @ w).numpy()
    top = np.linalg.eigh(hessian)[1][:, -1]
    direction = adversarial_direction(forward, x, forward(x).detach(), xi=1e-3, power_iterations=50)
    cosine = abs(float(direction.flatten() @ torch.from_numpy(top)))
    assert cosine > 0.999


def test_one_power_iteration_is_adversarial_compared_with_random_directions():
    torch.manual_seed(0)
    net = ArticleCNN().double().train()  # batch statistics, as in training; no dropout noise:
    model = lambda z: net(z, torch.ones(len(z), 100, dtype=z.dtype))  # noqa: E731
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64)
    clean = model(x).detach()
    epsilon = 2.5
    adversarial = model(x + epsilon * adversarial_direction(model, x, clean, xi=1e-6, power_iterations=1))
    adversarial_kl = torch.stack([kl_with_logits(clean[i : i + 1], adversarial[i : i + 1]) for i in range(16)])
    random_kl = []
    for _ in range(20):
        r = epsilon * l2_normalize(torch.randn_like(x))
        out = model(x + r)
        random_kl.append(torch.stack([kl_with_logits(clean[i : i + 1], out[i : i + 1]) for i in range(16)]))
    random_kl = torch.stack(random_kl)
    # Per example, the adversarial direction beats the typical random direction of the same norm (all but at most
    # one of 16: one power iteration from a random start can land nearly orthogonal to the dominant direction; on
    # this machine's CPU one example scores 0.0006 against a median of 0.0007), and for most examples every one
    # of 20 random directions.
    assert (adversarial_kl > random_kl.median(dim=0).values).float().mean() >= 15 / 16
    assert (adversarial_kl > random_kl.max(dim=0).values).float().mean() >= 0.75
    assert adversarial_kl.mean() > 3 * random_kl.mean()


def test_power_iteration_touches_no_weight_gradient_and_the_clean_target_is_constant():
    torch.manual_seed(0)
    model = ArticleCNN()
    x = torch.rand(8, 1, 28, 28)
    clean = model(x)  # with a graph, as a caller might pass it
    adversarial_direction(model, x, clean.detach(), xi=1e-6, power_iterations=2)
    assert all(p.grad is None for p in model.parameters()), "the power iteration differentiates r only"
    loss = lds_loss(model, x, clean, epsilon=2.5, xi=1e-6, power_iterations=1)
    grads = torch.autograd.grad(loss, [clean, model.fc2.weight], allow_unused=True)
    assert grads[0] is None, "no gradient flows into the clean prediction"
    assert grads[1] is not None and grads[1].abs().sum() > 0


def test_shared_dropout_mask_makes_the_probe_measure_the_perturbation_only():
    torch.manual_seed(0)
    model = ArticleCNN().train()
    x = torch.rand(32, 1, 28, 28)
    mask = model.dropout_mask(32, x)
    with torch.no_grad():
        clean = model(x, mask)
        probe = x + 1e-6 * l2_normalize(torch.randn_like(x))
        shared = kl_with_logits(clean, model(probe, mask))
        independent = kl_with_logits(clean, model(probe))
    assert shared < 1e-6 < 1e-4 < independent


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_a_tiny_probe_vanishes_in_half_precision_but_not_in_float32(dtype):
    """Why the power iteration runs in float32 under AMP: x + xi*d rounds back to x in bf16."""
    x = torch.rand(4, 1, 28, 28)
    probe = x + 1e-6 * l2_normalize(torch.randn_like(x))
    assert torch.equal(probe.to(dtype), x.to(dtype))
    assert not torch.equal(probe, x)


def test_model_matches_the_articles_layer_order_exactly():
    """Pool-before-ReLU and mask-before-ReLU compute the article's conv-BN-ReLU-pool / FC-dropout-ReLU."""
    torch.manual_seed(0)
    ours = ArticleCNN().train()
    x = torch.rand(16, 1, 28, 28)
    mask = ours.dropout_mask(16, x)
    article = nn.Sequential(
        ours.conv1, ours.bn1, nn.ReLU(), nn.MaxPool2d(2), ours.conv2, ours.bn2, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()
    )
    expected = ours.fc2(torch.relu(ours.fc1(article(x)) * mask))
    torch.testing.assert_close(ours(x, mask), expected)
    weights = [m.weight for m in ours.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(abs(float(w.detach().std()) - 0.02) < 0.005 for w in weights)
    layers = [m for m in ArticleCNN().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(float(m.bias.detach().abs().sum()) == 0 for m in layers)


@pytest.mark.parametrize("scaling", ["fixed", "input_norm"])
def test_perturbation_radius_is_epsilon_or_proportional_to_each_images_norm(scaling):
    torch.manual_seed(0)
    model = ArticleCNN().eval()
    x = torch.rand(6, 1, 28, 28) * torch.tensor([0.2, 0.5, 1.0, 1.0, 1.5, 2.0]).view(-1, 1, 1, 1)
    seen = []

    def forward(z):
        seen.append(z.detach())
        return model(z)

    with torch.no_grad():
        clean = model(x)
    lds_loss(forward, x, clean, epsilon=3.0, xi=1.0, power_iterations=1, epsilon_scaling=scaling)
    radius = (seen[-1] - x).flatten(1).norm(dim=1)  # the last pass is the perturbed one
    norms = x.flatten(1).norm(dim=1)
    expected = torch.full_like(norms, 3.0) if scaling == "fixed" else 3.0 * norms / norms.mean()
    torch.testing.assert_close(radius, expected, rtol=1e-4, atol=1e-4)


def test_a_teachers_target_changes_what_the_lds_pulls_towards_not_the_adversarial_direction():
    """The power iteration needs a divergence that is zero at r = 0: against another model's target its gradient
    there would swamp the curvature term, and the direction would be that gradient's, whatever d started as."""
    from job.vat import adversarial_direction, kl_with_logits, lds_loss

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    x = torch.randn(6, 1, 4, 4)
    clean, teacher = net(x), torch.randn(6, 5)
    state = torch.get_rng_state()
    own = lds_loss(net, x, clean, epsilon=0.5, xi=1e-3, power_iterations=1)
    torch.set_rng_state(state)
    taught = lds_loss(net, x, clean, epsilon=0.5, xi=1e-3, power_iterations=1, target_logits=teacher)
    torch.set_rng_state(state)
    direction = adversarial_direction(net, x, clean.detach(), 1e-3, 1)
    with torch.no_grad():
        assert torch.allclose(taught, kl_with_logits(teacher, net(x + 0.5 * direction)))
        assert torch.allclose(own, kl_with_logits(clean, net(x + 0.5 * direction)))
