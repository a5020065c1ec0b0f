"""Generator evaluation: do the images follow the prompt, and do variations keep their source?

Text to image, sampled with classifier-free guidance and (unless `unguided` is false) without
it (cfg_scale = 1):
- CLIP score, for any dataset: the mean cosine between each sample's CLIP image embedding and
  its prompt's text embedding; and a Fréchet distance between samples and the real images the
  prompts describe, in CLIP image-feature space.
- Caption accuracy, on shapes: the attribute checker reads each sample back and compares it with
  its prompt, all attributes at once and one attribute at a time. Prompts are the canonical
  captions of distinct test-split scenes, in three groups: one object of a colour-shape pair
  seen in training (`seen`), one object of a held-out pair (`held_out`), two objects.
Variations of test-split images (on shapes, those of one object):
- consistency, on shapes: the fraction of variations whose shape and colour, read by the
  checker, are those of their source; over all sources, and apart for sources of a seen and of
  a held-out colour-shape pair (a generator draws held-out pairs far less often);
- diversity: the mean L1 distance (pixels in [0, 1]) between two variations of one source, so
  copies score 0; and the mean CLIP cosine between each variation and its source.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from itertools import permutations
from statistics import mean
from typing import NamedTuple

import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from generator.clip import CLIPEncoder
from generator.pipeline import Pipeline
from generator.sampling import SamplingOptions
from tokenizer import shapes
from tokenizer.data import Sample, ShapesDataset
from tokenizer.evaluation import FeatureExtractor, pair_group
from tokenizer.shapes import Query, Scene, canonical_caption, parse_caption, relation_holds

SHAPES_GROUPS = ("seen", "held_out", "two_object")
CAPTIONS_GROUP = "captions"  # any other dataset: its own captions
ATTRIBUTES = ("shape", "color", "size", "position")


@dataclass
class GenerationEvalConfig:
    num_prompts: int = 100  # distinct prompts per group (seen, held-out, two-object)
    images_per_prompt: int = 1
    cfg_scale: float = 3.0  # guided sampling; the unguided run uses 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    rerank: int = 0  # candidates per image; the one CLIP finds closest to its prompt or source
    variation_rerank: int | None = None  # candidates per variation where other than rerank
    num_sources: int = 50  # source images for variations; 0 skips them
    variations_per_source: int = 4
    keep_rows: int = 0
    seed: int = 0
    unguided: bool = True  # also sample every prompt without guidance (cfg_scale 1)

    def __post_init__(self) -> None:
        least = {
            "num_prompts": (self.num_prompts, 1),
            "images_per_prompt": (self.images_per_prompt, 1),
            "num_sources": (self.num_sources, 0),
            "variations_per_source": (self.variations_per_source, 2),
            "keep_rows": (self.keep_rows, 0),
            "rerank": (self.rerank, 0),
            "variation_rerank": (self.variation_rerank or 0, 0),
        }
        for name, (value, minimum) in least.items():
            if value < minimum:
                raise ValueError(f"generation.{name} must be at least {minimum}, got {value}.")


class EvalPrompts(NamedTuple):
    prompts: list[str]  # (P,) group by group
    groups: list[str]  # (P,) the group of each prompt
    images: torch.Tensor  # (P, 3, H, W) in [-1, 1]: a real image that each prompt describes


@dataclass
class CaptionAccuracy:
    """Fractions of samples in [0, 1] that the checker finds right, over `num_images`."""

    num_prompts: int
    num_images: int
    accuracy: float  # every attribute (and the background and relation) right
    shape: float
    color: float
    size: float
    position: float
    relation: float | None = None  # two-object prompts: the named relation holds; else None


@dataclass
class GuidanceResults:
    cfg_scale: float
    num_images: int
    clip_score: float
    frechet_distance: float | None  # None with fewer than two images
    caption_accuracy: dict[str, CaptionAccuracy] | None  # by group; shapes only


@dataclass
class VariationScores:
    num_sources: int
    variations_per_source: int
    keep_rows: int
    consistency: float | None  # shapes only
    consistency_by_source: dict[str, float] | None  # shapes only: "seen" / "held_out" sources
    diversity: float
    clip_similarity: float  # mean cosine between each variation and its source


@dataclass
class GeneratorMetrics:
    settings: GenerationEvalConfig  # how the samples were drawn: guidance, temperature, rerank...
    with_cfg: GuidanceResults | None  # None where the config's cfg_scale is 1
    without_cfg: GuidanceResults | None  # None where the config says unguided=false
    variations: VariationScores | None  # None with num_sources = 0


# ---------------------------------------------------------------------------------------------
# Prompts and sources


def shapes_prompts(dataset: ShapesDataset, num_prompts: int) -> EvalPrompts:
    """Canonical captions of distinct test scenes, up to `num_prompts` a group."""
    found: dict[str, dict[str, torch.Tensor]] = {group: {} for group in SHAPES_GROUPS}
    for index in range(len(dataset)):
        scene = dataset.example(index).scene
        group = "two_object" if len(scene.objects) == 2 else pair_group(scene)
        caption = canonical_caption(scene)
        if len(found[group]) < num_prompts and caption not in found[group]:
            found[group][caption] = dataset[index].image
        if all(len(captions) == num_prompts for captions in found.values()):
            break
    return _prompts_of(found)


def caption_prompts(batches: Iterable[Sample], num_prompts: int) -> EvalPrompts:
    """The first `num_prompts` distinct, non-empty captions of a split, with their images."""
    found: dict[str, torch.Tensor] = {}
    for batch in batches:
        for image, caption in zip(batch.image, batch.caption, strict=True):
            if caption.strip() and caption not in found:
                found[caption] = image
        if len(found) >= num_prompts:
            break
    if not found:
        raise ValueError(
            "the evaluation split has no captions to prompt the generator with: choose a split "
            "with captions (split=...) or a captioned dataset."
        )
    return _prompts_of({CAPTIONS_GROUP: dict(list(found.items())[:num_prompts])})


def _prompts_of(found: dict[str, dict[str, torch.Tensor]]) -> EvalPrompts:
    prompts = [caption for captions in found.values() for caption in captions]
    groups = [group for group, captions in found.items() for _ in captions]
    images = [image for captions in found.values() for image in captions.values()]
    return EvalPrompts(prompts, groups, torch.stack(images))


def shapes_sources(dataset: ShapesDataset, count: int) -> torch.Tensor:
    """The first `count` one-object test images, (S, 3, H, W) in [-1, 1]."""
    sources = []
    for index in range(len(dataset)):
        if len(sources) == count:
            break
        if len(dataset.example(index).scene.objects) == 1:
            sources.append(dataset[index].image)
    return torch.stack(sources) if sources else torch.empty(0)


def first_images(batches: Iterable[Sample], count: int) -> torch.Tensor:
    """The first `count` images of a split, (S, 3, H, W) in [-1, 1]."""
    images, seen = [], 0
    for batch in batches:
        if seen >= count:
            break
        images.append(batch.image[: count - seen])
        seen += images[-1].shape[0]
    return torch.cat(images) if images else torch.empty(0)


# ---------------------------------------------------------------------------------------------
# Scores


def attribute_right(scene: Scene, query: Query, attribute: str) -> bool:
    """Whether the read scene has the prompt's objects with this attribute right, for some
    pairing of read objects with named ones."""
    if len(scene.objects) != len(query.objects):
        return False
    return any(
        all(
            getattr(wanted, attribute) in (None, getattr(found, attribute))
            for found, wanted in zip(pairing, query.objects, strict=True)
        )
        for pairing in permutations(scene.objects)
    )


def relation_right(scene: Scene, query: Query) -> bool:
    """Whether the read scene has the prompt's two objects (by shape and colour) in the named
    relation, for some pairing of read objects with named ones."""
    if query.relation is None or len(scene.objects) != len(query.objects):
        return False
    identity = ("shape", "color")
    return any(
        all(
            getattr(wanted, name) in (None, getattr(found, name))
            for found, wanted in zip(pairing, query.objects, strict=True)
            for name in identity
        )
        and relation_holds(query.relation, *pairing)
        for pairing in permutations(scene.objects)
    )


def caption_accuracy(scenes: list[Scene], prompts: list[str], num_prompts: int) -> CaptionAccuracy:
    """How many read scenes match their prompts, at once and attribute by attribute."""
    queries = [parse_caption(prompt) for prompt in prompts]
    pairs = list(zip(scenes, queries, strict=True))

    def fraction(right: Iterable[bool]) -> float:
        return sum(right) / len(pairs)

    related = [(scene, query) for scene, query in pairs if query.relation is not None]
    relation = None
    if related:
        relation = sum(relation_right(scene, query) for scene, query in related) / len(related)
    return CaptionAccuracy(
        num_prompts=num_prompts,
        num_images=len(pairs),
        relation=relation,
        accuracy=fraction(shapes.scene_matches(scene, query) for scene, query in pairs),
        **{
            attribute: fraction(attribute_right(scene, query, attribute) for scene, query in pairs)
            for attribute in ATTRIBUTES
        },
    )


def clip_score(clip: CLIPEncoder, images: torch.Tensor, prompts: list[str]) -> float:
    """Mean cosine between CLIP embeddings of images (N, 3, H, W) in [0, 1] and prompts (N,)."""
    image_embeddings = clip.encode_image(images.to(clip.device) * 2 - 1)
    return (image_embeddings * clip.encode_text(prompts)).sum(dim=-1).mean().item()


def clip_frechet_distance(
    clip: CLIPEncoder, real: torch.Tensor, generated: torch.Tensor
) -> float | None:
    """Fréchet distance between real and generated images in [0, 1], in CLIP image space."""
    if min(real.shape[0], generated.shape[0]) < 2:
        return None
    features = FeatureExtractor(lambda images: clip.encode_image(images * 2 - 1), clip.embed_dim)
    frechet = FrechetInceptionDistance(feature=features, normalize=True).to(clip.device)
    frechet.update(real.to(clip.device), real=True)
    frechet.update(generated.to(clip.device), real=False)
    return frechet.compute().item()


def mean_pairwise_l1(images: torch.Tensor, per_group: int) -> float:
    """Mean L1 per pixel between two images of one group, over groups of `per_group` images
    (N, 3, H, W) that lie one group after the other."""
    flat = images.float().flatten(1).view(-1, per_group, images[0].numel())  # (G, V, D)
    distances = torch.cdist(flat, flat, p=1) / flat.shape[-1]  # (G, V, V)
    pairs = per_group * (per_group - 1)
    return (distances.sum(dim=(1, 2)) / pairs).mean().item()


def shape_and_color(scene: Scene) -> Counter[tuple[str | None, str | None]]:
    """The (shape, colour) of each object, in any order; None where the checker saw none."""
    return Counter((obj.shape, obj.color) for obj in scene.objects)


# ---------------------------------------------------------------------------------------------
# Running it


def evaluate_guidance(
    pipeline: Pipeline,
    prompts: EvalPrompts,
    config: GenerationEvalConfig,
    cfg_scale: float,
    use_checker: bool,
) -> GuidanceResults:
    """Sample every prompt at one guidance scale, in one batched call, and score the samples."""
    options = replace(SamplingOptions.from_settings(asdict(config)), cfg_scale=cfg_scale)
    generated = pipeline.text_to_image(prompts.prompts, config.images_per_prompt, options)
    real = ((prompts.images.float() + 1) / 2).clamp(0, 1)
    accuracy = None
    if use_checker:
        scenes = shapes.check_batch(generated.images * 2 - 1)
        groups = [group for group in prompts.groups for _ in range(config.images_per_prompt)]
        accuracy = {}
        for group in dict.fromkeys(prompts.groups):
            rows = [i for i, name in enumerate(groups) if name == group]
            accuracy[group] = caption_accuracy(
                [scenes[i] for i in rows],
                [generated.prompts[i] for i in rows],
                num_prompts=prompts.groups.count(group),
            )
    return GuidanceResults(
        cfg_scale=cfg_scale,
        num_images=generated.images.shape[0],
        clip_score=clip_score(pipeline.clip, generated.images, generated.prompts),
        frechet_distance=clip_frechet_distance(pipeline.clip, real, generated.images),
        caption_accuracy=accuracy,
    )


def evaluate_variations(
    pipeline: Pipeline, sources: torch.Tensor, config: GenerationEvalConfig, use_checker: bool
) -> VariationScores:
    """Variations of each source: kept attributes, diversity and CLIP similarity."""
    per_source = config.variations_per_source
    options = SamplingOptions.from_settings(asdict(config))
    if config.variation_rerank is not None:
        options = replace(options, rerank=config.variation_rerank)
    varied = pipeline.variations(sources, per_source, options, keep_rows=config.keep_rows)
    consistency = by_source = None
    if use_checker:
        source_scenes = shapes.check_batch(varied.sources * 2 - 1)
        wanted = [shape_and_color(scene) for scene in source_scenes]
        found = [shape_and_color(scene) for scene in shapes.check_batch(varied.images * 2 - 1)]
        sources = varied.source_index.tolist()
        kept = [have == wanted[source] for have, source in zip(found, sources, strict=True)]
        consistency = sum(kept) / len(kept)
        groups = [pair_group(source_scenes[source]) for source in sources]
        by_source = {
            group: mean([k for k, g in zip(kept, groups, strict=True) if g == group])
            for group in sorted(set(groups), reverse=True)
        }
    clip = pipeline.clip
    source_embeddings = clip.encode_image(varied.sources.to(clip.device) * 2 - 1)
    variation_embeddings = clip.encode_image(varied.images.to(clip.device) * 2 - 1)
    similarity = variation_embeddings * source_embeddings[varied.source_index.to(clip.device)]
    return VariationScores(
        num_sources=varied.sources.shape[0],
        variations_per_source=per_source,
        keep_rows=config.keep_rows,
        consistency=consistency,
        consistency_by_source=by_source,
        diversity=mean_pairwise_l1(varied.images, per_source),
        clip_similarity=similarity.sum(dim=-1).mean().item(),
    )


def evaluate_generator(
    pipeline: Pipeline,
    prompts: EvalPrompts,
    sources: torch.Tensor,
    config: GenerationEvalConfig,
    use_checker: bool,
) -> GeneratorMetrics:
    """Text to image with guidance and without (unless the config says unguided=false), then
    variations of `sources` (S, 3, H, W)."""
    with_cfg = without_cfg = None
    if config.cfg_scale != 1:
        with_cfg = evaluate_guidance(pipeline, prompts, config, config.cfg_scale, use_checker)
    if config.unguided or config.cfg_scale == 1:
        without_cfg = evaluate_guidance(pipeline, prompts, config, 1.0, use_checker)
    variations = None
    if sources.shape[0]:
        variations = evaluate_variations(pipeline, sources, config, use_checker)
    return GeneratorMetrics(config, with_cfg, without_cfg, variations)
