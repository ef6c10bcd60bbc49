"""Hostile inputs of issue 16 that are not one adapter aggregated beside a good one (those are in
the gallery, tests/hostile_adapters.py): screening going on without broken clients, views bounded
by the layer, the CLI's output and terminal, paths that look like repo ids, one-rename saves, and
the Hub layer's symlinks, tokens, commit ids and timeouts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import pytest
import torch
from bad_adapters import CASES, edit_tensors

import hf_fedlora as hfl
from hf_fedlora.adapters import folders
from hf_fedlora.adapters import io as adapter_io
from hf_fedlora.cli import RedactTokens, main
from hf_fedlora.cli.push import read_token
from hf_fedlora.hub import push_round
from hf_fedlora.hub.errors import HubPathError, check_commit_sha, redact_chain
from hf_fedlora.screening import screen_clients

TOKEN = "hf_" + "a1B2c3D4e5F6g7H8i9J0k"


def _case(name):
    return next(c for c in CASES if c.name == name)


def test_screening_goes_on_without_clients_that_used_to_stop_the_round(make_adapter):
    good = [make_adapter(f"good{i}", 4, 8, seed=i) for i in range(2)]
    broken = {}
    for name in ("FIFO as adapter_config.json", "config nested 100k deep", '`peft_type: "lora"` (lower case)',
                 "3-D lora_B", "weights are a symlink loop", "`num_examples` NaN in provenance"):  # fmt: skip
        folder = make_adapter(f"bad{len(broken)}", 4, 8, seed=9)
        _case(name).corrupt(good[0], folder)
        broken[name] = folder
    huge = make_adapter("huge", 4, 8, seed=5)  # finite values whose squared norm overflows: a NaN/Inf norm
    edit_tensors(
        huge, lambda t: [t.__setitem__(k, torch.full_like(v, 1e19)) for k, v in t.items() if "lora_" in k]
    )
    sources = [good[0], *broken.values(), huge, good[1]]
    accepted, verdicts = screen_clients(sources, max_update_norm=1e6, max_norm_ratio=10.0)
    assert [v.accepted for v in verdicts] == [True] + [False] * (len(sources) - 2) + [True]
    assert len(accepted) == 2
    for verdict in verdicts[1:-1]:
        assert f"client {verdict.index}" in verdict.reason, verdict.reason
    assert "update norm" in verdicts[-2].reason and verdicts[-2].update_norm is None


def test_a_view_larger_than_the_layer_is_refused_before_allocating(make_adapter):
    adapter = hfl.LoraAdapter.from_pretrained(make_adapter("a", 4, 8))
    start = time.perf_counter()
    with pytest.raises(hfl.RankMismatchError, match="larger than module"):
        adapter.to_rank(10**7)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(hfl.AdapterError, match="lora_alpha"):
        adapter.to_rank(4, lora_alpha=float("nan"))


def test_an_fp16_view_that_overflows_float16_is_refused(make_adapter):
    adapter = hfl.LoraAdapter.from_pretrained(make_adapter("a", 4, 8))
    half = {k: (v * 100).half() for k, v in adapter.state_dict().items()}
    fp16 = hfl.LoraAdapter.from_state_dict(adapter.config, half, label="client 3")
    with pytest.raises(hfl.NonFiniteTensorError, match="client 3 at rank 4"):
        fp16.to_rank(4, lora_alpha=1e-6)  # unfolding to a tiny scale multiplies by ~2000: > 65504


def test_pattern_checks_are_fast_and_keep_ordinary_patterns(make_adapter):
    from hf_fedlora.adapters.limits import check_pattern

    for pattern in (
        r"layer\.\d+\.attention\.self\.query",
        "(query|value)",
        ".*query$",
        r"encoder\.layer\.[01]",
    ):
        check_pattern(pattern, "client 0", "rank_pattern")  # accepted
    folder = make_adapter("p", 4, 8, rank_pattern={r"layer\.1\..*query": 2})
    assert sorted(set(hfl.LoraAdapter.from_pretrained(folder).ranks.values())) == [2, 4]


@pytest.mark.parametrize("inside", [False, True], ids=["equal", "inside"])
def test_aggregate_output_equal_to_or_inside_an_input_is_refused(make_adapter, capsys, inside):
    a, b = make_adapter("a", 4, 8, seed=1), make_adapter("b", 4, 8, seed=2)
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    output = a / "merged" if inside else a
    assert main(["aggregate", str(a), str(b), "--output", str(output)]) == 2
    assert "overwrite an input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before


def test_inspect_escapes_terminal_control_characters(make_adapter, capsys):
    folder = make_adapter("a", 4, 8)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "\x1b]0;owned\x07\x1b[2Jbert"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "fedlora_provenance.json").write_text(json.dumps({"strategy": "\x1b[31mred\u202e"}))
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\\x1b" in out


def test_an_operator_mistake_is_one_line_and_exit_2(make_adapter, tmp_path, capsys):
    a = make_adapter("a", 4, 8)
    (tmp_path / "file").write_text("x")
    assert main(["aggregate", str(a), "--output", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("hf-fedlora aggregate: error: FileExistsError") and "Traceback" not in err


def test_a_missing_path_is_never_looked_up_on_the_hub_and_an_existing_folder_wins(
    make_adapter, tmp_path, monkeypatch
):
    monkeypatch.setattr(folders, "_download", lambda *a, **k: pytest.fail("the Hub was asked"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clients").mkdir()
    for missing in ("clients/missing", "./user/repo", "a/b/c", str(tmp_path / "nope")):
        with pytest.raises(hfl.AdapterNotFoundError, match="not a valid Hub repo id"):
            hfl.LoraAdapter.from_pretrained(missing)
    make_adapter("user/repo", 4, 8)  # a local folder named like a repo id
    assert (
        hfl.LoraAdapter.from_pretrained("user/repo").directory.resolve()
        == (tmp_path / "user" / "repo").resolve()
    )


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_save_replaces_the_whole_folder_at_once(make_adapter, tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(adapter_io, "_exchange", lambda a, b: False)
    first = hfl.LoraAdapter.from_pretrained(make_adapter("a", 4, 8, seed=1))
    second = hfl.LoraAdapter.from_pretrained(make_adapter("b", 2, 4, seed=2))
    out = tmp_path / "global"
    first.save_pretrained(out)
    (out / "README.md").write_text("kept")
    second.save_pretrained(out)
    reread = hfl.LoraAdapter.from_pretrained(out)
    assert set(reread.ranks.values()) == {2} and reread.sha256() == second.sha256()
    assert (out / "README.md").read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".global")]


def test_push_refuses_a_symlink_leaving_the_round_folder(make_adapter, tmp_path):
    folder = make_adapter("round", 4, 8)
    (tmp_path / "secret.txt").write_text("private")
    (folder / "notes.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(hfl.AdapterFormatError, match="symlink leading outside"):
        push_round(folder, "user/fed", 1, endpoint="http://127.0.0.1:9", max_retries=0)


def test_push_reads_the_token_from_a_file_and_warns_about_the_flag(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert read_token(argparse.Namespace(token=None, token_file=str(tmp_path / "token"))) == TOKEN
    assert read_token(argparse.Namespace(token=None, token_file=None)) is None  # HF_TOKEN / login
    with pytest.warns(FutureWarning, match="--token-file"):
        assert read_token(argparse.Namespace(token=TOKEN, token_file=None)) == TOKEN


def test_tokens_are_redacted_from_chained_exceptions_and_log_lines():
    try:
        try:
            raise ConnectionError(f"GET https://hub/api?token={TOKEN} failed")
        except ConnectionError as inner:
            raise RuntimeError(f"Authorization: Bearer {TOKEN}") from inner
    except RuntimeError as outer:
        redact_chain(outer, TOKEN)
        assert TOKEN not in str(outer) and TOKEN not in str(outer.__cause__)
    record = logging.LogRecord("httpx", logging.DEBUG, __file__, 1, "headers %s", (f"Bearer {TOKEN}",), None)
    RedactTokens().filter(record)
    assert TOKEN not in record.getMessage()


def test_commit_ids_from_the_server_are_validated():
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert check_commit_sha(sha, "repo") == sha
    for bad in ("../../../etc", "main", sha + "0", None, sha.upper()):
        with pytest.raises(HubPathError):
            check_commit_sha(bad, "repo")


def test_hub_requests_get_a_timeout():
    from huggingface_hub.utils import get_session

    from hf_fedlora.hub.push import _api

    _api(None, None)
    assert get_session().timeout.read is not None


def test_symlink_loop_folder_and_bounded_reads_name_the_client(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(hfl.AdapterError):
        hfl.LoraAdapter.from_pretrained(loop, label="client 7")
    os.mkfifo(tmp_path / "fifo.json")
    from hf_fedlora.files import read_small_text

    with pytest.raises(hfl.AdapterFormatError, match="client 7, file 'fifo.json': is not a regular file"):
        read_small_text(tmp_path / "fifo.json", "client 7")


def test_pull_refuses_a_tag_whose_commit_id_is_not_one_before_any_download(monkeypatch):
    from types import SimpleNamespace

    from hf_fedlora.hub import pull

    class Server:
        def list_repo_refs(self, repo_id):
            return SimpleNamespace(tags=[SimpleNamespace(name="round-0001", target_commit="../../../tmp/x")])

        def list_repo_files(self, *args, **kwargs):
            pytest.fail("files were listed for an unchecked commit id")

    monkeypatch.setattr(pull, "_api", lambda endpoint, token: Server())
    with pytest.raises(HubPathError, match="user/fed@round-0001: the server answered the commit id"):
        pull.download_round("user/fed", 1, max_retries=0)


def test_screening_against_a_reference_does_not_trust_the_first_client(make_adapter):
    hostile = make_adapter("hostile", 4, 8, seed=1, base_model_name_or_path="someone/other")
    honest = [make_adapter(f"honest{i}", 4, 8, seed=i + 2) for i in range(2)]
    reference = hfl.LoraAdapter.from_pretrained(make_adapter("previous", 4, 8, seed=7))
    _, trusting = screen_clients([hostile, *honest])
    assert [v.accepted for v in trusting] == [True, False, False]  # why a reference is needed
    _, verdicts = screen_clients([hostile, *honest], reference=reference)
    assert [v.accepted for v in verdicts] == [False, True, True]
    assert "client 0" in verdicts[0].reason and "base_model_name_or_path" in verdicts[0].reason


def test_errors_about_an_in_memory_adapter_blame_no_file(make_adapter):
    adapter = hfl.LoraAdapter.from_pretrained(make_adapter("a", 4, 8))
    state = adapter.state_dict()
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    memory = hfl.LoraAdapter.from_state_dict(adapter.config, state, label="global adapter (replication)")
    with pytest.raises(hfl.NonFiniteTensorError) as caught:
        memory.lora_factors(key.removesuffix(".lora_A.weight"))
    assert "global adapter (replication): tensor" in str(caught.value)
    assert "adapter_model.safetensors" not in str(caught.value)


def test_huge_weights_are_normalised_without_overflow(make_adapter):
    """Weights whose sum overflows (``[1e308, 1e308]``) used to give an all-zero merge."""
    import numpy as np

    folders_ = [make_adapter("w0", 2, 4, seed=1), make_adapter("w1", 4, 8, seed=2)]
    reference = hfl.aggregate_adapters(folders_, "replication", weights=[1.0, 3.0])
    for weights in ([5e307, 1.5e308], [1e-300, 3e-300]):  # the first pair sums past float max
        merged = hfl.aggregate_adapters(folders_, "replication", weights=weights)
        for module in reference.modules:
            torch.testing.assert_close(merged.delta_weight(module), reference.delta_weight(module))
            assert torch.count_nonzero(merged.delta_weight(module)) > 0
    streamed = hfl.StreamingAggregator("replication")
    for folder, weight in zip(folders_, [np.float32(1.0), torch.tensor(3.0)]):
        streamed.add(folder, weight=weight)  # NumPy and torch scalars are numbers too
    result = streamed.result()
    for module in reference.modules:
        torch.testing.assert_close(result.delta_weight(module), reference.delta_weight(module))


@pytest.mark.parametrize("weight", [float("nan"), -1.0, 0, True, "1", torch.tensor([1.0, 2.0])])
def test_a_weight_that_is_not_a_finite_positive_number_is_refused_naming_the_client(make_adapter, weight):
    folders_ = [make_adapter("v0", 2, 4, seed=1), make_adapter("v1", 4, 8, seed=2)]
    with pytest.raises(hfl.InvalidWeightsError, match=r"client 1 .*`weights` entry"):
        hfl.aggregate_adapters(folders_, "replication", weights=[1.0, weight])
