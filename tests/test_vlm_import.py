"""The SigLIP tower of VLM checkpoints (PaliGemma, Gemma 3, LLaVA) loads alone, strictly, in transformers 4's and 5's
key layouts, and equals the VLM's own vision tower in transformers on the same random weights."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import keep_only_shards_of, perturb, random_images
from safetensors.torch import load_file, save_file
from transformers import (
    AriaConfig,
    AriaForConditionalGeneration,
    AriaImageProcessor,
    AyaVisionConfig,
    AyaVisionForConditionalGeneration,
    Cohere2VisionConfig,
    Cohere2VisionForConditionalGeneration,
    Cohere2VisionImageProcessor,
    ColModernVBertConfig,
    ColModernVBertForRetrieval,
    ColPaliConfig,
    ColPaliForRetrieval,
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridImageProcessor,
    DeepseekVLImageProcessor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    GotOcr2ImageProcessor,
    GraniteDoclingConfig,
    GraniteDoclingForConditionalGeneration,
    GraniteDoclingImageProcessor,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessor,
    Lfm2VlConfig,
    Lfm2VlForConditionalGeneration,
    Lfm2VlImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    ModernVBertConfig,
    ModernVBertForMaskedLM,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Phi4MultimodalConfig,
    Phi4MultimodalForCausalLM,
    Phi4MultimodalImageProcessor,
    Phi4MultimodalVisionConfig,
    Phi4MultimodalVisionModel,
    PI0Config,
    PI0ForConditionalGeneration,
    PI0ImageProcessor,
    PI05Config,
    PI05ForConditionalGeneration,
    ShieldGemma2Config,
    ShieldGemma2ForImageClassification,
    SiglipImageProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    T5Gemma2Config,
    T5Gemma2ForConditionalGeneration,
    UltraVBertConfig,
    UltraVBertForMaskedLM,
    UltraVBertImageProcessor,
)

from siglip2_encoder import CheckpointError, EncoderConfig, ImageProcessor, SigLIP2Encoder
from siglip2_encoder.checkpoints.families import PROCESSOR_TYPES
from siglip2_encoder.checkpoints.hf_format import processor_config_from_hf, processor_config_to_hf

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
LM = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
LM = LM | dict(head_dim=8, vocab_size=300)
SIGLIP = TOWER | dict(image_size=32, model_type="siglip_vision_model")
PINPOINTS = [[32, 32], [32, 64]]


def build(family: str) -> tuple[torch.nn.Module, object]:
    """A tiny random VLM of the family, with the image processor it ships with."""
    torch.manual_seed(0)
    square = {"height": 32, "width": 32}
    if family == "paligemma":  # PaliGemma's tower has no pooling head
        config = PaliGemmaConfig(vision_config=SIGLIP | dict(vision_use_head=False), text_config=LM, projection_dim=16)
        return PaliGemmaForConditionalGeneration(config), SiglipImageProcessor(size=square)
    if family == "gemma3":
        config = Gemma3Config(vision_config=SIGLIP, text_config=LM, mm_tokens_per_image=4)
        return Gemma3ForConditionalGeneration(config), Gemma3ImageProcessor(size=square)
    if family == "shieldgemma2":  # Gemma 3 inside an image classifier
        config = ShieldGemma2Config(vision_config=SIGLIP, text_config=LM, mm_tokens_per_image=4)
        return ShieldGemma2ForImageClassification(config), Gemma3ImageProcessor(size=square)
    if family == "colpali":  # PaliGemma under vlm., its config in vlm_config
        vlm = dict(model_type="paligemma", vision_config=SIGLIP | dict(vision_use_head=False), text_config=LM)
        config = ColPaliConfig(vlm_config=vlm | dict(projection_dim=16), embedding_dim=16)
        return ColPaliForRetrieval(config), SiglipImageProcessor(size=square)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=300)
    text |= dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("modernvbert", "colmodernvbert"):  # Idefics3's processor and connector around a SigLIP tower
        text |= dict(cls_token_id=1, sep_token_id=2)
        config = ModernVBertConfig(vision_config=SIGLIP, text_config=text, pixel_shuffle_factor=2)
        processor = Idefics3ImageProcessor(max_image_size={"longest_edge": 32}, size={"longest_edge": 64})
        if family == "modernvbert":
            return ModernVBertForMaskedLM(config), processor
        return ColModernVBertForRetrieval(ColModernVBertConfig(vlm_config=config.to_dict())), processor
    if family == "ultravbert":  # ModernVBERT around another text encoder; its processor caps Idefics3's tiles
        text |= dict(cls_token_id=1, sep_token_id=2, prediction_head_size=16)
        vision = SIGLIP | dict(vision_use_head=False)  # its config's default
        config = UltraVBertConfig(vision_config=vision, text_config=text, pixel_shuffle_factor=2)
        processor = UltraVBertImageProcessor(max_image_size={"longest_edge": 32}, size={"longest_edge": 64})
        return UltraVBertForMaskedLM(config), processor
    if family == "granite_docling":  # Idefics3's layout, a DeepStack connector inside its tower, GOT-OCR 2's tiles
        vision = TOWER | dict(image_size=32, out_hidden_size=16, scale_factor=2, deepstack_visual_indexes=[0])
        config = GraniteDoclingConfig(vision_config=vision, text_config=text)
        return GraniteDoclingForConditionalGeneration(config), GraniteDoclingImageProcessor(size=square)
    if family in ("pi0", "pi05"):  # the robot policies: PaliGemma as vlm (vlm_config), a Gemma action expert
        vlm = dict(model_type="paligemma", vision_config=SIGLIP | dict(vision_use_head=False), text_config=LM)
        expert = dict(model_type="gemma") | LM
        config_class, model_class = (PI0Config, PI0ForConditionalGeneration) if family == "pi0" else (
            PI05Config, PI05ForConditionalGeneration)  # fmt: skip
        config = config_class(vlm_config=vlm | dict(projection_dim=16, image_token_id=299), dit_config=expert)
        fit = {"max_height": 32, "max_width": 32}
        return model_class(config), PI0ImageProcessor(size=fit, pad_size={"height": 32, "width": 32})
    if family == "deepseek_vl_hybrid":  # DeepSeek-VL 7B: a SAM tower beside SigLIP's, for a 64 px high-res view
        sam = dict(model_type="sam_vision_model", hidden_size=16, output_channels=8, num_hidden_layers=2)
        sam |= dict(num_attention_heads=2, image_size=64, patch_size=8, mlp_dim=32, global_attn_indexes=[1])
        text = LM | dict(model_type="llama")
        config = DeepseekVLHybridConfig(
            vision_config=SIGLIP, high_res_vision_config=sam | dict(window_size=4), text_config=text
        )
        processor = DeepseekVLHybridImageProcessor(size=square, high_res_size={"height": 64, "width": 64})
        return DeepseekVLHybridForConditionalGeneration(config), processor
    if family == "janus":  # DeepSeek-VL's processor; its tower: exact GELU, mlp_ratio, out_proj as projection_layer
        vision = dict(hidden_size=32, mlp_ratio=2.0, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
        vision |= dict(image_size=32, projection_dim=16, num_image_tokens=16)
        vq = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1)
        vq |= dict(latent_channels=8, image_token_embed_dim=16, num_patches=4, projection_dim=16)
        config = JanusConfig(vision_config=vision, text_config=LM, vq_config=vq)
        return JanusForConditionalGeneration(config), JanusImageProcessor(size=square)
    if family == "deepseek_vl":  # DeepSeek-VL 1.3B: its processor letterboxes
        config = DeepseekVLConfig(vision_config=SIGLIP, text_config=LM | dict(model_type="llama"))
        return DeepseekVLForConditionalGeneration(config), DeepseekVLImageProcessor(size=square)
    if family == "t5gemma2":  # Gemma 3's tower in an encoder-decoder's encoder: its config is encoder.vision_config
        encoder = dict(vision_config=SIGLIP, text_config=LM, mm_tokens_per_image=4)
        config = T5Gemma2Config(encoder=encoder, decoder=LM)
        return T5Gemma2ForConditionalGeneration(config), Gemma3ImageProcessor(size=square)
    if family == "llava":
        config = LlavaConfig(vision_config=SIGLIP, text_config=LM | dict(model_type="llama"))
        return LlavaForConditionalGeneration(config), SiglipImageProcessor(size=square)
    if family == "llava_next":  # its processor's size is a shortest edge: the base view is the tower's square
        config = LlavaNextConfig(vision_config=SIGLIP, text_config=LM | dict(model_type="llama"))
        config.image_grid_pinpoints = PINPOINTS
        return LlavaNextForConditionalGeneration(config), LlavaNextImageProcessor(image_grid_pinpoints=PINPOINTS)
    if family == "llava_onevision":  # OneVision's towers have no head
        vision = SIGLIP | dict(vision_use_head=False)
        config = LlavaOnevisionConfig(vision_config=vision, text_config=LM | dict(model_type="qwen2"))
        config.image_grid_pinpoints = PINPOINTS
        return LlavaOnevisionForConditionalGeneration(config), LlavaOnevisionImageProcessor(size=square)
    if family == "lfm2_vl":  # a NaFlex SigLIP 2 tower
        vision = TOWER | dict(num_patches=16, model_type="siglip2_vision_model", vision_use_head=False)
        text = dict(LM, vocab_size=500)
        del text["head_dim"]
        config = Lfm2VlConfig(vision_config=vision, text_config=text, projector_hidden_size=16)
        return Lfm2VlForConditionalGeneration(config), Lfm2VlImageProcessor(encoder_patch_size=8, max_image_tokens=6)
    if family == "aya_vision":  # Aya Vision's tower has no head
        vision = SIGLIP | dict(vision_use_head=False)
        config = AyaVisionConfig(vision_config=vision, text_config=LM | dict(model_type="llama"), downsample_factor=2)
        return AyaVisionForConditionalGeneration(config), GotOcr2ImageProcessor(size=square)
    if family == "cohere2_vision":
        text = LM | dict(model_type="llama")
        config = Cohere2VisionConfig(vision_config=SIGLIP, text_config=text, alignment_intermediate_size=32)
        return Cohere2VisionForConditionalGeneration(config), Cohere2VisionImageProcessor(size=square)
    if family == "phi4_multimodal":  # bucketed positions and a head, in its image embedding (and an audio tower)
        vision = TOWER | dict(image_size=32, crop_size=32)
        audio = dict(hidden_size=16, intermediate_size=32, num_blocks=1, num_attention_heads=2, nemo_conv_channels=16)
        audio |= dict(time_reduction=8, depthwise_seperable_out_channel=16, ext_pw_out_channel=16)
        text = {k: v for k, v in LM.items() if k != "head_dim"} | dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        config = Phi4MultimodalConfig(vision_config=vision, audio_config=audio, **text)
        # eager: transformers' sdpa path attends causally within unpadded crops (see the test below)
        model = Phi4MultimodalForCausalLM._from_config(config, attn_implementation="eager")
        return model, Phi4MultimodalImageProcessor(size=square, patch_size=8)
    if family == "aria":  # Idefics3's tower class; its processor's sides are 490 or 980 pixels: a 35 x 35 grid
        vision = TOWER | dict(model_type="idefics3_vision", image_size=490, patch_size=14)
        text = LM | dict(moe_num_experts=2, moe_topk=1, moe_intermediate_size=16)
        config = AriaConfig(vision_config=vision, text_config=text, projector_patch_to_query_dict={1225: 4})
        return AriaForConditionalGeneration(config), AriaImageProcessor(max_image_size=490)
    vision = TOWER | dict(image_size=32)  # Idefics2 / 3, SmolVLM: their own tower class, without a head
    if family == "idefics2":
        resampler = dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8)
        resampler |= dict(num_key_value_heads=1, hidden_size=LM["hidden_size"], rms_norm_eps=1e-6)
        text = LM | dict(model_type="llama")
        config = Idefics2Config(vision_config=vision, text_config=text, perceiver_config=resampler)
        processor = Idefics2ImageProcessor(size={"shortest_edge": 16, "longest_edge": 32})
        return Idefics2ForConditionalGeneration(config), processor
    if family == "idefics3":
        config = Idefics3Config(vision_config=vision, text_config=LM | dict(model_type="llama"), scale_factor=2)
        processor = Idefics3ImageProcessor(max_image_size={"longest_edge": 32}, size={"longest_edge": 64})
        return Idefics3ForConditionalGeneration(config), processor
    config = SmolVLMConfig(vision_config=vision, text_config=LM | dict(model_type="llama"), scale_factor=2)
    processor = SmolVLMImageProcessor(max_image_size={"longest_edge": 32}, size={"longest_edge": 64})
    return SmolVLMForConditionalGeneration(config), processor


def vision_tower(vlm: torch.nn.Module) -> torch.nn.Module:
    if isinstance(vlm, (ColPaliForRetrieval, ColModernVBertForRetrieval)):
        vlm = vlm.vlm  # the model they wrap: PaliGemma's or ModernVBERT's, tower and all
        return vlm.vision_tower if hasattr(vlm, "vision_tower") else vlm.vision_model
    if isinstance(vlm, ShieldGemma2ForImageClassification):
        return vlm.model.model.vision_tower
    if isinstance(vlm, T5Gemma2ForConditionalGeneration):
        return vlm.model.encoder.vision_tower
    if isinstance(vlm, (PI0ForConditionalGeneration, PI05ForConditionalGeneration)):
        return vlm.model.vlm.vision_tower
    if isinstance(vlm, Phi4MultimodalForCausalLM):
        return vlm.model.embed_tokens_extend.image_embed.img_processor
    return vlm.model.vision_model if hasattr(vlm.model, "vision_model") else vlm.model.vision_tower


def naflex_inputs(seed: int) -> dict[str, torch.Tensor]:
    """Two images with grids 4x4 and 2x5, patchified and padded to 16 patches of 8 x 8 x 3."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 16, 192, generator=generator)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    pixels[1, 10:] = 0
    return dict(pixel_values=pixels, spatial_shapes=torch.tensor([[4, 4], [2, 5]]), pixel_attention_mask=mask)


