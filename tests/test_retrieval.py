"""Retrieval: text embeddings of many texts, exact and FAISS search, text-to-image and image-to-text, against
transformers' SiglipModel features on the same checkpoint (the oracle) and brute-force search."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TEXT, VISION, keep_only_shards_of, perturb
from PIL import Image
from transformers import AutoModel, AutoTokenizer, SiglipConfig, SiglipModel

from siglip2_encoder import CheckpointError, ExtractedFeatures, SigLIP2Encoder
from siglip2_encoder.cli import EXIT_FATAL, EXIT_OK, EXIT_USAGE, main
from siglip2_encoder.models.text import SigLIP2TextEncoder
from siglip2_encoder.pipeline.faiss_index import FaissIndex, auto_factory
from siglip2_encoder.pipeline.retrieval import top_k

TEXTS = ["a cat", "a dog", "a red car", "an apple tree", "a photo of a bird", "a cat", "sketch of a dog"]


def write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.new("RGB", (32, 32), (40 * i % 256, 255 - 40 * i % 256, 90)).save(path)
        paths.append(str(path))
    return paths


def transformers_features(folder: Path, texts=(), images=()) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' normalised text and image features (32 x 32 is the native size: pixels only rescaled)."""
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        text = image = torch.empty(0)
        if texts:
            # SigLIP's texts as trained: padded to 64, no padding mask
            ids = tokenizer(
                list(texts), padding="max_length", max_length=64, return_attention_mask=False, return_tensors="pt"
            )
            text = F.normalize(model.get_text_features(**ids).pooler_output, dim=-1)
        if images:
            pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in images])
            image = F.normalize(model.get_image_features(pixel_values=pixels.float() / 127.5 - 1).pooler_output, dim=-1)
    return text, image


def expected_lines(queries, scores_matrix: torch.Tensor, names: list[str], k: int) -> list[str]:
    best = scores_matrix.topk(k, dim=1)
    lines = []
    for query, scores, indices in zip(queries, best.values.tolist(), best.indices.tolist()):
        lines += [query] + [f"  {s:.4f}  {names[i]}" for s, i in zip(scores, indices)]
    return lines


# ---------------------------------------------------------------------------------------------- the text tower alone


@pytest.mark.parametrize("generation", ["siglip", "siglip2"])
def test_text_tower_loads_alone_from_text_only_checkpoints(generation, tmp_path):
    from transformers import Siglip2TextConfig, Siglip2TextModel, SiglipTextConfig, SiglipTextModel

    config, model = {"siglip": (SiglipTextConfig, SiglipTextModel), "siglip2": (Siglip2TextConfig, Siglip2TextModel)}[
        generation
    ]
    torch.manual_seed(0)
    theirs = perturb(model(config(**TEXT)), seed=2).eval()
    theirs.save_pretrained(tmp_path)
    ours = SigLIP2TextEncoder.from_pretrained(tmp_path)
    ids = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).pooler_output, theirs(input_ids=ids).pooler_output, atol=1e-5, rtol=0)
    message = f"config.json has model_type='{generation}_text_model': a text-only checkpoint, without a vision tower"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        SigLIP2Encoder.from_pretrained(tmp_path)


