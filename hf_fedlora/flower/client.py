"""Client-side helpers: read the adapter a ``HeteroLoraStrategy`` sent, and build the reply."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from ..adapters import LoraAdapter
from .records import ALPHA_KEY, RANK_KEY, RSLORA_KEY, adapter_from_records, adapter_to_records
from .strategy import SEND_BACK_KEY


def client_view(
    message: Message,
    rank: int | None = None,
    lora_alpha: float | None = None,
    *,
    use_rslora: bool = False,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
) -> LoraAdapter:
    """The adapter this client trains from, at its own rank and alpha.

    The server sends a view at the rank it allocated or last heard from this node, or the full
    global adapter when it knows neither; this re-views it (``LoraAdapter.to_rank``, with the method
    the server asked for) only when rank, alpha or rsLoRA differ from what the client wants.

    Args:
        message: the train message from the server.
        rank: the client's own rank (its budget); ``None`` accepts the rank the server sent.
        lora_alpha: the client's alpha; ``None`` accepts the server's (or ``2 * rank`` on a re-view).
        use_rslora: whether the client trains with rsLoRA.
        arrayrecord_key, configrecord_key: the strategy's record keys.

    Returns:
        An in-memory ``LoraAdapter``; load it into a model with ``peft.set_peft_model_state_dict``.
    """
    arrays = message.content[arrayrecord_key]
    config = message.content[configrecord_key]
    adapter = adapter_from_records(arrays, config, label="adapter sent by the server")
    rank = int(config[RANK_KEY]) if rank is None else rank
    uniform = len(set(adapter.ranks.values())) == 1
    if lora_alpha is None:
        lora_alpha = float(config[ALPHA_KEY]) if rank == config[RANK_KEY] else 2.0 * rank
    same = (
        uniform
        and rank == config[RANK_KEY]
        and lora_alpha == config[ALPHA_KEY]
        and use_rslora == config[RSLORA_KEY]
    )
    if same:
        return adapter
    method = str(config.get(SEND_BACK_KEY, "truncate"))
    return adapter.to_rank(rank, lora_alpha, use_rslora=use_rslora, method=method)


def train_reply(
    message: Message,
    adapter: LoraAdapter,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    *,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
    weighted_by_key: str = "num-examples",
) -> Message:
    """The reply to a train message: the trained adapter, its ``lora-*`` config, and metrics.

    Args:
        message: the train message being answered.
        adapter: the trained adapter (e.g. ``LoraAdapter.from_peft_model(model)``).
        num_examples: training examples used this round (the aggregation weight).
        metrics: extra numbers to report (e.g. ``{"train-loss": 0.41}``).

    Returns:
        A reply ``Message`` ready to return from ``@app.train()``.
    """
    arrays, config = adapter_to_records(adapter, num_examples=num_examples)
    metric_record = MetricRecord({**dict(metrics or {}), weighted_by_key: int(num_examples)})
    content = RecordDict(
        {arrayrecord_key: arrays, configrecord_key: ConfigRecord(dict(config)), "metrics": metric_record}
    )
    return Message(content=content, reply_to=message)


__all__ = ["client_view", "train_reply"]
