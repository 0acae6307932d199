"""Customized positive queries: selection, padding, weights, embedding."""

import torch

from codetr.models.aux.base import PositiveSet
from codetr.models.positive_queries import PositiveQueryEmbedding, select_positive_queries

NUM_CLASSES = 3


def make_set(num_pos: int, num_neg: int, seed: int, width: float = 200.0, height: float = 100.0) -> PositiveSet:
    g = torch.Generator().manual_seed(seed)
    n = num_pos + num_neg
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width / 2, height / 2])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width / 2, height / 2]) + 1
    boxes = torch.cat([xy, xy + wh], 1)
    targets = boxes + torch.rand(n, 4, generator=g)
    labels = torch.full((n,), NUM_CLASSES)
    labels[:num_pos] = torch.randint(0, NUM_CLASSES, (num_pos,), generator=g)
    perm = torch.randperm(n, generator=g)  # positives are not necessarily first
    feats = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 8)  # feature = row in the set
    return PositiveSet(boxes=boxes[perm], labels=labels[perm], target_boxes=targets[perm], feats=feats)


def normalised_cxcywh(box: torch.Tensor, width: float, height: float) -> list[float]:
    x1, y1, x2, y2 = box.tolist()
    return [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]


def test_reference_points_are_the_normalised_positive_boxes():
    sets = [make_set(5, 20, 0), make_set(12, 20, 1)]
    sizes = torch.tensor([[100, 200], [100, 200]])
    q = select_positive_queries(sets, sizes, NUM_CLASSES, max_queries=300, min_queries=9)
    assert q.reference.shape == (2, 12, 4)  # group = largest positive count
    for i, s in enumerate(sets):
        pos = int((s.labels < NUM_CLASSES).sum())
        for j in range(q.reference.shape[1]):
            row = int(q.feats[i, j, 0])  # feats carry the row index of the source box
            assert torch.allclose(q.reference[i, j], torch.tensor(normalised_cxcywh(s.boxes[row], 200, 100)))
            assert int(q.labels[i, j]) == int(s.labels[row])
            if j < pos:
                assert q.labels[i, j] < NUM_CLASSES and q.box_weights[i, j] == 1
                assert torch.allclose(q.target_boxes[i, j],
                                      torch.tensor(normalised_cxcywh(s.target_boxes[row], 200, 100)))
            else:  # padded with the head's own negatives: background loss, no box loss
                assert q.labels[i, j] == NUM_CLASSES and q.box_weights[i, j] == 0
        assert torch.all(q.label_weights[i] == 1)
        rows = q.feats[i, :, 0].long()
        assert rows.unique().numel() == rows.numel()  # no box used twice
    assert q.self_attn_mask is None


def test_group_size_floor_and_cap():
    sizes = torch.tensor([[100, 200]])
    q = select_positive_queries([make_set(2, 30, 3)], sizes, NUM_CLASSES, max_queries=300, min_queries=9)
    assert q.reference.shape[1] == 9 and int(q.box_weights.sum()) == 2
    q = select_positive_queries([make_set(40, 30, 4)], sizes, NUM_CLASSES, max_queries=16, min_queries=9)
    assert q.reference.shape[1] == 16 and int(q.box_weights.sum()) == 16
    assert torch.all(q.labels < NUM_CLASSES)
    q = select_positive_queries([make_set(0, 30, 5)], sizes, NUM_CLASSES)
    assert q.reference.shape[1] == 9 and q.box_weights.sum() == 0 and torch.all(q.labels == NUM_CLASSES)


def test_cap_picks_a_random_subset():
    sizes = torch.tensor([[100, 200]])
    s = make_set(40, 5, 6)
    picks = {tuple(sorted(select_positive_queries([s], sizes, NUM_CLASSES, max_queries=10,
                                                  generator=torch.Generator().manual_seed(k)).feats[0, :, 0].tolist()))
             for k in range(5)}
    assert len(picks) > 1


