"""PromptEHR configuration (remote code: imports only transformers and the standard library).

A BART encoder-decoder plus the demographic prompts of PromptEHR (Wang & Sun, EMNLP 2022).
The BART hyperparameters keep BART's names (``d_model``, ``encoder_layers``, ...), so the BART
encoder and decoder of ``transformers`` are built directly from this config.

Demographics: ``x_num`` [B, n_num_features] raw numbers (age in years), divided inside the model
by ``num_feature_scales``; ``x_cat`` [B, len(cat_cardinalities)] category indices (sex: F=0, M=1).
Each feature becomes one prompt vector, prepended to the encoder AND the decoder inputs, so a
model sees ``num_prompts = n_num_features + len(cat_cardinalities)`` extra positions on each side:
encoder inputs may hold at most ``max_position_embeddings - num_prompts`` tokens.

Token ids (defaults follow PromptEHRTokenizer's fixed layout: ``<pad> <s> </s> <unk> <mask> <v>
</v>`` = 0..6): the decoder writes ONE visit, starting from ``decoder_start_token_id`` (``<s>``)
and ending at ``eos_token_id`` = ``</v>``, which is therefore what ``generate`` stops at.
``from_preset(..., tokenizer=tok)`` takes the vocabulary size and these ids from a tokenizer.
"""

from dataclasses import field

from transformers import PretrainedConfig

# Hyperparameters that differ between the presets; everything else is a field default.
PRESETS = {
    # Trains on 2 CPU cores in minutes: ~5.5M parameters without the token embeddings.
    "small": dict(
        d_model=256,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        max_position_embeddings=512,
        prompt_hidden_size=128,
    ),
    # BART-base size, as in the PromptEHR paper.
    "base": dict(
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
        prompt_hidden_size=512,
    ),
}


