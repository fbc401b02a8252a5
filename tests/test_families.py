"""connect across architecture families: every pairing right or refused, every weight counted.

One table of small random-init target <- aux pairs (timm, torchvision, Hugging Face, torch.nn), each
row saying where its attention rows live. A paired row checks, on the tensors ``connect`` placed,
q <- q, k <- k and v <- v head by head; that the report lists exactly the weights the forward reads
(ground truth: the parameters a backward pass reaches) and counts the body ones in its coverage;
that lambda 0 changes nothing, fold equals the connected model at random lambdas, the folded
weights load strictly into a fresh model, and fold keeps the parameter order. Refused rows check
the error and what it names. ``pytest -s`` prints connect's time on each row.
"""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
import toy_models as toys
from torch.utils._pytree import tree_flatten

import pathway
from pathway.errors import LayoutError
from pathway.inputs import derive_inputs
from pathway.modules import pathway_sites, plain_parameters
from pathway.trace import call_with

DIM, HEADS = 64, 4


# ----------------------------------------------------------------------------- the models


def _tf():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def neox():
    tf = _tf()
    return tf.GPTNeoXModel(tf.GPTNeoXConfig(hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=2,
                                            intermediate_size=4 * DIM, vocab_size=100))


def bloom():
    tf = _tf()
    return tf.BloomModel(tf.BloomConfig(hidden_size=DIM, n_head=HEADS, n_layer=2, vocab_size=100))


def falcon(multi_query: bool = False):
    """``multi_query=False``: Falcon-RW (per-head interleaved qkv); True: Falcon-7B (MQA, parallel block)."""
    tf = _tf()
    return tf.FalconModel(tf.FalconConfig(hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=2,
                                          vocab_size=100, new_decoder_architecture=False, multi_query=multi_query,
                                          parallel_attn=multi_query, alibi=not multi_query, bias=not multi_query))


def falcon40b():
    """The new decoder architecture: grouped-query rows [group, (queries, key, value), head_dim]."""
    tf = _tf()
    return tf.FalconModel(tf.FalconConfig(hidden_size=DIM, num_attention_heads=HEADS, num_kv_heads=2,
                                          num_hidden_layers=2,
                                          vocab_size=100, new_decoder_architecture=True))


def phi():
    tf = _tf()
    return tf.PhiModel(tf.PhiConfig(hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=2,
                                    intermediate_size=4 * DIM, vocab_size=100))


def gptj():
    tf = _tf()
    return tf.GPTJModel(tf.GPTJConfig(n_embd=DIM, n_head=HEADS, n_layer=2, vocab_size=100, n_positions=64,
                                      rotary_dim=8))


def llama(kv_heads: int = HEADS):
    tf = _tf()
    return tf.LlamaModel(tf.LlamaConfig(hidden_size=DIM, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                                        num_hidden_layers=2, intermediate_size=4 * DIM, vocab_size=100))


def phi3():
    tf = _tf()
    return tf.Phi3Model(tf.Phi3Config(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS,
                                      num_key_value_heads=HEADS, intermediate_size=4 * DIM, vocab_size=100,
                                      pad_token_id=0))


def deberta_v2(share_att_key: bool):
    """Disentangled attention: the content key also meets the position queries (p2c), ``key @ pos_q^T``."""
    tf = _tf()
    return tf.DebertaV2Model(tf.DebertaV2Config(hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=2,
                                                intermediate_size=4 * DIM, vocab_size=100, relative_attention=True,
                                                pos_att_type=["p2c", "c2p"], share_att_key=share_att_key,
                                                max_relative_positions=16, position_buckets=8))


def t5_encoder():
    tf = _tf()
    return tf.T5EncoderModel(tf.T5Config(d_model=DIM, d_kv=DIM // HEADS, num_heads=HEADS, num_layers=4,
                                         d_ff=4 * DIM, vocab_size=100))


def albert():
    tf = _tf()
    return tf.AlbertModel(tf.AlbertConfig(hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=2,
                                          intermediate_size=4 * DIM, vocab_size=100, embedding_size=32))


