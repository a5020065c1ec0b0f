"""Encoded shards: what they hold, resume after a kill, and refusing shards of another model."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import (
    FakeCLIP,
    compose_config,
    encoded_files,
    lightning_rank_loaders,
    load_script,
    run_script,
    save_clip,
    save_tokenizer,
    shapes_config,
    write_images,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import generator.encoding
from generator.clip import (
    CLIPConfig,
    build_small_clip,
    encoding_clip,
    load_clip,
    save_trained_clip,
)
from generator.data import (
    EncodedDataModule,
    EncodedDataset,
    check_token_features,
    load_manifest,
)
from generator.encoding import encode_run
from generator.shards import ShardMismatchError, read_shard
from tokenizer.data import DataConfig, build_dataset

ROOT = Path(__file__).resolve().parents[1]


class Killed(Exception):
    pass


def kill_after(monkeypatch, shards: int, leave_temporary: bool = False) -> None:
    """Make the encode die after writing `shards` shards, optionally mid-way through the next."""
    write_shard = generator.encoding.write_shard
    written = []

    def write_or_die(path: Path, *args, **kwargs):
        if len(written) == shards:
            if leave_temporary:
                (path.parent / f".{path.name}.k1ll3d.tmp").write_bytes(b"half a shard")
            raise Killed
        written.append(path)
        return write_shard(path, *args, **kwargs)

    monkeypatch.setattr(generator.encoding, "write_shard", write_or_die)


def write_tars(root: Path, files: list[tuple[str, bytes, str]]) -> None:
    root.mkdir(parents=True)
    for part, start in enumerate(range(0, len(files), 4)):
        with wds.TarWriter(str(root / f"part-{part:03d}.tar")) as writer:
            for key, data, caption in files[start : start + 4]:
                writer.write({"__key__": key, "png": data, "txt": caption})


def data_config(source: str, tmp_path: Path) -> DataConfig:
    if source == "shapes":
        return shapes_config()
    images = tmp_path / "images"
    files = write_images(images)
    path = images
    if source == "webdataset":
        path = tmp_path / "tars"
        write_tars(path, files)
    return DataConfig(source=source, path=str(path), val_fraction=0.0, batch_size=3, num_workers=0)


def test_shards_decode_to_the_images_encoded_on_the_fly(tmp_path):
    vqgan = save_tokenizer(tmp_path)
    clip = FakeCLIP()
    config = shapes_config()
    outcome = encode_run(tmp_path, config, clip, shard_size=4)
    manifest = outcome.manifest
    assert not outcome.already_done
    assert [(s.name, s.num_samples, len(s.shards)) for s in manifest.splits] == [
        ("train", 10, 3),
        ("val", 3, 1),
    ]
    assert manifest.plan.codes_dtype == "uint16" and manifest.plan.embedding_dtype == "float16"
    assert manifest.plan.grid_size == (8, 8) and manifest.plan.num_codes == 64
    assert read_shard(tmp_path / "encoded" / "train" / "shard-000000.safetensors").codes.dtype == (
        np.uint16
    )

    dataset = EncodedDataset(tmp_path, "train")
    source = build_dataset(config, "train", train=False)
    assert len(dataset) == len(source) == 10
    for start in range(0, 10, 4):  # the batches the encode ran: shard by shard
        rows = range(start, min(start + 4, 10))
        images = torch.stack([source[i].image for i in rows])
        stored = [dataset[i] for i in rows]
        codes = torch.stack([s.codes for s in stored]).view(-1, 8, 8)
        assert codes.dtype == torch.long
        assert torch.equal(codes, vqgan.encode(images))
        assert torch.equal(vqgan.decode(codes), vqgan.decode(vqgan.encode(images)))
        image_embeddings = torch.stack([s.image_embedding for s in stored])
        text_embeddings = torch.stack([s.text_embedding for s in stored])
        captions = [source[i].caption for i in rows]
        assert torch.allclose(image_embeddings, clip.encode_image(images), atol=2e-3)
        assert torch.allclose(text_embeddings, clip.encode_text(captions), atol=2e-3)
        assert [s.caption for s in stored] == captions
        assert all(s.has_text for s in stored)


@pytest.mark.parametrize(
    "source, tokens",
    [("shapes", False), ("folder", False), ("webdataset", False), ("folder", True)],
)
def test_a_killed_encode_resumes_to_the_same_bytes(tmp_path, monkeypatch, source, tokens):
    config = data_config(source, tmp_path)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for run_dir in (whole, resumed):
        save_tokenizer(run_dir)
    encode_run(whole, config, FakeCLIP(), splits=["train"], shard_size=3, tokens=tokens)

    with monkeypatch.context() as patch:
        kill_after(patch, shards=2)
        with pytest.raises(Killed):
            encode_run(resumed, config, FakeCLIP(), ["train"], shard_size=3, tokens=tokens)
    assert not (resumed / "encoded" / "manifest.json").exists()
    kept = sorted((resumed / "encoded" / "train").glob("shard-*"))
    assert len(kept) == 2
    stamps = [path.stat().st_mtime_ns for path in kept]
    encode_run(resumed, config, FakeCLIP(), splits=["train"], shard_size=3, tokens=tokens)

    assert [path.stat().st_mtime_ns for path in kept] == stamps  # resumed, not started over
    assert encoded_files(resumed) == encoded_files(whole)
    record = load_manifest(whole).split("train")
    if source == "shapes":
        assert record.num_samples == record.num_captioned == 10
    else:  # one corrupt file skipped, not replaced by its neighbour; two without captions
        captions = [EncodedDataset(whole, "train")[i].caption for i in range(10)]
        assert record.num_samples == 10 and record.num_captioned == 8
        assert captions.count("") == 2 and len(set(captions)) == 9


def token_reference(clip: FakeCLIP, images: torch.Tensor, captions: list[str]) -> list:
    """What the shards should hold for these samples: the CLIP's token features, in float16."""
    text = clip.encode_text_tokens(captions)
    image = clip.encode_image_tokens(images)
    return [
        (text.features[i][text.mask[i]].half().float(), image.features[i].half().float())
        for i in range(len(captions))
    ]


