"""PromptEHR: BART with demographic prompts (remote code: imports only torch, transformers and
the configuration file beside it).

Demographics enter as prompts (Wang & Sun, EMNLP 2022): one vector per feature (a linear map of
the normalised number for ``x_num``, an embedding for ``x_cat``), reparameterised through a small
MLP, prepended to the encoder inputs AND to the decoder inputs (two separate prompt modules).

Conventions that make this work inside ``generate()``:

* ``attention_mask`` / ``decoder_attention_mask`` always cover the TOKENS only; the model prepends
  ones for the ``config.num_prompts`` prompt positions itself (generate keeps extending the token
  masks, never knowing about prompts).
* ``generate`` runs the encoder through ``get_encoder()``: that is :class:`PromptEHREncoder`, whose
  forward takes ``x_num``/``x_cat`` (generate hands every model kwarg to an encoder accepting
  ``**kwargs``) and prepends the encoder prompts. Its ``last_hidden_state`` keeps the prompt
  positions, so the decoder cross-attends to them.
* The decoder prepends its prompts only when no decoder state is cached yet (first step, or any
  step without cache); later cached steps see them through the KV cache, and the positions
  (BART's are ``past length + arange``) line up because the cache length counts the prompts.
* Decoder outputs (``last_hidden_state``, ``hidden_states``, ``logits``) are returned for the
  token positions only (``[B, T_dec, ...]``); ``*_attentions`` keep the prompt positions.
"""

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.models.bart.modeling_bart import (
    BartDecoder,
    BartEncoder,
    BartScaledWordEmbedding,
    shift_tokens_right,
)
from transformers.utils import can_return_tuple

from .configuration_promptehr import PromptEHRConfig

# transformers 5.24 renamed the KV-cache argument and output field from ``past_key_values`` to
# ``cache`` (the old name is deprecated); the model passes its cache on under the installed name.
CACHE_ARG = "cache" if "cache" in inspect.signature(BartDecoder.forward).parameters else "past_key_values"