class PromptEHRConfig(PretrainedConfig):
    r"""Configuration of :class:`PromptEHRForConditionalGeneration`.

    BART fields (same meaning as in ``BartConfig``): vocab_size, max_position_embeddings,
    d_model, encoder_layers/decoder_layers, *_attention_heads, *_ffn_dim, *_layerdrop,
    activation_function, dropout, attention_dropout, activation_dropout, init_std,
    scale_embedding, token ids. Defaults are the ``small`` preset.

    Demographic prompts:
        n_num_features: number of numerical features in ``x_num`` (1: age).
        cat_cardinalities: number of values of each categorical feature in ``x_cat`` ([2]: sex;
            [2, M] with M visit types).
        visit_type_feature_index: which ``x_cat`` column holds the type of the visit being written
            (a mixture component of the training visits, drawn before the visit at generation);
            None: the model is not conditioned on visit types.
        num_feature_scales: the model feeds ``x_num / num_feature_scales`` to the prompts, so
            callers pass raw values (age in years; 100 maps ages to ~[0, 0.9]).
        prompt_hidden_size: width of the raw prompt vectors and of the reparameterisation MLP
            that maps them to ``d_model``.

    Auxiliary heads (on the masked mean of the decoder states over the real decoder tokens):
        age_feature_index: which ``x_num`` column the age head regresses (normalised by its
            scale); None: no age head.
        sex_feature_index: which ``x_cat`` column the sex head classifies; None: no sex head.
        age_loss_weight, sex_loss_weight: ``loss = lm_loss + w_age * age_loss + w_sex * sex_loss``.

    Code types (PromptEHR's conditioning on the code type, for a tokenizer holding procedures and
    medications beside diagnoses):
        code_type_ranges: ``[[first id, last id + 1, code type], ...]`` (the tokenizer's
            ``code_type_ranges()``): a token in a range gets that code type's learned embedding
            (type 1 = diagnoses, 2 = procedures, 3 = medications) added to its token embedding in
            the encoder and the decoder; other tokens get type 0's. None (default, a
            diagnosis-only tokenizer): no code-type embedding.
    """

    model_type = "promptehr"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # num_hidden_layers is what generate() sizes the decoder KV cache with.
    attribute_map = {
        "num_attention_heads": "encoder_attention_heads",
        "hidden_size": "d_model",
        "num_hidden_layers": "decoder_layers",
    }

    vocab_size: int = 1024
    max_position_embeddings: int = 512
    d_model: int = 256
    encoder_layers: int = 3
    decoder_layers: int = 3
    encoder_attention_heads: int = 4
    decoder_attention_heads: int = 4
    encoder_ffn_dim: int = 1024
    decoder_ffn_dim: int = 1024
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    use_cache: bool = True
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 6
    decoder_start_token_id: int | None = 1

    n_num_features: int = 1
    cat_cardinalities: list[int] = field(default_factory=lambda: [2])
    num_feature_scales: list[float] = field(default_factory=lambda: [100.0])
    prompt_hidden_size: int = 128
    age_feature_index: int | None = 0
    sex_feature_index: int | None = 0
    visit_type_feature_index: int | None = None
    age_loss_weight: float = 1.0
    sex_loss_weight: float = 1.0
    code_type_ranges: list[list[int]] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.cat_cardinalities = [int(c) for c in self.cat_cardinalities]
        self.num_feature_scales = [float(s) for s in self.num_feature_scales]
        problems = []
        if len(self.num_feature_scales) != self.n_num_features:
            problems.append(
                f"num_feature_scales has {len(self.num_feature_scales)} entries for "
                f"n_num_features={self.n_num_features}"
            )
        if any(s == 0.0 for s in self.num_feature_scales):
            problems.append(f"num_feature_scales must be non-zero, got {self.num_feature_scales}")
        if any(c < 1 for c in self.cat_cardinalities):
            problems.append(f"cat_cardinalities must be >= 1, got {self.cat_cardinalities}")
        for heads, name in ((self.encoder_attention_heads, "encoder"), (self.decoder_attention_heads, "decoder")):
            if self.d_model % heads:
                problems.append(f"d_model={self.d_model} is not a multiple of {name}_attention_heads={heads}")
        if self.age_feature_index is not None and not 0 <= self.age_feature_index < self.n_num_features:
            problems.append(
                f"age_feature_index={self.age_feature_index} is outside x_num's {self.n_num_features} columns")
        if self.sex_feature_index is not None and not 0 <= self.sex_feature_index < len(self.cat_cardinalities):
            problems.append(
                f"sex_feature_index={self.sex_feature_index} is outside x_cat's {len(self.cat_cardinalities)} columns"
            )
        if self.visit_type_feature_index is not None and not (
                0 <= self.visit_type_feature_index < len(self.cat_cardinalities)
                and self.visit_type_feature_index != self.sex_feature_index):
            problems.append(f"visit_type_feature_index={self.visit_type_feature_index} must be an x_cat column "
                            f"(of {len(self.cat_cardinalities)}) other than sex's")
        if self.code_type_ranges is not None:
            self.code_type_ranges = [[int(x) for x in r] for r in self.code_type_ranges]
            if any(len(r) != 3 or not 0 <= r[0] < r[1] <= self.vocab_size or r[2] < 1
                   for r in self.code_type_ranges):
                problems.append("code_type_ranges must be [first id, last id + 1, code type >= 1] triples inside "
                                f"the vocabulary ({self.vocab_size} tokens)")
        if self.num_prompts >= self.max_position_embeddings:
            problems.append(
                f"{self.num_prompts} prompts leave no room in max_position_embeddings={self.max_position_embeddings}")
        if problems:
            raise ValueError("PromptEHRConfig: " + "; ".join(problems))

    @property
    def num_prompts(self) -> int:
        """Prompt positions prepended to each of the encoder and decoder inputs."""
        return self.n_num_features + len(self.cat_cardinalities)

    @classmethod
    def from_preset(cls, name: str, tokenizer=None, **overrides) -> "PromptEHRConfig":
        """A preset ("small" | "base"), optionally sized for a tokenizer, then ``overrides``.

        ``tokenizer`` (a PromptEHRTokenizer or anything with the same attributes) sets
        ``vocab_size=len(tokenizer)``, ``pad/bos_token_id``, ``decoder_start_token_id=bos`` and
        ``eos_token_id=tokenizer.visit_end_id`` (the decoder writes one visit) and, for a
        multimodal tokenizer, ``code_type_ranges``. Keyword
        overrides win over both.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown PromptEHR preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = dict(PRESETS[name])
        if tokenizer is not None:
            kwargs.update(
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                decoder_start_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.visit_end_id,
            )
            if len(getattr(tokenizer, "modalities", ())) > 1:
                kwargs["code_type_ranges"] = tokenizer.code_type_ranges()
        kwargs.update(overrides)
        return cls(**kwargs)


PromptEHRConfig.register_for_auto_class()

__all__ = ["PromptEHRConfig"]
