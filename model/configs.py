"""Model configs as plain dataclasses, read from and written to the Hub `config.json` layout.

Each config keeps the keys it does not model in `extra`, so a config.json read and written back
keeps everything transformers wrote into it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="BaseConfig")


@dataclass
class BaseConfig:
    model_type: ClassVar[str] = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], check: bool = True) -> C:
        """The config of a dict in the config.json layout; `check=False` skips `validate` (a file kept as read)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} needs a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        config = cls(**known, extra=extra)
        if check:
            config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None:
                continue  # unset: readers apply their own default
            out[f.name] = value.to_dict() if isinstance(value, BaseConfig) else value
        if self.model_type:
            out["model_type"] = self.model_type
        return out

    def validate(self) -> None:
        """Raise ConfigError for values the model cannot be built from."""


def _check_heads(name: str, hidden: int, heads: int) -> None:
    if heads <= 0 or hidden % heads:
        raise ConfigError(f"{name}: hidden size {hidden} is not divisible by {heads} attention heads")


@dataclass
class InstructBlipVisionConfig(BaseConfig):
    model_type: ClassVar[str] = "instructblip_vision_model"
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True

    def validate(self) -> None:
        _check_heads("vision_config", self.hidden_size, self.num_attention_heads)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision_config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class InstructBlipQFormerConfig(BaseConfig):
    model_type: ClassVar[str] = "instructblip_qformer"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    # InstructBLIP feeds the instruction into the Q-Former; BLIP-2 does not (and has no text weights).
    use_qformer_text_input: bool = True
    position_embedding_type: str | None = None  # None: "absolute", the only kind (not written to config.json)

    def validate(self) -> None:
        _check_heads("qformer_config", self.hidden_size, self.num_attention_heads)
        if self.position_embedding_type not in (None, "absolute"):
            raise ConfigError(
                f"qformer_config: position_embedding_type {self.position_embedding_type!r} is not supported; only "
                "'absolute' is (what every InstructBLIP and BLIP-2 checkpoint uses)"
            )
        if self.cross_attention_frequency < 1:
            raise ConfigError("qformer_config: cross_attention_frequency must be at least 1")


@dataclass
class Blip2QFormerConfig(InstructBlipQFormerConfig):
    model_type: ClassVar[str] = "blip_2_qformer"
    use_qformer_text_input: bool = False


@dataclass
class Blip2VisionConfig(InstructBlipVisionConfig):
    model_type: ClassVar[str] = "blip_2_vision_model"


# The RoPE kinds of transformers 5.24's LLaMA that blipbatch implements, and the parameters each needs.
ROPE_KINDS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class LlamaConfig(BaseConfig):
    model_type: ClassVar[str] = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        _check_heads("text_config", self.hidden_size, self.num_attention_heads)
        assert self.num_key_value_heads is not None  # set by __post_init__
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config: {self.num_attention_heads} attention heads cannot be grouped over "
                f"{self.num_key_value_heads} key/value heads"
            )
        kind = self.rope_kind
        if kind not in ROPE_KINDS:
            raise ConfigError(
                f"text_config: rope type {kind!r} is not supported; supported: {', '.join(ROPE_KINDS)} "
                "(README: Using the model)"
            )
        missing = [k for k in ROPE_KINDS[kind] if self.rope_settings.get(k) is None]
        if missing:
            raise ConfigError(f"text_config: rope type {kind!r} needs {', '.join(missing)} in rope_parameters")

    @property
    def rope_settings(self) -> dict:
        """The RoPE parameters from either layout: 5.x `rope_parameters`, or the older `rope_scaling`."""
        return dict(self.rope_parameters or self.rope_scaling or {})

    @property
    def rope_kind(self) -> str:
        settings = self.rope_settings
        return settings.get("rope_type", settings.get("type", "default"))

    @property
    def rope_base(self) -> float:
        """RoPE theta from either layout: top-level `rope_theta` (older) or `rope_parameters` (5.x)."""
        if self.rope_parameters and "rope_theta" in self.rope_parameters:
            return float(self.rope_parameters["rope_theta"])
        return float(self.rope_theta if self.rope_theta is not None else 10000.0)


