"""The fixed-shape modules against the loop-based references of DESIGN.md."""
import numpy as np
import pytest
import torch

from sparsezip_deploy.sparsezip.config import NoneConfig, SparseZipConfig, VisionZipConfig, config_from_dict, \
    config_to_dict
from sparsezip_deploy.sparsezip.modules import build_compressor, contrast, project_text_to_vision, text_relevance
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
    SparseZipConfig(fusion="zscore"),
    SparseZipConfig(fusion="minmax", beta=1.0, raters=False),
    SparseZipConfig(alpha_ent=0.0, alpha_mut=0.0, kmeans_iters=0),
    SparseZipConfig(alpha_attn=0.0, alpha_ent=1.0, alpha_mut=1.0, tau_sim=0.5, tau_feat=0.3),
    SparseZipConfig(dynamic_k=True, k_offset=60.0, k_scale=10.0, k_min=8, k_max=120, contextual=16),
    SparseZipConfig(dynamic_k=True, k_offset=20.0, k_scale=4.0, k_min=4, k_max=40, contextual=1,
                    kmeans_iters=6),
]


def run_module(config, feats, project=None):
    h, cls_attn, kmet, text_vis, text_mask = feats
    with torch.no_grad():
        return [t.numpy() for t in build_compressor(config, project)(h, cls_attn, kmet, text_vis, text_mask)]


def kept_sets(kept: np.ndarray) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in kept]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the share of a's kept patches that b keeps too."""
    return float(np.mean([len(x & y) / len(x) for x, y in zip(kept_sets(a), kept_sets(b))]))


# Ids by position: hash() of a config with str fields changes per process, and pytest-xdist's workers
# must collect the same ids.
@pytest.mark.parametrize("config", CONFIGS, ids=[f"{c.method}-{i}" for i, c in enumerate(CONFIGS)])
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
                                 SparseZipConfig(tau_sim=0.0),
                                 SparseZipConfig(fusion="softmax"),
                                 SparseZipConfig(text_form="backward"),
                                 SparseZipConfig(text_form="forward", candidates=40)])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        bad.validate(NUM_PATCHES)


def test_unknown_method_or_option_is_rejected():
    with pytest.raises(ValueError, match="unknown compression method"):
        config_from_dict({"method": "tome"})
    with pytest.raises(ValueError, match="unknown option"):
        config_from_dict({"method": "visionzip", "k_max": 3})


def _flat_and_noise(text_vis):
    """A relevance that knows nothing: flat up to float rounding, then weak noise (a prompt
    whose embeddings barely correlate with the patches, as through an unaligned projector)."""
    return [("near-flat", text_vis * 1e-4), ("noise", text_vis * 0.05)]


def test_an_uninformative_text_term_leaves_the_visual_ranking():
    h, cls_attn, kmet, text_vis, text_mask = structured_features()
    visual = run_module(SparseZipConfig(beta=0.0), (h, cls_attn, kmet, text_vis, text_mask))[2]
    for name, weak in _flat_and_noise(text_vis):
        kept = run_module(SparseZipConfig(fusion="gated", beta=1.0), (h, cls_attn, kmet, weak, text_mask))[2]
        assert kept_sets(kept) == kept_sets(visual), f"a {name} relevance changed the kept patches"


def test_zscore_and_minmax_let_noise_outrank_the_visual_score():
    """What the gate is for: the same weak noise, min-max or z-scored, replaces a third or more."""
    h, cls_attn, kmet, text_vis, text_mask = structured_features()
    visual = run_module(SparseZipConfig(beta=0.0), (h, cls_attn, kmet, text_vis, text_mask))[2]
    noise = text_vis * 0.05
    for fusion in ("minmax", "zscore"):
        kept = run_module(SparseZipConfig(fusion=fusion, beta=1.0), (h, cls_attn, kmet, noise, text_mask))[2]
        assert overlap(kept, visual) < 0.7, fusion


