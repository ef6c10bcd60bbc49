"""Share the global adapter through the Hugging Face Hub, one tagged commit per round.

    from hf_fedlora import pull_round
    from hf_fedlora.hub import push_round, list_rounds, round_tag

    push_round("out/round-0003", "user/fed-sst2", 3, metrics_history=[...])   # commit + tag round-0003
    list_rounds("user/fed-sst2")                                              # [1, 2, 3]
    adapter = pull_round("user/fed-sst2", 3)                                  # a LoraAdapter

The Hub layer works on folders: it never imports ``hf_fedlora.adapters`` (which sits above it).

Consumers need nothing of ours: ``PeftModel.from_pretrained(base, "user/fed-sst2", revision="round-0003")``.
"""

from .errors import HubPathError, HubPushError
from .model_card import build_model_card
from .pull import download_round, list_rounds
from .push import push_adapter_folder, push_round, round_tag

__all__ = [
    "HubPathError",
    "HubPushError",
    "build_model_card",
    "download_round",
    "list_rounds",
    "push_adapter_folder",
    "push_round",
    "round_tag",
]
