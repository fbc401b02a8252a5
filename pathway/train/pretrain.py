"""MAE pretraining of the engine's transformer for any adapter (He et al., 2022; Point-MAE for points).

The tokenizer gives everything masked autoencoding needs (contracts.md section 2): ``tokens``
(position already added), ``pos`` (reused by the decoder), ``reconstruction_targets`` (what each token
reconstructs) and ``reconstruction_loss`` (``"mse"`` for patches, ``"chamfer"`` for point groups)::

    out = tokenizer.encode(x)                           tokens, pos [B, N, D]
    targets = tokenizer.reconstruction_targets(x, out)  [B, N, P], built only here, never in fine-tuning
    keep = random subset of (1 - mask_ratio) * N tokens per item
    latent = norm(blocks(tokens[keep]))                 the encoder sees visible tokens only
    y = decoder(scatter(latent, mask_token) + pos)      small transformer, width/depth from the recipe
    loss = reconstruction(pred[masked], targets[masked])

The encoder is a :class:`TransformerModel` (its head unused), saved as ``encoder.safetensors`` in
TransformerModel keys, which ``aux.checkpoint`` (or ``model.checkpoint``) loads directly: this is how
the demo makes its own aux models.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from pathway.errors import OptionError

from .config import Recipe, batch_plan
from .data import make_loader, set_epoch
from .engine import JsonlLog, NonFiniteLossError, optimizer_step, prepare_data, seed_everything, setup, steps_in_epoch
from .model import TransformerModel, build_transformer
from .optim import adamw, base_lr
from .owned import claim_run_dir, lock_run_dir, unlock_run_dir
from .schedule import apply_lr, lr_at, step_plan

__all__ = ["MaskedAutoencoder", "chamfer_l2", "random_masking", "pretrain"]


def random_masking(n: int, batch: int, mask_ratio: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per item, indices of kept tokens ``[B, n_keep]`` and a mask ``[B, N]`` (True = masked, predicted)."""
    n_keep = max(1, round(n * (1 - mask_ratio)))
    order = torch.rand(batch, n, device=device).argsort(dim=1)
    keep = order[:, :n_keep].sort(dim=1).values
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    return keep, mask


def chamfer_l2(pred: Tensor, target: Tensor) -> Tensor:
    """Symmetric squared-L2 Chamfer distance between point sets ``[M, K, 3]`` (Point-MAE's loss), mean over M."""
    d = torch.cdist(pred.float(), target.float()).pow(2)  # [M, K, K]
    return d.min(dim=2).values.mean(dim=1).mean() + d.min(dim=1).values.mean(dim=1).mean()


class MaskedAutoencoder(nn.Module):
    """Encoder (a TransformerModel without its head) + a small decoder predicting the masked tokens' targets."""

    def __init__(self, encoder: TransformerModel, target_dim: int, *, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, mask_ratio: float, norm_targets: bool = False) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise OptionError(f"pretrain.mask_ratio = {mask_ratio}; it must lie strictly between 0 and 1")
        self.encoder, self.mask_ratio, self.norm_targets = encoder, mask_ratio, norm_targets
        self.loss_kind = encoder.tokenizer.reconstruction_loss
        if self.loss_kind not in ("mse", "chamfer"):
            raise OptionError(f"tokenizer reconstruction_loss {self.loss_kind!r}; allowed: 'mse', 'chamfer'")
        d = encoder.embed_dim
        self.decoder_embed = nn.Linear(d, decoder_dim)
        self.decoder_pos = nn.Linear(d, decoder_dim)  # the tokenizer's position embedding, projected
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, target_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The encoder's (as in fine-tuning), under this wrapper's names."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction loss of one batch."""
        enc = self.encoder
        out = enc.tokenizer.encode(x)
        b, n, d = out.tokens.shape
        keep, mask = random_masking(n, b, self.mask_ratio, x.device)
        visible = out.tokens.gather(1, keep[..., None].expand(-1, -1, d))
        visible_pos = out.pos.expand(b, -1, -1).gather(1, keep[..., None].expand(-1, -1, d))
        if enc.cls_token is not None:
            visible = torch.cat([enc.cls_token.expand(b, -1, -1), visible], dim=1)
        latent = enc.norm(enc.run_blocks(visible, visible_pos)[0])
        latent = self.decoder_embed(latent[:, -keep.shape[1]:])  # drop the class token
        full = self.mask_token.expand(b, n, -1).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, full.shape[-1]), latent)
        full = full + self.decoder_pos(out.pos.expand(b, -1, -1))
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(full)))  # [B, N, P]
        target = enc.tokenizer.reconstruction_targets(x, out)
        if self.loss_kind == "chamfer":
            pts = target.shape[-1] // 3
            return chamfer_l2(pred[mask].view(-1, pts, 3), target[mask].view(-1, pts, 3))
        if self.norm_targets:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return F.mse_loss(pred[mask].float(), target[mask].float())