def test_token_features_round_trip_padded_to_the_clip_length(tmp_path):
    save_tokenizer(tmp_path)
    clip, config = FakeCLIP(), shapes_config()
    plan = encode_run(tmp_path, config, clip, shard_size=4, tokens=True).manifest.plan
    assert plan.tokens and plan.text_token_shape == (16, 8) and plan.image_token_shape == (16, 6)
    source = build_dataset(config, "train", train=False)
    captions = [source[i].caption for i in range(10)]
    lengths = [len(clip.token_ids(caption)) for caption in captions]
    shards = [read_shard(p) for p in sorted((tmp_path / "encoded" / "train").glob("shard-*"))]
    assert [s.text_lengths.tolist() for s in shards] == [lengths[i : i + 4] for i in (0, 4, 8)]
    assert [s.text_tokens.shape[1] for s in shards] == [16, 14, 16]  # each its longest caption
    dtypes = {(s.text_tokens.dtype, s.text_lengths.dtype, s.image_tokens.dtype) for s in shards}
    assert dtypes == {(np.dtype("float16"), np.dtype("int16"), np.dtype("float16"))}
    images = torch.stack([source[i].image for i in range(10)])
    reference = token_reference(clip, images, captions)
    dataset = EncodedDataset(tmp_path, "train")
    for index, (text_tokens, image_tokens) in enumerate(reference):
        sample, length = dataset[index], lengths[index]
        assert sample.text_tokens.shape == (16, 8) and sample.text_tokens.dtype == torch.float32
        assert torch.equal(sample.text_mask, torch.arange(16) < length)
        assert torch.equal(sample.text_tokens[:length], text_tokens)
        assert not sample.text_tokens[length:].any()
        assert torch.equal(sample.image_tokens, image_tokens)
    stored = torch.stack([dataset[i].text_embedding for i in range(10)])
    assert torch.allclose(stored, clip.encode_text(captions), atol=2e-3)