SIGLIP_FAMILIES = [
    "paligemma",
    "gemma3",
    "llava",
    "llava_next",
    "llava_onevision",
    "lfm2_vl",
    "aya_vision",
    "cohere2_vision",
]
# The tower's key prefix in each layout: 5.x saves (most families), the Hub's 4.x checkpoints, 4.52+ saves (after
# the `model.` refactor), 5.x module names (and LFM2-VL's 5.x saves).
LAYOUTS = {
    "transformers 5": "vision_tower.",
    "transformers 4": "vision_tower.vision_model.",
    "transformers 4.52": "model.vision_tower.vision_model.",
    "module names": "model.vision_tower.",
}
# The VLM processor's single view: (size or patch budget, filter).
VIEWS = {
    "paligemma": ((32, 32), "bicubic"),
    "gemma3": ((32, 32), "bilinear"),
    "shieldgemma2": ((32, 32), "bilinear"),
    "t5gemma2": ((32, 32), "bilinear"),
    "colpali": ((32, 32), "bicubic"),
    "pi0": ((32, 32), "bicubic"),
    "pi05": ((32, 32), "bicubic"),
    "modernvbert": ((32, 32), "lanczos"),
    "colmodernvbert": ((32, 32), "lanczos"),
    "ultravbert": ((32, 32), "lanczos"),
    "janus": ((32, 32), "bicubic"),
    "granite_docling": ((32, 32), "bicubic"),
    "llava": ((32, 32), "bicubic"),
    "llava_next": ((32, 32), "bicubic"),
    "llava_onevision": ((32, 32), "bicubic"),
    "lfm2_vl": (24, "bilinear"),
    "aya_vision": ((32, 32), "bicubic"),
    "cohere2_vision": ((32, 32), "bicubic"),
    "idefics3": ((32, 32), "lanczos"),
    "smolvlm": ((32, 32), "lanczos"),
    "idefics2": ((32, 32), "bilinear"),
}