def test_text_tower_reads_only_the_shards_holding_it(tmp_path):
    torch.manual_seed(0)
    model = perturb(SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION | dict(image_size=32))), seed=3)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    keep_only_shards_of(tmp_path, "text_model.")
    ours = SigLIP2TextEncoder.from_pretrained(tmp_path)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.eval().get_text_features(input_ids=ids).pooler_output
        torch.testing.assert_close(ours(ids).pooler_output, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- embed-text


def test_embed_text_writes_transformers_text_features_and_resumes(zero_shot_dir, tmp_path, caplog):
    out = tmp_path / "texts"
    args = ["-q", "embed-text", "--model", str(zero_shot_dir), "-o", str(out), "--shard-size", "3"]
    assert main([*args, *TEXTS[:4]]) == EXIT_OK
    assert main([*args, *TEXTS, "--resume"]) == EXIT_OK  # more texts follow: only they are embedded
    store = ExtractedFeatures.open(out)
    assert store.inputs == "texts"
    texts, embeddings = store.pooled()
    assert texts == TEXTS  # input order, the repeated text keeps its own row
    assert [json.loads(line)["text"] for line in (out / "manifest.jsonl").read_text().splitlines()] == TEXTS
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    want, _ = transformers_features(zero_shot_dir, texts=TEXTS)
    torch.testing.assert_close(F.normalize(embeddings, dim=-1), want, atol=1e-5, rtol=0)

    assert main([*args, "a dog", "--resume"]) == EXIT_FATAL
    assert "--resume with other texts than the first run: its text 0 is 'a cat', now 'a dog'" in caplog.text
    assert main([*args, "a cat"]) == EXIT_FATAL
    assert "already holds output; pass --resume to continue it or --overwrite to replace it" in caplog.text
    assert main(["embed-text", "--model", str(zero_shot_dir), "-o", str(tmp_path / "none")]) == EXIT_USAGE
    assert "no texts: give them as arguments or with --file-list (one text per line)" in caplog.text

    # A run written before texts were encoded without a padding mask has no such setting: not resumed on top of it.
    record = json.loads((out / "run.json").read_text())
    assert record["padding_mask"] is False
    (out / "run.json").write_text(json.dumps({k: v for k, v in record.items() if k != "padding_mask"}))
    assert main([*args, *TEXTS, "more", "--resume"]) == EXIT_FATAL
    assert "with other settings than the first run (padding_mask: None -> False); use the same settings" in caplog.text


def test_text_jobs_refuse_a_tokenizer_their_settings_do_not_name(zero_shot_dir, tmp_path):
    from siglip2_encoder import ImageProcessor, SigLIP2Model, TextTokenizer
    from siglip2_encoder.models.text import SigLIP2TextEncoder
    from siglip2_encoder.pipeline.extract import TextTower, extract
    from siglip2_encoder.pipeline.settings import ExtractSettings, TextEmbedSettings
    from siglip2_encoder.pipeline.sources import TarSource
    from siglip2_encoder.pipeline.texts import embed_texts

    masked = TextTokenizer.from_pretrained(zero_shot_dir, padding_mask=True)
    settings = TextEmbedSettings(model=str(zero_shot_dir), text_preprocessing="raw")
    message = "the tokenizer's padding_mask is True, the settings say padding_mask=False"
    with pytest.raises(ValueError, match=re.escape(message)):
        embed_texts(["a cat"], tmp_path / "out", SigLIP2TextEncoder.from_pretrained(zero_shot_dir), masked, settings)
    captions = ExtractSettings(model=str(zero_shot_dir), captions=True)
    assert captions.caption_padding_mask is False  # captions as trained by default
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    source, processor = (
        TarSource([str(tmp_path / "pairs.tar")], captions=True),
        ImageProcessor.from_pretrained(zero_shot_dir),
    )
    message = "the captions' tokenizer has padding_mask=True, the settings say caption_padding_mask=False"
    with pytest.raises(ValueError, match=re.escape(message)):
        extract(
            source, tmp_path / "out", model.vision_model, processor, captions, text=TextTower(model.text_model, masked)
        )
    message = "caption_padding_mask=False is for captions; set captions=True or leave it None"
    with pytest.raises(ValueError, match=re.escape(message)):
        ExtractSettings(model="m", caption_padding_mask=False)


def test_embed_text_and_extract_refuse_the_wrong_tower(zero_shot_dir, fixed_dir, tmp_path, caplog):
    from transformers import SiglipTextConfig, SiglipTextModel

    SiglipTextModel(SiglipTextConfig(**TEXT)).save_pretrained(tmp_path / "text_only")
    image = write_images(tmp_path / "images", 1)
    assert main(["extract", *image, "-o", str(tmp_path / "f"), "--model", str(tmp_path / "text_only")]) == EXIT_FATAL
    assert (
        "config.json has model_type='siglip_text_model': a text-only checkpoint, without a vision tower; give a "
        "vision-only or image-text checkpoint, or embed texts with it (SigLIP2TextEncoder, `embed-text`)"
    ) in caplog.text
    assert not (tmp_path / "f").exists()  # nothing written
    assert main(["embed-text", "a cat", "-o", str(tmp_path / "t"), "--model", str(fixed_dir)]) == EXIT_FATAL
    assert "config.json has model_type='siglip_vision_model', which has no text tower" in caplog.text


# ---------------------------------------------------------------------------------------------- search


def test_search_ranks_images_by_text_and_texts_by_image_as_transformers_features_do(zero_shot_dir, tmp_path, capsys):
    paths = write_images(tmp_path / "images", 6)
    images, texts = tmp_path / "features", tmp_path / "texts"
    model = ["--model", str(zero_shot_dir)]
    assert main(["-q", "extract", *paths, "-o", str(images), *model, "--workers", "0"]) == EXIT_OK
    assert main(["-q", "embed-text", *TEXTS, "-o", str(texts), *model]) == EXIT_OK
    want_text, want_image = transformers_features(zero_shot_dir, texts=TEXTS, images=paths)
    capsys.readouterr()

    assert main(["search", "a cat", "a red car", "--features", str(images), "-k", "3"]) == EXIT_OK
    want = expected_lines(["a cat", "a red car"], want_text[[0, 2]] @ want_image.T, paths, 3)
    assert capsys.readouterr().out.splitlines() == want

    assert main(["search", "--image", paths[1], paths[4], "--features", str(texts), "-k", "4"]) == EXIT_OK
    want = expected_lines([paths[1], paths[4]], want_image[[1, 4]] @ want_text.T, TEXTS, 4)
    assert capsys.readouterr().out.splitlines() == want


def test_bad_search_commands_are_refused_with_their_exact_message(zero_shot_dir, tmp_path, caplog):
    paths = write_images(tmp_path / "images", 2)
    out = tmp_path / "features"
    assert main(["-q", "extract", *paths, "-o", str(out), "--model", str(zero_shot_dir), "--workers", "0"]) == EXIT_OK
    cases = [
        (["search", "--features", str(out)], EXIT_USAGE, "give query texts, or query images with --image"),
        (["search", "a", "--image", paths[0], "--features", str(out)], EXIT_USAGE, "(one kind per search)"),
        (["search", "a cat", "--features", str(tmp_path)], EXIT_USAGE, "--features: " + str(tmp_path)),
        (["search", "--image", str(tmp_path / "no.png"), "--features", str(out)], EXIT_USAGE, "--image: "),
        (["search", "a cat", "--features", str(out), "--faiss"], EXIT_FATAL, f"{out} has no FAISS index; build it"),
        (["index", "--features", str(out), "--factory", "IVF2,Nonsense"], EXIT_USAGE, "is not a FAISS index"),
        (["index", "--features", str(out), "--factory", "Flat", "--nprobe", "2"], EXIT_USAGE, "applies to IVF"),
        (["index", "--features", str(out), "--factory", "IVF8,Flat"], EXIT_USAGE, "has 8 lists but the folder holds"),
    ]
    for argv, status, message in cases:
        caplog.clear()
        assert main(argv) == status, argv
        assert message in caplog.text, (argv, caplog.text)


def test_top_k_over_a_tensor_in_memory_is_chunked_and_exact(monkeypatch):
    import siglip2_encoder.pipeline.retrieval as retrieval

    generator = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(1000, 16, generator=generator), torch.randn(5, 16, generator=generator)
    want_scores, want_indices = (F.normalize(queries, dim=-1) @ F.normalize(bank, dim=-1).T).topk(7, dim=1)
    monkeypatch.setattr(retrieval, "CHUNK", 64)  # 16 chunks
    for given in (bank, bank.split(100)):
        scores, indices = top_k(queries, given, 7)
        assert torch.equal(indices, want_indices)
        torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=0)
    assert top_k(queries, [bank[:3]], 10)[1].shape == (5, 3)  # a smaller bank gives what it has
    with pytest.raises(ValueError, match=re.escape("k must be a positive int, got k=0")):
        top_k(queries, bank, 0)
    with pytest.raises(ValueError, match=re.escape("bank vectors have 16 dimensions, queries 8")):
        top_k(queries[:, :8], bank, 1)