def test_samples_without_a_caption_have_no_text_tokens(tmp_path):
    save_tokenizer(tmp_path)
    config = data_config("folder", tmp_path)
    encode_run(tmp_path, config, FakeCLIP(), splits=["train"], shard_size=1, tokens=True)
    dataset = EncodedDataset(tmp_path, "train")
    uncaptioned = [i for i in range(len(dataset)) if not dataset[i].has_text]
    assert len(uncaptioned) == 2
    for index in uncaptioned:
        sample = dataset[index]
        assert not sample.text_mask.any() and not sample.text_tokens.any()
        assert sample.text_tokens.shape == (16, 8) and sample.image_tokens.abs().sum() > 0
        shard = read_shard(dataset.paths[index])  # one sample, no caption: no text tokens at all
        assert shard.text_tokens.shape == (1, 0, 8) and shard.text_lengths.tolist() == [0]


def forget_token_features(run_dir: Path) -> None:
    """Make RUN/encoded as the code before token features wrote it: no tokens in the plan."""
    for name in ("plan.json", "manifest.json"):
        path = run_dir / "encoded" / name
        values = json.loads(path.read_text())
        plan = values.get("plan", values)
        for key in ("tokens", "word_embeddings", "text_token_shape", "image_token_shape"):
            del plan[key]
        path.write_text(json.dumps(values, indent=2) + "\n")


def test_shards_from_before_token_features_load_resume_and_collate(tmp_path):
    save_tokenizer(tmp_path)
    encode_run(tmp_path, shapes_config(), FakeCLIP(), splits=["train"], shard_size=4)
    forget_token_features(tmp_path)
    outcome = encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=4)  # adds val
    assert not outcome.already_done and not outcome.manifest.plan.tokens
    data = EncodedDataModule(tmp_path, batch_size=4, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.text_tokens.shape == (4, 0, 0) and batch.image_tokens.shape == (4, 0, 0)
    assert batch.text_mask.shape == (4, 0) and batch.text_mask.dtype == torch.bool
    check_token_features(load_manifest(tmp_path), needs_tokens=False, run_dir=tmp_path)
    with pytest.raises(ValueError) as refusal:
        check_token_features(load_manifest(tmp_path), needs_tokens=True, run_dir=tmp_path)
    assert str(refusal.value) == (
        "the generator's conditioning needs CLIP token features, but the shards in "
        f"{tmp_path / 'encoded'} have none: run scripts/encode.py run_dir={tmp_path} "
        "tokens=true overwrite=true."
    )


def test_token_features_are_not_mixed_into_shards_begun_without(tmp_path):
    save_tokenizer(tmp_path)
    encode_run(tmp_path, shapes_config(), FakeCLIP(), splits=["train"], shard_size=4)
    message = "made with tokens=false \\(now tokens=true\\)\\. Pass overwrite=true"
    with pytest.raises(ShardMismatchError, match=message):
        encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=4, tokens=True)
    encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=4, tokens=True, overwrite=True)
    check_token_features(load_manifest(tmp_path), needs_tokens=True, run_dir=tmp_path)
    with pytest.raises(ShardMismatchError, match="tokens=true \\(now tokens=false\\)"):
        encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=4)


def test_word_embeddings_widen_the_text_tokens_and_are_never_mixed_with_shards_without(tmp_path):
    save_tokenizer(tmp_path)
    clip, config = FakeCLIP(), shapes_config()
    run = encode_run(
        tmp_path, config, clip, ["train"], shard_size=4, tokens=True, word_embeddings=True
    )
    assert run.manifest.plan.word_embeddings and run.manifest.plan.text_token_shape == (16, 16)
    source = build_dataset(config, "train", train=False)
    text = clip.encode_text_tokens([source[i].caption for i in range(10)], word_embeddings=True)
    dataset = EncodedDataset(tmp_path, "train")
    for index in range(10):
        sample = dataset[index]
        stored = sample.text_tokens[sample.text_mask]  # (length, 16)
        assert torch.equal(stored, text.features[index][text.mask[index]].half().float())
    message = "word_embeddings=true \\(now word_embeddings=false\\)\\. Pass overwrite=true"
    with pytest.raises(ShardMismatchError, match=message):
        encode_run(tmp_path, config, clip, shard_size=4, tokens=True)
    with pytest.raises(ValueError, match="tokens=true word_embeddings=true"):
        encode_run(tmp_path, config, clip, shard_size=4, word_embeddings=True, overwrite=True)