def relayout(folder: Path, prefix: str) -> None:
    """Rewrite a save with the tower under ``prefix``, the projector and language model untouched."""
    state = load_file(folder / "model.safetensors")
    pattern = r"^(model\.)?vision_tower\.(vision_model\.)?"
    renamed = {re.sub(pattern, prefix, k): v for k, v in state.items()}
    assert sum(k.startswith(prefix) for k in renamed) == sum(re.match(pattern, k) is not None for k in state) > 0
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


def move_tower(folder: Path, saved: str, layout: str) -> None:
    """Rewrite a save with the tower's keys under ``layout`` instead of the ``saved`` prefix, the rest untouched."""
    state = load_file(folder / "model.safetensors")
    assert sum(k.startswith(saved) for k in state) > 0
    renamed = {layout + k.removeprefix(saved) if k.startswith(saved) else k: v for k, v in state.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


def check_processor(folder: Path, family: str) -> None:
    processor = ImageProcessor.from_pretrained(folder)
    size, resample = VIEWS[family]
    assert (processor.config.max_num_patches if family == "lfm2_vl" else processor.config.image_size) == size
    assert processor.config.resample == resample


@pytest.mark.parametrize(
    "name", [name for name in PROCESSOR_TYPES if not name.endswith("Fast") and name != "Phi4MMImageProcessor"]
)
def test_settings_a_processor_file_omits_are_the_processor_classes_defaults(name):
    """transformers fills a processor file's missing settings from its class, whose defaults differ between classes
    (CLIP's mean and std for LLaVA-NeXT's, OneVision's 384 pixels): so do we, for each class we read (but the remote
    code's Phi4MMImageProcessor, whose defaults are its port's, Phi4MultimodalImageProcessor)."""
    theirs = getattr(transformers, name)()
    naflex = PROCESSOR_TYPES[name].naflex
    tower = EncoderConfig(image_size=None, num_patches=256) if naflex else EncoderConfig(image_size=48)
    ours = processor_config_from_hf({"image_processor_type": name}, tower)
    assert ours.resample == {1: "lanczos", 2: "bilinear", 3: "bicubic"}[theirs.resample]
    assert (ours.image_mean, ours.image_std) == (tuple(theirs.image_mean), tuple(theirs.image_std))
    assert (ours.rescale_factor, ours.do_rescale, ours.do_normalize) == (
        theirs.rescale_factor,
        theirs.do_rescale,
        theirs.do_normalize,
    )
    if naflex:  # LFM2-VL's budget is in tokens after its unshuffle
        budget = getattr(theirs, "max_num_patches", None) or theirs.max_image_tokens * theirs.downsample_factor**2
        assert ours.max_num_patches == budget
    elif isinstance(getattr(theirs, "max_image_size", None), int):  # Aria's: a side, and the other's floor
        assert ours.image_size == (theirs.max_image_size,) * 2
        assert ours.letterbox_min_side == theirs.min_image_size
    elif getattr(theirs, "max_image_size", None):  # Idefics3's: one tile
        assert ours.image_size == (theirs.max_image_size["longest_edge"],) * 2
    elif theirs.size.shortest_edge is not None and theirs.size.longest_edge is not None:  # Idefics2's bounds
        assert ours.image_size == (theirs.size.longest_edge,) * 2
        assert ours.letterbox_min_side == theirs.size.shortest_edge
    elif theirs.size.height is not None:
        assert ours.image_size == (theirs.size.height, theirs.size.width)
    elif theirs.size.max_height is not None:  # pi0's: fitted within size, padded to pad_size
        assert (
            ours.image_size
            == (theirs.size.max_height, theirs.size.max_width)
            == (theirs.pad_size.height, theirs.pad_size.width)
        )
    else:  # LLaVA-NeXT's shortest edge: its base view is the tower's square
        assert ours.image_size == (48, 48)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", SIGLIP_FAMILIES)
def test_vlm_tower_equals_the_vlms_own_vision_tower(family, layout, tmp_path):
    vlm, image_processor = build(family)
    vlm = perturb(vlm, seed=5).eval()
    vlm.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    relayout(tmp_path, LAYOUTS[layout])
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert ours.config.use_head == (family in ("gemma3", "llava", "llava_next", "cohere2_vision"))
    if family == "lfm2_vl":
        x = naflex_inputs(1)
    else:
        x = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        want = vision_tower(vlm)(**x)
        got = ours(**x)
    mask = x.get("pixel_attention_mask", torch.ones(2, 1)).bool()[..., None]
    torch.testing.assert_close(got.last_hidden_state * mask, want.last_hidden_state * mask, atol=1e-4, rtol=0)
    if ours.config.use_head:
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=0)
    check_processor(tmp_path, family)


