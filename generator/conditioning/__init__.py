"""Conditioning, in one place: what the generator is conditioned on and how it reaches it.

    condition.py        `Condition`: the pooled CLIP embedding, CLIP's token features and their
                        mask, and which inputs are replaced by their nulls; the guided batch
    fusion.py           `Conditioner`: the fusion mechanisms (pooled, early, resampler, deep) and
                        the learnt null of every input
    cross_attention.py  cross-attention to the token features: deep fusion's gated blocks, the
                        resampler's layers
    inputs.py           which embedding a training sample is conditioned on (text, image, mixed),
                        LAFITE's pseudo-text embeddings, and the training drops

The GPT (generator/gpt.py) holds a Conditioner and the gated blocks; the sampler, the pipeline
and the training module build Conditions.
"""

from generator.conditioning.condition import Condition, as_condition
from generator.conditioning.fusion import FUSIONS, Conditioner
from generator.conditioning.inputs import (
    CONDITIONS,
    ConditionConfig,
    check_captions,
    choose_embedding,
    condition_embedding,
    pseudo_text_embedding,
    training_condition,
)

__all__ = [
    "CONDITIONS",
    "FUSIONS",
    "Condition",
    "ConditionConfig",
    "Conditioner",
    "as_condition",
    "check_captions",
    "choose_embedding",
    "condition_embedding",
    "pseudo_text_embedding",
    "training_condition",
]