@dataclass
class OPTConfig(BaseConfig):
    model_type: ClassVar[str] = "opt"
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    num_attention_heads: int = 12
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size

    def validate(self) -> None:
        _check_heads("text_config", self.hidden_size, self.num_attention_heads)


@dataclass
class T5Config(BaseConfig):
    model_type: ClassVar[str] = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = 0

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.dense_act_fn is None:
            act = self.feed_forward_proj.split("-")[-1]
            # transformers' historical mapping; the Hub Flan-T5 configs store dense_act_fn="gelu" explicitly.
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    def validate(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(f"text_config: feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")


TextConfig = LlamaConfig | OPTConfig | T5Config
TEXT_CONFIGS: dict[str, type[TextConfig]] = {"llama": LlamaConfig, "opt": OPTConfig, "t5": T5Config}
DECODER_ONLY_TYPES = frozenset({"llama", "opt"})


def text_config_from_dict(data: dict[str, Any]) -> TextConfig:
    model_type = data.get("model_type", "opt")
    if model_type not in TEXT_CONFIGS:
        raise ConfigError(
            f"text_config.model_type {model_type!r} is not supported; supported language models: "
            f"{', '.join(sorted(TEXT_CONFIGS))}"
        )
    return TEXT_CONFIGS[model_type].from_dict(data)


@dataclass
class InstructBlipConfig(BaseConfig):
    model_type: ClassVar[str] = "instructblip"
    vision_config_class: ClassVar[type[InstructBlipVisionConfig]] = InstructBlipVisionConfig
    qformer_config_class: ClassVar[type[InstructBlipQFormerConfig]] = InstructBlipQFormerConfig

    vision_config: InstructBlipVisionConfig = field(default_factory=InstructBlipVisionConfig)
    qformer_config: InstructBlipQFormerConfig = field(default_factory=InstructBlipQFormerConfig)
    text_config: TextConfig = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_token_index: int | None = None
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, data: dict[str, Any], check: bool = True) -> InstructBlipConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} needs a dict, got {type(data).__name__}")
        data = dict(data)
        found_type = data.get("model_type")
        if found_type is not None and found_type != cls.model_type:
            raise ConfigError(
                f"config.json has model_type {found_type!r}, but {cls.__name__} reads {cls.model_type!r}; "
                "use the class matching the checkpoint (InstructBlip* or Blip2*)"
            )
        if "image_token_id" in data and data.get("image_token_index") is None:
            data["image_token_index"] = data.pop("image_token_id")
        data.pop("image_token_id", None)
        vision = cls.vision_config_class.from_dict(data.pop("vision_config", None) or {})
        qformer = cls.qformer_config_class.from_dict(data.pop("qformer_config", None) or {})
        text = text_config_from_dict(data.pop("text_config", None) or {"model_type": "opt"})
        data.pop("model_type", None)
        config = super().from_dict(data, check)
        config.vision_config, config.qformer_config, config.text_config = vision, qformer, text
        config.__post_init__()
        return config

    def __post_init__(self) -> None:
        # The Q-Former cross-attends to the vision output, whatever its stored encoder size says.
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size

    @classmethod
    def from_vision_qformer_text_configs(
        cls,
        vision_config: BaseConfig | dict[str, Any],
        qformer_config: BaseConfig | dict[str, Any],
        text_config: BaseConfig | dict[str, Any],
        **kwargs: Any,
    ) -> InstructBlipConfig:
        """The composite config from its three parts (config objects or dicts) and top-level keys, as transformers'."""
        parts = {
            "vision_config": vision_config,
            "qformer_config": qformer_config,
            "text_config": text_config,
        }
        data = {k: v.to_dict() if isinstance(v, BaseConfig) else dict(v) for k, v in parts.items()}
        for key in ("vision_config", "qformer_config"):
            data[key].pop("model_type", None)  # a part of the other family (BLIP-2 / InstructBLIP) reads the same
        return cls.from_dict({**kwargs, **data})

    @property
    def use_decoder_only_language_model(self) -> bool:
        return self.text_config.model_type in DECODER_ONLY_TYPES

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["use_decoder_only_language_model"] = self.use_decoder_only_language_model
        return out