# Models holding a SigLIP tower deeper or under other names: (family, the prefix transformers 5 saves, a layout).
DEEPER = [
    ("shieldgemma2", "model.model.vision_tower.", "model.model.vision_tower."),
    ("shieldgemma2", "model.model.vision_tower.", "model.vision_tower.vision_model."),  # 4.50, ShieldGemma 2's release
    ("shieldgemma2", "model.model.vision_tower.", "model.model.vision_tower.vision_model."),  # 4.52+
    ("t5gemma2", "model.encoder.vision_tower.", "model.encoder.vision_tower."),
    ("t5gemma2", "model.encoder.vision_tower.", "encoder.vision_tower."),  # a T5Gemma2Model's
    ("colpali", "vlm.vision_tower.", "vlm.vision_tower."),
    ("colpali", "vlm.vision_tower.", "vlm.vision_tower.vision_model."),  # 4.x: the Hub's ColPali checkpoints
    ("colpali", "vlm.vision_tower.", "vlm.model.vision_tower.vision_model."),  # 4.52+
    ("modernvbert", "model.vision_model.", "model.vision_model."),
    ("modernvbert", "model.vision_model.", "vision_model."),  # a ModernVBertModel's
    ("modernvbert", "model.vision_model.", "model.vision_model.vision_model."),
    ("colmodernvbert", "vlm.vision_model.", "vlm.vision_model."),
    ("colmodernvbert", "vlm.vision_model.", "vlm.vision_model.vision_model."),
    ("ultravbert", "model.vision_model.", "model.vision_model."),
    ("ultravbert", "model.vision_model.", "vision_model."),  # an UltraVBertModel's
    ("granite_docling", "model.vision_model.", "model.vision_model."),  # its connector.* keys among the tower's
    ("granite_docling", "model.vision_model.", "vision_model."),  # a GraniteDoclingModel's
    ("janus", "model.vision_model.", "model.vision_model."),  # its attention's output named projection_layer
    ("janus", "model.vision_model.", "vision_model."),  # a JanusModel's
    # pi0 / pi0.5: transformers saves openpi's names, the Hub's LeRobot files have the policy's model. before them
    (
        "pi0",
        "paligemma_with_expert.paligemma.model.vision_tower.",
        "paligemma_with_expert.paligemma.model.vision_tower.",
    ),
    (
        "pi0",
        "paligemma_with_expert.paligemma.model.vision_tower.",
        "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.",
    ),
    (
        "pi0",
        "paligemma_with_expert.paligemma.model.vision_tower.",
        "model.paligemma_with_expert.paligemma.vision_tower.vision_model.",
    ),  # 4.48
    ("pi0", "paligemma_with_expert.paligemma.model.vision_tower.", "model.vlm.vision_tower."),  # 5.x module names
    ("pi0", "paligemma_with_expert.paligemma.model.vision_tower.", "vlm.vision_tower."),  # a PI0Model's
    (
        "pi05",
        "paligemma_with_expert.paligemma.model.vision_tower.",
        "paligemma_with_expert.paligemma.model.vision_tower.",
    ),
    (
        "pi05",
        "paligemma_with_expert.paligemma.model.vision_tower.",
        "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.",
    ),
]


@pytest.mark.parametrize(("family", "saved", "layout"), DEEPER)
def test_a_tower_held_deeper_loads_from_each_layout_and_equals_theirs(family, saved, layout, tmp_path, caplog):
    """ShieldGemma 2 wraps Gemma 3 in an image classifier; T5Gemma 2 holds Gemma 3's tower in its encoder (its config
    as encoder.vision_config); ColPali and ColModernVBERT wrap PaliGemma and ModernVBERT under vlm. (configs in
    vlm_config), pi0 and pi0.5 PaliGemma under openpi's names (configs in vlm_config); Granite Docling saves its
    connector within its tower. The tower loads from each key layout and equals theirs (the head too where there is
    one)."""
    vlm, image_processor = build(family)
    vlm = perturb(vlm, seed=5).eval()
    vlm.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    move_tower(tmp_path, saved, layout)
    with caplog.at_level(logging.WARNING):
        ours = SigLIP2Encoder.from_pretrained(tmp_path)
    headless = ("colpali", "pi0", "pi05", "ultravbert", "granite_docling", "janus")
    assert ours.config.use_head == (family not in headless) and ours.config.num_hidden_layers == 2
    one_tile = family.endswith("modernvbert") or family == "ultravbert"
    assert ("here each image is resized (LANCZOS) to one tile" in caplog.text) == one_tile
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = vision_tower(vlm)(x), ours(x)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=0)
    if ours.config.use_head:
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=0)
    check_processor(tmp_path, family)