def _one_cache(cache, past_key_values):
    """The KV cache passed under either name (``cache`` from transformers >= 5.24)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("PromptEHR: pass the KV cache as `cache` or `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _with_prompt_mask(mask: torch.Tensor | None, n_prompts: int) -> torch.Tensor | None:
    """[B, T] token mask -> [B, n_prompts + T] (prompts are always attended to)."""
    if mask is None or n_prompts == 0:
        return mask
    if mask.dim() != 2:
        raise ValueError(f"PromptEHR expects 2-D attention masks over the tokens, got shape {tuple(mask.shape)}")
    return torch.cat([mask.new_ones(mask.shape[0], n_prompts), mask], dim=1)


class DemographicPrompt(nn.Module):
    """Demographics -> prompt vectors.

    ``x_num`` [B, n_num] raw numbers (divided by ``config.num_feature_scales``) and ``x_cat``
    [B, n_cat] category indices -> [B, n_num + n_cat, d_model]: feature i gives
    ``mlp(x_i * W_i + b_i)`` (numbers) or ``mlp(E[x_i])`` (categories); the MLP is the
    reparameterisation PromptEHR (and prefix tuning) trains the prompts through.
    """

    def __init__(self, config: PromptEHRConfig):
        super().__init__()
        hidden = config.prompt_hidden_size
        self.num_scales = list(config.num_feature_scales)
        self.cardinalities = list(config.cat_cardinalities)
        self.num_weight = nn.Parameter(torch.empty(config.n_num_features, hidden))
        self.num_bias = nn.Parameter(torch.empty(config.n_num_features, hidden))
        self.cat_embed = nn.Embedding(sum(self.cardinalities), hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, config.d_model))

    def forward(self, x_num: torch.Tensor | None, x_cat: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        parts = []
        n_num, n_cat = len(self.num_scales), len(self.cardinalities)
        if n_num:
            if x_num is None or tuple(x_num.shape) != (batch_size, n_num):
                got = None if x_num is None else tuple(x_num.shape)
                raise ValueError(
                    f"PromptEHR needs x_num of shape [{batch_size}, {n_num}] (raw values, e.g. age in years), got {got}"
                )
            x = x_num.to(self.num_weight.dtype)
            if not torch.isfinite(x).all():
                raise ValueError("PromptEHR: x_num contains NaN or infinite values")
            x = x / x.new_tensor(self.num_scales)
            parts.append(x[..., None] * self.num_weight + self.num_bias)
        if n_cat:
            if x_cat is None or tuple(x_cat.shape) != (batch_size, n_cat):
                got = None if x_cat is None else tuple(x_cat.shape)
                raise ValueError(
                    f"PromptEHR needs x_cat of shape [{batch_size}, {n_cat}] (category indices, sex F=0 M=1), got {got}"
                )
            x_cat = x_cat.long()
            cards = x_cat.new_tensor(self.cardinalities)
            bad = (x_cat < 0) | (x_cat >= cards)
            if bad.any():
                row, col = (int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"PromptEHR: x_cat[{row}, {col}] = {int(x_cat[row, col])} is outside [0, {self.cardinalities[col]})"
                )
            offsets = torch.cumsum(cards, 0) - cards
            parts.append(self.cat_embed(x_cat + offsets))
        return self.mlp(torch.cat(parts, dim=1))


class CodeTypeEmbedding(nn.Module):
    """Token ids -> the learned embedding of each token's code type ([B, T] -> [B, T, d_model]).

    ``config.code_type_ranges`` (``[[first id, last id + 1, type], ...]``) sets the type of each
    token id (0 outside every range: the structure tokens). The id -> type table is a buffer saved
    with the weights (a loaded model reads it back; it is never trained).
    """

    def __init__(self, config: PromptEHRConfig):
        super().__init__()
        ranges = config.code_type_ranges
        token_type = torch.zeros(config.vocab_size, dtype=torch.long)
        for lo, hi, kind in ranges:
            token_type[lo:hi] = kind
        self.register_buffer("token_type", token_type)
        self.embed = nn.Embedding(max(kind for _, _, kind in ranges) + 1, config.d_model)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.embed(self.token_type[input_ids])


def _token_inputs(module, input_ids: torch.LongTensor) -> torch.Tensor:
    """Token embeddings, plus the code-type embeddings of a multimodal model."""
    embeds = module.embed_tokens(input_ids)
    if module.code_types is not None:
        embeds = embeds + module.code_types(input_ids).to(embeds.dtype)
    return embeds


@dataclass
class PromptEHRSeq2SeqLMOutput(Seq2SeqLMOutput):
    """Seq2SeqLMOutput plus the loss components and the auxiliary predictions.

    loss: lm_loss + config.age_loss_weight * age_loss + config.sex_loss_weight * sex_loss (the
        terms present); logits: [B, T_dec, vocab] for the decoder tokens (no prompt positions).
    lm_loss: token cross-entropy (mean over labels != -100), over the whole vocabulary or, with
        ``lm_grammar``, over the tokens the visit grammar allows at each position. age_loss: MSE between predicted and
        true age, both divided by the age feature's scale. sex_loss: cross-entropy of the sex head.
    age_pred: [B] predicted age in the units of x_num (years). sex_logits: [B, n_sex].
    Both pool the decoder states of THIS call's token positions (masked mean).
    """

    lm_loss: torch.FloatTensor | None = None
    age_loss: torch.FloatTensor | None = None
    sex_loss: torch.FloatTensor | None = None
    age_pred: torch.FloatTensor | None = None
    sex_logits: torch.FloatTensor | None = None


class VisitGrammar(NamedTuple):
    """The tokens the visit grammar allows at each decoder position, for the LM loss of
    :meth:`PromptEHRForConditionalGeneration.forward` (``lm_grammar=``). Built from the tokenizer by
    ``PromptEHRTrainer`` (``VocabIndex``); a position whose input token is a category predicts one
    of that category's codes, any other position a token of ``head_ids``.

    head_ids: [H] long, ascending: ``<pad>``, ``<v>``, ``</v>`` and every category.
    category_pos: [vocab_size] long, a category token's row in ``kids`` (n_cat elsewhere).
    kids: [n_cat + 1, K] long, each category's code ids, padded (the last row: padding only).
    kid_ok: [n_cat + 1, K] bool, the real entries of ``kids``.
    """

    head_ids: torch.Tensor
    category_pos: torch.Tensor
    kids: torch.Tensor
    kid_ok: torch.Tensor

    def to(self, device) -> "VisitGrammar":
        return VisitGrammar(*(t.to(device) for t in self))


def grammar_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, decoder_input_ids: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor | None, grammar: VisitGrammar
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token cross-entropy with each position normalised over the tokens the grammar allows there.

    hidden [B, T, d]; labels [B, T] (-100 = ignored); decoder_input_ids [B, T] (position t reads
    decoder_input_ids[:, t] and predicts labels[:, t]); weight [V, d] the LM head; bias [B, V] or
    None (the visit-type bias). Returns (loss: mean over the labelled positions, head logits
    [B, T, H] whose column h scores ``grammar.head_ids[h]``). The LM head is evaluated on H
    columns at head positions and on a category's K children at code positions, instead of all
    V columns: the softmax generation samples from (its processors mask the rest). A label the
    grammar cannot produce at its position (``<unk>``, a code whose category the tokenizer never
    saw) is left out of the loss, as generation can never write it.
    """
    n_cat = grammar.kids.shape[0] - 1
    labelled = labels.ne(-100)
    cat_row = grammar.category_pos[decoder_input_ids]  # [B, T]
    head_pos = torch.full((weight.shape[0],), -1, dtype=torch.long, device=labels.device)
    head_pos[grammar.head_ids] = torch.arange(len(grammar.head_ids), device=labels.device)
    at_code = labelled & (cat_row < n_cat)
    at_head = labelled & ~at_code & (head_pos[labels.clamp(min=0)] >= 0)
    head_logits = hidden @ weight[grammar.head_ids].T  # [B, T, H]
    if bias is not None:
        head_logits = head_logits + bias[:, None, grammar.head_ids]
    rows, cols = at_code.nonzero(as_tuple=True)  # the code positions
    kids, kid_ok = grammar.kids[cat_row[rows, cols]], grammar.kid_ok[cat_row[rows, cols]]  # [P, K]
    hit = (kids == labels[rows, cols][:, None]) & kid_ok
    allowed = hit.any(1)
    rows, cols, kids, kid_ok, hit = rows[allowed], cols[allowed], kids[allowed], kid_ok[allowed], hit[allowed]
    code_logits = torch.einsum("pd,pkd->pk", hidden[rows, cols], weight[kids])
    if bias is not None:
        code_logits = code_logits + bias[rows[:, None], kids]
    code_logits = code_logits.float().masked_fill(~kid_ok, float("-inf"))
    total = (nn.functional.cross_entropy(head_logits[at_head].float(), head_pos[labels[at_head]], reduction="sum")
             + nn.functional.cross_entropy(code_logits, hit.float().argmax(1), reduction="sum"))
    return total / (at_head.sum() + len(rows)).clamp(min=1), head_logits


