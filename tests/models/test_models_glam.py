"""GLAM attention: shapes at any map size, every ablation row as a config, naive-formula references, checkpoints."""

from __future__ import annotations

import pytest
import torch

from models import Encoder, load_encoder, save_encoder
from models.glam import GLAM, GLAM_ABLATIONS, GlobalChannelAttention, GlobalSpatialAttention
from models.registries import ATTENTION
from retrieval.config import ConfigError

BRANCHES = ("local_channel", "local_spatial", "global_channel", "global_spatial")
WITH_BRANCHES = [name for name in GLAM_ABLATIONS if name != "baseline"]


def _glam_config(config, **params):
    return config.model_copy(update={"attention": "glam", "attention_params": params})


def test_ablation_rows_are_the_papers():
    assert list(GLAM_ABLATIONS) == [
        "baseline",
        "local-channel",
        "local-spatial",
        "local",
        "global-channel",
        "global-spatial",
        "global",
        "global+local",
    ]
    assert all(set(row) == set(BRANCHES) for row in GLAM_ABLATIONS.values())
    assert not any(GLAM_ABLATIONS["baseline"].values()) and all(GLAM_ABLATIONS["global+local"].values())
    assert ATTENTION.get("glam") is GLAM


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("h", "w"), [(7, 5), (1, 1), (13, 9)])
def test_output_shape_equals_input_shape(h, w, batch):
    torch.manual_seed(0)
    module = GLAM(12, reduction=4)  # every branch on
    x = torch.rand(batch, 12, h, w)
    out = module(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("row", list(GLAM_ABLATIONS))
def test_every_ablation_builds_into_an_encoder(row, tiny_encoder_config):
    torch.manual_seed(0)
    encoder = Encoder(_glam_config(tiny_encoder_config, **GLAM_ABLATIONS[row])).eval()
    with torch.no_grad():
        for shape in [(2, 3, 64, 48), (1, 3, 32, 56)]:  # 2x2 and 1x2 feature maps
            out = encoder(torch.randn(*shape))
            assert out.shape == (shape[0], 32) and out.dtype == torch.float32
            torch.testing.assert_close(out.norm(dim=1), torch.ones(shape[0]))


def test_baseline_row_is_exactly_the_identity(tiny_encoder_config):
    module = GLAM(16, **GLAM_ABLATIONS["baseline"])
    x = torch.rand(2, 16, 3, 5)
    assert module(x) is x
    assert list(module.parameters()) == []
    torch.manual_seed(1)
    plain = Encoder(tiny_encoder_config).eval()
    baseline = Encoder(_glam_config(tiny_encoder_config, **GLAM_ABLATIONS["baseline"])).eval()
    baseline.load_state_dict(plain.state_dict(), strict=True)  # no GLAM parameters to add or miss
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(baseline(images), plain(images))


@pytest.mark.parametrize("row", WITH_BRANCHES)
def test_gradients_reach_every_enabled_branch_and_disabled_ones_hold_nothing(row):
    torch.manual_seed(2)
    flags = GLAM_ABLATIONS[row]
    module = GLAM(16, reduction=4, **flags)
    out = module(torch.rand(2, 16, 5, 7))
    (out * torch.randn_like(out)).sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    owners = {name.split(".")[0] for name, _ in module.named_parameters()}
    assert owners == {b for b, on in flags.items() if on} | {"fusion_logits"}
    for branch, on in flags.items():
        assert (getattr(module, branch) is not None) == on


def test_fusion_weights_start_equal_and_are_softmax_normalised():
    torch.manual_seed(3)
    full = GLAM(8)
    torch.testing.assert_close(full.fusion_weights, torch.full((3,), 1 / 3))
    torch.testing.assert_close(GLAM(8, **GLAM_ABLATIONS["local"]).fusion_weights, torch.full((2,), 0.5))
    with torch.no_grad():
        full.fusion_logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    w = full.fusion_weights
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    x = torch.rand(2, 8, 4, 6)
    expected = w[0] * full.local_stream(x) + w[1] * full.global_stream(x) + w[2] * x
    torch.testing.assert_close(full(x), expected)


def test_streams_follow_the_residual_formulas():
    torch.manual_seed(4)
    module = GLAM(8, reduction=2)
    x = torch.rand(1, 8, 3, 4)
    f_cl = x * module.local_channel(x) + x
    f_l = f_cl * module.local_spatial(f_cl) + f_cl
    f_cg = x * module.global_channel(x) + x
    f_g = f_cg * module.global_spatial(f_cg) + f_cg
    torch.testing.assert_close(module.local_stream(x), f_l)
    torch.testing.assert_close(module.global_stream(x), f_g)
    assert module.local_channel(x).shape == (1, 8, 1, 1) and module.local_spatial(x).shape == (1, 1, 3, 4)


def test_global_channel_attention_matches_a_naive_loop():
    torch.manual_seed(5)
    module = GlobalChannelAttention(kernel=3)
    x = torch.rand(2, 6, 3, 2)
    out = module(x)
    for n in range(2):
        pooled = x[n].mean(dim=(1, 2)).view(1, 1, 6)
        q = module.query(pooled).sigmoid().flatten()
        k = module.key(pooled).sigmoid().flatten()
        logits = torch.outer(k, q)  # (K^T Q)_{ij} = k_i q_j
        attention = logits.exp() / logits.exp().sum(dim=0, keepdim=True)  # over the key channel i
        value = x[n].flatten(1).T  # hw x c
        expected = (value @ attention).T.reshape(6, 3, 2)
        for j in range(6):  # output channel j mixes the input channels with weights attention[:, j]
            mixed = sum(attention[i, j] * x[n, i] for i in range(6))
            torch.testing.assert_close(expected[j], mixed)
        torch.testing.assert_close(out[n], expected)


def test_global_spatial_attention_matches_a_naive_loop():
    torch.manual_seed(6)
    module = GlobalSpatialAttention(channels=6, reduced=3)
    x = torch.rand(1, 6, 3, 2)
    out = module(x)
    q, k, v = (conv(x)[0].flatten(1) for conv in (module.query, module.key, module.value))  # c' x hw
    hw = 6
    expected = torch.zeros(3, hw)
    for pq in range(hw):  # each query position averages the values over all key positions
        logits = torch.stack([k[:, pk] @ q[:, pq] for pk in range(hw)])
        weights = logits.softmax(dim=0)
        expected[:, pq] = sum(weights[pk] * v[:, pk] for pk in range(hw))
    projected = module.project.weight[:, :, 0] @ expected + module.project.bias[:, None]
    torch.testing.assert_close(out[0], projected.reshape(6, 3, 2))


def test_invalid_params_fail_clearly(tiny_encoder_config):
    with pytest.raises(ValueError, match="odd"):
        GLAM(8, channel_kernel=4)
    with pytest.raises(ValueError, match="reduction"):
        GLAM(8, reduction=0)
    with pytest.raises(ConfigError, match=r"model\.attention_params: .*locl_channel"):  # one line naming the key
        Encoder(_glam_config(tiny_encoder_config, locl_channel=False))
    assert GLAM(4, reduction=8).reduced == 1


def test_checkpoint_with_glam_reproduces_outputs(tiny_encoder_config, tmp_path):
    torch.manual_seed(7)
    config = _glam_config(tiny_encoder_config, global_spatial=False, reduction=4, channel_kernel=5)
    encoder = Encoder(config).eval()
    with torch.no_grad():
        encoder.attention.fusion_logits.copy_(torch.tensor([0.3, -0.2, 0.1]))  # not the initial value
    save_encoder(encoder, tmp_path / "glam")
    loaded = load_encoder(tmp_path / "glam")
    assert loaded.config.attention == "glam" and loaded.config.attention_params == config.attention_params
    assert loaded.attention.global_spatial is None and loaded.attention.channel_kernel == 5
    images = torch.randn(2, 3, 56, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), encoder(images))