@pytest.mark.parametrize("use_head", [False, True])
def test_a_head_an_ultravbert_tower_lacks_is_dropped_as_transformers_drops_it(use_head, tmp_path):
    """UltraVBERT's towers have no head (vision_use_head=False), but its checkpoints may carry the SigLIP head they
    were made from: transformers ignores those weights (_keys_to_ignore_on_load_unexpected), and so do we. A tower
    whose config has the head loads it."""
    vlm, _ = build("ultravbert")
    config = vlm.config
    config.vision_config.vision_use_head = True
    vlm = perturb(UltraVBertForMaskedLM(config), seed=5).eval()
    vlm.save_pretrained(tmp_path)
    if not use_head:  # the head's weights stay in the file
        config.vision_config.vision_use_head = False
        config.save_pretrained(tmp_path)
    assert any(key.startswith("model.vision_model.head.") for key in load_file(tmp_path / "model.safetensors"))
    theirs = UltraVBertForMaskedLM.from_pretrained(tmp_path).eval()
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert ours.config.use_head == use_head == any(name.startswith("head.") for name in ours.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = vision_tower(theirs)(x), ours(x)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=0)
    if use_head:
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=0)


def test_a_saved_granite_docling_tower_loads_without_its_connector(tmp_path):
    """GraniteDoclingVisionModel holds its DeepStack connector: saved alone (granite_docling_vision), its tower loads
    and equals theirs, the connector's weights skipped by name; the layers it taps are hidden states by index."""
    vlm, _ = build("granite_docling")
    theirs = perturb(vision_tower(vlm), seed=5).eval()
    theirs.save_pretrained(tmp_path)
    assert any(key.startswith("connector.") for key in load_file(tmp_path / "model.safetensors"))
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert (ours.config.use_head, ours.config.position_lookup) == (False, "interpolate")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, taps = theirs.encode(x)  # final tokens and its first layer's output (deepstack_visual_indexes=[0])
        got = ours(x, layers=[1])
    torch.testing.assert_close(got.last_hidden_state, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.tokens(1), taps[0], atol=1e-4, rtol=0)


def test_a_saved_janus_tower_loads_with_its_mlp_ratio_and_names(tmp_path):
    """JanusVisionModel saved alone (janus_vision_model): its MLP width is hidden_size * mlp_ratio, its GELU exact, its
    attention's output layer named projection_layer; ours reads each and equals it. Its q/k norms and bias-free
    attention, which SigLIP lacks, are refused by name."""
    vlm, _ = build("janus")
    theirs = perturb(vision_tower(vlm), seed=5).eval()
    theirs.save_pretrained(tmp_path)
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert (ours.config.intermediate_size, ours.config.hidden_act, ours.config.use_head) == (64, "gelu", False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).last_hidden_state, theirs(x).last_hidden_state, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "config.json").read_text())
    for name, value in [("use_qk_norm", True), ("attention_bias", False)]:
        (tmp_path / "config.json").write_text(json.dumps(config | {name: value}))
        message = (
            f"config.json's janus_vision_model tower has {name}={value!r}; a SigLIP-architecture tower has "
            f"{name}={not value!r}, so this one cannot be loaded here"
        )
        with pytest.raises(CheckpointError, match=re.escape(message)):
            SigLIP2Encoder.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("policy", "advice"),
    [
        (
            "pi0",
            "save it in transformers' format first and load that folder: "
            "PI0ForConditionalGeneration.from_pretrained(SRC).save_pretrained(DIR), and its processor, "
            "PI0Processor.from_pretrained(SRC).save_pretrained(DIR)",
        ),
        (
            "pi05",
            "save it in transformers' format first and load that folder: "
            "PI05ForConditionalGeneration.from_pretrained(SRC).save_pretrained(DIR), and its processor, "
            "PI05Processor.from_pretrained(SRC).save_pretrained(DIR)",
        ),
        ("act", "this library reads transformers' checkpoints"),
    ],
)
def test_a_lerobot_policys_config_says_how_to_get_a_transformers_checkpoint(policy, advice, tmp_path):
    """LeRobot's policy files (the Hub's pi0 and pi0.5 ones among them) name their kind as type, no model_type."""
    (tmp_path / "config.json").write_text(json.dumps({"type": policy, "n_obs_steps": 1}))
    message = f"config.json is a LeRobot policy's (type={policy!r}), not transformers' (it names no model_type); "
    with pytest.raises(CheckpointError, match=re.escape(message + advice)):
        SigLIP2Encoder.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("family", "tiles"),
    [("aya_vision", False), ("aya_vision", True), ("cohere2_vision", True), ("granite_docling", True),
     ("granite_docling", False)],
)  # fmt: skip
def test_the_view_of_a_tiling_processor_is_its_thumbnail(family, tiles, tmp_path, caplog):
    """Aya Vision's, Command A Vision's and Granite Docling's processors, with crop_to_patches, cut tiles and add a
    thumbnail (the image resized to size): the view reproduced is that thumbnail, and without tiles their only view.
    The warning says so only when they tile."""
    vlm, image_processor = build(family)
    image_processor.crop_to_patches = tiles
    vlm.config.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        ours = ImageProcessor.from_pretrained(tmp_path)
    assert ("here the thumbnail only" in caplog.text) == tiles
    images = random_images(3, [(40, 100), (64, 30)])  # several tiles each, so each has a thumbnail last
    if family == "granite_docling":  # one sample per image, tiles padded in the batch: the thumbnail is its last
        theirs = image_processor([[image] for image in images], return_tensors="pt")
        last = theirs["pixel_attention_mask"].sum(1) - 1
        assert (last > 1).all() == tiles and (last == 0).all() != tiles
        torch.testing.assert_close(ours(images).pixel_values, theirs["pixel_values"][[0, 1], last], atol=1e-6, rtol=0)
        return
    theirs = image_processor(images, return_tensors="pt")
    views = theirs["pixel_values"]
    if tiles:
        assert (theirs["num_patches"] > 2).all()
        views = views[theirs["num_patches"].cumsum(0) - 1]
    torch.testing.assert_close(ours(images).pixel_values, views, atol=1e-6, rtol=0)


LFM2_SIZES = [(16, 16), (12, 100), (40, 100), (64, 30), (200, 120), (33, 33), (8, 90)]