class PromptEHRPreTrainedModel(PreTrainedModel):
    config_class = PromptEHRConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BartEncoderLayer", "BartDecoderLayer", "DemographicPrompt"]
    _skip_keys_device_placement = [CACHE_ARG]
    _supports_sdpa = True
    # The x_cat range check reads a tensor value (a graph break); eager/sdpa run as usual.
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VisitTypeBias):
            init.zeros_(module.weight)
        if isinstance(module, DemographicPrompt):
            # Unit-scale prompts: with BART's 0.02 the prompt would vanish under the position
            # embedding added to it, and demographics would barely move the first predictions.
            init.normal_(module.num_weight, mean=0.0, std=1.0)
            init.normal_(module.num_bias, mean=0.0, std=1.0)
            init.normal_(module.cat_embed.weight, mean=0.0, std=1.0)
            for layer in (module.mlp[0], module.mlp[2]):
                init.xavier_uniform_(layer.weight)
                init.zeros_(layer.bias)


class PromptEHREncoder(PromptEHRPreTrainedModel, BartEncoder):
    """BART encoder whose inputs are ``[encoder prompts; token embeddings]``.

    forward(input_ids [B, T], attention_mask [B, T] (tokens only), x_num, x_cat) ->
    BaseModelOutput with last_hidden_state [B, num_prompts + T, d_model].
    """

    def __init__(self, config: PromptEHRConfig):
        super().__init__(config)
        self.prompt = DemographicPrompt(config)
        self.code_types = CodeTypeEmbedding(config) if config.code_type_ranges else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        x_num: torch.Tensor | None = None,
        x_cat: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("PromptEHREncoder: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = _token_inputs(self, input_ids)
        prompts = self.prompt(x_num, x_cat, inputs_embeds.shape[0]).to(inputs_embeds.dtype)
        total = prompts.shape[1] + inputs_embeds.shape[1]
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"PromptEHREncoder: {inputs_embeds.shape[1]} tokens + {prompts.shape[1]} prompts exceed "
                f"max_position_embeddings={self.config.max_position_embeddings}; truncate the history"
            )
        return super().forward(
            inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1),
            attention_mask=_with_prompt_mask(attention_mask, prompts.shape[1]),
            **kwargs,
        )


