"""The backbone's architecture, read once from a transformers config."""

from __future__ import annotations

from dataclasses import dataclass

from balcony_runtime.errors import ModelSourceError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass(frozen=True)
class ModelArch:
    """What the forward needs to know about a LLaMA-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when fewer than num_heads)
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelSourceError(
                f"{self.num_heads} query heads do not divide into {self.num_kv_heads} KV heads"
            )

    @classmethod
    def from_hf_config(cls, config) -> "ModelArch":
        architectures = getattr(config, "architectures", None) or []
        if getattr(config, "model_type", None) != "llama" or (
            architectures and architectures[0] not in SUPPORTED_ARCHITECTURES
        ):
            raise ModelSourceError(
                f"unsupported architecture {architectures or config.model_type!r}: Balcony Serve runs "
                f"LLaMA-family decoders ({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ModelSourceError("LLaMA variants with attention or MLP biases are not supported")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ModelSourceError(f"unsupported activation {config.hidden_act!r} (expected silu)")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