@pytest.mark.parametrize("splitting", [False, True])
def test_lfm2_vls_view_is_its_smart_resize_and_its_thumbnail(splitting, tmp_path, caplog):
    """LFM2-VL's processor sizes each image by its smart_resize (sides of multiples of 2 patches, the grid scaled into
    [min, max] image tokens), and with do_image_splitting cuts large ones into tiles followed by a thumbnail of that
    size: ours gives that view, pixel for pixel, its grid and mask; the warning says so only when it splits."""
    vlm, _ = build("lfm2_vl")
    theirs = Lfm2VlImageProcessor(
        encoder_patch_size=8, min_image_tokens=2, max_image_tokens=6, do_image_splitting=splitting, tile_size=32
    )
    vlm.config.save_pretrained(tmp_path)
    theirs.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        ours = ImageProcessor.from_pretrained(tmp_path)
    assert ("here that thumbnail, by its smart_resize rule" in caplog.text) == splitting
    assert (ours.config.naflex_resize, ours.config.min_num_patches, ours.config.max_num_patches) == ("smart", 8, 24)
    images = random_images(5, LFM2_SIZES)
    want = theirs(images, return_tensors="pt", return_row_col_info=True)
    tiles = [rows * cols for rows, cols in zip(want["image_rows"], want["image_cols"])]
    views = torch.tensor([n + (n > 1) for n in tiles])  # the tiles, then a thumbnail
    last = views.cumsum(0) - 1  # each image's thumbnail, or its only view
    assert (views > 1).any() == splitting
    got = ours(images, pad_to_max=True)
    torch.testing.assert_close(got.spatial_shapes, want["spatial_shapes"][last], atol=0, rtol=0)
    torch.testing.assert_close(got.pixel_attention_mask, want["pixel_attention_mask"][last], atol=0, rtol=0)
    torch.testing.assert_close(got.pixel_values, want["pixel_values"][last], atol=1e-6, rtol=0)
    # Saved, it is LFM2-VL's processor again, without tiles: transformers gives the same single views.
    ours_again = Lfm2VlImageProcessor.from_dict(processor_config_to_hf(ours.config))
    again = ours_again(images, return_tensors="pt")
    torch.testing.assert_close(again["pixel_values"], got.pixel_values, atol=1e-6, rtol=0)
    tower = EncoderConfig(image_size=None, num_patches=16, patch_size=8)
    assert processor_config_from_hf(processor_config_to_hf(ours.config), tower) == ours.config


def test_lfm2_vls_rule_refuses_what_it_would_size_over_the_budget():
    """At extreme aspect ratios smart_resize keeps a side at one multiple and the grid exceeds the budget
    (transformers' processor then fails to batch it); ours says so."""
    tower = EncoderConfig(image_size=None, num_patches=16, patch_size=8)
    settings = dict(image_processor_type="Lfm2VlImageProcessor", encoder_patch_size=8, max_image_tokens=6)
    ours = ImageProcessor(processor_config_from_hf(settings, tower))
    message = "image 0 (5x300) is resized to 16x288, 72 patches, over the budget of 24: its aspect ratio is too extreme"
    with pytest.raises(ValueError, match=re.escape(message)):
        ours(random_images(0, [(5, 300)]))


@pytest.mark.parametrize("family", ["idefics3", "smolvlm", "idefics2"])
def test_idefics3_tower_equals_its_own_including_padded_images(family, tmp_path):
    """Idefics3's tower (and Idefics2's, the same) reads positions at each patch's fractional coordinate for grids
    smaller than its native one (images padded in the batch): ours does too, on each image's real patches."""
    vlm, image_processor = build(family)
    vlm = perturb(vlm, seed=6).eval()
    vlm.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert (ours.config.use_head, ours.config.position_lookup) == (False, "buckets")
    generator = torch.Generator().manual_seed(2)
    full = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(full).last_hidden_state, vision_tower(vlm)(full).last_hidden_state, atol=1e-4, rtol=0
        )
        for h, w in [(3, 2), (1, 4), (3, 3), (2, 1)]:  # grids within the 4x4 native one, padded as Idefics3 pads
            mask = torch.zeros(1, 4, 4, dtype=torch.bool)
            mask[0, :h, :w] = True
            want = vision_tower(vlm)(full[:1], patch_attention_mask=mask).last_hidden_state[0, mask[0].flatten()]
            got = ours([full[0, :, : 8 * h, : 8 * w]]).last_hidden_state[0, : h * w]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    check_processor(tmp_path, family)
    # Saved alone it is transformers' Idefics3VisionTransformer, and comes back with its bucketed positions.
    ours.save_pretrained(tmp_path / "tower")
    from transformers import AutoModel

    theirs = AutoModel.from_pretrained(tmp_path / "tower").eval()
    again = SigLIP2Encoder.from_pretrained(tmp_path / "tower")
    assert again.config == ours.config
    with torch.no_grad():
        torch.testing.assert_close(theirs(full).last_hidden_state, ours(full).last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid", [19, 25])
def test_a_bucketed_tower_reads_the_cells_idefics3s_does_at_its_native_grid(grid, tmp_path):
    """At some grids Idefics3's float32 coordinates fall below a boundary, and even full-size images read a
    neighbour's position cell: a bucketed tower looks up buckets at every grid, so it equals Idefics3's tower there
    too (reading the table as is differed by 1.06 at grid 25). The grids real towers have keep every cell."""
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

    from siglip2_encoder.models.embeddings import buckets_keep_native_grid

    assert not buckets_keep_native_grid(grid)
    assert all(buckets_keep_native_grid(g) for g in (14, 16, 24, 26, 27, 32, 35, 70))
    torch.manual_seed(0)
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=2)
    theirs = perturb(Idefics3VisionTransformer(Idefics3VisionConfig(**fields, image_size=2 * grid)), seed=1).eval()
    theirs.save_pretrained(tmp_path)
    ours = SigLIP2Encoder.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 2 * grid, 2 * grid, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(pixels).last_hidden_state
        torch.testing.assert_close(ours(pixels).last_hidden_state, want, atol=1e-5, rtol=0)