def whisper_encoder():
    tf = _tf()
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    return WhisperEncoder(tf.WhisperConfig(d_model=DIM, encoder_layers=2, encoder_attention_heads=HEADS,
                                           encoder_ffn_dim=4 * DIM, num_mel_bins=16, max_source_positions=32,
                                           vocab_size=100, pad_token_id=0))


def _speech(kind: str):
    tf = _tf()
    config, model = {"wav2vec2": (tf.Wav2Vec2Config, tf.Wav2Vec2Model),
                     "hubert": (tf.HubertConfig, tf.HubertModel)}[kind]
    return model(config(hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=2, intermediate_size=4 * DIM,
                        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=4))


def torch_encoder(batch_first: bool):
    layer = nn.TransformerEncoderLayer(DIM, HEADS, 4 * DIM, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def tv_swin():
    return torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5)


def vit():
    return toys.timm_vit(dim=DIM, heads=HEADS)


def bert(depth: int = 2):
    return toys.hf_bert(depth=depth, dim=DIM, heads=HEADS)


# ----------------------------------------------------------------------------- where q, k, v live


@dataclass(frozen=True)
class Rows:
    """Block ``{i}``'s q, k, v rows: one fused weight (``[q | k | v]`` or per head) or three weights."""

    names: tuple[str, ...]
    interleaved: bool = False      # fused rows laid out [head, (q, k, v), head_dim]
    older: tuple[str, ...] = ()    # the names transformers 4.x gives them, where they differ

    def roles(self, weights: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """role -> rows as [head, head_dim, in]."""
        names = self.names if self.names[0].format(i=i) in weights or not self.older else self.older
        if len(names) == 3:
            return {r: weights[n.format(i=i)].reshape(HEADS, -1, DIM) for r, n in zip("qkv", names)}
        w = weights[names[0].format(i=i)]
        heads = w.reshape(HEADS, 3, -1, DIM) if self.interleaved else w.reshape(3, HEADS, -1, DIM).transpose(0, 1)
        return {r: heads[:, j] for j, r in enumerate("qkv")}


def split(prefix: str, q: str, k: str, v: str) -> Rows:
    return Rows(tuple(f"{prefix}.{n}.weight" for n in (q, k, v)))


VIT = Rows(("blocks.{i}.attn.qkv.weight",))
BERT = split("encoder.layer.{i}.attention.self", "query", "key", "value")
NEOX = Rows(("layers.{i}.attention.query_key_value.weight",), interleaved=True)
BLOOM = Rows(("h.{i}.self_attention.query_key_value.weight",), interleaved=True)
PROJ = split("layers.{i}.self_attn", "q_proj", "k_proj", "v_proj")          # LLaMA, Phi, Whisper
DEBERTA = split("encoder.layer.{i}.attention.self", "query_proj", "key_proj", "value_proj")
SPEECH = split("encoder.layers.{i}.attention", "q_proj", "k_proj", "v_proj")   # wav2vec2, HuBERT


@dataclass(frozen=True)
class Case:
    id: str
    target: Callable[[], nn.Module]
    aux: Callable[[], nn.Module]
    target_rows: Rows | None       # None: nothing to check head by head (paired by name, or k/v heads selected)
    aux_rows: Rows | None
    body: int                      # body weights of the connected kinds the target's forward reads
    options: dict[str, Any] = field(default_factory=dict)


PAIRED = [
    Case("gpt_neox <- timm vit (interleaved <- [q|k|v])", neox, vit, NEOX, VIT, 8),
    Case("timm vit <- gpt_neox ([q|k|v] <- interleaved)", vit, neox, VIT, NEOX, 8),
    Case("gpt_neox <- bert (interleaved <- split q, k, v)", neox, bert, NEOX, BERT, 8),
    Case("bert <- gpt_neox (split <- interleaved)", bert, neox, BERT, NEOX, 12),
    Case("bloom <- timm vit", bloom, vit, BLOOM, VIT, 8),
    Case("falcon-rw <- bert", falcon, bert, BLOOM, BERT, 8),
    Case("phi (parallel attention + mlp) <- timm vit", phi, vit, PROJ, VIT, 12),
    Case("gpt-j (parallel attention + mlp) <- bert", gptj, bert, split("h.{i}.attn", "q_proj", "k_proj", "v_proj"),
         BERT, 12),
    Case("phi-3 (qkv sliced into [q | k | v]) <- llama", phi3, llama, Rows(("layers.{i}.self_attn.qkv_proj.weight",)),
         PROJ, 8),
    Case("llama <- phi-3", llama, phi3, PROJ, Rows(("layers.{i}.self_attn.qkv_proj.weight",)), 14),
    Case("falcon-7b (MQA, parallel block) <- timm vit, on_shape_mismatch='select'", lambda: falcon(multi_query=True),
         vit, None, None, 8, {"on_shape_mismatch": "select"}),
    Case("timm vit <- llama (SwiGLU: fc1 <- up, fc2 <- down)", vit, llama, VIT, PROJ, 8),
    Case("timm vit <- llama GQA + SwiGLU, on_shape_mismatch='select'", vit, lambda: llama(kv_heads=2), None, None, 8,
         {"on_shape_mismatch": "select"}),
    Case("llama GQA <- timm vit, on_shape_mismatch='select'", lambda: llama(kv_heads=2), vit, None, None, 8,
         {"on_shape_mismatch": "select", "exclude": [r"\.mlp\."]}),
    Case("deberta-v2 (share_att_key: key_proj also projects positions) <- bert", lambda: deberta_v2(True), bert,
         DEBERTA, BERT, 12),
    Case("deberta-v2 (own pos_key_proj / pos_query_proj, left out) <- bert", lambda: deberta_v2(False), bert,
         DEBERTA, BERT, 12, {"exclude": [r"\.pos_(key|query)_proj\."]}),
    Case("t5 encoder (block 0 holds the position bias) <- bert", t5_encoder, lambda: bert(4),
         split("encoder.block.{i}.layer.0.SelfAttention", "q", "k", "v"), BERT, 24),
    Case("whisper encoder <- timm vit", whisper_encoder, vit, PROJ, VIT, 12),
    Case("wav2vec2 <- timm vit", lambda: _speech("wav2vec2"), vit, SPEECH, VIT, 12),
    Case("hubert <- bert", lambda: _speech("hubert"), bert, SPEECH, BERT, 12),
    Case("ast <- timm vit", lambda: toys.hf_ast(dim=DIM, heads=HEADS), vit,
         Rows(split("layers.{i}.attention", "q_proj", "k_proj", "v_proj").names,
              older=split("encoder.layer.{i}.attention.attention", "query", "key", "value").names), VIT, 12),
    Case("nn.TransformerEncoder batch_first <- timm vit", lambda: torch_encoder(True), vit,
         Rows(("layers.{i}.self_attn.in_proj_weight",)), VIT, 8),
    Case("nn.TransformerEncoder (seq, batch) <- bert", lambda: torch_encoder(False), bert,
         Rows(("layers.{i}.self_attn.in_proj_weight",)), BERT, 8),
    Case("torchvision swin (fx.wrap'd attention) <- itself", tv_swin, tv_swin, None, None, 16),
    Case("timm resnet18 (every residual block) <- torchvision resnet18",
         lambda: timm.create_model("resnet18", num_classes=5),
         lambda: torchvision.models.resnet18(num_classes=5), None, None, 19, {"kinds": ("conv",)}),
]


# ----------------------------------------------------------------------------- helpers


def output(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = call_with(model, inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def weights_read(model: nn.Module, inputs: Any, kinds: tuple[str, ...]) -> set[str]:
    """Weights of ``kinds`` that one backward pass reaches: what the forward really reads."""
    model.zero_grad()
    out = call_with(model, inputs)
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    sum(t.float().square().sum() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
        and t.is_floating_point()).backward()
    found = set()
    for path, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.grad is None or isinstance(module, nn.Embedding) or not name.endswith("weight"):
                continue
            linear = "linear" in kinds and p.dim() == 2
            conv = "conv" in kinds and p.dim() >= 3 and isinstance(module, nn.modules.conv._ConvNd)
            if linear or conv:
                found.add(f"{path}.{name}" if path else name)
    model.zero_grad(set_to_none=True)
    return found


def listed(report) -> list[str]:
    return [*(p.target for p in report.pairs), *report.unpaired, *report.unpaired_outside_body, *report.excluded,
            *report.outside_segments]


def placed_aux(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: pathways[0].aux_weight.detach() for name, _, _, pathways in pathway_sites(model)}


# ----------------------------------------------------------------------------- paired families


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PAIRED])
def test_family_pairs_right_and_counts_every_weight(case: Case):
    target, aux = case.target().eval(), case.aux().eval()
    kinds = case.options.get("kinds", ("linear",))
    inputs, _ = derive_inputs(target)
    truth = weights_read(target, inputs, kinds)
    names = [n for n, _ in target.named_parameters()]
    keys = list(target.state_dict())
    with torch.no_grad():
        before = output(target, inputs)

    start = time.perf_counter()
    report = pathway.connect(target, aux, **case.options)
    print(f"\n  {case.id}: connect {time.perf_counter() - start:.2f} s, coverage {report.coverage}, "
          f"read by {report.target_reader.split(' (')[0]} / {report.aux_reader.split(' (')[0]}")

    assert report.coverage == (case.body, case.body)
    assert sorted(listed(report)) == sorted(truth)          # each weight read, in exactly one list
    if case.target_rows is not None:
        placed, aux_weights = placed_aux(target), plain_parameters(aux)
        for i in (0, report.depth[0] - 1):
            got = case.target_rows.roles(placed, i)
            want = case.aux_rows.roles(aux_weights, report.block_map[i])
            for role in "qkv":
                assert torch.equal(got[role], want[role]), f"block {i}: target {role} rows are not aux {role} rows"
    with torch.no_grad():
        assert torch.equal(output(target, inputs), before)   # lambda 0 leaves outputs unchanged
        for lam in pathway.lambdas(target).values():
            lam.uniform_(-0.5, 0.5)
        connected = output(target, inputs)
    pathway.fold(target)
    with torch.no_grad():
        torch.testing.assert_close(output(target, inputs), connected, rtol=1e-4, atol=1e-5)
    assert [n for n, _ in target.named_parameters()] == names and list(target.state_dict()) == keys
    fresh = case.target().eval()
    fresh.load_state_dict(target.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(output(fresh, inputs), output(target, inputs))


def test_swin_attention_hidden_from_fx_is_read_at_runtime_or_listed():
    report = pathway.plan(tv_swin(), tv_swin())
    assert report.target_reader.startswith("runtime recorder") and "does not open" in report.target_reader
    assert report.coverage == (16, 16)
    fx_only = pathway.plan(tv_swin(), tv_swin(), tracer="fx")
    hidden = {n: why for n, why in fx_only.unpaired.items() if "tracer='runtime'" in why}
    assert "features.1.0.attn.qkv.weight" in hidden and "features.1.0.attn.proj.weight" in hidden
    assert fx_only.coverage[1] > 16    # the hidden weights are counted, not dropped


def test_t5_block_zero_is_a_block():
    report = pathway.plan(t5_encoder(), bert(4))
    assert report.depth == (4, 4) and report.block_map == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- refused, with the reason


@pytest.mark.parametrize("make_target, make_aux, error, message", [
    pytest.param(lambda: falcon(multi_query=True), vit, pathway.ShapeMismatchError,
                 r"multi-query attention \(MQA: 4 query heads, 1 key/value head\).*on_shape_mismatch='select'",
                 id="falcon-7b (MQA) <- timm vit"),
    pytest.param(lambda: llama(kv_heads=2), vit, pathway.GroupSizeError,
                 r"grouped-query attention \(GQA: 4 query heads, 2 key/value heads\)", id="llama GQA <- timm vit"),
    pytest.param(vit, lambda: llama(kv_heads=2), pathway.GroupSizeError, r"the aux uses grouped-query attention",
                 id="timm vit <- llama GQA"),
    pytest.param(falcon40b, vit, LayoutError, r"viewed as \[2, 4, 16\].*grouped-query attention",
                 id="falcon-40b (GQA rows per group) <- timm vit"),
    pytest.param(vit, toys.SlicedQKVNet, LayoutError, r"blocks\.0\.qkv\.weight \[192, 64\].*no view, split or slices",
                 id="timm vit <- fused qkv cut by index_select (layout unreadable)"),
    pytest.param(vit, lambda: toys.SlicedQKVNet(split="chunk", order="kqv"), LayoutError,
                 r"rows 0:64 -> k, rows 64:128 -> q, rows 128:192 -> v", id="timm vit <- fused qkv chunked as k, q, v"),
    pytest.param(vit, lambda: toys.SlicedQKVNet(split="slice", order="kqv"), LayoutError,
                 r"rows 0:64 -> k, rows 64:128 -> q, rows 128:192 -> v", id="timm vit <- fused qkv sliced as k, q, v"),
])
def test_family_refused_with_what_it_is(make_target, make_aux, error, message):
    with pytest.raises(error, match=re.compile(message, re.DOTALL)):
        pathway.plan(make_target(), make_aux())


def test_grouped_query_pairs_are_kept_flagged_under_select():
    report = pathway.plan(falcon(multi_query=True), vit(), on_shape_mismatch="select")
    qkv = next(p for p in report.pairs if p.target == "h.0.self_attention.query_key_value.weight")
    assert qkv.aux == ("blocks.0.attn.qkv.weight",) and {"shape_mismatch", "gqa"} <= set(qkv.flags)
    assert qkv.heads == (4, 4) and qkv.kv_heads == (1, 4)
    report = pathway.plan(llama(kv_heads=2), vit(), on_shape_mismatch="select", exclude=[r"\.mlp\."])
    roles = {p.target.split(".")[-2]: (p.out_slice, "gqa" in p.flags) for p in report.pairs if p.target_block == 0}
    assert roles["q_proj"] == ((0, 64), False) and roles["k_proj"] == ((64, 128), True)
    assert roles["v_proj"] == ((128, 192), True)


def test_an_unreadable_layout_is_set_by_hand_with_pairs():
    target, aux = toys.SlicedQKVNet(), vit()
    pairs = {f"blocks.{i}.qkv.weight": {"aux": f"blocks.{i}.attn.qkv.weight", "layout": ""} for i in range(2)}
    report = pathway.plan(target, aux, pairs=pairs, allow_partial=True)
    assert {p.target: p.transform for p in report.pairs}["blocks.0.qkv.weight"] == "override"
    interleaved = pathway.plan(neox(), aux, pairs={"layers.0.attention.query_key_value.weight": {
        "aux": "blocks.0.attn.qkv.weight", "layout": "heads", "heads": HEADS}})
    pair = next(p for p in interleaved.pairs if p.target == "layers.0.attention.query_key_value.weight")
    assert pair.layout == ("heads", "") and pair.transform == "override+to_heads[4]"
    with pytest.raises(pathway.OptionError, match="'heads'"):
        pathway.plan(neox(), aux, pairs={"layers.0.attention.query_key_value.weight": {
            "aux": "blocks.0.attn.qkv.weight", "layout": "heads"}})


@pytest.mark.parametrize("make_aux, aux_rows", [(bert, BERT), (neox, NEOX)], ids=["bert", "gpt_neox"])
def test_albert_target_names_every_shared_weight_and_the_fix(make_aux, aux_rows):
    target, aux = albert(), make_aux()
    with pytest.raises(pathway.CompetingPairsError, match="6 target weight") as caught:
        pathway.plan(target, aux)
    fix = ast.literal_eval(re.search(r"pairs=(\{.*?\}) keeps", str(caught.value)).group(1))
    assert len(fix) == 6 and all(name in str(caught.value) for name in fix)
    report = pathway.connect(target, aux, pairs=fix)     # the fix as printed: whole weights, rows, layouts
    assert report.coverage == (6, 6)
    shared = split("encoder.albert_layer_groups.0.albert_layers.0.attention", "query", "key", "value")
    got, want = shared.roles(placed_aux(target), 0), aux_rows.roles(plain_parameters(aux), 0)
    assert all(torch.equal(got[r], want[r]) for r in "qkv")
