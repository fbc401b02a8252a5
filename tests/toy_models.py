"""Small models for the core tests: one per way a weight can be stored or used.

Real libraries (timm, torchvision, Hugging Face) are tested at small sizes in the test files;
these toys cover what those libraries do not show in one place.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


def timm_vit(depth: int = 2, dim: int = 64, heads: int = 4, classes: int = 5, **kw) -> nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, num_classes=classes, **kw)


def tv_vit(depth: int = 2, dim: int = 64, heads: int = 4, classes: int = 5) -> nn.Module:
    return torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=16, num_layers=depth, num_heads=heads, hidden_dim=dim, mlp_dim=4 * dim,
        num_classes=classes)


def hf_bert(depth: int = 2, dim: int = 64, heads: int = 4):
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                intermediate_size=4 * dim, vocab_size=100, max_position_embeddings=64))


def hf_vit(depth: int = 2, dim: int = 64, heads: int = 4):
    from transformers import ViTConfig, ViTModel
    return ViTModel(ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                              intermediate_size=4 * dim, image_size=32, patch_size=16), add_pooling_layer=False)


def hf_videomae(depth: int = 2, dim: int = 64, heads: int = 4):
    from transformers import VideoMAEConfig, VideoMAEModel
    return VideoMAEModel(VideoMAEConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                        intermediate_size=4 * dim, image_size=32, patch_size=16, num_frames=4))


def hf_ast(depth: int = 2, dim: int = 64, heads: int = 4):
    from transformers import ASTConfig, ASTModel
    return ASTModel(ASTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                              intermediate_size=4 * dim, max_length=64, num_mel_bins=32))


def hf_gpt2(depth: int = 2, dim: int = 64, heads: int = 4, lm_head: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
    config = GPT2Config(n_embd=dim, n_layer=depth, n_head=heads, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config) if lm_head else GPT2Model(config)


class FunctionalBlock(nn.Module):
    """Uses its weights through F.linear on attributes, as BEiT/EVA do with qkv."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.fc1 = nn.Linear(dim, 2 * dim, bias=bias)
        self.fc2 = nn.Linear(2 * dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(self.norm(x), self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        x = x + F.linear(F.scaled_dot_product_attention(q, k, v), self.proj.weight, self.proj.bias)
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class FunctionalNet(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2, bias: bool = True):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(FunctionalBlock(dim, bias) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


class EncoderNet(nn.Module):
    """nn.TransformerEncoder: MHA in_proj/out_proj plus linear1/linear2, fast paths in eval."""

    def __init__(self, dim: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class TiedBlock(nn.Module):
    """``down`` reuses ``up``'s weight transposed (a tied pair inside the body)."""

    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.up = nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + F.linear(F.gelu(self.up(x)), self.up.weight.t())


class TiedNet(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.Sequential(*(TiedBlock(dim) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.embed(x)).mean(1)


class SharedNet(nn.Module):
    """One block applied ``times`` times (ALBERT-style weight sharing)."""

    def __init__(self, dim: int = 16, times: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.block = FunctionalBlock(dim)
        self.times = times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for _ in range(self.times):
            x = self.block(x)
        return x.mean(1)


class BranchNet(FunctionalNet):
    """A data-dependent branch: fx cannot trace it and only one expert runs per input."""

    def __init__(self, dim: int = 16):
        super().__init__(dim)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.experts[0](x) if x.mean() > 0 else self.experts[1](x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def tokens(batch: int = 2, n: int = 5, features: int = 8) -> torch.Tensor:
    return torch.randn(batch, n, features)


class GQABlock(nn.Module):
    """Grouped-query attention: q has 4 heads, k and v 2 (narrower than q)."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape(b, n, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(x)))


class GQANet(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(GQABlock(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(1)


class BareBlock(nn.Module):
    """Two weights held as bare Parameters on one module, used through F.linear."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(2 * dim, dim) * 0.1)
        self.w2 = nn.Parameter(torch.randn(dim, 2 * dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.linear(torch.relu(F.linear(x, self.w1)), self.w2)


class BareNet(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(BareBlock(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(1)


class SlicedQKVBlock(nn.Module):
    """A fused qkv split by ``index_select`` (a layout the dataflow does not show: the rows are picked by a
    tensor), by ``narrow``, by slices or by chunk, its three parts read as ``order`` (``"kqv"``: the first
    rows are the keys)."""

    def __init__(self, dim: int = 64, heads: int = 4, split: str = "index_select", order: str = "qkv"):
        super().__init__()
        self.dim, self.heads, self.split, self.order = dim, heads, split, order
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x)
        if self.split == "index_select":
            parts = [qkv.index_select(-1, torch.arange(i * d, (i + 1) * d)) for i in range(3)]
        elif self.split == "narrow":
            parts = [qkv.narrow(-1, i * d, d) for i in range(3)]
        elif self.split == "slice":
            parts = [qkv[..., i * d:(i + 1) * d] for i in range(3)]
        else:
            chunks = qkv.chunk(3, dim=-1)
            parts = [chunks[i] for i in range(3)]
        named = dict(zip(self.order, parts))
        q, k, v = (named[r].reshape(b, n, self.heads, -1).transpose(1, 2) for r in "qkv")
        return x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class SlicedQKVNet(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2, **split):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(SlicedQKVBlock(dim, **split) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(1)


class UnequalHeadsBlock(nn.Module):
    """LeViT-style attention: q and k ``key_dim`` wide per head, v ``value_dim`` wide. ``fused``: one qkv
    viewed per head and split unequally (``view(B, N, heads, -1).split([24, 24, 48], dim=3)``); else
    separate q, k, v projections of the same widths."""

    def __init__(self, dim: int = 64, heads: int = 4, key_dim: int = 24, value_dim: int = 48, fused: bool = True):
        super().__init__()
        self.heads, self.widths, self.fused = heads, [key_dim, key_dim, value_dim], fused
        if fused:
            self.qkv = nn.Linear(dim, heads * (2 * key_dim + value_dim))
        else:
            self.q, self.k = nn.Linear(dim, heads * key_dim), nn.Linear(dim, heads * key_dim)
            self.v = nn.Linear(dim, heads * value_dim)
        self.proj = nn.Linear(heads * value_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).view(b, n, self.heads, -1).split(self.widths, dim=3)
        else:
            q, k, v = (layer(x).view(b, n, self.heads, -1) for layer in (self.q, self.k, self.v))
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        attn = ((q @ k.transpose(-2, -1)) * self.widths[0] ** -0.5).softmax(dim=-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class UnequalHeadsNet(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2, **widths):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(UnequalHeadsBlock(dim, **widths) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(1)
