"""Every CUDA path, on tiny random checkpoints: ``pytest -m cuda`` (skipped without a CUDA device; run by
benchmarks/gpu/run.sh on a lent GPU). Written for the GPU machine's older stack too (torch >= 2.4, transformers >=
5.0): a test that needs a newer version skips, naming it.

Tolerances, stated once: GPU kernels differ from CPU ones in summation order, so fp32 on CUDA is compared at 1e-4
with TF32 off (PyTorch's default for matmuls; for convolutions, which the fixed-resolution patch embedding is, the
default is on, and these tests turn it off); fp16 / bf16 at the rounding of the half type over a 3-layer tower
(fp16: 2e-2 absolute + 1e-2 relative; bf16: 6e-2 + 2e-2, on features of unit scale).
"""

from __future__ import annotations

import pytest
import torch
from conftest import free_port, random_images
from PIL import Image

from siglip2_encoder import ImageProcessor, SigLIP2Encoder
from siglip2_encoder.models.attention import ATTENTION_BACKENDS
from siglip2_encoder.models.loss import sigmoid_loss, sigmoid_loss_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)"),
]

HALF = {torch.float16: dict(atol=2e-2, rtol=1e-2), torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}
GRID_SIZES = [(30, 100), (64, 64), (100, 20), (9, 9), (200, 33)]  # a NaFlex batch of mixed grids


@pytest.fixture(autouse=True)
def no_tf32_convolutions():
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def naflex_inputs(naflex_dir, budget: int = 24) -> dict[str, torch.Tensor]:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(naflex_dir)
    inputs = processor(random_images(0, GRID_SIZES), max_num_patches=budget, return_tensors="pt")
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["sdpa", "varlen", "flash_attn", "flex"])
def test_each_attention_backend_on_a_packed_naflex_batch(naflex_dir, backend, dtype):
    """Each backend in half precision vs our sdpa in the same precision (the backend's own error) and vs
    transformers' sdpa on the padded batch (the whole tower's), on real tokens only."""
    from transformers import Siglip2VisionModel

    device = torch.device("cuda")
    reason = ATTENTION_BACKENDS[backend].unavailable(device, dtype, 0.0)
    if reason:
        pytest.skip(f"{backend} {reason}")
    inputs = naflex_inputs(naflex_dir)
    mask = inputs["pixel_attention_mask"].bool()
    ours = SigLIP2Encoder.from_pretrained(naflex_dir).cuda().set_precision(dtype).eval()
    theirs = Siglip2VisionModel.from_pretrained(naflex_dir, attn_implementation="sdpa").to("cuda", dtype).eval()
    with torch.no_grad():
        sdpa = ours(**inputs)
        ours.attention_backend = backend
        got = ours(**inputs)
        want = theirs(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()})
    for name, reference in (("our sdpa", sdpa.last_hidden_state[mask]), ("transformers", want.last_hidden_state[mask])):
        torch.testing.assert_close(got.last_hidden_state[mask].float(), reference.float(), **HALF[dtype], msg=name)
    torch.testing.assert_close(got.pooler_output.float(), want.pooler_output.float(), **HALF[dtype])


