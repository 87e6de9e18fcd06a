"""Built-in demo models: small transformers MoE models with random weights (no download).

`build(name)` returns `(model, (input_ids,))` ready for `torch.compile(model, backend="moe")`.
The configs keep every MoE feature of the real model (routing, activation, shared experts) at a
size a CPU compiles in seconds.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable

import torch

from .errors import UserInputError

VOCAB = 128


def _common(hidden: int, layers: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def _mixtral(hidden, layers):
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM, MixtralConfig(**_common(hidden, layers), intermediate_size=2 * hidden,
                                             num_local_experts=8, num_experts_per_tok=2)


def _qwen3_moe(hidden, layers):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM, Qwen3MoeConfig(**_common(hidden, layers), head_dim=hidden // 4,
                                               intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                                               num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)


def _olmoe(hidden, layers):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM, OlmoeConfig(**_common(hidden, layers), intermediate_size=hidden,
                                         num_experts=16, num_experts_per_tok=4, norm_topk_prob=False)


def _qwen2_moe(hidden, layers):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM, Qwen2MoeConfig(**_common(hidden, layers), intermediate_size=2 * hidden,
                                               moe_intermediate_size=hidden // 2,
                                               shared_expert_intermediate_size=hidden, num_experts=8,
                                               num_experts_per_tok=2, norm_topk_prob=False)


def _deepseek_mla(hidden) -> dict:
    """Multi-head latent attention sizes for a small DeepSeek config."""
    return dict(num_key_value_heads=4, kv_lora_rank=hidden // 4, q_lora_rank=hidden // 2, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=hidden // 4, first_k_dense_replace=0, n_shared_experts=1)


def _deepseek_v3(hidden, layers):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    # sigmoid scoring, score-correction bias, 2 of 4 expert groups by top-2 sum, routed scaling
    return DeepseekV3ForCausalLM, DeepseekV3Config(
        **{**_common(hidden, layers), **_deepseek_mla(hidden)}, intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True)


def _deepseek_v2(hidden, layers):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    # softmax scoring, 2 of 4 expert groups by their best expert, routed scaling, no renormalization
    return DeepseekV2ForCausalLM, DeepseekV2Config(
        **{**_common(hidden, layers), **_deepseek_mla(hidden)}, intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, topk_method="group_limited_greedy")


def _gpt_oss(hidden, layers):
    from transformers import GptOssConfig, GptOssForCausalLM

    # router bias, top-k then softmax, interleaved gate/up (E, H, 2I) with biases, clamped SwiGLU
    return GptOssForCausalLM, GptOssConfig(
        **_common(hidden, layers), head_dim=hidden // 4, intermediate_size=hidden // 2, num_local_experts=8,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"][:layers] * max(1, layers // 2),
        sliding_window=64)


def _mistral_dense(hidden, layers):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(**_common(hidden, layers), intermediate_size=2 * hidden)


BUILDERS: dict[str, Callable] = {
    "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe, "qwen2_moe": _qwen2_moe,
    "deepseek_v3": _deepseek_v3, "deepseek_v2": _deepseek_v2, "gpt_oss": _gpt_oss, "dense": _mistral_dense,
}
MOE_MODELS = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "gpt_oss")


def names() -> list[str]:
    return list(BUILDERS)


def build(name: str, dtype: str | torch.dtype = "float32", experts_impl: str = "grouped_mm",
          batch: int = 2, tokens: int = 16, layers: int = 2, hidden: int = 64, seed: int = 0):
    """A small random-weight model and an input for it: `(model, (input_ids (batch, tokens),))`.

    `name` is a built-in (see `names()`) or `package.module:factory`, a function returning a model
    (inputs are then random token ids up to the model's `config.vocab_size`).
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    check_sizes(batch=batch, tokens=tokens, layers=layers)
    torch.manual_seed(seed)
    if ":" in name:
        factory = _import_factory(name)
        with user_code(name):
            model = factory()
        if not isinstance(model, torch.nn.Module):
            raise UserInputError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
        vocab = vocab_size(model)
    elif name in BUILDERS:
        model_cls, config = BUILDERS[name](hidden, layers)
        if name in MOE_MODELS:
            config._experts_implementation = experts_impl
        config.use_cache = False
        model = model_cls(config)
        _randomize_correction_bias(model)
        vocab = VOCAB
    else:
        raise UserInputError(f"unknown model {name!r}; built-in: {', '.join(names())}, "
                             "or package.module:factory")
    with user_code(name):
        model = model.to(dtype).eval()
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed + 1))
    return model, (ids,)


def _randomize_correction_bias(model: torch.nn.Module) -> None:
    """DeepSeek's score-correction bias starts at zero and is learned; zeros would hide what it does
    (it steers which experts are chosen), so demo models get the spread a trained router has."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)


# Bounds on what the command line asks for: a mistyped size gives a clear error, not hours of work
# or an allocation failure. 2^24 tokens per batch is 64x a 256k-token training batch; a trace of
# 2^16 batches or a demo model of 256 layers is already more than placement needs.
MAX_TOKENS = 1 << 24
MAX_BATCHES = 1 << 16
MAX_LAYERS = 256


def check_sizes(batch: int | None = None, tokens: int | None = None, layers: int | None = None,
                batches: int | None = None) -> None:
    """UserInputError unless the sizes asked for are at least 1 and within the bounds above."""
    for flag, value in (("--batch", batch), ("--tokens", tokens), ("--layers", layers), ("--batches", batches)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} must be at least 1, got {value}")
    if batch is not None and tokens is not None and batch * tokens > MAX_TOKENS:
        raise UserInputError(f"--batch {batch} x --tokens {tokens} = {batch * tokens} tokens per batch; "
                             f"at most {MAX_TOKENS} are supported")
    if layers is not None and layers > MAX_LAYERS:
        raise UserInputError(f"--layers {layers}: at most {MAX_LAYERS} are supported")
    if batches is not None and batches > MAX_BATCHES:
        raise UserInputError(f"--batches {batches}: at most {MAX_BATCHES} are supported")


def vocab_size(model: torch.nn.Module) -> int:
    """The model's `config.vocab_size` (random token ids are drawn below it), checked."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", VOCAB)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise UserInputError(f"the model's config.vocab_size must be a whole number >= 1, got {vocab!r}")
    return vocab


@contextlib.contextmanager
def user_code(name: str):
    """Run a user's model factory or model: any error it raises is theirs, reported in one line.
    Built-in models are ours: their errors stay errors of ours."""
    if ":" not in name:
        yield
        return
    try:
        yield
    except (UserInputError, KeyboardInterrupt):
        raise
    except SystemExit as err:
        raise UserInputError(f"model {name!r} called exit({err.code!r})") from None
    except Exception as err:  # noqa: BLE001 -- user code fails in any way it likes
        message = (str(err).strip().splitlines() or [""])[0]
        raise UserInputError(f"model {name!r} failed: {type(err).__name__}: {message}") from None


def _import_factory(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or module_name.startswith("."):
        raise UserInputError(f"model {path!r}: expected a built-in name or package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- importing user code runs it
        message = (str(err).strip().splitlines() or [""])[0]
        raise UserInputError(f"cannot import {module_name!r} for model factory {path!r}: "
                             f"{type(err).__name__}: {message}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise UserInputError(f"cannot load model factory {path!r}: {module_name} has no {attr!r}")
    if not callable(factory):
        raise UserInputError(f"model factory {path!r} is not callable")
    return factory
