"""Zero123 checkpoint formats: ldm/OpenAI -> diffusers/HF key conversion, and the three on-disk
formats (kxic folder, bennyguo/ashawkey folder, original .ckpt) loading to the same model.

The reverse conversion used to write fake original checkpoints is built here independently of
lift3d.zero123.ldm_to_diffusers: by walking the diffusers modules (not the config), with its own rename
tables, and it is pinned to ldm key names and shapes of the real Zero123/SD-1.x checkpoint.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lift3d.errors import UserError
from lift3d.zero123 import Zero123Model, ldm_checkpoint
from lift3d.zero123.convert_ckpt import convert_ckpt
from lift3d.zero123.random_model import random_zero123
from ldm_layout import clip_to_openai, openai_encode_image, unet_to_ldm, vae_to_ldm, write_ldm_ckpt

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny():
    return random_zero123("tiny", seed=3)


@pytest.fixture(scope="module")
def kxic_dir(tiny, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kxic") / "model")
    tiny.save_pretrained(path)
    return path


def to_bennyguo(kxic_dir, out, fp16_files=None):
    """Rewrite a kxic folder in the bennyguo/ashawkey layout. ``fp16_files``: None (fp32 only),
    "variant" (fp32 plus *.fp16.safetensors) or "only" (fp16 weights as the plain files)."""
    shutil.copytree(kxic_dir, out)
    os.rename(os.path.join(out, "cc_projection"), os.path.join(out, "clip_camera_projection"))
    proj = os.path.join(out, "clip_camera_projection")
    w = load_file(os.path.join(proj, "diffusion_pytorch_model.safetensors"))
    save_file({"proj.weight": w["projection.weight"], "proj.bias": w["projection.bias"]},
              os.path.join(proj, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(proj, "config.json"), "w") as f:
        json.dump({"_class_name": "CLIPCameraProjection", "additional_embeddings": 4, "embedding_dim": 32}, f)
    if fp16_files:
        for root, _, files in os.walk(out):
            for name in files:
                if name.endswith(".safetensors"):
                    src = os.path.join(root, name)
                    half = {k: v.half() for k, v in load_file(src).items()}
                    dst = src.replace(".safetensors", ".fp16.safetensors") if fp16_files == "variant" else src
                    save_file(half, dst)
    return out


def prediction(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, 64, 64, generator=g)
    noisy, pose = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, generator=g)
    condition = model.encode_condition(image)
    with torch.no_grad():
        return model.predict_noise(noisy, torch.tensor([700, 30]), condition, pose, 3.0)


def half_model(model):
    """The same model with weights rounded through fp16 (what fp16 files hold)."""
    copy = random_zero123("tiny", seed=99)
    copy.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return copy


# ----------------------------------------------------------------------------- conversion


def test_ema_key_naming():
    assert (ldm_checkpoint.ema_key("model.diffusion_model.input_blocks.0.0.weight")
            == "model_ema.diffusion_modelinput_blocks00weight")


def test_full_size_key_conversion_matches_zero123_layout():
    """Real Zero123 shapes (meta tensors, no memory): known ldm names and shapes convert and
    the inferred configs reproduce the model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lift3d.zero123 import ldm_to_diffusers as convert
    from lift3d.zero123.random_model import CLIP, UNET, VAE

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET["full"])
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            **VAE["full"])
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP["full"]))
    ldm_unet, ldm_vae, openai = unet_to_ldm(unet), vae_to_ldm(vae), clip_to_openai(clip)
    known = {  # ldm key -> shape, from the original SD-1.x / Zero123 checkpoints
        "input_blocks.0.0.weight": (320, 8, 3, 3), "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1), "input_blocks.11.0.in_layers.0.weight": (1280,),
        "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1), "output_blocks.0.0.in_layers.0.weight": (2560,),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3), "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3), "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.2.weight": (4, 320, 3, 3), "time_embed.0.weight": (1280, 320)}
    for key, shape in known.items():
        assert tuple(ldm_unet[key].shape) == shape, key
    for key, shape in {"encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
                       "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                       "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                       "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3),
                       "quant_conv.weight": (8, 8, 1, 1)}.items():
        assert tuple(ldm_vae[key].shape) == shape, key
    for key, shape in {"conv1.weight": (1024, 3, 14, 14), "positional_embedding": (257, 1024), "proj": (1024, 768),
                       "transformer.resblocks.23.attn.in_proj_weight": (3072, 1024)}.items():
        assert tuple(openai[key].shape) == shape, key

    unet_cfg, vae_cfg = ldm_checkpoint.unet_config(ldm_unet), ldm_checkpoint.vae_config(ldm_vae)
    for k, v in UNET["full"].items():
        assert unet_cfg[k] == (list(v) if isinstance(v, tuple) else v), k
    assert vae_cfg["block_out_channels"] == [128, 256, 512, 512] and vae_cfg["layers_per_block"] == 2
    clip_cfg = ldm_checkpoint.clip_config(openai)
    assert {k: clip_cfg[k] for k in CLIP["full"]} == CLIP["full"]

    for forward, ldm, model, cfg in ((convert.ldm_unet_to_diffusers, ldm_unet, unet, unet_cfg),
                                     (convert.ldm_vae_to_diffusers, ldm_vae, vae, vae_cfg)):
        back, unclaimed = forward(ldm, cfg)
        assert not unclaimed and {k: tuple(v.shape) for k, v in back.items()} == \
            {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_tiny_round_trip_exact(tiny):
    from lift3d.zero123 import ldm_to_diffusers as convert

    cases = ((convert.ldm_unet_to_diffusers, unet_to_ldm, tiny.unet, dict(tiny.unet.config)),
             (convert.ldm_vae_to_diffusers, vae_to_ldm, tiny.vae, dict(tiny.vae.config)))
    for forward, reverse, model, cfg in cases:
        back, unclaimed = forward(reverse(model), cfg)
        sd = model.state_dict()
        assert not unclaimed and back.keys() == sd.keys()
        assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_clip_conversion_matches_openai_forward(tiny):
    from lift3d.zero123 import ldm_to_diffusers as convert

    openai = clip_to_openai(tiny.image_encoder)
    hf, unclaimed = convert.openai_clip_visual_to_hf(openai)
    assert not unclaimed
    tiny_copy = random_zero123("tiny", seed=5).image_encoder
    tiny_copy.load_state_dict(hf, strict=False)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = openai_encode_image(openai, heads=2, pixels=pixels)
        assert torch.allclose(tiny_copy(pixel_values=pixels).image_embeds, expected, atol=1e-5)


# ----------------------------------------------------------------------------- the three formats


def test_three_formats_same_noise_prediction(tiny, kxic_dir, tmp_path):
    expected = prediction(tiny)
    ckpt = str(tmp_path / "zero123.ckpt")
    write_ldm_ckpt(tiny, ckpt)
    benny = to_bennyguo(kxic_dir, str(tmp_path / "benny"))
    for source in (kxic_dir, benny, ckpt):
        loaded = Zero123Model.from_pretrained(source)
        assert torch.allclose(prediction(loaded), expected, atol=1e-5), source
    # Without EMA the perturbed raw UNet weights are used: a different prediction.
    raw = Zero123Model.from_pretrained(ckpt, use_ema=False)
    assert not torch.allclose(prediction(raw), expected, atol=1e-3)


@pytest.mark.parametrize("fp16_files,variant", [("only", None), ("variant", "fp16"), ("variant", None)])
def test_bennyguo_fp16_and_variants(tiny, kxic_dir, tmp_path, fp16_files, variant):
    folder = to_bennyguo(kxic_dir, str(tmp_path / "benny"), fp16_files)
    loaded = Zero123Model.from_pretrained(folder, torch_dtype=torch.float32, variant=variant)
    assert loaded.dtype == torch.float32
    reference = half_model(tiny) if (fp16_files == "only" or variant == "fp16") else tiny
    assert torch.allclose(prediction(loaded), prediction(reference), atol=1e-5)


def test_convert_ckpt_writes_kxic_folder(tiny, tmp_path):
    ckpt = str(tmp_path / "z.ckpt")
    write_ldm_ckpt(tiny, ckpt)
    out = convert_ckpt(ckpt, str(tmp_path / "converted"))
    assert sorted(os.listdir(out)) == ["cc_projection", "feature_extractor", "image_encoder", "model_index.json",
                                       "scheduler", "unet", "vae"]
    assert "projection.weight" in load_file(os.path.join(out, "cc_projection", "diffusion_pytorch_model.safetensors"))
    assert torch.allclose(prediction(Zero123Model.from_pretrained(out)), prediction(tiny), atol=1e-5)
    with pytest.raises(UserError, match="already exists"):
        convert_ckpt(ckpt, out)


# ----------------------------------------------------------------------------- refusals


def test_not_a_zero123_folder(kxic_dir, tmp_path):
    folder = str(tmp_path / "sd")
    shutil.copytree(kxic_dir, folder)
    shutil.rmtree(os.path.join(folder, "cc_projection"))
    with pytest.raises(UserError, match="cc_projection"):
        Zero123Model.from_pretrained(folder)
    with pytest.raises(UserError, match="not found"):
        Zero123Model.from_pretrained(str(tmp_path / "nothing" / "here.ckpt"))


def test_missing_key_and_wrong_shapes(kxic_dir, tmp_path):
    folder = str(tmp_path / "broken")
    shutil.copytree(kxic_dir, folder)
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    sd = load_file(weights)
    del sd["conv_out.bias"]
    save_file(sd, weights)
    with pytest.raises(UserError, match=r"unet.*1 missing \(e\.g\. conv_out\.bias\)"):
        Zero123Model.from_pretrained(folder)

    folder = str(tmp_path / "proj")
    shutil.copytree(kxic_dir, folder)
    save_file({"projection.weight": torch.zeros(32, 768), "projection.bias": torch.zeros(32)},
              os.path.join(folder, "cc_projection", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match=r"camera projection has shape \(32, 768\), expected \(32, 36\)"):
        Zero123Model.from_pretrained(folder)


def test_plain_sd_unet_is_refused(kxic_dir, tmp_path):
    folder = str(tmp_path / "four")
    shutil.copytree(kxic_dir, folder)
    cfg_path = os.path.join(folder, "unet", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["in_channels"] = 4
    json.dump(cfg, open(cfg_path, "w"))
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    sd = load_file(weights)
    sd["conv_in.weight"] = sd["conv_in.weight"][:, :4].contiguous()
    save_file(sd, weights)
    with pytest.raises(UserError, match="takes 4 input channels; a Zero123 UNet takes 8"):
        Zero123Model.from_pretrained(folder)


def test_bad_checkpoints(tiny, tmp_path):
    path = str(tmp_path / "other.ckpt")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(UserError, match="not an original Zero123 checkpoint"):
        Zero123Model.from_pretrained(path)
    full = str(tmp_path / "noproj.ckpt")
    write_ldm_ckpt(tiny, full, drop="cc_projection")
    with pytest.raises(UserError, match=r"lacks cc_projection\.\*"):
        Zero123Model.from_pretrained(full)
    garbage = str(tmp_path / "garbage.ckpt")
    with open(garbage, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(UserError):
        Zero123Model.from_pretrained(garbage)


# ----------------------------------------------------------------------------- ldm config (head count)


def _with_heads(heads, seed=4):
    """The tiny random model with another UNet head count (same shapes: only the YAML can tell)."""
    from diffusers import UNet2DConditionModel

    from lift3d.zero123.random_model import UNET

    model = random_zero123("tiny", seed=seed)
    torch.manual_seed(seed)
    model.unet = UNet2DConditionModel(**{**UNET["tiny"], "attention_head_dim": heads}).eval().requires_grad_(False)
    return model


def _ldm_yaml(path, **unet_params):
    lines = ["model:", "  target: ldm.models.diffusion.ddpm.LatentDiffusion", "  params:", "    unet_config:",
             "      params:"] + [f"        {k}: {v}" for k, v in unet_params.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_unet_heads_come_from_the_ldm_yaml(tmp_path, caplog):
    model = _with_heads(2)
    expected = prediction(model)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    ckpt = str(folder / "last.ckpt")
    write_ldm_ckpt(model, ckpt)
    # No YAML: Zero123's 8 heads are assumed, and said so.
    with caplog.at_level("WARNING"):
        assumed = Zero123Model.from_pretrained(ckpt)
    assert assumed.unet.config.attention_head_dim == 8 and "assuming Zero123's 8" in caplog.text
    assert not torch.allclose(prediction(assumed), expected, atol=1e-4)
    # <stem>.yaml next to the checkpoint.
    _ldm_yaml(str(folder / "last.yaml"), num_heads=2, model_channels=32)
    found = Zero123Model.from_pretrained(ckpt)
    assert found.unet.config.attention_head_dim == 2
    assert torch.allclose(prediction(found), expected, atol=1e-5)


def test_convert_ckpt_config_option_with_num_head_channels(tmp_path, capsys):
    from lift3d.zero123.convert_ckpt import main

    model = _with_heads([2, 2, 4])  # widths (32, 32, 64) at 16 channels per head
    ckpt, config = str(tmp_path / "z.ckpt"), str(tmp_path / "elsewhere.yml")
    write_ldm_ckpt(model, ckpt)
    _ldm_yaml(config, num_heads=-1, num_head_channels=16)
    assert main([ckpt, str(tmp_path / "out"), "--config", config]) == 0
    assert f"from {config}" in capsys.readouterr().out
    loaded = Zero123Model.from_pretrained(str(tmp_path / "out"))
    assert list(loaded.unet.config.attention_head_dim) == [2, 2, 4]
    assert torch.allclose(prediction(loaded), prediction(model), atol=1e-5)
    with pytest.raises(UserError, match="ldm config not found"):
        main([ckpt, str(tmp_path / "out2"), "--config", str(tmp_path / "missing.yaml")])
    _ldm_yaml(config, num_head_channels=24)
    with pytest.raises(UserError, match="does not divide"):
        main([ckpt, str(tmp_path / "out3"), "--config", config])
