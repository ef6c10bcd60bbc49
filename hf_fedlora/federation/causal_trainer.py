"""Local training of one client's LoRA adapter on a causal LM (instruction tuning).

:class:`CausalLMTrainer` is :class:`~hf_fedlora.federation.client.LocalTrainer` with a causal LM
for base model: the same single ``PeftModel`` with one adapter slot per rank, the same seeded
``initial_adapter`` / ``client_view`` / ``train``, and the same returned
:class:`~hf_fedlora.adapters.LoraAdapter` and ``LocalResult``. What differs is what it loads
(``AutoModelForCausalLM``, bf16 on a GPU that supports it), how a batch is made (chat-template
prompts, loss on the response tokens only, see :mod:`.instruct_data`) and what evaluation reports:
the token-weighted loss over the split's response tokens and its perplexity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..adapters import LoraAdapter
from .client import LocalTrainer
from .instruct_data import IGNORE_INDEX, InstructSplit, build_prompt, encode_rows, has_chat_template

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The attention projections of Llama-style models (SmolLM2, Llama, Mistral, Qwen2...)."""


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/``None``: bf16 on a CUDA device that supports it, else float32; else the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"`dtype` must be one of {['auto', *names]}, got {dtype!r}.")
    return names[dtype]


class CausalLMTrainer(LocalTrainer):
    """One causal LM per process, shared by every client that process trains.

    Args:
        model_name_or_path (`str`, *optional*): Hub id or folder; default the embedded
            SmolLM2-135M-Instruct (converted once, see :func:`.embedded_llm.embedded_causal_lm_path`).
        target_modules (`Sequence[str]`, *optional*, defaults to q/k/v/o projections): LoRA targets.
        lora_alpha (`float`, *optional*, defaults to 16): every client's LoRA alpha.
        lora_dropout (`float`, *optional*, defaults to 0.05): LoRA dropout.
        use_rslora (`bool`, *optional*, defaults to False): rsLoRA scaling.
        config_overrides (`dict`, *optional*): model config overrides.
        trust_remote_code (`bool`, *optional*, defaults to False): allow custom model code.
        device (`str` or `torch.device`, *optional*, defaults to ``"cpu"``): where the model trains.
            Adapters always come back on the CPU, in float32.
        dtype (`str` or `torch.dtype`, *optional*, defaults to ``"auto"``): the base model's dtype;
            ``"auto"`` is bf16 on a CUDA device that supports it, else float32. LoRA weights stay float32.
        cache_dir (`str`, *optional*): where the embedded model is converted (default its own cache).
    """

    peft_task_type = "CAUSAL_LM"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        *,
        target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        use_rslora: bool = False,
        config_overrides: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        cache_dir: str | None = None,
    ):
        # LocalTrainer.__init__ loads a sequence classifier: this sets the same attributes for a causal LM
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if model_name_or_path is None:
            from .embedded_llm import embedded_causal_lm_path

            model_name_or_path = embedded_causal_lm_path(cache_dir)
        self.model_name_or_path = model_name_or_path
        self.target_modules = list(target_modules)
        self.lora_alpha, self.lora_dropout, self.use_rslora = float(lora_alpha), lora_dropout, use_rslora
        self.is_regression = False
        self.device = torch.device(device or "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        config = AutoConfig.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code, **dict(config_overrides or {})
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code
        )
        base = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, config=config, dtype=self.dtype, trust_remote_code=trust_remote_code
        )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if base.config.pad_token_id is None:
            base.config.pad_token_id = self.tokenizer.pad_token_id
        base.config.use_cache = False  # training and teacher-forced evaluation need no KV cache
        self._base = base.to(device=self.device, dtype=self.dtype).eval()
        logger.info(
            f"loaded '{model_name_or_path}' on {self.device} in {self.dtype} (LoRA weights in float32)"
        )
        self.model: Any = None  # the PeftModel, created with the first adapter slot

    def _batch(
        self, split: InstructSplit, indices: Sequence[int], max_length: int
    ) -> dict[str, torch.Tensor]:
        """Tokenised rows (labels ``-100`` on prompts and padding) on this trainer's device."""
        encoded = encode_rows(self.tokenizer, split, list(indices), max_length)
        return {k: v.to(self.device, non_blocking=True) for k, v in encoded.items()}

    @contextmanager
    def _model_with(self, adapter: LoraAdapter | None) -> Iterator[Any]:
        """The model in eval mode with ``adapter`` active, or the bare base model for ``None``."""
        if adapter is not None:
            self.load(adapter)
            self.model.eval()
            yield self.model
        elif self.model is None:
            yield self._base
        else:
            self.model.eval()
            with self.model.disable_adapter():
                yield self.model

    @torch.no_grad()
    def evaluate(
        self,
        adapter: LoraAdapter | None,
        split: InstructSplit,
        batch_size: int = 8,
        max_seq_length: int = 256,
    ) -> dict[str, float]:
        """Loss per response token over ``split`` (each token weighs the same), its perplexity, and ``score``.

        Args:
            adapter: the adapter to evaluate; ``None`` evaluates the base model (round 0).

        Returns:
            ``{"loss", "perplexity", "score", "num_tokens"}`` with ``perplexity = exp(loss)`` and
            ``score = -loss`` (higher is better, as the loop's other scores).
        """
        nll, tokens = 0.0, 0
        with self._model_with(adapter) as model:
            for lo in range(0, len(split), batch_size):
                batch = self._batch(split, range(lo, min(lo + batch_size, len(split))), max_seq_length)
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels by one
                nll += float(model(**batch).loss) * count
                tokens += count
        if tokens == 0:
            raise ValueError("the evaluation split has no response tokens; is it empty?")
        loss = nll / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "score": -loss, "num_tokens": tokens}

    @torch.no_grad()
    def generate(
        self, instruction: str, input: str = "", adapter: LoraAdapter | None = None, max_new_tokens: int = 64
    ) -> str:
        """The greedy answer to one instruction (prompted like the training data), special tokens removed."""
        prompt = build_prompt(self.tokenizer, instruction, input)
        encoded = self.tokenizer(
            prompt, add_special_tokens=not has_chat_template(self.tokenizer), return_tensors="pt"
        )
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        with self._model_with(adapter) as model:
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return self.tokenizer.decode(
            output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a causal LM has no class predictions; use `evaluate` or `generate`.")


_CAUSAL_TRAINERS: dict[tuple, CausalLMTrainer] = {}


def get_causal_trainer(model_name_or_path: str | None, **kwargs: Any) -> CausalLMTrainer:
    """A process-wide cached :class:`CausalLMTrainer` for these settings (the model is loaded once)."""
    key = (model_name_or_path, repr(sorted(kwargs.items())))
    if key not in _CAUSAL_TRAINERS:
        _CAUSAL_TRAINERS[key] = CausalLMTrainer(model_name_or_path, **kwargs)
    return _CAUSAL_TRAINERS[key]


__all__ = ["CausalLMTrainer", "DEFAULT_TARGET_MODULES", "get_causal_trainer", "resolve_dtype"]