# ---------------------------------------------------------------------------------------------- FAISS


def clustered_folder(folder: Path, count: int, dim: int = 32, shard: int = 700) -> torch.Tensor:
    """A folder in extract's layout holding ``count`` vectors drawn around 50 centres, as embeddings cluster."""
    from siglip2_encoder.pipeline.settings import ExtractSettings
    from siglip2_encoder.pipeline.store import RUN_FILE, ShardWriter, write_manifest

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(50, dim, generator=generator)
    vectors = centres[torch.randint(0, 50, (count,), generator=generator)] + 0.5 * torch.randn(count, dim)
    folder.mkdir()
    (folder / RUN_FILE).write_text(json.dumps({"model": "m", **ExtractSettings(model="m").__dict__}, default=list))
    writer, rows = ShardWriter(folder, torch.float32), []
    for start in range(0, count, shard):
        block = [{"path": f"v{i}", "status": "ok"} for i in range(start, min(start + shard, count))]
        writer.write(block, [{"pooled": v} for v in vectors[start : start + len(block)]])
        rows += block
    write_manifest(folder, rows)
    return vectors


def test_flat_faiss_index_equals_exact_search_and_ivf_keeps_recall(tmp_path):
    vectors = clustered_folder(tmp_path / "f", 3000)
    store = ExtractedFeatures.open(tmp_path / "f")
    queries = vectors[::97] + 0.1
    exact_scores, exact = top_k(queries, vectors, 10)

    flat = FaissIndex.build(store)  # auto: exact below 50k vectors
    assert (flat.factory, flat.nprobe) == ("Flat", None)
    scores, indices = flat.search(queries, 10)
    assert torch.equal(indices, exact)
    torch.testing.assert_close(scores, exact_scores, atol=1e-5, rtol=0)

    ivf = FaissIndex.build(store, "IVF32,Flat")
    assert ivf.nprobe == 2  # 1/16 of the lists
    _, found = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist())])
    assert recall >= 0.9, recall
    ivf.save(store)
    loaded = FaissIndex.load(store)
    assert (loaded.factory, loaded.nprobe) == ("IVF32,Flat", 2)
    assert torch.equal(loaded.search(queries, 10)[1], found)
    assert auto_factory(1_000_000) == ("IVF4096,Flat", 256)


