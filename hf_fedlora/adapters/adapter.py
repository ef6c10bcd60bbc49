"""``LoraAdapter``: one PEFT LoRA adapter as a value, read lazily, checked, and saved atomically."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from ..constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_PICKLE_NAME,
    ADAPTER_SAFETENSORS_NAME,
    PROVENANCE_NAME,
    SendBackMethod,
    __version__,
)
from ..errors import AdapterNotFoundError, UnsafeFormatError
from .folders import resolve_source
from .io import (
    MemoryStore,
    SafetensorsStore,
    TensorStore,
    atomic_output_dir,
    load_pickle,
    read_json,
    write_json,
)
from .keys import bias_key, magnitude_key, split_keys
from .limits import check_provenance
from .scaling import fold, module_scale
from .validate import check_factor_shapes, check_finite, lora_config_from_dict
from .views import rank_view


class LoraAdapter:
    """A PEFT LoRA adapter: its ``LoraConfig``, its per-module factors and dense extras.

    Tensors stay on disk until asked for (safetensors is read lazily), so holding many clients'
    adapters costs only their headers. Build one with :meth:`from_pretrained` (a folder or a Hub
    repo), :meth:`from_peft_model` or :meth:`from_state_dict`.

    Linear, convolution and embedding LoRA, LoRA biases and DoRA magnitudes are all read.

    Attributes:
        config (`peft.LoraConfig`): the adapter's configuration.
        modules (`tuple[str]`): LoRA module names (PEFT keys without ``.lora_A.weight``), sorted.
        extras (`tuple[str]`): dense tensors saved with the adapter (``modules_to_save``, and an
            embedding weight PEFT saved because the layer is targeted or resized).
        layout (`KeyLayout`): the PEFT key of every tensor, and which modules are embeddings or carry
            a LoRA bias or a DoRA magnitude.
        label (`str`): how errors name this adapter, e.g. ``client 2 ('clients/b')``.
        provenance (`dict`): contents of ``fedlora_provenance.json`` (example count, strategy, ...).
        directory (`Path`, *optional*): the folder it was read from.
    """

    def __init__(
        self,
        config: LoraConfig,
        store: TensorStore,
        *,
        label: str = "in-memory adapter",
        provenance: Mapping[str, Any] | None = None,
        directory: str | os.PathLike | None = None,
    ):
        self.config = config
        self._store = store
        self.label = label
        self.provenance = dict(provenance or {})
        self.directory = Path(directory) if directory is not None else None
        check_provenance(self.provenance, label)
        self.layout = split_keys(store.keys(), config.modules_to_save, self.where)
        self.modules, self.extras = self.layout.modules, self.layout.extras
        check_factor_shapes(self)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        revision: str | None = None,
        *,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        label: str | None = None,
    ) -> LoraAdapter:
        """Open a PEFT adapter folder, or download one from the Hub.

        Args:
            source: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``, or a Hub
                repo id (``"user/repo"``, ``"user/repo@round-0003"``).
            revision: Hub branch, tag or commit.
            token: Hub token for private repos (never logged).
            cache_dir: Hub cache folder.
            allow_pickle: accept a pickle ``adapter_model.bin`` when no safetensors file exists. It is
                still read with ``torch.load(weights_only=True)``; only pass it for files you trust.
            label: how errors should name this adapter (default: the source).

        Raises:
            AdapterNotFoundError, AdapterFormatError, UnsupportedAdapterError, RankMismatchError,
            UnsafeFormatError: with the source, file and field named.
        """
        kwargs = dict(revision=revision, token=token, cache_dir=cache_dir, allow_pickle=allow_pickle)
        folder, label = resolve_source(source, where=label, **kwargs)
        config = lora_config_from_dict(
            read_json(folder / ADAPTER_CONFIG_NAME, label, "adapter config"), label
        )
        weights = folder / ADAPTER_SAFETENSORS_NAME
        if os.path.lexists(weights):  # anything there is opened as safetensors (FIFOs, loops refused)
            store: TensorStore = SafetensorsStore(weights, label)
        elif (folder / ADAPTER_PICKLE_NAME).is_file():
            if not allow_pickle:
                raise UnsafeFormatError(
                    f"{label}, file '{ADAPTER_PICKLE_NAME}': only a pickle weights file is present, and loading "
                    "pickles can run arbitrary code. Ask the client for 'adapter_model.safetensors' (PEFT's "
                    "default), or pass `allow_pickle=True` if you trust this file."
                )
            store = load_pickle(folder / ADAPTER_PICKLE_NAME, label)
        else:
            raise AdapterNotFoundError(f"{label}: no '{ADAPTER_SAFETENSORS_NAME}' in '{folder}'.")
        provenance = (
            read_json(folder / PROVENANCE_NAME, label, "provenance")
            if os.path.lexists(folder / PROVENANCE_NAME)
            else {}
        )
        check_provenance(provenance, f"{label}, file '{PROVENANCE_NAME}'")
        return cls(config, store, label=label, provenance=provenance, directory=folder)

    @classmethod
    def from_peft_model(
        cls, model: Any, adapter_name: str | None = None, *, label: str | None = None
    ) -> LoraAdapter:
        """Take an adapter (default: the active one) out of a ``peft.PeftModel``, as PEFT would save it."""
        from peft import get_peft_model_state_dict

        adapter_name = adapter_name or model.active_adapter
        config = copy.deepcopy(model.peft_config[adapter_name])
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        state = {k: v.detach().to("cpu").clone() for k, v in state.items()}
        return cls(config, MemoryStore(state), label=label or f"PeftModel adapter '{adapter_name}'")

    @classmethod
    def from_state_dict(
        cls,
        config: LoraConfig,
        state_dict: Mapping[str, torch.Tensor],
        *,
        label: str = "in-memory adapter",
        provenance: Mapping[str, Any] | None = None,
    ) -> LoraAdapter:
        """Wrap tensors keyed as PEFT saves them (``...lora_A.weight``, ``...lora_B.weight``, extras)."""
        return cls(config, MemoryStore(state_dict), label=label, provenance=provenance)

    @property
    def where(self) -> str:
        """How errors name its tensors: the label, with the safetensors file when read from one."""
        if isinstance(self._store, SafetensorsStore):
            return f"{self.label}, file '{self._store.path.name}'"
        return self.label

    def relabel(self, label: str) -> LoraAdapter:
        """The same adapter (sharing its tensors) under another name for error messages."""
        twin = copy.copy(self)
        twin.label = label
        return twin

    @property
    def ranks(self) -> dict[str, int]:
        """Rank of every LoRA module, ``{module_name: rank}``."""
        return {m: self.factor_shapes(m)[0][0] for m in self.modules}

    @property
    def max_rank(self) -> int:
        """The largest module rank."""
        return max(self.ranks.values())

    @property
    def num_examples(self) -> int | None:
        """How many training examples produced this adapter, when its provenance says so."""
        value = self.provenance.get("num_examples")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @num_examples.setter
    def num_examples(self, value: int | None) -> None:
        self.provenance["num_examples"] = value

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the LoRA factors."""
        return self.tensor_dtype(self.layout.factor_keys(self.modules[0])[0]) or torch.float32

    def scale(self, module: str) -> float:
        """PEFT's scale ``s`` for ``module`` (``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA)."""
        return module_scale(self.config, module)

    def tensor_shape(self, key: str) -> tuple[int, ...]:
        """Shape of a stored tensor, read from the header only."""
        return self._store.shape(key)

    def tensor_dtype(self, key: str) -> torch.dtype | None:
        """Dtype of a stored tensor, read from the header only."""
        return self._store.dtype(key)

    def factor_shapes(self, module: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``(A, B)`` for ``module`` without reading their data."""
        a_key, b_key = self.layout.factor_keys(module)
        return self._store.shape(a_key), self._store.shape(b_key)

    def num_parameters(self) -> int:
        """Number of stored values (LoRA factors and extras): what a client sends."""
        return sum(int(torch.Size(self._store.shape(k)).numel()) for k in self._store.keys())

    def num_bytes(self) -> int:
        """Size of the stored tensors in bytes."""
        total = 0
        for key in self._store.keys():
            dtype = self._store.dtype(key) or torch.float32
            total += int(torch.Size(self._store.shape(key)).numel()) * dtype.itemsize
        return total

    def _read(self, key: str, check: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self._store.get(key, out) if out is not None else self._store.get(key)
        if check:
            check_finite(tensor, self.where, key)
        return tensor

    def lora_factors(
        self,
        module: str,
        *,
        check_finite_values: bool = True,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored ``(A, B)`` of ``module`` as saved (unscaled, storage dtype), checked finite
        unless ``check_finite_values=False`` (for callers that check what they compute from them).
        With ``out``, two uint8 tensors of the factors' sizes in bytes (slots of buffers the caller
        reuses), the factors are read into them and returned as views of them."""
        if module not in self.modules:
            raise KeyError(
                f"{self.label}: no LoRA module `{module}`; it has {len(self.modules)} modules, e.g. {self.modules[:2]}"
            )
        a_key, b_key = self.layout.factor_keys(module)
        a_out, b_out = out if out is not None else (None, None)
        return self._read(a_key, check_finite_values, a_out), self._read(b_key, check_finite_values, b_out)

    def folded_factors(
        self, module: str, *, check_finite_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(s) A, sqrt(s) B)`` as float32 matrices ``[r, in]`` and ``[out, r]``: ``B' @ A' = dW``
        (for an embedding, ``in`` is the vocabulary and ``out`` the embedding size)."""
        a, b = self.lora_factors(module, check_finite_values=check_finite_values)
        a, b = fold(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1]), self.scale(module))
        if check_finite_values:  # finite factors times a large scale may still overflow float32
            where = f"{self.where} (after folding the scale {self.scale(module):.3g})"
            [check_finite(t, where, k) for k, t in zip(self.layout.factor_keys(module), (a, b))]
        return a, b

    def extra(self, key: str) -> torch.Tensor:
        """A dense tensor saved with the adapter (``modules_to_save``), checked finite."""
        return self._read(key)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update PEFT adds to the base layer's weight, ``s * B @ A``, in float32.

        For ``nn.Linear`` this is ``[out, in]`` (transpose it for ``fan_in_fan_out`` layers such as
        GPT-2's ``Conv1D``); convolution updates come back in the layer's weight shape; an embedding
        module's is ``(s * B @ A)^T``, ``[num_embeddings, dim]`` like ``nn.Embedding.weight``. With DoRA
        this is the LoRA part only: PEFT's merged weight is ``m * (W + dW) / ||W + dW||`` per output.
        """
        a, b = self.folded_factors(name)
        if name in self.layout.embeddings:
            return (b @ a).T
        a_shape, _ = self.factor_shapes(name)
        return (b @ a).reshape(b.shape[0], *a_shape[1:])

    def delta_bias(self, name: str) -> torch.Tensor | None:
        """The update PEFT adds to the layer's bias, ``s * lora_B.bias`` (float32), or ``None``."""
        if name not in self.layout.biases:
            return None
        return self._read(bias_key(name)).to(torch.float32, copy=True).mul_(self.scale(name))

    def magnitude(self, name: str) -> torch.Tensor | None:
        """The module's DoRA magnitude vector as stored (checked finite), or ``None`` without DoRA."""
        return self._read(magnitude_key(name)) if name in self.layout.magnitudes else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, loaded, keyed as PEFT saves them."""
        return {key: self._store.get(key) for key in self._store.keys()}

    def held_open(self) -> contextlib.AbstractContextManager:
        """A context in which reads of this adapter's safetensors file share one open descriptor
        (a no-op for in-memory adapters)."""
        if isinstance(self._store, SafetensorsStore):
            return self._store.held_open()
        return contextlib.nullcontext()

    def hash_reads(self) -> None:
        """Compute :meth:`sha256` from the tensor reads that follow (in file order, as aggregation
        reads modules), instead of a second pass over the file; a no-op for in-memory adapters."""
        if isinstance(self._store, SafetensorsStore):
            self._store.hash_reads()

    def sha256(self) -> str:
        """Hex sha256 identifying the adapter's weights: of the safetensors file when read from one,
        else of its safetensors serialisation."""
        store = self._store
        if isinstance(store, SafetensorsStore):
            return store.sha256()
        return hashlib.sha256(
            safetensors_bytes({k: v.contiguous() for k, v in self.state_dict().items()})
        ).hexdigest()

    def save_pretrained(self, save_directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write the adapter as PEFT does (config + safetensors), plus its provenance file.

        The files appear all at once (written to a temporary folder, then renamed), so an
        interrupted save never leaves a half-written adapter. The result loads with
        ``peft.PeftModel.from_pretrained``.

        Args:
            save_directory: target folder (created if needed).
            dtype: cast the tensors (e.g. ``torch.bfloat16``); default: as stored.

        Returns:
            The folder written.
        """
        tensors = {
            k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in self.state_dict().items()
        }
        with atomic_output_dir(save_directory) as tmp:
            save_file(tensors, str(tmp / ADAPTER_SAFETENSORS_NAME), metadata={"format": "pt"})
            self.config.save_pretrained(str(tmp))
            if self.provenance:
                write_json(tmp / PROVENANCE_NAME, {**self.provenance, "hf_fedlora_version": __version__})
        return Path(save_directory)

    def to_rank(
        self,
        rank: int,
        lora_alpha: float | None = None,
        *,
        use_rslora: bool = False,
        method: SendBackMethod = "truncate",
        seed: int = 0,
        revive_zero_slots: bool = False,
    ) -> LoraAdapter:
        """The view of this adapter a client of rank ``rank`` trains from (every module at ``rank``).

        Factors (and LoRA biases) are unfolded to the client's scale (``lora_alpha / rank``, or
        ``/ sqrt(rank)`` with rsLoRA), so PEFT applies the same update up to the dropped slots; DoRA
        magnitudes and extras are copied. Slots beyond a module's rank, and directions an ``"svd"``
        view finds empty, get PEFT's initialisation (random A, zero B; zero A, normal B for
        embeddings): no change to the update, but trainable (A = B = 0 has no gradient).

        Args:
            rank: the client's LoRA rank.
            lora_alpha: the client's alpha (default: ``rank``, scale 1).
            use_rslora: whether the client uses rsLoRA scaling.
            method: ``"truncate"`` keeps the first ``rank`` slots (for the padding strategies, whose
                slots are ordered); ``"svd"`` keeps the best rank-``rank`` approximation of each update.
            seed: seed for the initialisation of padded slots.
            revive_zero_slots: also give PEFT's initialisation to slots whose A row and B column are
                both exactly zero (what zero-padding leaves once a round has no client of that rank,
                and no client could train again); the update is unchanged.

        Returns a new in-memory ``LoraAdapter`` with ``r=rank`` and the client's alpha.

        Raises:
            AdapterError: ``rank`` is not a positive integer or exceeds a layer (``RankMismatchError``),
                ``method`` is not a ``SendBackMethod``, or the view overflows its dtype.
        """
        return rank_view(
            self,
            rank,
            lora_alpha,
            use_rslora=use_rslora,
            method=method,
            seed=seed,
            revive_zero_slots=revive_zero_slots,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision_tag: str | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        model_card: str | None = None,
        endpoint: str | None = None,
        max_retries: int = 5,
    ) -> str:
        """Upload this adapter to the Hub in one commit (PEFT files, provenance, model card); returns the
        commit sha. Saved to a temporary folder that :func:`hf_fedlora.hub.push_adapter_folder` uploads
        (see it for the arguments and the ``HubPushError`` it raises); loads with
        ``PeftModel.from_pretrained(base, repo_id, revision=revision_tag)``."""
        from ..hub.push import push_adapter_folder

        with tempfile.TemporaryDirectory(prefix="hf-fedlora-push-") as tmp:
            return push_adapter_folder(
                self.save_pretrained(Path(tmp) / "adapter"),
                repo_id,
                revision_tag=revision_tag,
                commit_message=commit_message,
                private=private,
                token=token,
                model_card=model_card,
                endpoint=endpoint,
                max_retries=max_retries,
                label=self.label,
            )

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return f"LoraAdapter({self.label!r}, modules={len(self.modules)}, ranks={ranks}, extras={len(self.extras)})"


__all__ = ["LoraAdapter"]