def pretrain(recipe: Recipe, *, progress: bool = True) -> dict[str, Any]:
    """MAE-pretrain ``model`` on the recipe's training split; write ``encoder.safetensors`` and ``pretrain.jsonl``.

    Uses the recipe's ``data``, ``model``, ``optim`` (no layer decay) and ``train`` (epochs, max_steps,
    seed, log_every) sections and ``pretrain`` for the masking and decoder. Single process.
    """
    from safetensors.torch import save_file

    import pathway

    ctx = setup(recipe)
    if ctx.world > 1:  # no DDP wrapper, sampler or rank-0 writes here: refuse rather than train each rank alone
        raise OptionError(f"pathway pretrain runs in one process, but {ctx.world} were started (torchrun); "
                          f"start it without torchrun")
    t, o, p = recipe.train, recipe.optim, recipe.pretrain
    adapter = prepare_data(recipe, ctx)
    dataset = adapter.dataset(recipe.data.train_split, train=True)
    loader, sampler = make_loader(dataset, batch_size=recipe.data.batch_size, num_workers=recipe.data.num_workers,
                                  seed=t.seed, shuffle=True)
    seed_everything(t.seed)
    encoder = build_transformer(recipe, adapter)
    with torch.no_grad():  # the reconstruction target's size per token
        probe = adapter.example_input()[None]
        target_dim = encoder.tokenizer.reconstruction_targets(probe, encoder.tokenizer.encode(probe)).shape[-1]
    mae = MaskedAutoencoder(encoder, target_dim, decoder_dim=p.decoder_dim, decoder_depth=p.decoder_depth,
                            decoder_heads=p.decoder_heads, mask_ratio=p.mask_ratio, norm_targets=p.norm_targets)
    mae.to(ctx.device).train()
    plan = batch_plan(recipe, ctx.world)
    lr = base_lr(recipe, plan.global_batch)
    # no decay on 1-D tensors, biases and the encoder's no_weight_decay() (learned position embedding, cls token)
    optimizer = adamw(pathway.param_groups(mae, lr, o.weight_decay), recipe, lr)
    steps_per_epoch = steps_in_epoch(recipe, loader, len(dataset), plan)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
    total, warmup = step_plan(steps_per_epoch, t.epochs, t.max_steps, o.warmup_epochs)
    run_dir = claim_run_dir(recipe.run_dir)
    lock_run_dir(run_dir)  # a second pretraining into the same folder is refused, not interleaved
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    (run_dir / "pretrain.jsonl").unlink(missing_ok=True)
    log = JsonlLog(run_dir / "pretrain.jsonl", main=True)
    ctx.log(f"MAE pretraining: {adapter.name} tokens, loss {mae.loss_kind}, mask {p.mask_ratio}, "
            f"{total} steps, lr {lr:.3g}, decoder {p.decoder_depth} x {p.decoder_dim}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"mae {recipe.run_name}", dynamic_ncols=True, file=sys.stderr)

    def loss_of(batch: Any) -> tuple[Tensor, int]:
        x = batch[0]
        return mae(x), x.shape[0]

    def stop(value: float) -> None:
        raise NonFiniteLossError(f"MAE loss is {value} at step {step}; lower optim.blr or set optim.clip_grad")

    step, epoch, losses = 0, 0, []
    while step < total:
        set_epoch(loader, sampler, epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            if step >= total:
                break
            apply_lr(optimizer, lr_at(step, base_lr=lr, total_steps=total, warmup_steps=warmup, min_lr=o.min_lr))
            loss_sum, _ = optimizer_step(mae, batches, loss_of, optimizer, scaler, ctx, plan.accum_steps, o.clip_grad,
                                         stop, repeat_step=o.repeat_step)
            step += 1
            losses.append(loss_sum)
            if step % t.log_every == 0 or step == total:
                log.write(step=step, epoch=epoch, loss=loss_sum)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum:.4f}")
                bar.update(1)
        epoch += 1
    if bar is not None:
        bar.close()
    path = run_dir / "encoder.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    save_file(state, str(path), metadata={"format": "pathway", "layout": "TransformerModel", "kind": "mae-encoder",
                                          "adapter": adapter.name})
    ctx.log(f"saved MAE encoder: {path} (loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    unlock_run_dir(run_dir)
    return {"encoder": str(path), "first_loss": losses[0], "last_loss": losses[-1], "steps": step}
