import pytest
import torch

from fastmim.masking import masking_from_bool, num_visible, random_masking


@pytest.mark.parametrize("b,n,ratio", [(1, 196, 0.75), (3, 197, 0.6), (2, 49, 0.9), (4, 2, 0.5)])
def test_random_masking_exact_count_and_inverse(b, n, ratio):
    info = random_masking(b, n, ratio, generator=torch.Generator().manual_seed(0))
    k = int(n * (1 - ratio))
    assert info.ids_keep.shape == (b, k)
    assert (info.mask.sum(1) == n - k).all()
    # ids_restore inverts the shuffle: kept ids map to the first K positions
    pos = torch.gather(info.ids_restore, 1, info.ids_keep)
    assert torch.equal(pos.sort(1).values, torch.arange(k).expand(b, k))
    # the mask is 0 exactly at the kept ids
    assert (torch.gather(info.mask, 1, info.ids_keep) == 0).all()


def test_masks_differ_per_sample_and_follow_generator():
    a = random_masking(8, 196, 0.75, generator=torch.Generator().manual_seed(1))
    b = random_masking(8, 196, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.mask, b.mask)
    assert len({tuple(r.tolist()) for r in a.mask}) == 8


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, "0.5", None])
def test_bad_mask_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio must be a number in the open interval"):
        random_masking(2, 16, ratio)


def test_num_visible_keeps_at_least_one_token():
    assert num_visible(196, 0.75) == 49
    assert num_visible(4, 0.9) == 1
    assert num_visible(16, 1e-17) == 15  # at least one masked token, too
    assert num_visible(1, 0.5) == 1


def test_masking_from_bool_round_trip():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, [1, 4, 5]] = True
    mask[1, [0, 1, 2]] = True
    mask[2, [7, 8, 9]] = True
    info = masking_from_bool(mask)
    assert torch.equal(info.mask.bool(), mask)
    assert (torch.gather(mask, 1, info.ids_keep) == 0).all()
    with pytest.raises(ValueError, match="same number"):
        masking_from_bool(torch.tensor([[True, False], [True, True]]))


def test_a_cpu_generator_serves_any_device():
    """The noise is drawn on the generator's device and moved: the same masks wherever they are made (a CPU generator
    with device="cuda" used to fail with "Expected a 'cuda' device type for generator")."""
    a = random_masking(4, 49, 0.6, generator=torch.Generator().manual_seed(3))
    b = random_masking(4, 49, 0.6, device="meta", generator=torch.Generator().manual_seed(3))
    assert b.mask.device.type == "meta" and b.ids_keep.shape == a.ids_keep.shape
    if torch.cuda.is_available():
        c = random_masking(4, 49, 0.6, device="cuda", generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(c.mask.cpu(), a.mask)


def test_a_mask_hiding_every_token_is_refused_for_an_encoder_that_drops_them():
    """mask_ratio=1 was refused, but an explicit all-hidden mask went through: the encoder saw no patch at all."""
    import fastmim

    model = fastmim.create_model("mae_vit_tiny_patch16", img_size=32, decoder_depth=1, decoder_embed_dim=32,
                                 decoder_num_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="the mask hides all 4 tokens"):
        model(torch.randn(2, 3, 32, 32), mask=torch.ones(2, 4, dtype=torch.bool))
    simmim = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64)  # keeps every token: a choice it can take
    loss, _, _ = simmim(torch.randn(2, 3, 64, 64), mask=torch.ones(2, 4, 4, dtype=torch.bool))
    assert torch.isfinite(loss)