def real_tokens(tokens: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """(H * W, D) tokens of a padded image, (H, W) its patch mask (a top-left h x w block) -> the block's (h * w, D)."""
    h, w = int(patch_mask[:, 0].sum()), int(patch_mask[0].sum())
    assert int(patch_mask.sum()) == h * w
    return tokens.unflatten(0, patch_mask.shape)[:h, :w].flatten(0, 1)


def their_tower_calls(tower: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Records each call of a transformers tower: (the patch mask it was given, its last_hidden_state)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((kwargs["patch_attention_mask"], output.last_hidden_state))

    tower.register_forward_hook(hook, with_kwargs=True)
    return calls


# wide (the short side at its floor), tall with a partial last patch column, square, tall and upscaled
ARIA_SIZES = [(300, 700), (600, 500), (490, 490), (200, 150)]


@pytest.mark.parametrize("layout", ["vision_tower.", "model.vision_tower."])
def test_arias_tower_and_processor_equal_its_own_on_images_of_any_shape(layout, tmp_path, caplog):
    """Aria holds Idefics3's tower class; its processor keeps each image's aspect ratio and pads it at the bottom and
    right with black, its tower masking the patches of padding alone. Ours reads each image on its own grid of whole
    patches (padded with black): image -> ours equals image -> Aria's processor -> the tower call its
    get_image_features makes, on each image's real patches, in both layouts transformers writes; hidden state -1 is
    what its projector reads. No warning: nothing of its view is left out."""
    vlm, image_processor = build("aria")
    vlm = perturb(vlm, seed=6).eval()
    vlm.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    move_tower(tmp_path, "vision_tower.", layout)
    with caplog.at_level(logging.WARNING):
        ours = SigLIP2Encoder.from_pretrained(tmp_path)
        processor = ImageProcessor.from_pretrained(tmp_path)
    assert "AriaImageProcessor" not in caplog.text
    assert (ours.config.use_head, ours.config.position_lookup, ours.config.image_size) == (False, "buckets", 490)
    assert (processor.config.letterbox, processor.config.letterbox_min_side) == ("aria", 336)
    images = random_images(3, ARIA_SIZES)
    theirs = image_processor(images, return_tensors="pt")
    calls, received = their_tower_calls(vision_tower(vlm)), []
    vlm.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: received.append(args[0]))
    with torch.no_grad():
        vlm.model.get_image_features(pixel_values=theirs["pixel_values"], pixel_mask=theirs["pixel_mask"])
        inputs = processor(images)
        got = ours(**inputs, layers=[-1])
    ((masks, last),) = calls
    assert inputs.spatial_shapes.tolist() == [[24, 35], [35, 30], [35, 35], [35, 27]]
    for i, (h, w) in enumerate(inputs.spatial_shapes.tolist()):
        n = h * w
        torch.testing.assert_close(got.last_hidden_state[i, :n], real_tokens(last[i], masks[i]), atol=1e-4, rtol=0)
        torch.testing.assert_close(got.tokens(-1)[i, :n], real_tokens(received[0][i], masks[i]), atol=1e-4, rtol=0)


def test_idefics2s_tower_and_processor_equal_its_own_on_images_of_any_shape(tmp_path, caplog):
    """Idefics2's processor shrinks images over its longest_edge keeping their aspect ratio, raises sides under its
    shortest_edge, and pads the batch; its model masks every patch that reaches into the padding. Ours reads each
    image on its own grid of whole patches: image -> ours equals image -> Idefics2's processor -> the tower call its
    get_image_features makes, on each image's real patches. With do_image_splitting a warning says what is left
    out."""
    vlm, image_processor = build("idefics2")
    vlm = perturb(vlm, seed=6).eval()
    vlm.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        ours = SigLIP2Encoder.from_pretrained(tmp_path)
        processor = ImageProcessor.from_pretrained(tmp_path)
    assert "Idefics2ImageProcessor" not in caplog.text
    assert (processor.config.letterbox, processor.config.image_size, processor.config.letterbox_min_side) == (
        "idefics2",
        (32, 32),
        16,
    )
    # shrunk wide (the short side raised to 16), shrunk tall with a partial patch column, kept with partial patches,
    # upscaled to the floor, the longest edge
    images = random_images(4, [(20, 50), (45, 30), (24, 27), (10, 10), (32, 32)])
    theirs = image_processor(images, return_tensors="pt")
    calls = their_tower_calls(vision_tower(vlm))
    with torch.no_grad():
        vlm.model.get_image_features(theirs["pixel_values"], theirs["pixel_attention_mask"])
        inputs = processor(images)
        got = ours(**inputs)
    ((masks, last),) = calls
    assert inputs.spatial_shapes.tolist() == [[2, 4], [4, 2], [3, 3], [2, 2], [4, 4]]
    for i, (h, w) in enumerate(inputs.spatial_shapes.tolist()):
        torch.testing.assert_close(got.last_hidden_state[i, : h * w], real_tokens(last[i], masks[i]), atol=1e-4, rtol=0)
    image_processor.do_image_splitting = True
    image_processor.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        ImageProcessor.from_pretrained(tmp_path)
    assert (
        "Idefics2ImageProcessor with do_image_splitting adds 4 crops of each image before it; here the whole image"
        in caplog.text
    )


@pytest.mark.parametrize("layout", ["model.", ""])
def test_phi4_multimodals_tower_equals_its_own_head_and_padded_crops_included(layout, tmp_path, caplog):
    """Phi-4-multimodal's tower: bucketed positions and a head, in its image embedding (a Phi4MultimodalModel's
    without model.). Ours equals it, head included, on full images and on each padded crop's real patches; its
    projection reads hidden state -2 pooled 2x2. Its processor's global view is ours (for images of its size, also
    their one crop; other images: test_letterbox); saved, the tower is a Phi4MultimodalVisionModel that transformers
    loads.

    Their eager attention is the oracle: with sdpa, transformers (5.25) drops an unpadded crop's all-ones mask and
    its attention's is_causal=True then makes SDPA causal, unlike the original model's SigLIP (pinned below).
    The head's features reach 108 on these weights, where transformers' own float32 result is 3.5e-3 from its float64
    one (ours 4e-4 from its float32 one on an AMD EPYC, 1e-4 on Intel Xeons): pooled features compare with rtol 1e-4."""
    vlm, image_processor = build("phi4_multimodal")
    vlm = perturb(vlm, seed=6).eval()
    vlm.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)
    saved = "model.embed_tokens_extend.image_embed.img_processor."
    move_tower(tmp_path, saved, layout + saved.removeprefix("model."))
    with caplog.at_level(logging.WARNING):
        ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert "adds a global view, that canvas resized to size; here the global view only" in caplog.text
    assert (ours.config.use_head, ours.config.position_lookup) == (True, "buckets")
    images = random_images(3, [(32, 32), (32, 32)])
    want = image_processor(images, return_tensors="pt")["image_pixel_values"]  # (B, views, 3, 32, 32)
    pixels = ImageProcessor(ours.processor_config)(images).pixel_values
    torch.testing.assert_close(pixels, want[:, 0], atol=1e-6, rtol=0)  # the global view
    torch.testing.assert_close(pixels, want[:, 1], atol=1e-6, rtol=0)  # the one crop
    theirs = vision_tower(vlm)
    with torch.no_grad():
        want, got = theirs(pixels), ours(pixels, layers=[-2])
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=1e-4)
        pooled = torch.nn.functional.avg_pool2d(got.tokens(-2).reshape(2, 4, 4, 32).permute(0, 3, 1, 2), 2)
        received = vlm.model.embed_tokens_extend.image_embed.get_img_features(pixels)
        torch.testing.assert_close(pooled.flatten(2).transpose(1, 2), received, atol=1e-4, rtol=0)
        mask = torch.zeros(1, 4, 4, dtype=torch.bool)
        mask[0, :3, :2] = True  # a crop padded at the bottom and right
        want = theirs(pixels[:1], patch_attention_mask=mask)
        got = ours([pixels[0, :, :24, :16]])
        torch.testing.assert_close(got.last_hidden_state[0, :6], want.last_hidden_state[0, mask[0].flatten()],
                                   atol=1e-4, rtol=0)  # fmt: skip
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=1e-4)
        sdpa = Phi4MultimodalVisionModel._from_config(copy.deepcopy(theirs.config), attn_implementation="sdpa")
        sdpa.eval().load_state_dict(theirs.state_dict())
        causal = sdpa(pixels).last_hidden_state
        assert not torch.allclose(causal, theirs(pixels).last_hidden_state, atol=1e-2)
    ours.save_pretrained(tmp_path / "tower")
    again = Phi4MultimodalVisionModel.from_pretrained(tmp_path / "tower", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixels).pooler_output, theirs(pixels).pooler_output, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_the_hubs_remote_code_phi4mm_folder_loads_the_tower_its_conversion_builds(tmp_path):
    """The Hub's Phi-4-multimodal main branch is remote code (model_type phi4mm): its config.json describes no tower
    (its code builds a SigLIP So400m/14 at 448 px) and transformers' conversion of it builds
    Phi4MultimodalVisionConfig() with the key names unchanged. A folder of that layout (that config's fields, a
    full-size tower's random weights, its processor file) loads with those defaults and equals transformers' tower."""
    config = Phi4MultimodalVisionConfig()
    theirs = Phi4MultimodalVisionModel._from_config(config, attn_implementation="eager")  # see the test above
    with torch.no_grad():  # its init draws matrices of std 1: 27 such layers amplify rounding past any tolerance
        for weight in theirs.parameters():
            if weight.ndim == 2:
                weight.mul_(weight.shape[1] ** -0.5)
    theirs = perturb(theirs, seed=1).eval()
    prefix = "model.embed_tokens_extend.image_embed.img_processor."
    save_file({prefix + k: v for k, v in theirs.state_dict().items()}, tmp_path / "model.safetensors")
    layer = dict(crop_size=448, hd_transform_order="sub_glb", use_hd_transform=True, image_token_compression_cls="avg")
    settings = dict(model_type="phi4mm", architectures=["Phi4MMForCausalLM"], embd_layer=dict(image_embd_layer=layer))
    (tmp_path / "config.json").write_text(json.dumps(settings))
    processor = dict(image_processor_type="Phi4MMImageProcessor", processor_class="Phi4MMProcessor", dynamic_hd=36)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert (ours.config.hidden_size, ours.config.num_hidden_layers, ours.config.num_attention_heads) == (1152, 27, 16)
    assert (ours.config.image_size, ours.config.patch_size, ours.config.position_lookup) == (448, 14, "buckets")
    assert ours.processor_config.image_size == (448, 448) and ours.processor_config.resample == "bicubic"
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))  # a 4 x 4 grid: its buckets
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=1e-5)