class PromptEHRDecoder(PromptEHRPreTrainedModel, BartDecoder):
    """BART decoder whose inputs are ``[decoder prompts; token embeddings]`` on the first pass.

    The prompts are prepended when the cache (``cache`` or ``past_key_values``) holds nothing yet; a cached call only
    feeds the new tokens. ``attention_mask`` covers all tokens so far (not the prompts) and
    ``encoder_attention_mask`` the encoder positions (prompts included). Returns
    last_hidden_state [B, T_new, d_model] for the tokens of this call.
    """

    def __init__(self, config: PromptEHRConfig):
        super().__init__(config)
        self.prompt = DemographicPrompt(config)
        self.code_types = CodeTypeEmbedding(config) if config.code_type_ranges else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        x_num: torch.Tensor | None = None,
        x_cat: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("PromptEHRDecoder: pass exactly one of decoder_input_ids or decoder_inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = _token_inputs(self, input_ids)
        cache = _one_cache(cache, past_key_values)
        past_length = cache.get_seq_length() if cache is not None else 0
        n_new = 0
        if past_length == 0:
            prompts = self.prompt(x_num, x_cat, inputs_embeds.shape[0]).to(inputs_embeds.dtype)
            n_new = prompts.shape[1]
            inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)
        if past_length + inputs_embeds.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"PromptEHRDecoder: {past_length + inputs_embeds.shape[1]} positions (prompts included) exceed "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        outputs = super().forward(
            inputs_embeds=inputs_embeds,
            attention_mask=_with_prompt_mask(attention_mask, self.config.num_prompts),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            **{CACHE_ARG: cache},
            **kwargs,
        )
        if n_new:
            outputs.last_hidden_state = outputs.last_hidden_state[:, n_new:]
            if outputs.hidden_states is not None:
                outputs.hidden_states = tuple(h[:, n_new:] for h in outputs.hidden_states)
        return outputs