@dataclass
class Blip2Config(InstructBlipConfig):
    model_type: ClassVar[str] = "blip-2"
    vision_config_class: ClassVar[type[InstructBlipVisionConfig]] = Blip2VisionConfig
    qformer_config_class: ClassVar[type[InstructBlipQFormerConfig]] = Blip2QFormerConfig

    vision_config: InstructBlipVisionConfig = field(default_factory=Blip2VisionConfig)
    qformer_config: InstructBlipQFormerConfig = field(default_factory=Blip2QFormerConfig)


# transformers' generation settings that blipbatch does not implement: refused (when set) by name, not as unknown.
TRANSFORMERS_ONLY_SETTINGS = frozenset(
    {
        "max_time",
        "stop_strings",
        "use_mtp",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "top_h",
        "token_healing",
        "guidance_scale",
        "watermarking_config",
        "output_attentions",
        "output_hidden_states",
        "output_logits",
        "is_assistant",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "prompt_lookup_num_tokens",
        "max_matching_ngram_size",
        "assistant_early_exit",
        "assistant_lookbehind",
        "target_lookbehind",
        "assistant_ensemble_weight",
        "speculation_type",
        "compile_config",
        "disable_compile",
        "continuous_batching_config",
        "low_memory",
        "penalty_alpha",
        "dola_layers",
        "diversity_penalty",
        "num_beam_groups",
        "constraints",
        "force_words_ids",
        "prefill_chunk_size",
    }
)
# Keys a saved or to_dict()-ed transformers GenerationConfig carries that are bookkeeping, not settings.
BOOKKEEPING_KEYS = frozenset({"transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash"})


