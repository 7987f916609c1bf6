"""The InstructBLIP / BLIP-2 vision tower (EVA ViT-g in the checkpoints): a pre-LN ViT plus a final LayerNorm.

Parameter names follow transformers' `InstructBlipVisionModel` (identical to `Blip2VisionModel`), so its
state_dict loads as is; `from_pretrained` reads its standalone checkpoints or the `vision_model.` part of a
full InstructBLIP / BLIP-2 one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation
from .attention import attend_eager
from .base_models import PretrainedPart
from .configs import Blip2VisionConfig, InstructBlipVisionConfig
from .errors import ProcessorError
from .outputs import BaseModelOutputWithPooling


class VisionEmbeddings(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_positions, config.hidden_size))

    def positions(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings for a grid_h x grid_w patch grid; the CLS position is never resized."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.position_embedding
        dim = self.position_embedding.shape[-1]
        patch_pos = self.position_embedding[:, 1:].reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        # Same call as transformers (target size, not a scale factor) so the sampling grid matches exactly.
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([self.position_embedding[:, :1], patch_pos], dim=1)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool) -> Tensor:
        height, width = pixel_values.shape[-2:]
        if not interpolate_pos_encoding and (height, width) != (self.image_size, self.image_size):
            raise ProcessorError(
                f"the vision model expects {self.image_size}x{self.image_size} images, got {height}x{width}; "
                "resize the images or pass interpolate_pos_encoding=True"
            )
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], 1, -1)
        positions = self.positions(height // self.patch_size, width // self.patch_size)
        return torch.cat([cls, patches], dim=1) + positions.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        # One fused projection; in the checkpoints its bias is q_bias | 0 | v_bias (EVA has no key bias).
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, attentions: list[Tensor] | None = None) -> Tensor:
        """`attentions`: a list to append this layer's probabilities to (output_attentions), else None."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if attentions is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out, probs = attend_eager(q, k, v, None)
            attentions.append(probs)
        return self.projection(out.transpose(1, 2).reshape(batch, length, dim))


class VisionMLP(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: Tensor, attentions: list[Tensor] | None = None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attentions)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, x: Tensor, hidden_states: list[Tensor] | None = None, attentions: list[Tensor] | None = None
    ) -> Tensor:
        """The lists, when given, collect the input and every layer's output / every layer's attention."""
        if hidden_states is not None:
            hidden_states.append(x)
        for layer in self.layers:
            x = layer(x, attentions)
            if hidden_states is not None:
                hidden_states.append(x)
        return x


class InstructBlipVisionModel(PretrainedPart):
    config_key = "vision_config"
    checkpoint_prefix = "vision_model."
    standalone = {"InstructBlipVisionModel": InstructBlipVisionConfig, "Blip2VisionModel": Blip2VisionConfig}
    config: InstructBlipVisionConfig

    def __init__(self, config: InstructBlipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def encode(
        self,
        pixel_values: Tensor,
        interpolate_pos_encoding: bool = False,
        hidden_states: list[Tensor] | None = None,
        attentions: list[Tensor] | None = None,
    ) -> Tensor:
        """pixel_values [B, 3, H, W] -> last_hidden_state [B, 1 + num_patches, hidden] (after post_layernorm):
        the fast path, with no output record. The lists are forward's collectors."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ProcessorError(f"pixel_values must be [batch, 3, height, width], got {list(pixel_values.shape)}")
        x = self.embeddings(pixel_values, interpolate_pos_encoding)
        return self.post_layernorm(self.encoder(x, hidden_states, attentions))

    def forward(
        self,
        pixel_values: Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> BaseModelOutputWithPooling | tuple:
        """As transformers: last_hidden_state, pooler_output (the CLS state, post_layernorm applied once more, as
        there), hidden_states (embeddings, then every layer's output before post_layernorm), attentions."""
        hidden: list[Tensor] | None = [] if output_hidden_states else None
        attentions: list[Tensor] | None = [] if output_attentions else None
        last = self.encode(pixel_values, interpolate_pos_encoding, hidden, attentions)
        out = BaseModelOutputWithPooling(
            last_hidden_state=last,
            pooler_output=self.post_layernorm(last[:, 0, :]),
            hidden_states=tuple(hidden) if hidden is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
        )
        return out if return_dict is not False else out.to_tuple()


# BLIP-2's vision tower has the same parameters and maths.
Blip2VisionModel = InstructBlipVisionModel
