import pytest
import torch

import fastmim
from fastmim.models.convnextv2 import ConvNeXtV2, GlobalResponseNorm


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
@pytest.mark.parametrize("num_classes", [0, 7])
def test_state_dict_moves_both_ways_with_timm_and_outputs_match(name, num_classes):
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    torch.manual_seed(0)
    ours = fastmim.create_model(name, num_classes=num_classes).eval()
    for p in ours.parameters():  # GRN starts as the identity (zero weight and bias): make every parameter count
        p.data.add_(0.05 * torch.randn_like(p))
    ref = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_small_sizes_store_pointwise_layers_as_1x1_convs_like_timm():
    atto = fastmim.create_model("convnextv2_atto").state_dict()
    tiny = fastmim.create_model("convnextv2_tiny").state_dict()
    assert atto["stages.0.blocks.0.mlp.fc1.weight"].shape == (160, 40, 1, 1)
    assert tiny["stages.0.blocks.0.mlp.fc1.weight"].shape == (384, 96)
    assert atto["stages.1.downsample.1.weight"].shape == (80, 40, 2, 2)


def test_grn_matches_the_paper_formula():
    grn = GlobalResponseNorm(4)
    grn.weight.data = torch.tensor([0.5, -1.0, 2.0, 0.0])
    grn.bias.data = torch.tensor([0.1, 0.2, 0.3, 0.4])
    x = torch.randn(2, 3, 5, 4)
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), grn.weight * (x * nx) + grn.bias + x)


def test_drop_path_rises_linearly_and_is_off_in_eval():
    m = fastmim.create_model("convnextv2_atto", drop_path_rate=0.3)
    rates = [blk.drop_path.p for stage in m.stages for blk in stage.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    m.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="same length"):
        ConvNeXtV2(depths=(1, 1), dims=(8, 16, 32))
    with pytest.raises(ValueError, match="drop_path_rate"):
        ConvNeXtV2(drop_path_rate=1.0)
    m = fastmim.create_model("convnextv2_atto")
    with pytest.raises(ValueError, match="not divisible by the total stride 32"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expected images"):
        m(torch.randn(1, 1, 64, 64))
