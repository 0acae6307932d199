"""Quality focal loss against the formula written out element by element."""

import pytest
import torch
import torch.nn.functional as F

from codetr.models.losses.quality_focal import quality_focal_loss


def direct_formula(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, beta: float) -> torch.Tensor:
    """sum_c BCE(p_ic, t_ic) * |t_ic - p_ic| ** beta, with t_ic = score_i if c == label_i else 0, p = sigmoid."""
    n, c = logits.shape
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for k in range(c):
            p = torch.sigmoid(logits[i, k].double())
            target = scores[i].double() if int(labels[i]) == k else torch.tensor(0.0, dtype=torch.float64)
            out[i] += F.binary_cross_entropy(p, target) * (target - p).abs() ** beta
    return out


@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_matches_direct_formula(beta):
    generator = torch.Generator().manual_seed(0)
    n, c = 40, 6
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, c + 1, (n,), generator=generator)  # c = background
    scores = torch.rand(n, generator=generator, dtype=torch.float64)
    scores[labels == c] = 0.0
    assert (labels == c).any() and (labels < c).any()
    logits.requires_grad_(True)
    ours = quality_focal_loss(logits, labels, scores, beta)
    reference = direct_formula(logits, labels, scores, beta)
    torch.testing.assert_close(ours, reference)
    # same gradient too: the modulating factor is differentiated through, as in mmdet
    weights = torch.rand(n, generator=generator, dtype=torch.float64)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(ours_grad, reference_grad)


def test_background_only():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 4, generator=generator, dtype=torch.float64) * 2
    labels = torch.full((9,), 4)
    scores = torch.zeros(9, dtype=torch.float64)
    loss = quality_focal_loss(logits, labels, scores)
    torch.testing.assert_close(loss, direct_formula(logits, labels, scores, 2.0))
    # every class is pushed towards 0: the loss is -log(1 - p) p^2 summed over classes
    p = logits.sigmoid()
    torch.testing.assert_close(loss, (-(1 - p).log() * p**2).sum(1))


def test_positive_with_perfect_prediction_costs_nothing_on_its_class():
    logits = torch.tensor([[0.0, -30.0]], dtype=torch.float64)  # class 0 probability 0.5, class 1 ~0
    loss = quality_focal_loss(logits, torch.tensor([0]), torch.tensor([0.5], dtype=torch.float64))
    assert float(loss) < 1e-20


def test_gradients_finite_at_extreme_logits():
    logits = torch.tensor([[100.0, -100.0, 1e4], [-1e4, 50.0, -50.0], [0.0, 88.0, -88.0], [30.0, -30.0, 0.0]],
                          requires_grad=True)
    labels = torch.tensor([0, 1, 3, 2])
    scores = torch.tensor([0.0, 1.0, 0.0, 0.5])
    loss = quality_focal_loss(logits, labels, scores)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0] > 0.5 and logits.grad[0, 2] > 0.5  # confident wrong answers are pushed back


def test_empty_and_bad_input():
    assert quality_focal_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="labels must lie"):
        quality_focal_loss(torch.zeros(2, 3), torch.tensor([0, 4]), torch.zeros(2))
    with pytest.raises(ValueError, match="scores"):
        quality_focal_loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(3))
