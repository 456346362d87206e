"""Writers of fake original (ldm / OpenAI-CLIP layout) Zero123 checkpoints for the checkpoint tests.

Built independently of lift3d.zero123.ldm_to_diffusers: by walking the diffusers modules (not the
config), with their own rename tables, pinned to ldm key names and shapes of the real
Zero123/SD-1.x checkpoint.
"""

import sys
import types

import torch
import torch.nn.functional as F

from lift3d.zero123 import ldm_checkpoint

# ----------------------------------------------------------------------------- reverse mapping


def _resnet_to_ldm(rest):
    table = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
             ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise AssertionError(rest)


def unet_to_ldm(unet):
    """diffusers UNet2DConditionModel -> ldm ``diffusion_model`` state dict, by module walk."""
    blocks = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
              "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
    n = 1
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if hasattr(block, "attentions"):
                blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if block.downsamplers is not None:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    n = 0
    for i, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            layers = [f"up_blocks.{i}.resnets.{j}"]
            if hasattr(block, "attentions"):
                layers.append(f"up_blocks.{i}.attentions.{j}")
            if j == len(block.resnets) - 1 and block.upsamplers is not None:
                layers.append(f"up_blocks.{i}.upsamplers.0.conv")
            for position, name in enumerate(layers):
                blocks[name] = f"output_blocks.{n}.{position}" + (".conv" if "upsamplers" in name else "")
            n += 1
    out = {}
    for key, value in unet.state_dict().items():
        block = max((b for b in blocks if key.startswith(b + ".")), key=len)
        rest = key[len(block) + 1:]
        if ".resnets." in block:
            rest = _resnet_to_ldm(rest)
        out[f"{blocks[block]}.{rest}"] = value
    return out


def vae_to_ldm(vae):
    out = {}
    levels = len(vae.encoder.down_blocks)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        name = key
        if "mid_block" in key:
            kind, idx = parts[2], parts[3]
            base = f"{parts[0]}.mid." + ({"0": "block_1", "1": "block_2"}[idx] if kind == "resnets" else "attn_1")
            rest = ".".join(parts[4:])
            if kind == "attentions":
                sub = max((a for a in attn if rest.startswith(a + ".")), key=len)
                rest = attn[sub] + rest[len(sub):]
                if sub != "group_norm" and rest.endswith("weight"):
                    value = value[:, :, None, None]
            name = f"{base}.{rest}"
        elif "down_blocks" in key:
            i = parts[2]
            name = (f"encoder.down.{i}.block.{parts[4]}." + ".".join(parts[5:]) if parts[3] == "resnets"
                    else f"encoder.down.{i}.downsample.conv.{parts[-1]}")
        elif "up_blocks" in key:
            level = levels - 1 - int(parts[2])
            name = (f"decoder.up.{level}.block.{parts[4]}." + ".".join(parts[5:]) if parts[3] == "resnets"
                    else f"decoder.up.{level}.upsample.conv.{parts[-1]}")
        name = name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out[name] = value
    return out


def clip_to_openai(clip):
    sd = clip.state_dict()
    p = "vision_model."
    out = {"conv1.weight": sd[p + "embeddings.patch_embedding.weight"],
           "class_embedding": sd[p + "embeddings.class_embedding"],
           "positional_embedding": sd[p + "embeddings.position_embedding.weight"],
           "ln_pre.weight": sd[p + "pre_layrnorm.weight"], "ln_pre.bias": sd[p + "pre_layrnorm.bias"],
           "ln_post.weight": sd[p + "post_layernorm.weight"], "ln_post.bias": sd[p + "post_layernorm.bias"],
           "proj": sd["visual_projection.weight"].t()}
    for i in range(clip.config.num_hidden_layers):
        h, o = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.in_proj_{kind}"] = torch.cat([sd[h + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for hf, oa in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                           ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[o + f"{oa}.{kind}"] = sd[h + f"{hf}.{kind}"]
    return out


def openai_encode_image(sd, heads, pixels):
    """OpenAI CLIP's VisionTransformer forward written from its definition (nn.MultiheadAttention)."""
    x = F.conv2d(pixels, sd["conv1.weight"], stride=sd["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(len(x), 1, -1), x], 1) + sd["positional_embedding"]
    width = x.shape[-1]
    x = F.layer_norm(x, (width,), sd["ln_pre.weight"], sd["ln_pre.bias"])
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        g = lambda name: sd[f"transformer.resblocks.{i}.{name}"]  # noqa: E731
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": g("attn.in_proj_weight"), "in_proj_bias": g("attn.in_proj_bias"),
                              "out_proj.weight": g("attn.out_proj.weight"), "out_proj.bias": g("attn.out_proj.bias")})
        h = F.layer_norm(x, (width,), g("ln_1.weight"), g("ln_1.bias"))
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (width,), g("ln_2.weight"), g("ln_2.bias"))
        h = F.linear(h, g("mlp.c_fc.weight"), g("mlp.c_fc.bias"))
        x = x + F.linear(h * torch.sigmoid(1.702 * h), g("mlp.c_proj.weight"), g("mlp.c_proj.bias"))
        i += 1
    return F.layer_norm(x[:, 0], (width,), sd["ln_post.weight"], sd["ln_post.bias"]) @ sd["proj"]


def write_ldm_ckpt(model, path, ema_differs=True, drop=None):
    """A Lightning-style original Zero123 checkpoint. The raw UNet weights are perturbed and the
    EMA copy holds the true ones, so loading the true model proves the EMA weights are used."""
    sd = {}
    for k, v in unet_to_ldm(model.unet).items():
        key = "model.diffusion_model." + k
        sd[key] = v + 0.5 * torch.randn_like(v) if ema_differs else v.clone()
        sd[ldm_checkpoint.ema_key(key)] = v.clone()
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(105000)
    sd.update({"first_stage_model." + k: v for k, v in vae_to_ldm(model.vae).items()})
    sd.update({"cond_stage_model.model.visual." + k: v for k, v in clip_to_openai(model.image_encoder).items()})
    sd["cond_stage_model.model.ln_final.weight"] = torch.ones(8)  # text-side leftovers
    sd["cc_projection.weight"], sd["cc_projection.bias"] = model.projection.weight, model.projection.bias
    sd["alphas_cumprod"] = model.alphas_cumprod.clone()
    if drop:
        sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    # A callback class used as a dict key, as Lightning 1.x stores it: a global that is neither
    # allowlisted nor importable at load time.
    fake = types.ModuleType("fake_lightning_callbacks")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = fake.__name__, "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    sys.modules[fake.__name__] = fake
    try:
        torch.save({"state_dict": sd, "global_step": 105000, "epoch": 3,
                    "callbacks": {ModelCheckpoint: {"best_model_score": None}}}, path)
    finally:
        del sys.modules[fake.__name__]
