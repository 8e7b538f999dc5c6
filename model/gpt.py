"""The GPT-MoE decoder: pre-LayerNorm blocks, causal SDPA attention, learned positions, tied embeddings.

Shape suffixes / comments: B batch, T new tokens, S keys (cached + new), C model dim, H heads, Dh head dim,
V vocabulary.

Single-device code. Parallelism comes in from outside: the expert-parallel group through DeepSpeed
(`MoE.set_deepspeed_parallelism`) or `model.parallel.set_expert_parallel_group`, and DeepSpeed-Ulysses
sequence parallelism by wrapping each block's `attn.core` (`model.parallel.apply_sequence_parallel`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import GPTMoEConfig
from .moe.layer import MLP, MoELayer, MoEOutput, moe_layers


class KVCache:
    """Past keys and values per layer, (B, H, S, Dh): the layout and `update` signature of transformers'
    DynamicCache, so attention takes either.

    `keys[i]` / `values[i]` hold layer i's cached positions. Outside autograd (decoding) they are views into
    buffers with room to grow: a step writes its new positions in place, where concatenating would copy the
    whole cache every step (B x S x D per layer, which dominates a batched step's memory traffic); a full
    buffer doubles, up to `max_length` (the model's seq_len) when given. Assigning other tensors to
    `keys` / `values` (the Decoder drops finished rows and merges new ones) is allowed: the next update copies
    them into a fresh buffer.
    """

    def __init__(self, max_length: int | None = None):
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.max_length = max_length
        # per layer: (key buffer, value buffer, the views of them last handed out as keys[i] / values[i])
        self._buffers: list[tuple[Tensor, Tensor, Tensor, Tensor] | None] = []

    def update(self, k: Tensor, v: Tensor, layer_idx: int, cache_kwargs=None) -> tuple[Tensor, Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
            self._buffers.append(None)
            return k, v
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if k.requires_grad or old_k.requires_grad:  # autograd needs the tensors it saved left unchanged
            self.keys[layer_idx] = torch.cat([old_k, k], dim=2)
            self.values[layer_idx] = torch.cat([old_v, v], dim=2)
            return self.keys[layer_idx], self.values[layer_idx]
        s, t = old_k.shape[2], k.shape[2]
        buffers = self._buffers[layer_idx]
        if buffers is None or buffers[2] is not old_k or buffers[3] is not old_v or s + t > buffers[0].shape[2]:
            room = 2 * (s + t) if self.max_length is None else max(min(2 * (s + t), self.max_length), s + t)
            key_buf = old_k.new_empty(*old_k.shape[:2], room, old_k.shape[3])
            value_buf = old_v.new_empty(*old_v.shape[:2], room, old_v.shape[3])
            key_buf[:, :, :s] = old_k
            value_buf[:, :, :s] = old_v
        else:
            key_buf, value_buf = buffers[:2]
        key_buf[:, :, s:s + t] = k
        value_buf[:, :, s:s + t] = v
        self.keys[layer_idx], self.values[layer_idx] = key_buf[:, :, :s + t], value_buf[:, :, :s + t]
        self._buffers[layer_idx] = (key_buf, value_buf, self.keys[layer_idx], self.values[layer_idx])
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx < len(self.keys) else 0


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(Dh)) v on (B, T, H, Dh) tensors: the part DeepSpeed-Ulysses wraps
    (`DistributedAttention(core, sp_group, scatter_idx=2, gather_idx=1)` with batch_dim_idx=0)."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = True) -> Tensor:
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal and attn_mask is None)
        return y.transpose(1, 2)  # (B, T, H, Dh)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj.scaled_init = True
        self.core = AttentionCore(config.dropout)
        self.recompute_core = config.recompute == "sel"

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, cache=None) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, T, H, Dh)
        if cache is not None:
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)  # (B, H, S, Dh)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.recompute_core and self.training and torch.is_grad_enabled():
            # Selective recompute: keep only q, k, v; rebuild the attention core in backward.
            y = checkpoint(self.core, q, k, v, attn_mask, is_causal, use_reentrant=False)
        else:
            y = self.core(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.reshape(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm transformer layer; its feed-forward part is a dense MLP or a MoE layer."""

    def __init__(self, config: GPTMoEConfig, layer_idx: int, num_experts: int = 0, ep_rank: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.is_moe = num_experts > 0
        if self.is_moe:
            self.mlp = MoELayer(config, num_experts, ep_rank=ep_rank)
        else:
            self.mlp = MLP(config.hidden_size, config.ffn_hidden_size, bias=True)
            self.mlp.fc2.scaled_init = True
        self.drop = nn.Dropout(config.dropout)
        self.recompute_layer = config.recompute == "full"

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = True, cache=None):
        if self.recompute_layer and self.training and torch.is_grad_enabled() and cache is None:
            # Full recompute: keep only the layer input; torch.utils.checkpoint restores the RNG state, so
            # dropout, router jitter and random token selection replay identically.
            return checkpoint(self._forward, x, attn_mask, is_causal, None, use_reentrant=False)
        return self._forward(x, attn_mask, is_causal, cache)

    def _forward(self, x: Tensor, attn_mask, is_causal, cache) -> tuple[Tensor, MoEOutput | None]:
        x = x + self.drop(self.attn(self.ln1(x), attn_mask, is_causal, cache))
        h = self.ln2(x)
        if self.is_moe:
            moe = self.mlp(h)
            return x + self.drop(moe.hidden), moe
        return x + self.drop(self.mlp(h)), None


@dataclass
class GPTMoEOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None  # LM cross-entropy, mean over labels != -100
    aux_loss: Tensor  # aux_loss_coef * sum over MoE layers of the balancing loss (0 for dense)
    z_loss: Tensor  # z_loss_coef * sum over MoE layers of the router z-loss
    # per MoE layer: layer index, expert_counts (E,), dropped_fraction, router entropy, aux_loss and z_loss
    # (unweighted)
    moe_stats: list[dict] = field(default_factory=list)
    past_key_values: object | None = None

    @property
    def total_loss(self) -> Tensor | None:
        """What training minimises: LM loss + weighted balancing loss + weighted z-loss."""
        return None if self.loss is None else self.loss + self.aux_loss + self.z_loss


def shift_labels(labels_BT: Tensor) -> Tensor:
    """Labels aligned with input_ids (transformers' convention) -> labels for GPTMoE.forward: position t is
    scored on the token at t+1; the last position has nothing to predict (-100)."""
    return F.pad(labels_BT[:, 1:], (0, 1), value=-100)


class GPTMoE(nn.Module):
    """GPT decoder with MoE feed-forward layers every `config.moe_layer_interval` layers.

    forward(input_ids, labels=None, ...) -> GPTMoEOutput. `labels` come shifted already: labels[:, t] is the
    token after input_ids[:, t]. The pretraining loop passes input_ids = sample[:, :-1] and labels =
    sample[:, 1:]; labels in the transformers convention (aligned with input_ids: fine-tuning data, the
    Hugging Face wrapper in model/hf.py) go through `shift_labels` first. Labels of -100 are ignored.

    `ep_rank` (this process's rank in its expert-parallel group, 0..ep_size-1; see
    `model.parallel.expert_parallel_rank`) places its slice of the experts; it must be given when
    `config.ep_size > 1`. Parameter names do not depend on it: local expert i of rank r is global expert
    r * E_local + i, which is how DeepSpeed numbers its per-expert checkpoint files.
    """

    def __init__(self, config: GPTMoEConfig, ep_rank: int | None = None):
        super().__init__()
        self.config = config
        if ep_rank is None and config.ep_size > 1:
            raise ValueError(f"GPTMoE: ep_size={config.ep_size} needs this process's expert-parallel rank: "
                             "GPTMoE(config, ep_rank=model.parallel.expert_parallel_rank(rank, ep_size))")
        ep_rank = ep_rank or 0
        experts = dict(zip(config.moe_layer_indices(), config.experts_per_moe_layer()))
        self.wte = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.seq_len, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, experts.get(i, 0), ep_rank) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Tied: logits use wte's weight directly, so the state dict holds it once (safetensors-friendly).
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.padded_vocab_size,
                                                                    bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2/Megatron init: N(0, init_std) weights, zero biases, output projections of each residual
        branch scaled by 1/sqrt(2 * layers)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, out_std if getattr(m, "scaled_init", False) else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in moe_layers(self):
            layer.reset_parameters(std, out_std)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, past_key_values=None, use_cache: bool = False,
                logits_to_keep: int = 0) -> GPTMoEOutput:
        """input_ids (B, T). position_ids (B or 1, T): defaults to past..past+T-1; sequence parallelism
        passes each rank's offsets. attention_mask (B, S): 1 for real tokens, 0 for padding (optional).
        past_key_values: a KVCache (or transformers Cache) to extend; created when use_cache is set.
        logits_to_keep: logits of the last N positions only (0 = all); generation needs the last one."""
        b, t = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(max_length=self.config.seq_len)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if past + t > self.config.seq_len:
                raise ValueError(f"{past} cached + {t} new positions exceed the model's seq_len={self.config.seq_len}")
            position_ids = torch.arange(past, past + t, device=input_ids.device).unsqueeze(0)
        attn_mask, is_causal = self._attention_mask(attention_mask, past, t, input_ids.device)

        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)
        moe_outputs: list[tuple[int, MoEOutput]] = []
        for i, block in enumerate(self.blocks):
            x, moe = block(x, attn_mask, is_causal, cache)
            if moe is not None:
                moe_outputs.append((i, moe))
        if logits_to_keep:
            if labels is not None:
                raise ValueError("logits_to_keep needs labels=None: the loss reads every position")
            x = x[:, -logits_to_keep:]
        x = self.ln_f(x)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        # The rows of the real vocabulary only (a contiguous view): the padding rows' logits are never read,
        # and slicing the logits instead would copy them and, in backward, fill a padded gradient.
        logits = F.linear(x, weight[:self.config.vocab_size])  # (B, T, V)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100)
        zero = x.new_zeros((), dtype=torch.float32)
        aux = sum((m.aux_loss for _, m in moe_outputs), zero) * self.config.aux_loss_coef
        z = sum((m.z_loss for _, m in moe_outputs), zero) * self.config.z_loss_coef
        stats = [{"layer": i, "expert_counts": m.expert_counts, "dropped_fraction": m.dropped_fraction,
                  "entropy": m.entropy, "aux_loss": m.aux_loss.detach(), "z_loss": m.z_loss.detach()}
                 for i, m in moe_outputs]
        return GPTMoEOutput(logits, loss, aux, z, stats, cache if use_cache or past_key_values is not None else None)

    @staticmethod
    def _attention_mask(attention_mask: Tensor | None, past: int, t: int, device) -> tuple[Tensor | None, bool]:
        """(mask, is_causal) for SDPA: no mask on the plain causal path, so SDPA can use its fused kernels."""
        if attention_mask is None and past == 0:
            return None, True
        if attention_mask is None and t == 1:
            return None, False  # one new token sees every cached one
        s = past + t
        q_pos = torch.arange(past, s, device=device)[:, None]
        k_pos = torch.arange(s, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            keys = attention_mask[:, None, None, :s].bool()  # (B, 1, 1, S)
            # A padding query still sees itself, so no row is empty (an empty row would give NaN).
            allowed = allowed & (keys | (k_pos == q_pos))
        return allowed, False

    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
                 repetition_penalty: float = 1.0) -> Tensor:
        """Sample up to max_new_tokens after input_ids (B, T) with a KV cache; returns (B, T + new).

        temperature 0 is greedy. top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p. A sequence that emits eos_id is padded with eos_id after it; generation
        stops when all have. Each row samples from its own generator, seeded from `generator` (else from
        torch's global RNG). Runs in eval mode (deterministic, dropless routing), restoring the mode after.
        Batches of prompts of different lengths, per-row settings and streaming: model.generation.Decoder.
        """
        from .generation import Decoder, Request, SamplingParams

        b, t = input_ids.shape
        if t + max_new_tokens > self.config.seq_len:
            raise ValueError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds seq_len={self.config.seq_len}")
        params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                      top_p=1.0 if top_p is None else top_p, repetition_penalty=repetition_penalty,
                      stop_token_ids=() if eos_id is None else (eos_id,))
        seeds = torch.randint(0, 2**62, (b,), generator=generator,
                              device=generator.device if generator is not None else "cpu").tolist()
        done = Decoder(self).run([Request(ids, SamplingParams(**params, seed=seed))
                                  for ids, seed in zip(input_ids.tolist(), seeds)])
        new = input_ids.new_full((b, max(len(c.token_ids) for c in done)), 0 if eos_id is None else eos_id)
        for i, c in enumerate(done):
            new[i, :len(c.token_ids)] = torch.tensor(c.token_ids)
        return torch.cat([input_ids, new], dim=1)
