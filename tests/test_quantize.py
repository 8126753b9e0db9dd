"""Quantized inference copies (torchao): the same int8 scheme applied to transformers' SiglipVisionModel gives the
same features; the tower quantized from stays as it was; the copy refuses saving; extract --quantize."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
from transformers import SiglipVisionModel

from siglip2_encoder import ExtractedFeatures, SigLIP2Encoder
from siglip2_encoder.cli import EXIT_OK, main
from siglip2_encoder.export.quantize import quantize
from siglip2_encoder.pipeline.settings import ExtractSettings

CONFIGS = {"int8": Int8DynamicActivationInt8WeightConfig, "int8-weight": Int8WeightOnlyConfig}


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_quantized_tower_equals_transformers_quantized_the_same_way(fixed_dir, scheme):
    ours = SigLIP2Encoder.from_pretrained(fixed_dir)
    before = copy.deepcopy(ours.state_dict())
    theirs = SiglipVisionModel.from_pretrained(fixed_dir).eval()
    quantize_(theirs.encoder, CONFIGS[scheme]())  # transformers 5: the tower is the model itself
    quantized = quantize(ours, scheme)
    x = torch.randn(3, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, full = quantized(x), theirs(pixel_values=x), ours(x)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=0)
    assert F.cosine_similarity(got.pooler_output, full.pooler_output).min() > 0.99  # and close to fp32
    assert not torch.equal(got.pooler_output, full.pooler_output)  # it is quantized
    assert all(torch.equal(v, before[k]) and type(v) is torch.Tensor for k, v in ours.state_dict().items())


def test_the_copy_cannot_be_saved_and_bad_requests_are_refused(fixed_dir, tmp_path):
    quantized = quantize(SigLIP2Encoder.from_pretrained(fixed_dir))
    with pytest.raises(ValueError, match=re.escape("cannot save: 18 weights are quantized (e.g. encoder.layers.0.")):
        quantized.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape("scheme must be one of ['int8', 'int8-weight'], got scheme='int4'")):
        quantize(SigLIP2Encoder.from_pretrained(fixed_dir), "int4")
    with pytest.raises(ValueError, match=re.escape("quantize runs the rest of the tower in fp32; got dtype='bf16'")):
        ExtractSettings(model="m", quantize="int8", dtype="bf16")


def test_extract_quantize_writes_close_features(tiny_checkpoint, photos, tmp_path):
    folder = str(photos[0]).rsplit("/", 1)[0]
    common = [folder, "--model", str(tiny_checkpoint), "--batch-size", "3"]
    assert main(["extract", *common, "-o", str(tmp_path / "fp32")]) == EXIT_OK
    assert main(["extract", *common, "--quantize", "int8", "-o", str(tmp_path / "int8")]) == EXIT_OK
    want, got = (
        ExtractedFeatures.open(tmp_path / "fp32").pooled()[1],
        ExtractedFeatures.open(tmp_path / "int8").pooled()[1],
    )
    assert F.cosine_similarity(got, want).min() > 0.99 and not torch.equal(got, want)
    assert json.loads((tmp_path / "int8" / "run.json").read_text())["quantize"] == "int8"