def test_a_faiss_index_older_than_its_features_is_refused(zero_shot_dir, tmp_path, capsys, caplog):
    paths = write_images(tmp_path / "images", 5)
    out = tmp_path / "features"
    extract = ["-q", "extract", "-o", str(out), "--model", str(zero_shot_dir), "--workers", "0", "--shard-size", "2"]
    assert main([*extract, *paths[:3]]) == EXIT_OK
    assert main(["-q", "index", "--features", str(out)]) == EXIT_OK
    capsys.readouterr()
    assert main(["search", "a cat", "--features", str(out), "-k", "3", "--faiss"]) == EXIT_OK
    with_index = capsys.readouterr().out
    assert main(["search", "a cat", "--features", str(out), "-k", "3"]) == EXIT_OK
    assert capsys.readouterr().out == with_index  # a flat index: the exact ranking

    assert main([*extract, *paths, "--resume"]) == EXIT_OK  # two more images: the index is stale
    assert main(["search", "a cat", "--features", str(out), "--faiss"]) == EXIT_FATAL
    assert f"the FAISS index of {out} is older than its features; rebuild it with `siglip2-encoder index" in caplog.text
    assert main(["-q", "index", "--features", str(out)]) == EXIT_OK
    assert main(["search", "a cat", "--features", str(out), "-k", "5", "--faiss"]) == EXIT_OK
    assert len(capsys.readouterr().out.splitlines()) == 6  # the query and all 5 images