def test_a_half_written_shard_is_ignored_and_rewritten(tmp_path, monkeypatch):
    save_tokenizer(tmp_path / "whole")
    save_tokenizer(tmp_path / "resumed")
    encode_run(tmp_path / "whole", shapes_config(), FakeCLIP(), splits=["train"], shard_size=4)
    with monkeypatch.context() as patch:
        kill_after(patch, shards=1, leave_temporary=True)
        with pytest.raises(Killed):
            encode_run(tmp_path / "resumed", shapes_config(), FakeCLIP(), ["train"], shard_size=4)
    split_dir = tmp_path / "resumed" / "encoded" / "train"
    assert [p.name for p in split_dir.glob(".shard-*.tmp")] == [
        ".shard-000001.safetensors.k1ll3d.tmp"
    ]
    encode_run(tmp_path / "resumed", shapes_config(), FakeCLIP(), ["train"], shard_size=4)
    assert encoded_files(tmp_path / "resumed") == encoded_files(tmp_path / "whole")


def test_a_finished_encode_does_nothing(tmp_path):
    save_tokenizer(tmp_path)
    encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=4)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "encoded").rglob("*")}
    outcome = encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=4)
    assert outcome.already_done
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "encoded").rglob("*")} == stamps


def test_encoding_with_another_model_refuses_unless_overwrite(tmp_path):
    save_tokenizer(tmp_path)
    encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=4)
    with pytest.raises(ShardMismatchError, match="another CLIP.*overwrite=true"):
        encode_run(tmp_path, shapes_config(), FakeCLIP(seed=1), shard_size=4)
    with pytest.raises(ShardMismatchError, match="shard_size=4 \\(now 5\\)"):
        encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=5)
    save_tokenizer(tmp_path, seed=1)
    with pytest.raises(ShardMismatchError, match="another tokenizer"):
        encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=4)
    outcome = encode_run(tmp_path, shapes_config(), FakeCLIP(seed=1), shard_size=4, overwrite=True)
    assert outcome.manifest.plan.clip_fingerprint == FakeCLIP(seed=1).fingerprint()
    assert len(EncodedDataset(tmp_path, "train")) == 10


def test_a_split_the_data_lacks_is_refused_before_any_work(tmp_path):
    save_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no val split"):
        encode_run(tmp_path, shapes_config(num_val=0), FakeCLIP(), splits=["train", "val"])
    assert not (tmp_path / "encoded").exists()


def test_stage_two_refuses_shards_of_another_tokenizer(tmp_path):
    save_tokenizer(tmp_path)
    encode_run(tmp_path, shapes_config(), FakeCLIP(), shard_size=4)
    save_tokenizer(tmp_path, seed=1)  # retrained, not re-encoded
    message = "made by another tokenizer .*: run scripts/encode.py"
    with pytest.raises(ShardMismatchError, match=message):
        EncodedDataset(tmp_path, "train")
    with pytest.raises(ShardMismatchError, match=message):
        EncodedDataModule(tmp_path, batch_size=4).setup("fit")


def test_datamodule_batches_and_workers_see_every_sample_once(tmp_path):
    save_tokenizer(tmp_path)
    encode_run(tmp_path, shapes_config(num_train=12), FakeCLIP(), shard_size=5)
    data = EncodedDataModule(tmp_path, batch_size=4, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.codes.shape == (4, 64) and batch.codes.dtype == torch.long
    assert batch.image_embedding.shape == batch.text_embedding.shape == (4, FakeCLIP.embed_dim)
    assert batch.image_embedding.dtype == torch.float32 and batch.has_text.dtype == torch.bool
    assert len(batch.caption) == 4 and all(isinstance(c, str) for c in batch.caption)
    assert len(data.val_dataloader().dataset) == 3

    dataset = data.datasets["train"]
    expected = [dataset[i].caption for i in range(len(dataset))]
    assert len(pickle.dumps(dataset)) < 10_000  # workers get paths, not copies of the shards
    loader = DataLoader(dataset, batch_size=5, num_workers=2)
    assert [caption for batch in loader for caption in batch.caption] == expected


def test_encoded_shards_are_split_between_ranks_by_lightning(tmp_path):
    """Two ranks x two batches of 3 over 12 samples in three shards: each once, on one rank."""
    save_tokenizer(tmp_path)
    encode_run(tmp_path, shapes_config(num_train=12), FakeCLIP(), shard_size=5)
    data = EncodedDataModule(tmp_path, batch_size=3, num_workers=0)
    data.setup("fit")
    dataset = data.datasets["train"]
    expected = sorted(dataset[i].image_embedding.numpy().tobytes() for i in range(len(dataset)))
    seen = []
    for loader in lightning_rank_loaders(data.train_dataloader(), world_size=2):
        batches = list(loader)
        assert [batch.codes.shape[0] for batch in batches] == [3, 3]
        seen += [row.numpy().tobytes() for batch in batches for row in batch.image_embedding]
    assert sorted(seen) == expected


def test_encode_config_composes_with_its_defaults():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="encode", overrides=["run_dir=RUN"])
    assert isinstance(instantiate(cfg.data, _convert_="all"), DataConfig)
    assert isinstance(instantiate(cfg.clip, _convert_="all"), CLIPConfig)
    assert list(cfg.splits) == ["train", "val"] and not cfg.overwrite


