"""PyTorch ground truth for ITAE: the last block's attention computed explicitly, with the
artifact detection and attenuation of docs/method.md for every option. Parity of the patched
ONNX is measured against this module."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from graph_passes.config import ITAEConfig

from .models import DinoV2Embedder


def token_norms(src: torch.Tensor, scope: str) -> torch.Tensor:
    """src [B,H,T,Dh] -> lengths [B,T] over all heads together (token) or [B,H,T] (head), in float32."""
    s = src.float()
    if scope == "token":
        return s.pow(2).sum(dim=(1, 3)).sqrt()
    return s.pow(2).sum(dim=-1).sqrt()


def flag_artifacts(norms: torch.Tensor, cfg: ITAEConfig, num_prefix: int) -> torch.Tensor:
    """Boolean mask of artifact patch tokens, same shape as norms; CLS/registers never flagged."""
    if cfg.threshold is not None:
        thr = torch.tensor(cfg.threshold, dtype=norms.dtype)
    else:
        patch = norms[..., num_prefix:]
        if cfg.relative_stat == "mean":
            stat = patch.mean(dim=-1, keepdim=True)
        else:
            stat = torch.quantile(patch, 0.5, dim=-1, keepdim=True)  # even count: mean of the middle two
        thr = cfg.gamma * stat
    flagged = norms > thr if cfg.direction == "high" else norms < thr
    flagged[..., :num_prefix] = False
    return flagged


def itae_attention(
    attn: nn.Module, x: torch.Tensor, cfg: ITAEConfig | None, num_prefix: int, stats: dict | None = None
) -> torch.Tensor:
    """timm Attention.forward written out, with ITAE applied when cfg is given."""
    b, t, _ = x.shape
    h, dh = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(b, t, 3, h, dh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # [B,H,T,T]
    probs_before = logits.softmax(dim=-1)
    probs = probs_before
    if cfg is not None:
        src = {"q": q, "k": k, "v": v}[cfg.norm_source]
        norms = token_norms(src, cfg.norm_scope)
        flagged = flag_artifacts(norms, cfg, num_prefix)
        # key-axis mask [B,1|H,1,T], restricted to the attenuated query rows
        cond = flagged[:, None, None, :] if cfg.norm_scope == "token" else flagged[:, :, None, :]
        if cfg.rows == "cls":
            row = torch.zeros(t, 1, dtype=torch.bool)
            row[0] = True
            cond = cond & row
        if cfg.attenuation == "min-logit":
            row_min = logits[..., num_prefix:].amin(dim=-1, keepdim=True)
            probs = torch.where(cond, row_min, logits).softmax(dim=-1)
        elif cfg.attenuation == "mask":
            probs = torch.where(cond, torch.finfo(logits.dtype).min, logits).softmax(dim=-1)
        else:
            scaled = torch.where(cond, probs_before * cfg.alpha, probs_before)
            probs = scaled / scaled.sum(dim=-1, keepdim=True)
        if stats is not None:
            stats["norms"] = norms
            stats["flagged"] = flagged
    if stats is not None:
        stats["cls_attn_before"] = probs_before[:, :, 0, :]
        stats["cls_attn_after"] = probs[:, :, 0, :]
    out = (probs @ v).transpose(1, 2).reshape(b, t, h * dh)
    out = attn.norm(out)
    return attn.proj(out)


def _last_block(block: nn.Module, x: torch.Tensor, cfg: ITAEConfig | None, num_prefix: int, stats: dict | None):
    x = x + block.drop_path1(block.ls1(itae_attention(block.attn, block.norm1(x), cfg, num_prefix, stats)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class ITAEReference(nn.Module):
    """The embedder with ITAE in its final block; forward(x) -> [B, D] final-norm CLS token.
    With cfg=None it computes the baseline through the same explicit attention."""

    def __init__(self, embedder: DinoV2Embedder, cfg: ITAEConfig | None):
        super().__init__()
        self.embedder = embedder
        self.cfg = cfg

    def forward(self, pixel_values: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        e = self.embedder
        x = e.tokens(pixel_values)
        for blk in e.vit.blocks[:-1]:
            x = blk(x)
        x = _last_block(e.vit.blocks[-1], x, self.cfg, e.num_prefix_tokens, stats)
        return e.vit.norm(x)[:, 0]


@torch.no_grad()
def last_block_stats(embedder: DinoV2Embedder, x: torch.Tensor, cfg: ITAEConfig) -> dict:
    """Norms, flags and CLS attention of the final block before/after ITAE, as numpy arrays."""
    stats: dict = {}
    ITAEReference(embedder, cfg).eval()(x, stats)
    out = {k: v.detach().cpu().numpy() for k, v in stats.items()}
    out["num_prefix_tokens"] = embedder.num_prefix_tokens
    out["grid"] = embedder.grid
    return out


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