def test_zero_padding_masks_and_weights():
    sets = [make_set(3, 10, 7), make_set(11, 10, 8)]
    sizes = torch.tensor([[100, 200], [100, 200]])
    q = select_positive_queries(sets, sizes, NUM_CLASSES, zero_padding=True)
    assert q.reference.shape[1] == 11
    mask = q.self_attn_mask
    assert mask.shape == (2, 11, 11)
    # image 0: 3 real queries, 8 padding
    assert torch.all(q.label_weights[0, :3] == 1) and torch.all(q.label_weights[0, 3:] == 0)
    assert torch.all(q.box_weights[0, 3:] == 0) and torch.all(q.labels[0, 3:] == NUM_CLASSES)
    assert torch.all(q.reference[0, 3:] == 0)
    assert not mask[0, :3, :3].any()  # real queries see each other
    assert mask[0, :3, 3:].all()  # ... but not the padding
    assert mask[0, 3:, :3].all()  # padding does not see real queries
    assert not mask[0].all(dim=1).any()  # no fully masked row
    assert not mask[1].any()  # image 1 has no padding


def test_embedding_depends_on_head_box_and_feature():
    torch.manual_seed(0)
    emb = PositiveQueryEmbedding(d_model=16, num_heads=2)
    with torch.no_grad():
        emb.head_embed.weight.normal_()
    ref = torch.rand(2, 5, 4) * 0.5 + 0.25
    feats = torch.randn(2, 5, 16)
    q0, p0 = emb(0, ref, feats)
    q1, p1 = emb(1, ref, feats)
    assert q0.shape == p0.shape == (2, 5, 16)
    assert not torch.allclose(q0, q1) and not torch.allclose(p0, p1)
    q0b, p0b = emb(0, ref, feats + 1)
    assert torch.allclose(p0b, p0) and not torch.allclose(q0b, q0)  # features feed the content only
    q0c, p0c = emb(0, ref.flip(1), feats.flip(1))
    assert torch.allclose(q0c, q0.flip(1), atol=1e-6)  # per-query, order-equivariant


def test_embedding_weights_use_the_official_xavier_init():
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out)) is wider than PyTorch's default Linear
    # bound 1 / sqrt(fan_in): the largest weight lands between the two only under xavier
    torch.manual_seed(0)
    emb = PositiveQueryEmbedding(d_model=64, num_heads=2)
    for w in [*(m.weight for m in emb.box_proj), *(m.weight for m in emb.feat_proj)]:
        fan_out, fan_in = w.shape
        xavier = (6 / (fan_in + fan_out)) ** 0.5
        assert xavier >= w.abs().max() > 1.2 / fan_in**0.5
    # the released head table: one scalar per head (heads, 1), xavier bound sqrt(6 / (1 + heads))
    assert emb.head_embed.weight.shape == (2, 1) and emb.head_embed.weight.abs().max() <= (6 / 3) ** 0.5


def test_the_head_scalar_is_added_to_every_channel_and_trains_as_one() -> None:
    """As released: head h adds its one scalar to each channel of its positional queries, so the
    scalar's gradient is the sum of the positional queries' gradients over channels."""
    torch.manual_seed(0)
    emb = PositiveQueryEmbedding(d_model=16, num_heads=2)
    ref, feats = torch.rand(1, 3, 4) * 0.5 + 0.25, torch.randn(1, 3, 16)
    _, base = emb(1, ref, feats)
    with torch.no_grad():
        emb.head_embed.weight[1] += 0.5
    _, shifted = emb(1, ref, feats)
    torch.testing.assert_close(shifted - base, torch.full_like(base, 0.5))
    weights = torch.randn_like(base)
    (emb(1, ref, feats)[1] * weights).sum().backward()
    torch.testing.assert_close(emb.head_embed.weight.grad, torch.tensor([[0.0], [float(weights.sum())]]))