def test_encode_script_end_to_end(tmp_path, capsys):
    """scripts/encode.py with a small CLIP saved into RUN/clip; a rerun does nothing."""
    vqgan = save_tokenizer(tmp_path)
    clip_config = instantiate(OmegaConf.load(ROOT / "conf" / "clip" / "tiny.yaml"), _convert_="all")
    torch.manual_seed(0)
    save_trained_clip(build_small_clip(clip_config), clip_config, tmp_path / "clip")
    overrides = [
        f"run_dir={tmp_path}",
        "clip=tiny",
        "data.num_train=6",
        "data.num_val=2",
        "data.num_workers=0",
        "shard_size=4",
        "device=cpu",
    ]
    run_script("encode.py", *overrides, check=True)

    clip = load_clip(clip_config, tmp_path)
    dataset = EncodedDataset(tmp_path, "train")
    assert dataset.manifest.plan.clip_fingerprint == clip.fingerprint()
    assert encoding_clip(tmp_path / "encoded") == clip_config
    source = build_dataset(shapes_config(num_train=6), "train", train=False)
    images = torch.stack([source[i].image for i in range(6)])
    stored = torch.stack([dataset[i].image_embedding for i in range(6)])
    assert len(dataset) == 6
    assert torch.allclose(stored, clip.encode_image(images), atol=2e-3)
    assert torch.equal(
        torch.stack([dataset[i].codes for i in range(6)]).view(6, 8, 8)[:4],
        vqgan.encode(images[:4]),
    )
    load_script("encode.py").encode(compose_config("encode", overrides))
    assert "nothing to do" in capsys.readouterr().out


def test_encode_script_stores_a_real_clips_token_features(tmp_path):
    """tokens=true with the small CLIP in RUN/clip: its own features, in float16."""
    save_tokenizer(tmp_path)
    save_clip(tmp_path)
    overrides = [f"run_dir={tmp_path}", "clip=tiny", "data.num_train=6", "data.num_val=2"]
    overrides += ["data.num_workers=0", "shard_size=4", "device=cpu", "tokens=true"]
    load_script("encode.py").encode(compose_config("encode", overrides))

    clip = load_clip(encoding_clip(tmp_path / "encoded"), tmp_path)
    dataset = EncodedDataset(tmp_path, "train")
    plan = dataset.manifest.plan
    assert (plan.text_token_shape, plan.image_token_shape) == (
        clip.text_token_shape,
        clip.image_token_shape,
    )
    source = build_dataset(shapes_config(num_train=6), "train", train=False)
    images = torch.stack([source[i].image for i in range(6)])
    text = clip.encode_text_tokens([source[i].caption for i in range(6)])
    image = clip.encode_image_tokens(images)
    stored = [dataset[i] for i in range(6)]
    assert torch.equal(torch.stack([s.text_mask for s in stored]), text.mask)
    for name, features in (("text_tokens", text.features), ("image_tokens", image.features)):
        mine = torch.stack([getattr(s, name) for s in stored])
        assert torch.allclose(mine, features.half().float(), rtol=1e-3, atol=1e-3), name
