"""The fixed-shape modules against the loop-based references of DESIGN.md."""
import numpy as np
import pytest
import torch

from sparsezip_deploy.sparsezip.config import NoneConfig, SparseZipConfig, VisionZipConfig, config_from_dict, \
    config_to_dict
from sparsezip_deploy.sparsezip.modules import build_compressor, project_text_to_vision
from sparsezip_deploy.sparsezip.ops import topk_first
from sparsezip_deploy.sparsezip.reference import reference, reference_text_to_vision

from .conftest import NUM_PATCHES, structured_features

CONFIGS = [
    NoneConfig(),
    VisionZipConfig(),
    VisionZipConfig(dominant=10, contextual=3),
    VisionZipConfig(dominant=2, contextual=1),
    SparseZipConfig(),
    SparseZipConfig(beta=0.0),
    SparseZipConfig(raters=False, beta=2.0),
    SparseZipConfig(alpha_ent=0.0, alpha_mut=0.0, kmeans_iters=0),
    SparseZipConfig(alpha_attn=0.0, alpha_ent=1.0, alpha_mut=1.0, tau_sim=0.5, tau_feat=0.3),
    SparseZipConfig(dynamic_k=True, k_offset=60.0, k_scale=10.0, k_min=8, k_max=120, contextual=16),
    SparseZipConfig(dynamic_k=True, k_offset=20.0, k_scale=4.0, k_min=4, k_max=40, contextual=1,
                    kmeans_iters=6),
]


def run_module(config, feats):
    h, cls_attn, kmet, text_vis, text_mask = feats
    with torch.no_grad():
        return [t.numpy() for t in build_compressor(config)(h, cls_attn, kmet, text_vis, text_mask)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{abs(hash(c)) % 10**6}")
@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_shape_equals_reference(config, seed):
    feats = structured_features(seed=seed)
    tokens, num, kept = run_module(config, feats)
    assert tokens.shape[1] == kept.shape[1] == config.num_slots(NUM_PATCHES)
    for b in range(tokens.shape[0]):
        ref = reference(config, *(x[b].numpy() for x in feats))
        assert int(num[b]) == ref.num_tokens
        np.testing.assert_array_equal(kept[b], ref.kept_index)
        np.testing.assert_allclose(tokens[b], ref.tokens, atol=2e-5, rtol=1e-5)
        assert not tokens[b, ref.num_tokens:].any(), "padding slots must be zero"


def test_dynamic_k_varies_per_image():
    config = SparseZipConfig(dynamic_k=True, k_offset=60.0, k_scale=10.0, k_min=8, k_max=120)
    nums = set()
    for seed in range(4):
        _, num, _ = run_module(config, structured_features(seed=seed))
        nums.update(int(n) for n in num)
    assert len(nums) > 1, "dynamic K gave the same K for every image: the test data or the formula is off"


@pytest.mark.parametrize("config", [VisionZipConfig(dominant=20, contextual=5),
                                    SparseZipConfig(alpha_ent=0.0, alpha_mut=0.0, beta=0.0, k_max=20)])
def test_ties_go_to_the_lower_index(config):
    h, cls_attn, kmet, text_vis, text_mask = structured_features(batch=1)
    cls_attn = torch.full_like(cls_attn, 1.0 / cls_attn.shape[-1])
    cls_attn[..., 301:341] = 2.0 / cls_attn.shape[-1]  # patches 300..339 tie for 19-20 places
    _, _, kept = run_module(config, (h, cls_attn, kmet, text_vis, text_mask))
    ref = reference(config, h[0].numpy(), cls_attn[0].numpy(), kmet[0].numpy(), text_vis[0].numpy(),
                    text_mask[0].numpy())
    np.testing.assert_array_equal(kept[0], ref.kept_index)
    dominant = kept[0][kept[0] >= 0]
    assert dominant.tolist() == list(range(300, 300 + len(dominant)))


def test_topk_first_breaks_ties_like_onnx():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0]])
    assert topk_first(x, 4).tolist() == [[1, 2, 4, 6]]
    assert topk_first(x, 2, largest=False).tolist() == [[5, 0]]


def test_text_off_means_prompt_has_no_effect():
    h, cls_attn, kmet, text_vis, text_mask = structured_features()
    config = SparseZipConfig(beta=0.0)
    a = run_module(config, (h, cls_attn, kmet, text_vis, text_mask))
    b = run_module(config, (h, cls_attn, kmet, -text_vis, text_mask))
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_array_equal(a[0], b[0])


def test_empty_prompt_adds_nothing():
    h, cls_attn, kmet, text_vis, text_mask = structured_features()
    text_aware = run_module(SparseZipConfig(beta=3.0), (h, cls_attn, kmet, text_vis, torch.zeros_like(text_mask)))
    plain = run_module(SparseZipConfig(beta=0.0), (h, cls_attn, kmet, text_vis, text_mask))
    np.testing.assert_array_equal(text_aware[2], plain[2])


def test_text_to_vision_is_the_projector_transposed():
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(16, 8, generator=g), torch.randn(16, 16, generator=g)
    e = torch.randn(2, 5, 16, generator=g)
    got = project_text_to_vision(e, w1, w2)
    for b in range(2):
        np.testing.assert_allclose(got[b].numpy(), reference_text_to_vision(e[b].numpy(), w1.numpy(), w2.numpy()),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS[:6], ids=lambda c: c.method)
def test_config_round_trip(config):
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("bad", [VisionZipConfig(dominant=570, contextual=10),
                                 SparseZipConfig(k_min=60, k_max=50),
                                 SparseZipConfig(k_max=570, contextual=10),
                                 SparseZipConfig(tau_sim=0.0)])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        bad.validate(NUM_PATCHES)


def test_unknown_method_or_option_is_rejected():
    with pytest.raises(ValueError, match="unknown compression method"):
        config_from_dict({"method": "tome"})
    with pytest.raises(ValueError, match="unknown option"):
        config_from_dict({"method": "visionzip", "k_max": 3})
