"""A conv shared by several paths (RTMDet's head shares its convs across levels)."""
import pytest
import torch
from torch import nn

import expand_mm
from expand_mm.checkpoint import compact_key_shapes, match_state_dict


def shared_net() -> nn.Module:
    shared = nn.Conv2d(4, 4, 3, padding=1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ModuleList([shared, shared]))


def test_a_compact_checkpoint_with_every_path_of_a_shared_conv_is_recognised():
    torch.manual_seed(0)
    net, original = shared_net(), shared_net()
    compact = {k: v.clone() for k, v in original.state_dict().items()}
    x = torch.randn(1, 3, 8, 8)
    expand_mm.expand_model(net, ratio=2)
    layers = net[1]
    assert layers[0] is layers[1]  # still one expanded layer
    assert set(compact_key_shapes(net)) == set(compact)
    assert match_state_dict(net, compact) == 'compact'
    net.load_state_dict(compact, strict=False)  # the factors are set from the compact convs
    contracted = expand_mm.contract_model(net)
    assert contracted[1][0] is contracted[1][1]
    assert match_state_dict(net, contracted.state_dict()) == 'compact'
    assert match_state_dict(net, net.state_dict()) == 'expanded'
    run = lambda m: m[1][1](m[1][0](m[0](x)))  # noqa: E731
    torch.testing.assert_close(run(net), run(original), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(contracted), run(original), rtol=1e-5, atol=1e-6)


def test_the_float64_check_compares_every_path_of_a_shared_conv():
    from expand_mm.verification import ContractionCheckError, check_layer_contractions
    torch.manual_seed(0)
    net = shared_net()
    expand_mm.expand_model(net, ratio=2)
    compact = expand_mm.contract_model(net)
    assert check_layer_contractions(net, compact) < 1e-6
    compact[1][1] = nn.Conv2d(4, 4, 3, padding=1)  # the second path no longer shares it
    with pytest.raises(ContractionCheckError, match='at 1.1:'):
        check_layer_contractions(net, compact)
