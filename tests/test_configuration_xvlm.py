import pytest
from transformers import AutoConfig, SwinConfig

from modeling_xvlm import XVLMConfig, XVLMTextConfig


def test_default_is_xvlm_base_384():
    config = XVLMConfig()
    vision, text = config.vision_config, config.text_config
    assert isinstance(vision, SwinConfig) and isinstance(text, XVLMTextConfig)
    assert (vision.embed_dim, list(vision.depths), list(vision.num_heads)) == (128, [2, 2, 18, 2], [4, 8, 16, 32])
    assert (vision.image_size, vision.window_size, vision.hidden_size) == (384, 12, 1024)
    assert (text.hidden_size, text.num_hidden_layers, text.fusion_layer, text.num_attention_heads) == (768, 12, 6, 12)
    assert (text.num_text_layers, text.num_fusion_layers) == (6, 6)
    assert (text.vocab_size, text.intermediate_size, text.layer_norm_eps, text.hidden_dropout_prob) == (
        30522, 3072, 1e-12, 0.1
    )
    assert text.encoder_width == 1024
    assert (config.projection_dim, config.temperature_init, config.image_size) == (256, 0.07, 384)
    assert (config.patch_stride, config.num_patches) == (32, 144)


@pytest.mark.parametrize("size,window,patches", [(224, 7, 49), (384, 12, 144), (480, 15, 225)])
def test_base_preset_windows(size, window, patches):
    config = XVLMConfig.from_preset("base", image_size=size)
    assert (config.image_size, config.vision_config.window_size, config.num_patches) == (size, window, patches)
    assert XVLMConfig(image_size=size).vision_config.window_size == window


def test_round_trip(tmp_path):
    config = XVLMConfig.from_preset("tiny", temperature_init=0.05)
    config.save_pretrained(tmp_path)
    loaded = XVLMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert XVLMConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    auto = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(auto, XVLMConfig) and auto.temperature_init == 0.05
    changed = XVLMConfig.from_pretrained(tmp_path, text_config={"vocab_size": 20})
    assert changed.text_config.vocab_size == 20 and changed.text_config.hidden_size == 32
    assert XVLMTextConfig.from_pretrained(tmp_path).hidden_size == 32


def test_partial_vision_dict_overrides_base():
    config = XVLMConfig(vision_config={"image_size": 224, "window_size": 7})
    assert config.vision_config.embed_dim == 128 and config.image_size == 224


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_size": 100}, "not divisible by the total stride 32"),
        ({"text_config": {"num_hidden_layers": 4, "fusion_layer": 5}}, "fusion_layer"),
        ({"text_config": {"fusion_layer": 12}}, "cannot exceed the layer count"),
        ({"vision_config": {"model_type": "clip_vision_model"}}, "Unknown vision backbone"),
        ({"text_config": {"hidden_size": 100, "num_attention_heads": 12}}, "multiple of"),
        ({"temperature_init": 0.0}, "temperature_init"),
    ],
)
def test_invalid_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        XVLMConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown X-VLM preset"):
        XVLMConfig.from_preset("huge")
