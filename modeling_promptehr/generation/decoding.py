"""The decoding loop of one visit, for ``model.generate(..., custom_generate=visit_decoding)``.

transformers' own loop (``GenerationMixin._sample``) hands the processors [B, V] scores and takes
the argmax of [B, V] results, so every step makes about seven passes over the whole vocabulary
(the model's logits, generate's float32 copy, the processors' gather and scatter, the argmax),
although a visit's next token can only be one of ~1,000 columns
(:class:`~.processors.VisitStep`'s two blocks). ``generate`` still does
all the input preparation (encoder, cache, stopping criteria, processors); this loop then asks the
model for the block columns only (``logits_columns``), runs the
:class:`~.processors.VisitLogitsProcessor` chain on the blocks and picks each row's token
there. Given the same scores it picks the same tokens as transformers' loop with the same
processors and seed (tested); the LM head summed over fewer columns can, rarely, round a last
bit differently and so change a draw.

Shipped with the checkpoint in ``custom_generate/``: imports only torch, transformers and the
files beside it.
"""

from __future__ import annotations

import inspect

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

from .processors import NEG_INF, VisitLogitsProcessor, VisitStep


def _visit_chain(logits_processor: LogitsProcessorList | None) -> VisitLogitsProcessor:
    procs = list(logits_processor or [])
    if len(procs) != 1 or not isinstance(procs[0], VisitLogitsProcessor):
        names = [type(p).__name__ for p in procs]
        raise ValueError(
            "visit_decoding runs one VisitLogitsProcessor (visit_logits_processors(...)) and nothing else; "
            f"generate prepared {names}. Put warpers inside the chain and leave the generation config's own "
            "processors (forced tokens, min_length, repetition penalty, do_sample) unset."
        )
    return procs[0]


def visit_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
) -> torch.LongTensor:
    """Decode one visit per row on the grammar's column blocks; returns the sequences [B, T].

    Called by ``generate`` (``custom_generate=visit_decoding``) with the same arguments as its
    sampling loop. ``logits_processor`` must hold exactly one
    :class:`~.processors.VisitLogitsProcessor` (its sampler draws; the loop then takes the
    best column, lowest token id on a tie, as greedy decoding would). The model computes only the
    non-code columns when the chain never reads its code scores (empirical or uniform stage two)
    and its forward takes ``logits_columns``; otherwise every column, gathered into the blocks.
    """
    if synced_gpus:
        raise ValueError("visit_decoding does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP generation)")
    if generation_config.return_dict_in_generate:
        raise ValueError("visit_decoding returns the sequences only; set return_dict_in_generate=False")
    chain = _visit_chain(logits_processor)
    index = chain.index
    columns = None
    if not chain.reads_code_scores and "logits_columns" in inspect.signature(model.forward).parameters:
        columns = index.head_ids
        model_kwargs["logits_columns"] = columns
    pad_id = generation_config.pad_token_id
    pad = torch.tensor(index.pad_id if pad_id is None else pad_id, device=input_ids.device)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    first = True
    while True:
        inputs = model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=None if first else 1, is_first_iteration=first, **model_kwargs
        )
        first = False
        outputs = model(**inputs, return_dict=True)
        # The cache and masks move on as in transformers' own loop.
        model_kwargs = model._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder
        )
        logits = outputs.logits[:, -1].float()
        step = VisitStep(index, input_ids)
        if columns is not None and logits.shape[-1] == len(columns):
            kid = torch.full(step.kids.shape, NEG_INF, device=logits.device)  # replaced by stage two
            head = logits
        else:  # every column (stage two by the model, or a model without logits_columns)
            kid, head = step.gather(logits)
        next_tokens = torch.where(unfinished, step.select(*chain.process(step, kid, head)), pad)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished &= ~stopping_criteria(input_ids, None)
        del outputs
        if not bool(unfinished.any()):
            break
    if streamer is not None:
        streamer.end()
    return input_ids


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose key/value buffers grow by doubling, so that a step copies only its new
    token (DynamicLayer's ``torch.cat`` copies the whole cache at every step).
    ``keys``/``values`` are views of the filled part of the buffers."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if getattr(self, "_view", None) is not self.keys:  # first call, or keys replaced (crop, reorder)
            self._n = self.keys.shape[-2] if self.keys.numel() else 0
            self._k, self._v = (self.keys, self.values) if self._n else (None, None)
        n, m = self._n, key_states.shape[-2]
        if self._k is None or n + m > self._k.shape[-2]:
            k = key_states.new_empty(*key_states.shape[:-2], max(16, 2 * (n + m)), key_states.shape[-1])
            v = torch.empty_like(k)
            if n:
                k[..., :n, :] = self._k[..., :n, :]
                v[..., :n, :] = self._v[..., :n, :]
            self._k, self._v = k, v
        self._k[..., n:n + m, :] = key_states
        self._v[..., n:n + m, :] = value_states
        self._n = n + m
        self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]
        self._view = self.keys
        return self.keys, self.values


def visit_cache() -> EncoderDecoderCache:
    """Decoder self-attention in growing buffers; cross-attention (written once) as usual."""
    return EncoderDecoderCache(Cache(layer_class_to_replicate=_GrowingLayer), DynamicCache())


__all__ = ["visit_cache", "visit_decoding"]
