import torch

NUM_PATCHES, WIDTH, HEADS, HEAD_DIM = 576, 32, 4, 8


def structured_features(batch: int = 3, seed: int = 0, text_len: int = 6):
    """Layer-l* features with clear structure, so rankings have no near-ties.

    CLS attention: log-uniform spread of logits (peaked, well separated).
    Keys: 12 cluster centres + small noise, so similarity has real structure.
    """
    g = torch.Generator().manual_seed(seed)
    n = NUM_PATCHES + 1
    h = torch.randn(batch, n, WIDTH, generator=g)
    logits = torch.randn(batch, HEADS, n, generator=g) * 4.0
    cls_attn = torch.softmax(logits, dim=-1)
    centres = torch.randn(batch, 12, HEAD_DIM, generator=g) * 2.0
    member = torch.randint(0, 12, (batch, n), generator=g)
    kmet = centres.gather(1, member.unsqueeze(-1).expand(-1, -1, HEAD_DIM)) \
        + 0.3 * torch.randn(batch, n, HEAD_DIM, generator=g)
    text_vis = torch.randn(batch, text_len, WIDTH, generator=g) * 2.0
    text_mask = torch.ones(batch, text_len, dtype=torch.int64)
    text_mask[0, -2:] = 0
    return h, cls_attn, kmet, text_vis, text_mask