# ---------------------------------------------------------------------------------------------- index-ready files


def test_export_npy_is_read_by_autofaiss_reader_in_row_order(tmp_path, caplog):
    from embedding_reader import EmbeddingReader

    vectors = clustered_folder(tmp_path / "f", 2500)
    out = tmp_path / "npy"
    assert main(["-q", "export-npy", "--features", str(tmp_path / "f"), "-o", str(out), "--rows-per-file", "1000"]) == 0
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{i}.npy" for i in range(3)]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [f"metadata_{i}.parquet" for i in range(3)]
    reader = EmbeddingReader(
        str(out / "img_emb"),
        file_format="parquet_npy",
        meta_columns=["image_path"],
        metadata_folder=str(out / "metadata"),
    )
    assert (reader.count, reader.dimension) == (2500, 32)
    got, names = [], []
    for embeddings, meta in reader(batch_size=700, show_progress=False):  # in file order, as autofaiss reads
        got.append(embeddings)
        names += meta["image_path"].tolist()
    got = np.concatenate(got)
    assert names == [f"v{i}" for i in range(2500)]
    assert np.load(out / "img_emb" / "img_emb_0.npy").dtype == np.float16  # clip-retrieval's storage
    np.testing.assert_allclose(got, F.normalize(vectors, dim=-1).numpy(), atol=1e-3)

    assert main(["-q", "export-npy", "--features", str(tmp_path / "f"), "-o", str(out)]) == EXIT_FATAL  # not replaced
    assert f"{out} already holds files; pass --overwrite to replace them, or another -o folder" in caplog.text
    args = ["-q", "export-npy", "--features", str(tmp_path / "f"), "-o", str(out), "--overwrite", "--save-dtype"]
    assert main([*args, "fp32"]) == EXIT_OK
    assert [p.name for p in (out / "img_emb").iterdir()] == ["img_emb_0.npy"]  # 2500 rows fit one default file
    np.testing.assert_allclose(np.load(out / "img_emb" / "img_emb_0.npy"), F.normalize(vectors, dim=-1), atol=1e-6)


def test_export_npy_of_texts_writes_text_emb_and_captions(zero_shot_dir, tmp_path, caplog):
    import pyarrow.parquet as pq

    texts = tmp_path / "texts"
    assert main(["-q", "embed-text", *TEXTS, "-o", str(texts), "--model", str(zero_shot_dir)]) == EXIT_OK
    assert main(["-q", "export-npy", "--features", str(texts), "-o", str(tmp_path / "out")]) == EXIT_OK
    assert pq.read_table(tmp_path / "out" / "metadata" / "metadata_0.parquet").column("caption").to_pylist() == TEXTS
    want, _ = transformers_features(zero_shot_dir, texts=TEXTS)
    got = np.load(tmp_path / "out" / "text_emb" / "text_emb_0.npy")
    np.testing.assert_allclose(got.astype(np.float32), want.numpy(), atol=1e-3)  # fp16 storage

    paths = write_images(tmp_path / "images", 1)
    tokens_only = [
        "-q",
        "extract",
        *paths,
        "-o",
        str(tmp_path / "tok"),
        "--model",
        str(zero_shot_dir),
        "--workers",
        "0",
    ]
    assert main([*tokens_only, "--no-pooled", "--tokens"]) == EXIT_OK
    assert main(["export-npy", "--features", str(tmp_path / "tok"), "-o", str(tmp_path / "o2")]) == EXIT_FATAL
    assert f"{tmp_path / 'tok'} holds no pooled features; extract without --no-pooled" in caplog.text
