"""ONNX export of the tower, run by onnxruntime: dynamic batch and grids (a grid the export never saw included),
NaFlex position grids resized inside the graph, outputs as forward chooses them; equal to our PyTorch outputs."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import perturb

from siglip2_encoder import SigLIP2Encoder
from siglip2_encoder.cli import EXIT_OK, EXIT_USAGE, main
from siglip2_encoder.data.processor import patchify
from siglip2_encoder.export.onnx_export import ExportGraph, export_onnx

TINY = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, patch_size=8)


def run(path, **inputs) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: np.asarray(v) for k, v in inputs.items()})[0]  # tensors, arrays or lists


@pytest.fixture(scope="module")
def fixed():
    torch.manual_seed(0)
    return SigLIP2Encoder.from_preset("siglip2-base-patch16-224", image_size=32, **TINY).eval()


@pytest.fixture(scope="module")
def naflex():
    torch.manual_seed(0)
    return SigLIP2Encoder.from_preset("siglip2-base-patch16-naflex", num_patches=16, **TINY).eval()


@pytest.mark.parametrize("output", ["pooled", "tokens", -2])
def test_fixed_resolution_export_equals_pytorch_on_any_batch_and_grid(fixed, output, tmp_path):
    export_onnx(fixed, tmp_path / "tower.onnx", output=output)
    for shape in [(1, 3, 32, 32), (3, 3, 32, 32), (2, 3, 48, 24)]:  # the last grid, 6x3, the export never saw
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            out = fixed(x, layers=[output] if isinstance(output, int) else [])
        want = {"pooled": out.pooler_output, "tokens": out.last_hidden_state}.get(output, out.hidden_states.get(output))
        np.testing.assert_allclose(run(tmp_path / "tower.onnx", pixel_values=x), want.numpy(), atol=1e-4, rtol=0)


def naflex_batch(images, patch):
    """transformers-style padded NaFlex input for ``images`` (C, H, W)."""
    patches = [patchify(image[None], patch)[0] for image in images]
    length = max(len(p) for p in patches)
    pixels = torch.zeros(len(images), length, patches[0].shape[1])
    mask = torch.zeros(len(images), length, dtype=torch.int32)  # as transformers' processor gives it
    for b, p in enumerate(patches):
        pixels[b, : len(p)], mask[b, : len(p)] = p, 1
    grids = torch.tensor([[im.shape[1] // patch, im.shape[2] // patch] for im in images])
    return pixels, grids, mask


def test_naflex_export_resizes_each_images_grid_in_the_graph(naflex, tmp_path):
    export_onnx(naflex, tmp_path / "naflex.onnx")
    generator = torch.Generator().manual_seed(3)
    for sizes in [[(32, 32)], [(32, 32), (16, 40), (56, 8)], [(8, 8), (24, 72)]]:  # 1x1 and 3x9: never seen
        images = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
        pixels, grids, mask = naflex_batch(images, 8)
        with torch.no_grad():
            want = naflex(images).pooler_output
        got = run(tmp_path / "naflex.onnx", pixel_values=pixels, spatial_shapes=grids, pixel_attention_mask=mask)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_the_naflex_graph_takes_both_processors_outputs_unchanged(naflex, tmp_path):
    """Our ImageProcessor and transformers' Siglip2ImageProcessor give the same input dtypes (mask int32, shapes
    int64): either's output goes into onnxruntime as it is, and gives the PyTorch tower's features."""
    from PIL import Image
    from transformers import Siglip2ImageProcessor

    from siglip2_encoder import ImageProcessor
    from siglip2_encoder.checkpoints.hf_format import processor_config_to_hf

    export_onnx(naflex, tmp_path / "naflex.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "naflex.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 64), (90, 30)]]
    ours = ImageProcessor(naflex.processor_config)(images)
    theirs = Siglip2ImageProcessor.from_dict(processor_config_to_hf(naflex.processor_config))(
        images, return_tensors="np"
    )
    with torch.no_grad():
        want = naflex(**ours).pooler_output.numpy()
    got_ours = session.run(None, {k: ours[k].numpy() for k in ours.keys()})[0]
    got_theirs = session.run(None, dict(theirs))[0]
    np.testing.assert_allclose(got_ours, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_theirs, want, atol=1e-4, rtol=0)


def bucketed_tower(family: str):
    """A random tower with bucketed positions as transformers builds it (Idefics3's, or Phi-4-multimodal's with a
    head; eager attention: see tests/test_vlm_import.py), saved and loaded as ours: (theirs, ours)."""
    from transformers import Idefics3VisionConfig, Phi4MultimodalVisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalVisionModel

    torch.manual_seed(0)
    fields = dict(TINY, patch_size=4, image_size=20)  # a 5x5 grid
    if family == "idefics3":
        theirs = Idefics3VisionTransformer(Idefics3VisionConfig(**fields))
    else:
        config = Phi4MultimodalVisionConfig(**fields, crop_size=20)
        theirs = Phi4MultimodalVisionModel._from_config(config, attn_implementation="eager")
    return perturb(theirs, seed=1).eval(), theirs


@pytest.mark.parametrize(("family", "output"), [("idefics3", "tokens"), ("idefics3", -1), ("phi4", "pooled")])
def test_a_bucketed_towers_graph_equals_transformers_tower_on_padded_images(family, output, tmp_path):
    """Idefics3's and Phi-4-multimodal's towers read positions at each patch's fractional coordinate: the graph does
    so in onnxruntime, and with ``patch_attention_mask`` takes padded images as transformers' tower does (padding
    patches not attended to, and keeping their values, which Idefics3's connector reads), on grids it never saw."""
    theirs, _ = bucketed_tower(family)
    theirs.save_pretrained(tmp_path / "tower")
    ours = SigLIP2Encoder.from_pretrained(tmp_path / "tower").eval()
    assert ours.config.position_lookup == "buckets"
    if output == "tokens":  # the command, on the saved folder
        command = ["export-onnx", str(tmp_path / "masked.onnx"), "--model", str(tmp_path / "tower")]
        assert main([*command, "--returns", "tokens", "--patch-attention-mask"]) == EXIT_OK
    else:
        export_onnx(ours, tmp_path / "masked.onnx", output=output, patch_attention_mask=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "masked.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("pixel_values", "tensor(float)"),
        ("patch_attention_mask", "tensor(bool)"),
    ]
    pixels = torch.randn(3, 3, 28, 24, generator=torch.Generator().manual_seed(1))  # a 7x6 grid, padded below:
    mask = torch.zeros(3, 7, 6, dtype=torch.bool)
    mask[0], mask[1, :3, :5], mask[2, :, :1] = True, True, True  # whole, 3x5 and 7x1 images

    def features(model, x):
        with torch.no_grad():
            out = model(x, patch_attention_mask=mask, output_hidden_states=True)
        return {"pooled": out.pooler_output, "tokens": out.last_hidden_state}.get(output, out.hidden_states[-1])

    # Phi-4's pooled features reach 90 on these weights, where transformers' own float32 result is 2.4e-3 from its
    # float64 one: the oracle is float64, the tolerance twice transformers' float32 error (at least 1e-4).
    want = features(copy.deepcopy(theirs).double(), pixels.double()).numpy()
    tolerance = max(1e-4, 2 * np.abs(features(theirs, pixels).numpy() - want).max())
    got = session.run(None, {"pixel_values": pixels.numpy(), "patch_attention_mask": mask.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=tolerance, rtol=0)
    if family == "idefics3" and output == "tokens":  # without the mask input: whole images of any grid
        export_onnx(ours, tmp_path / "whole.onnx", output=output)
        with torch.no_grad():
            want = theirs(pixels).last_hidden_state
            np.testing.assert_allclose(ours(pixels).last_hidden_state.numpy(), want.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(run(tmp_path / "whole.onnx", pixel_values=pixels), want.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["idefics2", "aria"])
def test_an_own_grid_towers_graph_takes_its_processors_output_and_equals_transformers(family, tmp_path):
    """Idefics2's and Aria's towers, loaded with their processors, read each image on its own grid: their graph takes
    our processor's output (patches, grids, mask) unchanged, and gives each image's real tokens as the tower call
    their transformers model makes (Idefics2's final tokens; hidden state -1, what Aria's projector reads)."""
    from conftest import random_images
    from test_vlm_import import build, real_tokens, their_tower_calls, vision_tower

    from siglip2_encoder import ImageProcessor

    vlm, image_processor = build(family)
    vlm = perturb(vlm, seed=6).eval()
    vlm.save_pretrained(tmp_path / "vlm")
    image_processor.save_pretrained(tmp_path / "vlm")
    returns = "tokens" if family == "idefics2" else "-1"
    command = ["export-onnx", str(tmp_path / "tower.onnx"), "--model", str(tmp_path / "vlm"), "--returns", returns]
    assert main(command) == EXIT_OK
    sizes = [(20, 50), (45, 30), (24, 27), (10, 10)] if family == "idefics2" else [(300, 700), (600, 500), (200, 150)]
    images = random_images(5, sizes)
    inputs = ImageProcessor.from_pretrained(tmp_path / "vlm")(images)
    got = run(tmp_path / "tower.onnx", **dict(inputs))
    theirs, calls, received = image_processor(images, return_tensors="pt"), their_tower_calls(vision_tower(vlm)), []
    with torch.no_grad():
        if family == "idefics2":
            vlm.model.get_image_features(theirs["pixel_values"], theirs["pixel_attention_mask"])
            received = [calls[0][1]]
        else:
            vlm.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: received.append(args[0]))
            vlm.model.get_image_features(pixel_values=theirs["pixel_values"], pixel_mask=theirs["pixel_mask"])
    masks = calls[0][0]
    for i, (h, w) in enumerate(inputs.spatial_shapes.tolist()):
        want = real_tokens(received[0][i], masks[i]).numpy()
        np.testing.assert_allclose(got[i, : h * w], want, atol=1e-4, rtol=0)
        assert not got[i, h * w :].any()  # padding slots are zero, as the tower's


def test_export_onnx_command_and_its_refusals(fixed, tmp_path, caplog):
    path = tmp_path / "cli.onnx"
    assert (
        main(["export-onnx", str(path), "--random-weights", "siglip2-base-patch16-224", "--returns", "-2"]) == EXIT_OK
    )
    # The exporter keeps the weights beside the graph (external data): onnxruntime reads both.
    got = run(path, pixel_values=torch.rand(1, 3, 224, 224))
    assert got.shape == (1, 196, 768)
    assert (
        main(["export-onnx", str(path), "--random-weights", "siglip2-base-patch16-224", "--returns", "x"]) == EXIT_USAGE
    )
    assert caplog.messages[-1] == "error: --returns x: give pooled, tokens or a hidden-state index such as -2"
    text = ["export-onnx", str(tmp_path / "t.onnx"), "--random-weights", "siglip2-base-patch16-224", "--text"]
    assert main(text) == EXIT_USAGE
    assert (
        caplog.messages[-1]
        == "error: --text exports a checkpoint's text tower: give a checkpoint, not --random-weights"
    )
    # The forms before 0.2.0 (MODEL OUT.onnx; --output) are refused with the new spelling.
    assert main(["export-onnx", "google/x", str(path)]) == EXIT_USAGE
    assert caplog.messages[-1].endswith(f"export-onnx {path} --model google/x")
    assert (
        main(["export-onnx", str(path), "--random-weights", "siglip2-base-patch16-224", "--output", "-2"]) == EXIT_USAGE
    )
    assert caplog.messages[-1] == "error: export-onnx's --output is --returns since 0.2.0: --returns -2"
    mask = ["export-onnx", str(path), "--random-weights", "siglip2-base-patch16-224", "--patch-attention-mask"]
    assert main(mask) == EXIT_USAGE
    assert caplog.messages[-1] == (
        "error: --patch-attention-mask is for towers with bucketed positions (Idefics3's, SmolVLM's); "
        "siglip2-base-patch16-224 interpolates its positions and takes whole images: leave it out"
    )
    with pytest.raises(ValueError, match=re.escape("this tower has position_lookup='interpolate' and takes whole")):
        export_onnx(fixed, path, patch_attention_mask=True)
    lettered = copy.deepcopy(fixed)
    lettered.processor_config = lettered.processor_config.replace(patch_size=8, letterbox="aria")
    message = (
        "the tower's processor gives patches of each image's own grid (letterbox='aria'), which a graph of its "
        "bicubic positions cannot read; set tower.processor_config = "
        "tower.processor_config.at_size(tower.processor_config.image_size) to export one size"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        export_onnx(lettered, path)
    headless = SigLIP2Encoder.from_preset("siglip2-base-patch16-224", use_head=False, **TINY)
    with pytest.raises(ValueError, match="this tower has no attention-pooling head; export output='tokens' or a layer"):
        ExportGraph(headless)


def test_text_tower_export_equals_pytorch_on_any_batch_and_length(tmp_path, zero_shot_dir):
    """The text graph, as trained (ids only: every position attended) and with a padding mask input, equals our text
    tower; the command's export of a saved image-text folder takes its tokenizer's output unchanged."""
    from transformers import AutoTokenizer

    from siglip2_encoder import SigLIP2Model, SigLIP2TextEncoder, TextConfig
    from siglip2_encoder.export.onnx_export import export_text_onnx

    torch.manual_seed(0)
    fields = {k: v for k, v in TINY.items() if k != "patch_size"}
    tower = SigLIP2TextEncoder(TextConfig(**fields, vocab_size=50, max_position_embeddings=16)).eval()
    export_text_onnx(tower, tmp_path / "text.onnx")
    export_text_onnx(tower, tmp_path / "masked.onnx", padding_mask=True)
    generator = torch.Generator().manual_seed(4)
    for batch, length in [(1, 16), (3, 16), (2, 5)]:
        ids = torch.randint(0, 50, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, length // 2 :] = 0  # the last text is padded
        with torch.no_grad():
            want, want_masked = tower(ids).pooler_output, tower(ids, mask).pooler_output
        np.testing.assert_allclose(run(tmp_path / "text.onnx", input_ids=ids), want.numpy(), atol=1e-4, rtol=0)
        got = run(tmp_path / "masked.onnx", input_ids=ids, attention_mask=mask)
        np.testing.assert_allclose(got, want_masked.numpy(), atol=1e-4, rtol=0)
    # The command exports an image-text checkpoint's text tower; a folder saved here feeds it its tokenizer's output.
    SigLIP2Model.from_pretrained(zero_shot_dir).save_pretrained(tmp_path / "saved")
    assert main(["export-onnx", str(tmp_path / "cli.onnx"), "--model", str(tmp_path / "saved"), "--text"]) == EXIT_OK
    texts = ["a photo of a cat", "a dog"]
    inputs = AutoTokenizer.from_pretrained(tmp_path / "saved")(texts, padding="max_length", max_length=64)
    assert list(inputs) == ["input_ids"]
    with torch.no_grad():
        want = SigLIP2Model.from_pretrained(tmp_path / "saved").get_text_features(torch.tensor(inputs["input_ids"]))
    np.testing.assert_allclose(run(tmp_path / "cli.onnx", **inputs), want.numpy(), atol=1e-4, rtol=0)
