"""Reliability of Hub pushes against injected faults: retries with backoff, no double push on
resume or on a lost answer, a clear error that leaves the local round intact, no token leaks,
and file names checked before download."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from hub_server import LocalHub
from testing_utils import HUB_TOKEN, write_peft_adapter

from hf_fedlora import LoraAdapter, aggregate_adapters, pull_round
from hf_fedlora.cli import main
from hf_fedlora.hub import HubPathError, HubPushError, list_rounds, push_round, round_tag
from hf_fedlora.hub.pull import check_repo_path

REPO = "user/fed-tiny"


@pytest.fixture
def rounds(tmp_path: Path) -> dict[int, Path]:
    a = write_peft_adapter(tmp_path / "clients" / "a", r=2, lora_alpha=4, seed=1)
    b = write_peft_adapter(tmp_path / "clients" / "b", r=4, lora_alpha=8, seed=2)
    return {
        n: aggregate_adapters([a, b], num_examples=[n, 3]).save_pretrained(tmp_path / "run" / round_tag(n))
        for n in (1, 2)
    }


def _push(folder: Path, n: int, hub: LocalHub, **kw):
    kw.setdefault("token", HUB_TOKEN)
    return push_round(folder, REPO, n, endpoint=hub.url, **kw)


def _commit_statuses(hub: LocalHub) -> list:
    return [r.status for r in hub.requests("POST", "/commit/")]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_resume_after_round_1_pushes_only_round_2(rounds, hub_env: LocalHub, caplog) -> None:
    sha1 = _push(rounds[1], 1, hub_env)
    # the run crashes after round 1 and resumes: the recipe replays round 1's push, then round 2
    with caplog.at_level(logging.INFO, logger="hf_fedlora.hub"):
        assert _push(rounds[1], 1, hub_env) is None
    assert "round 1" in caplog.text and "not pushing it again" in caplog.text
    sha2 = _push(rounds[2], 2, hub_env)

    assert _commit_statuses(hub_env) == [200, 200]
    assert [c.sha for c in hub_env.commits(REPO)] == [sha2, sha1, hub_env.commits(REPO)[-1].sha]
    assert hub_env.repos[REPO].tags == {"round-0001": sha1, "round-0002": sha2}
    assert list_rounds(REPO, endpoint=hub_env.url) == [1, 2]


def test_500_on_first_commit_attempt_is_retried(rounds, hub_env: LocalHub, caplog) -> None:
    hub_env.fail("POST", r"/commit/main$", status=500, times=1)
    with caplog.at_level(logging.WARNING, logger="hf_fedlora.hub"):
        sha = _push(rounds[1], 1, hub_env)

    assert _commit_statuses(hub_env) == [500, 200]
    assert "commit failed (HTTP 500" in caplog.text and "retry 1/5" in caplog.text
    assert hub_env.repos[REPO].tags == {"round-0001": sha}
    assert len(hub_env.commits(REPO)) == 2


def test_dropped_connection_is_retried(rounds, hub_env: LocalHub) -> None:
    hub_env.fail("POST", r"/commit/", status="drop", times=2)
    sha = _push(rounds[1], 1, hub_env)
    assert _commit_statuses(hub_env) == ["drop", "drop", 200]
    assert hub_env.repos[REPO].tags == {"round-0001": sha}


def test_lost_answer_after_commit_does_not_commit_twice(rounds, hub_env: LocalHub) -> None:
    # the server makes the commit, then the connection drops before the answer arrives
    hub_env.fail("POST", r"/commit/", status="drop", times=1, after=True)
    sha = _push(rounds[1], 1, hub_env)

    assert _commit_statuses(hub_env) == ["drop"]  # the retry found every file already there
    assert len(hub_env.commits(REPO)) == 2
    assert hub_env.repos[REPO].tags == {"round-0001": sha} and hub_env.repos[REPO].branches["main"] == sha


def test_lost_answer_after_tag_is_accepted(rounds, hub_env: LocalHub) -> None:
    hub_env.fail("POST", r"/tag/", status=502, times=1, after=True)
    sha = _push(rounds[1], 1, hub_env)
    assert [r.status for r in hub_env.requests("POST", "/tag/")] == [502, 409]
    assert hub_env.repos[REPO].tags == {"round-0001": sha}


def test_crash_between_commit_and_tag_then_rerun_tags_the_existing_commit(rounds, hub_env: LocalHub) -> None:
    hub_env.fail("POST", r"/tag/", status=503, times=None)
    with pytest.raises(HubPushError, match=r"tagging round-0001: HTTP 503"):
        _push(rounds[1], 1, hub_env, max_retries=1)
    committed = hub_env.repos[REPO].branches["main"]
    assert hub_env.repos[REPO].tags == {}

    hub_env.clear_faults()
    assert _push(rounds[1], 1, hub_env) == committed
    assert _commit_statuses(hub_env) == [200]  # the rerun made no second commit
    assert hub_env.repos[REPO].tags == {"round-0001": committed}


def test_permanently_failing_hub_leaves_local_output_and_says_so(rounds, hub_env: LocalHub, caplog) -> None:
    before = _digest(rounds[1])
    hub_env.fail("POST", r"/commit/", status=500, times=None)
    with caplog.at_level(logging.DEBUG), pytest.raises(HubPushError) as info:
        _push(rounds[1], 1, hub_env, max_retries=2)

    message = str(info.value)
    assert f"pushing round 1 ('{rounds[1]}') to '{REPO}' failed after 3 attempts (commit: HTTP 500" in message
    assert f"The local output in '{rounds[1]}' is intact" in message
    assert _commit_statuses(hub_env) == [500, 500, 500]
    assert _digest(rounds[1]) == before
    assert LoraAdapter.from_pretrained(rounds[1]).sha256() == before["adapter_model.safetensors"]
    assert HUB_TOKEN not in message and HUB_TOKEN not in caplog.text
    assert hub_env.repos[REPO].tags == {}


def test_cli_exits_with_a_clear_message_when_the_hub_is_down(rounds, hub_env: LocalHub, capsys) -> None:
    hub_env.fail("POST", r"/commit/", status=503, times=None)
    argv = [
        "push",
        str(rounds[1]),
        REPO,
        "--round",
        "1",
        "--endpoint",
        hub_env.url,
        "--token",
        HUB_TOKEN,
        "--max-retries",
        "1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("hf-fedlora push: error: pushing round 1") and "HTTP 503" in err and "is intact" in err
    )
    assert HUB_TOKEN not in err
    assert (rounds[1] / "adapter_model.safetensors").is_file()


def test_cli_push_round_is_safe_to_rerun(rounds, hub_env: LocalHub, capsys) -> None:
    argv = ["push", str(rounds[1]), REPO, "--round", "1", "--endpoint", hub_env.url, "--token", HUB_TOKEN]
    assert main(argv) == 0
    assert "tag round-0001" in capsys.readouterr().out
    assert main(argv) == 0
    assert "round-0001 is already on the Hub; nothing pushed" in capsys.readouterr().out
    assert _commit_statuses(hub_env) == [200]
    assert (
        main(
            [
                "push",
                str(rounds[2]),
                "user/plain",
                "--tag",
                "v2",
                "--endpoint",
                hub_env.url,
                "--token",
                HUB_TOKEN,
            ]
        )
        == 0
    )
    assert set(hub_env.repos["user/plain"].tags) == {"v2"}


def test_wrong_token_fails_at_once_without_leaking_it(rounds, hub_env: LocalHub, caplog) -> None:
    wrong = "hf_WRONGtokenWRONGtokenWRONG1234"
    with caplog.at_level(logging.DEBUG), pytest.raises(HubPushError) as info:
        _push(rounds[1], 1, hub_env, token=wrong)
    message = str(info.value)
    assert (
        "at once (not a transient error)" in message
        and "HTTP 401" in message
        and "write access to 'user'" in message
    )
    assert wrong not in message and wrong not in caplog.text
    assert hub_env.count("POST", "/api/repos/create") == 1  # 401 is not retried


def test_pull_refuses_file_names_escaping_the_download_folder(rounds, hub_env: LocalHub) -> None:
    _push(rounds[1], 1, hub_env)
    hub_env.tree_overrides[REPO] = [{"type": "file", "path": "../../outside.txt", "size": 1, "oid": "0" * 40}]
    with pytest.raises(
        HubPathError, match=r"user/fed-tiny@round-0001: the repo lists a file named '../../outside.txt'"
    ):
        pull_round(REPO, 1, endpoint=hub_env.url)
    assert hub_env.count("GET", "/resolve/") == 0  # nothing was downloaded


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "/etc/passwd", "C:evil", "a\\..\\x", "a/./b", "", "a//b", "x\0y"]
)
def test_check_repo_path_refuses(name: str) -> None:
    with pytest.raises(HubPathError, match="outside the download folder"):
        check_repo_path(name, "user/repo@round-0001")


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "sub/dir/file.json", ".gitattributes", "a..b"])
def test_check_repo_path_accepts(name: str) -> None:
    assert check_repo_path(name, "user/repo@round-0001") == name


def test_list_rounds_of_a_missing_repo_is_empty(hub_env: LocalHub) -> None:
    assert list_rounds("user/nothing-yet", endpoint=hub_env.url) == []


def test_round_tag_format() -> None:
    assert round_tag(3) == "round-0003" and round_tag(12345) == "round-12345"
    with pytest.raises(HubPushError, match="`round_index` must be a non-negative integer"):
        round_tag(-1)


def test_repo_name_without_namespace_goes_to_the_token_owner(rounds, hub_env: LocalHub) -> None:
    sha = push_round(rounds[1], "fed-tiny", 1, token=HUB_TOKEN, endpoint=hub_env.url)
    assert hub_env.repos["user/fed-tiny"].tags == {"round-0001": sha}
    assert push_round(rounds[1], "fed-tiny", 1, token=HUB_TOKEN, endpoint=hub_env.url) is None