def test_transformers_flash_attention_2_skips_with_its_reason(naflex_dir):
    """transformers' flash_attention_2 needs the flash-attn package; without it the GPU run says so."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("transformers' flash_attention_2 needs flash-attn (pip install flash-attn; no wheel on PyPI)")
    from transformers import Siglip2VisionModel

    inputs = naflex_inputs(naflex_dir)
    mask = inputs["pixel_attention_mask"].bool()
    theirs = Siglip2VisionModel.from_pretrained(naflex_dir, attn_implementation="flash_attention_2")
    ours = SigLIP2Encoder.from_pretrained(naflex_dir).cuda().set_precision(torch.bfloat16).eval()
    with torch.no_grad():
        want = theirs.to("cuda", torch.bfloat16).eval()(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                                           for k, v in inputs.items()})  # fmt: skip
        got = ours(**inputs)
    torch.testing.assert_close(got.last_hidden_state[mask].float(), want.last_hidden_state[mask].float(),
                               **HALF[torch.bfloat16])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_half_precision_tower_is_its_fp32_tower_rounded(fixed_dir, dtype):
    x = torch.randn(4, 3, 36, 36, generator=torch.Generator().manual_seed(0)).cuda()
    fp32 = SigLIP2Encoder.from_pretrained(fixed_dir).cuda().eval()
    cpu = SigLIP2Encoder.from_pretrained(fixed_dir).eval()
    half = SigLIP2Encoder.from_pretrained(fixed_dir).cuda().set_precision(dtype).eval()
    with torch.no_grad():
        want, got, on_cpu = fp32(x, layers=[-2]), half(x, layers=[-2]), cpu(x.cpu(), layers=[-2])
    torch.testing.assert_close(want.pooler_output.cpu(), on_cpu.pooler_output, atol=1e-4, rtol=0)  # fp32: CUDA = CPU
    for a, b in ((got.pooler_output, want.pooler_output), (got.hidden_states[-2], want.hidden_states[-2])):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, **HALF[dtype])


@pytest.fixture(scope="module")
def jpeg_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    for i, pixels in enumerate(random_images(3, [(50 + 7 * i, 80 - 5 * i) for i in range(10)])):
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return sorted(str(p) for p in folder.glob("*.jpg"))


def test_extract_on_cuda_equals_itself_at_a_batch_size_and_cpu_across_batch_sizes(fixed_dir, jpeg_files, tmp_path):
    """GPU kernels are not batch-invariant: byte equality holds between runs at one batch size; across batch sizes
    and against the CPU run, fp32 features agree within 1e-4."""
    from siglip2_encoder.pipeline.extract import extract
    from siglip2_encoder.pipeline.settings import ExtractSettings
    from siglip2_encoder.pipeline.store import ExtractedFeatures

    def run(name: str, device: str, batch: int) -> torch.Tensor:
        tower = SigLIP2Encoder.from_pretrained(fixed_dir)
        settings = ExtractSettings(model=str(fixed_dir), device=device, batch_size=batch, last_hidden_state=True)
        extract(jpeg_files, tmp_path / name, tower, ImageProcessor(tower.processor_config), settings)
        paths, pooled = ExtractedFeatures.open(tmp_path / name).pooled()
        assert paths == jpeg_files
        return pooled

    first, again, other, cpu = run("a", "cuda", 4), run("b", "cuda", 4), run("c", "cuda", 3), run("d", "cpu", 4)
    assert torch.equal(first, again)
    torch.testing.assert_close(other, first, atol=1e-4, rtol=0)
    torch.testing.assert_close(cpu, first, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [7, 1000])
def test_the_tiled_loss_on_cuda_equals_the_cpu_reference(dtype, batch, backend):
    generator = torch.Generator().manual_seed(batch)
    images = torch.nn.functional.normalize(torch.randn(batch, 64, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(batch, 64, generator=generator), dim=-1)
    scale, bias = torch.tensor(2.3), torch.tensor(-10.0)
    inputs = [t.clone().requires_grad_() for t in (images, texts, scale, bias)]
    want = sigmoid_loss_reference(*inputs)
    want.backward()
    on_gpu = [t.to("cuda", dtype if t.dim() else torch.float32).detach().requires_grad_() for t in inputs]
    got = sigmoid_loss(*on_gpu, tile=256, backend=backend)  # triton: the kernels compiled for the GPU
    got.backward()
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), want.detach(), atol=atol * max(1.0, want.item()), rtol=0)
    for g, w in zip(on_gpu, inputs):
        torch.testing.assert_close(g.grad.float().cpu(), w.grad, atol=atol, rtol=0)


def test_ddp_on_nccl_with_one_rank_equals_the_plain_step():
    """The VLM under ``ddp_vlm`` on NCCL (world 1): one SGD step gives the parameters of the same step without DDP."""
    import copy

    import torch.distributed as dist
    from test_llava import images, make_vlm

    from siglip2_encoder.integrations.llava import TrainingStage, apply_stage
    from siglip2_encoder.integrations.parallel import ddp_vlm

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    model, processor, _ = make_vlm(seed=0)
    apply_stage(model, TrainingStage(projector=True, language_model="full", vision_tower="full"))
    model = model.cuda().train()
    inputs = processor(["<image> describe image", "what is <image> it"], [images(1, 0), images(1, 2)], ["a", "b c"])
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    plain = copy.deepcopy(model)

    def step(module: torch.nn.Module) -> None:
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        module(**batch).loss.backward()
        optimizer.step()

    step(plain)
    before = model.language_model.lm_head.weight.detach().clone()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        step(ddp_vlm(model, device_ids=[0]))
    finally:
        dist.destroy_process_group()
    want = plain.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, want[name], atol=1e-5, rtol=0, msg=name)
    assert not torch.equal(model.language_model.lm_head.weight, before)  # the step moved the weights