class PromptEHRModel(PromptEHRPreTrainedModel):
    """Encoder + decoder with demographic prompts; returns decoder states of the tokens only."""

    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: PromptEHRConfig):
        super().__init__(config)
        embed_scale = config.d_model**0.5 if config.scale_embedding else 1.0
        self.shared = BartScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, embed_scale)
        self.encoder = PromptEHREncoder(config)
        self.decoder = PromptEHRDecoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = value
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    def get_encoder(self, modality: str | None = None):
        return self.encoder

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        x_num: torch.Tensor | None = None,
        x_cat: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        """Shapes: input_ids/attention_mask [B, T_enc]; decoder_input_ids/decoder_attention_mask
        [B, T_dec] (with a cache: the new tokens / all tokens so far); x_num [B, n_num] float raw;
        x_cat [B, n_cat] long. last_hidden_state: [B, T_dec, d_model]; encoder_last_hidden_state:
        [B, num_prompts + T_enc, d_model]."""
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                x_num=x_num,
                x_cat=x_cat,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=_with_prompt_mask(attention_mask, self.config.num_prompts),
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            x_num=x_num,
            x_cat=x_cat,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            **{CACHE_ARG: getattr(decoder_outputs, CACHE_ARG)},
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class VisitTypeBias(nn.Module):
    """A bias on the LM logits for each visit type: ``weight`` [n_types, vocab_size] (zeros at
    init; the trainer may start it from the visit-type mixture's log-probabilities).

    forward(types [B] long, columns [K] long or None) -> [B, vocab_size] (or [B, K]).
    """

    def __init__(self, n_types: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_types, vocab_size))

    def forward(self, types: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if columns is None else self.weight[:, columns]
        return weight[types.long()]


class PromptEHRForConditionalGeneration(PromptEHRPreTrainedModel, GenerationMixin):
    """PromptEHR: BART + demographic prompts + LM head + auxiliary age/sex heads; with visit types
    (``config.visit_type_feature_index``), a per-type bias on the LM logits (:class:`VisitTypeBias`).

    ``generate(input_ids=history [B, T], attention_mask=..., x_num=[B, 1] age in years,
    x_cat=[B, 1] sex, ...)`` writes one visit from ``config.decoder_start_token_id`` until
    ``config.eos_token_id`` (``</v>``).
    """

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}
    # forward takes **kwargs (attention flags from generate); without this, Trainer would assume
    # the model normalises by num_items_in_batch and skip the gradient-accumulation scaling.
    accepts_loss_kwargs = False

    def __init__(self, config: PromptEHRConfig):
        super().__init__(config)
        self.model = PromptEHRModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.age_head = nn.Linear(config.d_model, 1) if config.age_feature_index is not None else None
        self.sex_head = (
            nn.Linear(config.d_model, config.cat_cardinalities[config.sex_feature_index])
            if config.sex_feature_index is not None
            else None
        )
        type_index = getattr(config, "visit_type_feature_index", None)
        self.visit_type_bias = (
            VisitTypeBias(config.cat_cardinalities[type_index], config.vocab_size) if type_index is not None else None
        )
        self.post_init()

    def get_encoder(self, modality: str | None = None):
        # generate() encodes through this module, so it must be the prompt-aware encoder.
        return self.model.encoder

    def get_decoder(self):
        return self.model.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        x_num: torch.Tensor | None = None,
        x_cat: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_columns: torch.LongTensor | None = None,
        cache=None,
        **kwargs,
    ) -> PromptEHRSeq2SeqLMOutput:
        """Shapes: input_ids/attention_mask [B, T_enc] (encoder history; masks cover tokens only);
        labels [B, T_dec] (-100 = ignored; decoder_input_ids default to labels shifted right
        after decoder_start_token_id); x_num [B, n_num] float, raw (age in years); x_cat
        [B, n_cat] long (sex F=0, M=1). Keyword-only ``age_labels`` [B] (years) and
        ``sex_labels`` [B] default, when labels are given, to the x_num / x_cat columns named by
        config.age/sex_feature_index. ``logits_columns`` [K] long: compute the LM head for these
        vocabulary ids only, as ``logits_to_keep`` does for positions: logits are then
        [B, T_dec, K], column k scoring token ``logits_columns[k]`` (for decoding loops that read
        only those scores; not with ``labels``). Keyword-only ``lm_grammar`` (a :class:`VisitGrammar`,
        with ``labels``): the LM loss normalises each position over the tokens the visit grammar
        allows there (:func:`grammar_lm_loss`), and logits are [B, T_dec, H], column h scoring
        token ``lm_grammar.head_ids[h]``.
        Returns PromptEHRSeq2SeqLMOutput; logits [B, T_dec, vocab] (or [B, T_dec, K], [B, T_dec, H])."""
        # Not named parameters on purpose: Trainer treats every forward parameter containing
        # "label" as a label name and silently reports no eval_loss when one is absent.
        age_labels = kwargs.pop("age_labels", None)
        sex_labels = kwargs.pop("sex_labels", None)
        lm_grammar = kwargs.pop("lm_grammar", None)
        if lm_grammar is not None and (labels is None or logits_columns is not None):
            raise ValueError("lm_grammar restricts the LM loss: it needs labels and no logits_columns")
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
            if age_labels is None and self.age_head is not None and x_num is not None:
                age_labels = x_num[:, self.config.age_feature_index]
            if sex_labels is None and self.sex_head is not None and x_cat is not None:
                sex_labels = x_cat[:, self.config.sex_feature_index]

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            x_num=x_num,
            x_cat=x_cat,
            encoder_outputs=encoder_outputs,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        bias = None
        if self.visit_type_bias is not None:  # the prompts have checked x_cat's shape and range
            columns = None if lm_grammar is not None else logits_columns
            bias = self.visit_type_bias(x_cat[:, self.config.visit_type_feature_index], columns).to(hidden.dtype)
        lm_loss = None
        if lm_grammar is not None:
            if decoder_input_ids is None:
                raise ValueError("lm_grammar needs decoder_input_ids (or labels to derive them from)")
            lm_loss, logits = grammar_lm_loss(hidden, labels, decoder_input_ids, self.lm_head.weight, bias, lm_grammar)
        else:
            if logits_columns is None:
                logits = self.lm_head(hidden)
            else:
                if labels is not None:
                    raise ValueError("logits_columns is for generation; the loss needs every logit")
                logits = nn.functional.linear(hidden, self.lm_head.weight[logits_columns])
            if bias is not None:
                logits = logits + bias[:, None, :]

        # Masked mean over this call's decoder tokens; padding is excluded by the decoder mask
        # (its last T columns: under a cache it covers all tokens so far) or else by the labels.
        if decoder_attention_mask is not None:
            keep = decoder_attention_mask[:, -hidden.shape[1] :]
        elif labels is not None:
            keep = labels.ne(-100)
        else:
            keep = torch.ones(hidden.shape[:2], device=hidden.device)
        keep = keep.to(hidden.dtype)[..., None]
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)

        age_loss = sex_loss = age_pred = sex_logits = None
        terms = []
        if labels is not None:
            if lm_loss is None:
                lm_loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                      labels.to(logits.device).reshape(-1), ignore_index=-100)
            terms.append(lm_loss)
        if self.age_head is not None:
            scale = self.config.num_feature_scales[self.config.age_feature_index]
            age_norm = self.age_head(pooled).squeeze(-1).float()
            age_pred = age_norm * scale
            if age_labels is not None:
                age_loss = nn.functional.mse_loss(age_norm, age_labels.to(age_norm) / scale)
                terms.append(self.config.age_loss_weight * age_loss)
        if self.sex_head is not None:
            sex_logits = self.sex_head(pooled).float()
            if sex_labels is not None:
                sex_loss = nn.functional.cross_entropy(sex_logits, sex_labels.to(sex_logits.device).long())
                terms.append(self.config.sex_loss_weight * sex_loss)
        loss = torch.stack(terms).sum() if terms else None

        return PromptEHRSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            lm_loss=lm_loss,
            age_loss=age_loss,
            sex_loss=sex_loss,
            age_pred=age_pred,
            sex_logits=sex_logits,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also names this class under ``AutoModel`` in ``auto_map`` (``register_for_auto_class``
        records a single auto class per model class)."""
        name = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": name}
        return super().save_pretrained(save_directory, *args, **kwargs)


PromptEHRForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "DemographicPrompt",
    "grammar_lm_loss",
    "PromptEHRDecoder",
    "PromptEHREncoder",
    "PromptEHRForConditionalGeneration",
    "PromptEHRModel",
    "PromptEHRPreTrainedModel",
    "PromptEHRSeq2SeqLMOutput",
    "VisitGrammar",
    "VisitTypeBias",
]
