"""Model configuration: one dataclass for the three decoder families, read from HF ``config.json``.

Why our own dataclass rather than transformers' config objects: the runtime needs a dozen fields,
and the same names across Qwen2 / Llama / Starcoder2 (which spell them differently:
``rms_norm_eps`` vs ``norm_epsilon``, ``rope_scaling`` vs ``rope_parameters``). Parsing is keyed by
``model_type`` with no fuzzy matching: an unknown type is an error that lists the supported ones.

The built-in shapes reproduce the published ``config.json`` of the five seed checkpoints (values
copied by hand from the files on the Hugging Face hub, Nov 2025): they let
``load_model("open-dcoder-0.5b", random_weights=True)`` build a real-size model offline for benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "starcoder2")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one decoder checkpoint (family flags derive from ``model_type``)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (DeepSeek-Coder: 4.0); 1.0 = none
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    attention_bias: bool = False  # q/k/v biases (Qwen2: always; Starcoder2: o_proj too)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; dinfill supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    # family flags: the runtime branches on these, never on names
    @property
    def norm(self) -> str:
        """``"layernorm"`` (Starcoder2, with bias) or ``"rmsnorm"`` (Qwen2, Llama)."""
        return "layernorm" if self.model_type == "starcoder2" else "rmsnorm"

    @property
    def mlp(self) -> str:
        """``"gelu"`` (Starcoder2 c_fc/c_proj, tanh-approximated GELU) or ``"swiglu"``."""
        return "gelu" if self.model_type == "starcoder2" else "swiglu"

    @property
    def o_bias(self) -> bool:
        """Whether the attention output projection has a bias (Starcoder2 with use_bias, Llama with attention_bias).

        Qwen2 puts biases on q/k/v only, whatever the config says.
        """
        return self.model_type in ("starcoder2", "llama") and self.attention_bias

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        H, D, I = self.hidden_size, self.head_dim, self.intermediate_size  # noqa: E741
        attn = H * D * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = H * I * (2 if self.mlp == "gelu" else 3)
        emb = self.vocab_size * H * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp) + emb

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from the dict of an HF ``config.json`` (transformers 4.x and 5.x spellings)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; dinfill supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # RoPE: transformers 5 nests everything in rope_parameters; 4.x has rope_theta + rope_scaling
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        factor = 1.0
        if rope_type == "linear":
            factor = float(rope.get("factor", scaling.get("factor", 1.0)))
        elif rope_type != "default":
            raise ValueError(f"unsupported RoPE scaling {rope_type!r}; dinfill implements 'default' and 'linear'")
        if model_type == "qwen2":
            attention_bias, mlp_bias, eps = True, False, cfg.get("rms_norm_eps", 1e-6)
            window = None
            if cfg.get("use_sliding_window"):
                # HF applies Qwen2's window only to layers >= max_window_layers: per-layer windows are not
                # implemented here, so accept only the case where no layer or every layer has it
                first = int(cfg.get("max_window_layers", 0))
                if 0 < first < int(cfg["num_hidden_layers"]):
                    raise ValueError(
                        f"Qwen2 sliding window on layers >= {first} only (max_window_layers) is not supported; "
                        "dinfill applies one window to every layer"
                    )
                window = cfg.get("sliding_window") if first == 0 else None
        elif model_type == "llama":
            attention_bias = bool(cfg.get("attention_bias", False))
            mlp_bias, eps, window = bool(cfg.get("mlp_bias", False)), cfg.get("rms_norm_eps", 1e-6), None
        else:  # starcoder2
            attention_bias = mlp_bias = bool(cfg.get("use_bias", True))
            eps, window = cfg.get("norm_epsilon", 1e-5), cfg.get("sliding_window")
        # Starcoder2Config defaults to tied embeddings; Llama / Qwen2 spell it out or default to untied
        tie_default = model_type == "starcoder2"
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope_theta=float(theta),
            rope_scaling_factor=factor,
            norm_eps=float(eps),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)),
            sliding_window=int(window) if window else None,
            head_dim=int(cfg.get("head_dim") or 0),
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            extra={k: v for k, v in cfg.items() if k in ("architectures", "_name_or_path", "torch_dtype", "dtype")},
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read an HF ``config.json``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read model config {path}: {err}") from err
        return cls.from_hf_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for benchmark records)."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


# --- built-in shapes -------------------------------------------------------------------------------
# Real sizes: from each checkpoint's published config.json on the Hugging Face hub.
# open-dcoder-0.5B is a Qwen2.5-Coder-0.5B-shaped model (its config says model_type "qwen2").
# fmt: off
_QWEN05 = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
    intermediate_size=4864, max_position_embeddings=32768, rope_theta=1000000.0, norm_eps=1e-6,
    tie_word_embeddings=True, attention_bias=True, bos_token_id=151643, eos_token_id=151643,
)
BUILTIN_SHAPES: dict[str, dict[str, Any]] = {
    # fredzzp/open-dcoder-0.5B/config.json
    "open-dcoder-0.5b": dict(_QWEN05, hub_id="fredzzp/open-dcoder-0.5B", kind="diffusion"),
    # Qwen/Qwen2.5-Coder-0.5B/config.json
    "qwen2.5-coder-0.5b": dict(_QWEN05, hub_id="Qwen/Qwen2.5-Coder-0.5B", kind="ar"),
    # Qwen/Qwen2.5-Coder-1.5B/config.json (the published comparison used the -Instruct variant, same shape)
    "qwen2.5-coder-1.5b": dict(
        _QWEN05, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
        hub_id="Qwen/Qwen2.5-Coder-1.5B", kind="ar",
    ),
    # deepseek-ai/deepseek-coder-1.3b-base/config.json: Llama with linear RoPE scaling x4, untied head
    "deepseek-coder-1.3b": dict(
        model_type="llama", vocab_size=32256, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
        intermediate_size=5504, max_position_embeddings=16384, rope_theta=100000.0, rope_scaling_factor=4.0,
        norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=32013, eos_token_id=32014,
        hub_id="deepseek-ai/deepseek-coder-1.3b-base", kind="ar",
    ),
    # bigcode/starcoder2-3b/config.json (no tie_word_embeddings key: Starcoder2Config's default, tied)
    "starcoder2-3b": dict(
        model_type="starcoder2", vocab_size=49152, hidden_size=3072, num_layers=30, num_heads=24, num_kv_heads=2,
        intermediate_size=12288, max_position_embeddings=16384, rope_theta=999999.4420358813, norm_eps=1e-5,
        tie_word_embeddings=True, sliding_window=4096, attention_bias=True, mlp_bias=True, bos_token_id=0,
        eos_token_id=0, hub_id="bigcode/starcoder2-3b", kind="ar",
    ),
    # Tiny shapes for tests and CPU benchmarks. The Qwen2 ones keep the real vocabulary so that the real
    # Qwen2.5-Coder tokenizer (plus an added mask token) can drive them.
    "tiny-qwen2": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=True,
        attention_bias=True, bos_token_id=151643, eos_token_id=151643, kind="ar",
    ),
    "tiny-dcoder": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=True,
        attention_bias=True, bos_token_id=151643, eos_token_id=151643, kind="diffusion",
    ),
    "tiny-llama": dict(
        model_type="llama", vocab_size=1031, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
        intermediate_size=160, max_position_embeddings=2048, rope_theta=100000.0, rope_scaling_factor=4.0,
        tie_word_embeddings=False, kind="ar",
    ),
    "tiny-starcoder2": dict(
        model_type="starcoder2", vocab_size=1031, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=256, max_position_embeddings=2048, rope_theta=999999.4420358813, norm_eps=1e-5,
        tie_word_embeddings=True, sliding_window=4096, attention_bias=True, mlp_bias=True, kind="ar",
    ),
}

# fmt: on

_NON_CONFIG_KEYS = ("hub_id", "kind")


def builtin_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a built-in shape (see ``BUILTIN_SHAPES``)."""
    key = name.lower()
    if key not in BUILTIN_SHAPES:
        raise KeyError(f"unknown built-in shape {name!r}; choose one of {', '.join(BUILTIN_SHAPES)}")
    return ModelConfig(**{k: v for k, v in BUILTIN_SHAPES[key].items() if k not in _NON_CONFIG_KEYS})
