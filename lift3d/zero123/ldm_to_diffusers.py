"""Key conversion from the original Zero123 checkpoint (ldm / OpenAI CLIP naming) to diffusers /
transformers naming.

The UNet and VAE maps are built from the model's block structure (number of levels, resnets per
level, which levels have attention), so the same rules convert the full-size model and the tiny
test models. Each map is a list of ``(ldm_prefix, diffusers_prefix)`` pairs for whole blocks; the
names inside a block are renamed by a small per-kind table (resnet, VAE attention).
"""

from __future__ import annotations

import torch

# Inside a UNet ResBlock: ldm Sequential indices -> diffusers ResnetBlock2D attribute names.
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# Inside a VAE ResnetBlock only the shortcut is renamed.
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
# The VAE mid-block attention: 1x1 convs in ldm, linear layers in diffusers.
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_block_map(config: dict) -> list[tuple[str, str]]:
    """(ldm prefix, diffusers prefix) for every block of a UNet2DConditionModel with ``config``."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
             ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
             ("middle_block.0", "mid_block.resnets.0"), ("middle_block.1", "mid_block.attentions.0"),
             ("middle_block.2", "mid_block.resnets.1")]
    k = 1  # input_blocks.0 is conv_in
    for i in range(levels):
        for j in range(per_level):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}"))
            if down_attn[i]:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}"))
            k += 1
        if i < levels - 1:
            pairs.append((f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
            k += 1
    k = 0
    for i in range(levels):
        for j in range(per_level + 1):  # the up path has one extra resnet per level (skip concat)
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}"))
            if up_attn[i]:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}"))
            if j == per_level and i < levels - 1:
                # The upsampler follows the resnet (and the attention when the level has one).
                pairs.append((f"output_blocks.{k}.{2 if up_attn[i] else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
            k += 1
    return pairs


def vae_block_map(config: dict) -> list[tuple[str, str]]:
    """(ldm prefix, diffusers prefix) for every block of an AutoencoderKL with ``config``."""
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out"),
                  (f"{part}.norm_out", f"{part}.conv_norm_out"),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0"),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0"),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")]
    for i in range(levels):
        for j in range(per_level):
            pairs.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}"))
        if i < levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        # ldm numbers decoder levels from the bottom (highest resolution = up.0); diffusers from the top.
        up = levels - 1 - i
        for j in range(per_level + 1):
            pairs.append((f"decoder.up.{up}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}"))
        if up > 0:
            pairs.append((f"decoder.up.{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
    return pairs


def _rename(state_dict: dict, pairs: list[tuple[str, str]], inner) -> tuple[dict, list[str]]:
    """Apply a block map; ``inner(diffusers_prefix, rest, tensor)`` renames inside a block.
    Returns the converted dict and the keys no block claimed."""
    prefixes = dict(pairs)
    out, unclaimed = {}, []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest block prefix first
            target = prefixes.get(".".join(parts[:cut]))
            if target is not None:
                name, tensor = inner(target, ".".join(parts[cut:]), tensor)
                out[f"{target}.{name}"] = tensor
                break
        else:
            unclaimed.append(key)
    return out, unclaimed


def _rename_first(table: dict, rest: str) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def ldm_unet_to_diffusers(state_dict: dict, config: dict) -> tuple[dict, list[str]]:
    """``model.diffusion_model.*`` (prefix removed) -> UNet2DConditionModel keys."""

    def inner(target, rest, tensor):
        if ".resnets." in target:
            rest = _rename_first(UNET_RESNET, rest)
        return rest, tensor  # attention blocks keep their names (norm, proj_in, transformer_blocks...)

    return _rename(state_dict, unet_block_map(config), inner)


def ldm_vae_to_diffusers(state_dict: dict, config: dict) -> tuple[dict, list[str]]:
    """``first_stage_model.*`` (prefix removed) -> AutoencoderKL keys."""

    def inner(target, rest, tensor):
        if ".resnets." in target:
            rest = _rename_first(VAE_RESNET, rest)
        elif ".attentions." in target:
            rest = _rename_first(VAE_ATTENTION, rest)
            if rest.endswith(".weight") and tensor.ndim == 4 and not rest.startswith("group_norm"):
                tensor = tensor[:, :, 0, 0]  # 1x1 conv -> linear
        return rest, tensor

    return _rename(state_dict, vae_block_map(config), inner)


def openai_clip_visual_to_hf(state_dict: dict) -> tuple[dict, list[str]]:
    """OpenAI CLIP ``visual.*`` (prefix removed) -> CLIPVisionModelWithProjection keys."""
    v, e = "vision_model", "vision_model.embeddings"
    fixed = {"conv1.weight": f"{e}.patch_embedding.weight", "class_embedding": f"{e}.class_embedding",
             "positional_embedding": f"{e}.position_embedding.weight",
             "ln_pre.weight": f"{v}.pre_layrnorm.weight", "ln_pre.bias": f"{v}.pre_layrnorm.bias",
             "ln_post.weight": f"{v}.post_layernorm.weight", "ln_post.bias": f"{v}.post_layernorm.bias"}
    layer = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    out, unclaimed = {}, []
    for key, tensor in state_dict.items():
        if key in fixed:
            out[fixed[key]] = tensor
        elif key == "proj":  # x @ proj in OpenAI; Linear stores the transpose
            out["visual_projection.weight"] = tensor.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            index, rest = key[len("transformer.resblocks."):].split(".", 1)
            prefix = f"{v}.encoder.layers.{index}"
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), torch.chunk(tensor, 3, dim=0)):
                    out[f"{prefix}.self_attn.{name}.{kind}"] = chunk.contiguous()
            else:
                renamed = _rename_first(layer, rest)
                if renamed == rest:
                    unclaimed.append(key)
                else:
                    out[f"{prefix}.{renamed}"] = tensor
        else:
            unclaimed.append(key)
    return out, unclaimed