def test_only_the_shards_holding_the_tower_are_read(tmp_path):
    vlm, _ = build("paligemma")
    vlm.save_pretrained(tmp_path, max_shard_size="20KB")
    keep_only_shards_of(tmp_path, "vision_tower.")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = vision_tower(vlm.eval())(pixel_values=x).last_hidden_state
        got = SigLIP2Encoder.from_pretrained(tmp_path)(x).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_vlm_with_another_tower_or_pan_and_scan_is_refused(tmp_path):
    LlavaConfig(text_config=LM | dict(model_type="llama")).save_pretrained(tmp_path / "clip")  # a CLIP tower
    message = (
        "config.json is a 'llava' checkpoint whose vision tower is 'clip_vision_model', not a SigLIP-architecture "
        "tower (one of siglip_vision_model, siglip2_vision_model, idefics3_vision, smolvlm_vision, idefics2_vision, "
        "granite_docling_vision, janus_vision_model, phi4_multimodal_vision); load it with the library of its own "
        "tower"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        SigLIP2Encoder.from_pretrained(tmp_path / "clip")
    vlm, _ = build("gemma3")
    vlm.save_pretrained(tmp_path / "gemma3")
    Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=True).save_pretrained(tmp_path / "gemma3")
    with pytest.raises(CheckpointError, match=re.escape("crops pan-and-scan views (do_pan_and_scan=true)")):
        ImageProcessor.from_pretrained(tmp_path / "gemma3")


def test_import_llava_refuses_what_it_would_drop(tmp_path):
    from siglip2_encoder.integrations.llava_export import import_llava

    build("paligemma")[0].save_pretrained(tmp_path / "paligemma")
    message = (
        f"{tmp_path}/paligemma is a 'paligemma' checkpoint, not one of ('llava', 'llava_onevision', 'llava_next'): "
        f"importing it would drop a different architecture. Load its vision tower alone with "
        f"SigLIP2Encoder.from_pretrained('{tmp_path}/paligemma')"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        import_llava(tmp_path / "paligemma")
    build("llava_next")[0].save_pretrained(tmp_path / "next")  # its default strategy drops a token SigLIP lacks
    with pytest.raises(ValueError, match=re.escape("vision_feature_select_strategy='default' drops a CLS token")):
        import_llava(tmp_path / "next")


@pytest.mark.parametrize("family", ["paligemma", "gemma3", "llava_onevision", "lfm2_vl", "smolvlm"])
def test_the_stored_dtype_is_kept_and_equals_the_vlms_tower_in_it(family, tmp_path):
    vlm, _ = build(family)
    perturb(vlm, seed=8).to(torch.bfloat16).save_pretrained(tmp_path)
    ours = SigLIP2Encoder.from_pretrained(tmp_path)
    assert ours.dtype == torch.bfloat16
    theirs = vision_tower(type(vlm).from_pretrained(tmp_path, dtype=torch.bfloat16).eval())
    if family == "lfm2_vl":
        x = naflex_inputs(9)
        x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
    else:
        x = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16))
    mask = x.get("pixel_attention_mask", torch.ones(2, 1)).bool()[..., None]
    with torch.no_grad():
        got, want = ours(**x).last_hidden_state, theirs(**x).last_hidden_state
    assert got.dtype == want.dtype == torch.bfloat16
    # Both in bf16: the kernels' rounding differs, the weights do not (fp32 parity is the test above).
    torch.testing.assert_close((got * mask).float(), (want * mask).float(), atol=5e-2, rtol=0)