@dataclass
class GenerationConfig(BaseConfig):
    """Generation settings with transformers' names, defaults and meaning (README "Generation settings").

    A setting given as None to `generate()` means what it means to transformers' `generate()`: the processor it
    controls is off (top_k=None: no top-k cut; eos_token_id=None: no eos), see `merged`."""

    max_length: int | None = None  # None with max_new_tokens None: 20 new tokens, as transformers
    max_new_tokens: int | None = None
    min_length: int | None = 0
    min_new_tokens: int | None = None
    do_sample: bool | None = False
    temperature: float | None = 1.0
    top_k: int | None = 50
    top_p: float | None = 1.0
    min_p: float | None = None
    typical_p: float | None = 1.0
    epsilon_cutoff: float | None = 0.0
    eta_cutoff: float | None = 0.0
    num_beams: int = 1
    length_penalty: float | None = 1.0
    early_stopping: bool | str | None = False
    num_return_sequences: int = 1
    repetition_penalty: float | None = 1.0
    # transformers applies these two to the encoder's input ids; InstructBLIP/BLIP-2 hand the language model
    # embeddings, so transformers ignores them (with a warning), and so do we.
    encoder_repetition_penalty: float | None = 1.0
    encoder_no_repeat_ngram_size: int | None = 0
    no_repeat_ngram_size: int | None = 0
    bad_words_ids: list[list[int]] | None = None
    sequence_bias: Any = None  # {(ids...): bias} or [[[ids...], bias], ...]
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    exponential_decay_length_penalty: tuple[int, float] | list | None = None  # (start, factor)
    remove_invalid_values: bool | None = False
    renormalize_logits: bool | None = False
    use_cache: bool | None = True  # accepted for compatibility: blipbatch always caches (same ids either way)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    return_dict_in_generate: bool | None = False  # a GenerateOutput (sequences, scores, ...) instead of the ids
    output_scores: bool | None = False  # with return_dict_in_generate: the processed scores of every step

    @classmethod
    def setting_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls)) - {"extra"}

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with `overrides` applied, None included (as transformers applies keyword arguments); unknown
        names are an error, not silently ignored."""
        check_setting_names(overrides)
        config = dataclasses.replace(self, **overrides)
        config.validate()
        return config

    def merged(self, given: GenerationConfig | Any | None, overrides: dict[str, Any]) -> GenerationConfig:
        """The settings of one generate call, as transformers merges them: `given` (our GenerationConfig, or any
        object with transformers' `to_dict()`), its unset (None) values filled from `self` (the model's base
        settings) and then from the defaults, then `overrides` (keyword arguments) on top, None included."""
        if given is None:
            return self.updated(**overrides)
        values = given_settings(given)
        defaults = GenerationConfig()
        filled = {}
        for name in self.setting_names():
            for source in (values, vars(self), vars(defaults)):
                if source.get(name) is not None:
                    filled[name] = source[name]
                    break
        return dataclasses.replace(GenerationConfig(), **filled).updated(**overrides)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def validate(self) -> None:
        for name in ("num_beams", "num_return_sequences"):
            if getattr(self, name) is None:
                raise ConfigError(f"{name} cannot be None (transformers fails on it too); leave it out for 1")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.num_return_sequences < 1:
            raise ConfigError(f"num_return_sequences must be at least 1, got {self.num_return_sequences}")
        if not self.do_sample and self.num_beams == 1 and self.num_return_sequences > 1:
            raise ConfigError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams}) "
                "without sampling"
            )
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})"
            )
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be greater than 0, got {self.max_new_tokens}")
        if self.early_stopping not in (None, True, False, "never"):
            raise ConfigError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        self._check_processor_values()
        if self.suppress_tokens is not None:
            for name in ("forced_bos_token_id", "forced_eos_token_id"):
                forced = getattr(self, name)
                forced = {forced} if isinstance(forced, int) else set(forced or ())
                if forced and forced <= set(self.suppress_tokens):
                    raise ConfigError(
                        f"every token of {name} ({sorted(forced)}) is also in suppress_tokens: nothing could be "
                        "generated at the forcing step; remove it from one of them"
                    )

    def _check_processor_values(self) -> None:
        """transformers' checks on the arguments of the logits processors it builds, made when it would build them
        (temperature=0 is fine without sampling); its checks want floats where it says float (1.5, not 1)."""
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            _positive_float("repetition_penalty", self.repetition_penalty)
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size > 0:
            _positive_int("no_repeat_ngram_size", self.no_repeat_ngram_size)
        if self.sequence_bias is not None:
            sequence_biases(self.sequence_bias)
        if self.bad_words_ids is not None:
            value = self.bad_words_ids
            if not (
                isinstance(value, list)
                and value
                and all(isinstance(w, list) for w in value)
                and all(_is_token_id(t) for w in value for t in w)
            ):
                raise ConfigError(f"bad_words_ids must be a non-empty list of lists of token ids, got {value!r}")
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            if getattr(self, name) is not None:
                token_list(getattr(self, name), name)
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (list, tuple)) and all(map(_is_token_id, value))):
                raise ConfigError(f"{name} must be a list of token ids, got {value!r}")
        decay = self.exponential_decay_length_penalty
        if decay is not None and not (
            isinstance(decay, (list, tuple))
            and len(decay) == 2
            and _is_token_id(decay[0])
            and isinstance(decay[1], (int, float))
            and not isinstance(decay[1], bool)
        ):
            raise ConfigError(f"exponential_decay_length_penalty must be (start index, decay factor), got {decay!r}")
        if not self.do_sample:
            return
        if self.temperature is not None and self.temperature != 1.0:
            _positive_float("temperature", self.temperature)
        if self.top_k is not None and self.top_k != 0:
            _positive_int("top_k", self.top_k)
        if self.top_p is not None and self.top_p < 1.0 and self.top_p < 0:
            raise ConfigError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.typical_p is not None and self.typical_p < 1.0 and not self.typical_p > 0:
            raise ConfigError(f"typical_p must be > 0 and < 1, got {self.typical_p!r}")


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_float(name: str, value: Any) -> float:
    if not isinstance(value, float) or not value > 0:
        raise ConfigError(f"{name} must be a float > 0 (e.g. 2.0, not 2; transformers checks the type), got {value!r}")
    return value


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be an integer > 0, got {value!r}")
    return value


def token_list(value: Any, name: str = "token ids") -> list[int]:
    """A token id or a list of them, as a list."""
    tokens = [value] if _is_token_id(value) else value
    if not (isinstance(tokens, (list, tuple)) and all(map(_is_token_id, tokens))):
        raise ConfigError(f"{name} must be a token id or a list of them, got {value!r}")
    return list(tokens)


def sequence_biases(value: Any) -> dict[tuple[int, ...], float]:
    """sequence_bias as transformers takes it, {(ids...): float} or [[[ids...], float], ...], as the dict."""
    shape = "a dict {(token ids...): float} or a list [[[token ids...], float], ...], non-empty"
    if isinstance(value, dict) and value:
        if not all(isinstance(k, tuple) and k and all(map(_is_token_id, k)) for k in value):
            raise ConfigError(f"sequence_bias must be {shape}; its keys must be non-empty tuples of token ids")
        if not all(isinstance(v, float) for v in value.values()):
            raise ConfigError(f"sequence_bias must be {shape}; its biases must be floats (e.g. 2.0, not 2)")
        return dict(value)
    if isinstance(value, list) and value:
        if all(
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and isinstance(pair[0], list)
            and pair[0]
            and all(map(_is_token_id, pair[0]))
            and isinstance(pair[1], float)
            for pair in value
        ):
            return {tuple(ids): bias for ids, bias in value}
    raise ConfigError(f"sequence_bias must be {shape} (biases are floats, e.g. 2.0, not 2); got {value!r}")


def check_setting_names(settings: Any) -> None:
    """A one-line ConfigError for the first name that is not a generation setting we implement: transformers'
    settings that blipbatch does not implement are named as such, others get a did-you-mean."""
    known = GenerationConfig.setting_names()
    for name in sorted(set(settings) - known):
        if name in TRANSFORMERS_ONLY_SETTINGS:
            raise ConfigError(f"generation setting {name!r} is a transformers setting that blipbatch does not support")
        close = difflib.get_close_matches(name, sorted(known | TRANSFORMERS_ONLY_SETTINGS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown generation setting {name!r}{hint} (README: Generation settings)")


def given_settings(given: Any) -> dict[str, Any]:
    """The settings of a generation_config= argument: ours, or a transformers GenerationConfig through its public
    to_dict() (no transformers import). Unset (None) and bookkeeping entries are dropped; a transformers-only
    setting with a value that does something is refused by name."""
    if isinstance(given, GenerationConfig):
        return {name: getattr(given, name) for name in GenerationConfig.setting_names()}
    to_dict = getattr(given, "to_dict", None)
    if not callable(to_dict):
        raise ConfigError(
            f"generation_config must be a GenerationConfig (blipbatch's or transformers'), got {type(given).__name__}"
        )
    values = {k: v for k, v in to_dict().items() if v is not None and k not in BOOKKEEPING_KEYS}
    # transformers-only settings at their "off" value do nothing and can be dropped.
    values = {k: v for k, v in values.items() if not (k in TRANSFORMERS_ONLY_SETTINGS and v in (False, 0, {}))}
    check_setting_names(values)
    return values


# model_type -> the config of a whole checkpoint (vision + Q-Former + language model) that blipbatch loads.
COMPOSITE_CONFIGS: dict[str, type[InstructBlipConfig]] = {c.model_type: c for c in (InstructBlipConfig, Blip2Config)}