def _naming(h, targets, gain=3.0):
    """Text tokens that each name one of `targets` (its hidden state, scaled): a relevance that knows."""
    text = torch.stack([h[b, 1 + targets[b]] * gain for b in range(h.shape[0])])  # [B,T,C]
    return text, torch.ones(text.shape[:2], dtype=torch.int64)


def test_an_informative_text_term_brings_in_what_it_names():
    h, cls_attn, kmet, _, _ = structured_features()
    config = SparseZipConfig(beta=1.0, raters=False)  # raters would keep only some of the 4 words
    visual = build_compressor(SparseZipConfig(beta=0.0)).visual_scores(h, cls_attn, kmet)
    targets = visual.argsort(-1, descending=True)[:, 100:104]  # ranked well past k_max = 53
    text, mask = _naming(h, targets)
    kept = run_module(config, (h, cls_attn, kmet, text, mask))[2]
    for row, wanted in zip(kept_sets(kept), targets.tolist()):
        assert set(wanted) <= row
    assert float(contrast(text_relevance(h[:, 1:], text, mask, False)).min()) > 0.5


def test_contrast_is_zero_when_flat_and_one_on_a_single_patch():
    flat = torch.full((1, 576), 1 / 576)
    peak = torch.zeros(1, 576)
    peak[0, 7] = 1.0
    assert float(contrast(flat)) == pytest.approx(0.0, abs=1e-6)
    assert float(contrast(peak)) == pytest.approx(1.0, abs=1e-6)


def _projector(width_in: int, width_out: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(width_out, width_in, generator=g) / width_in ** 0.5, torch.randn(width_out, generator=g)
    w2, b2 = torch.randn(width_out, width_out, generator=g) / width_out ** 0.5, torch.randn(width_out, generator=g)

    def torch_project(x):
        return torch.nn.functional.gelu(x @ w1.T + b1) @ w2.T + b2

    def numpy_project(x):  # the reference's: one patch [C] float64 -> [D]
        return torch_project(torch.from_numpy(np.asarray(x, np.float32))).double().numpy()
    return torch_project, numpy_project


@pytest.mark.parametrize("config", [SparseZipConfig(text_form="forward", beta=1.0),
                                    SparseZipConfig(text_form="forward", candidates=60, fusion="minmax",
                                                    raters=False, dynamic_k=True, k_min=8)],
                         ids=["gated", "minmax-dynamic"])
def test_forward_form_equals_reference(config):
    h, cls_attn, kmet, _, _ = structured_features()
    torch_project, numpy_project = _projector(h.shape[-1], 24)
    g = torch.Generator().manual_seed(9)
    text = torch.randn(h.shape[0], 5, 24, generator=g) * 2.0
    mask = torch.ones(h.shape[0], 5, dtype=torch.int64)
    mask[1, -1] = 0
    tokens, num, kept = run_module(config, (h, cls_attn, kmet, text, mask), torch_project)
    visual = run_module(SparseZipConfig(beta=0.0, k_max=config.candidates),
                        (h, cls_attn, kmet, None, None))[2]
    for b in range(h.shape[0]):
        ref = reference(config, h[b].numpy(), cls_attn[b].numpy(), kmet[b].numpy(), text[b].numpy(),
                        mask[b].numpy(), numpy_project)
        assert int(num[b]) == ref.num_tokens
        np.testing.assert_array_equal(kept[b], ref.kept_index)
        np.testing.assert_allclose(tokens[b], ref.tokens, atol=2e-5, rtol=1e-5)
    # It re-ranks the visual score's candidates and never reaches past them.
    for row, candidates in zip(kept_sets(kept), kept_sets(visual)):
        assert row <= candidates


def test_forward_form_needs_the_projector():
    h, cls_attn, kmet, text_vis, text_mask = structured_features()
    with pytest.raises(ValueError, match="projector"):
        run_module(SparseZipConfig(text_form="forward"), (h, cls_attn, kmet, text_vis, text_mask))
