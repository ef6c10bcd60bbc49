"""recipes/flower deployed for real: a SuperLink and SuperNodes as separate processes, `flwr run`.

1. Insecure on loopback: 1 SuperLink + 3 SuperNodes (ranks 2/4/8), 2 rounds on a tiny BERT. One
   SuperNode is killed (SIGKILL, its whole process group) in the middle of round 1, as soon as
   its ClientApp has the round's message (it writes ``status-dir/round-0001.received``; killing it
   then also spares the other nodes its start-up on shared cores): the round
   completes with the 2 other replies (``straggler-timeout`` seconds after they came, so the test
   takes as long as the healthy nodes need, not a fixed ``round-timeout``), the loss is logged with
   the node id and recorded in ``metrics.jsonl``, and round 2 goes on.
2. TLS + SuperNode authentication (certificates and keys made here with ``cryptography``): a
   registered SuperNode joins and trains a round; one whose key was never registered is refused.

Every process gets its own process group, free loopback ports and its own ``FLWR_HOME``; a fixture
finalizer stops every process the test started, and their children, by pid, also when it fails.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")

from testing_utils import REPO_ROOT  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
RECIPE = REPO_ROOT / "recipes" / "flower"
BIN = Path(sys.executable).parent
ROUND_TIMEOUT_S = 240  # a cap never reached: rounds end STRAGGLER_TIMEOUT_S after the healthy replies
STRAGGLER_TIMEOUT_S = 3  # round 1 goes on this long after the 2 healthy replies


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Deployment:
    """The processes of one local deployment, each started in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr_home"
        self.home.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
        }

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.root,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, name: str, text: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in (log := self.log(name)):
                return log
            if self.procs[name].poll() is not None and text not in self.log(name):
                break
            time.sleep(0.2)
        pytest.fail(f"{name}: no {text!r} after {timeout} s. Log:\n{self.log(name)[-3000:]}")

    def wait_for_file(self, path: Path, timeout: float = 60) -> dict:
        """The JSON a ClientApp wrote to ``path`` (its node config's ``status-dir``), once it exists."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if path.exists():
                return json.loads(path.read_text())
            time.sleep(0.1)
        pytest.fail(
            f"no {path} after {timeout} s. Logs:\n" + "\n".join(self.log(n)[-1500:] for n in self.procs)
        )

    def kill(self, name: str) -> None:
        """SIGKILL the process and every descendant (a SuperNode with its SuperExec and ClientApp)."""
        self._signal(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def stop_all(self) -> list:
        """SIGKILL every started process and its descendants, by pid, and reap them; returns them all."""
        killed = []
        for proc in self.procs.values():
            if proc.poll() is None:  # not reaped yet, so the pid is still this process's
                killed += self._signal(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(10)
        return killed

    @staticmethod
    def _signal(pid: int, sig: int) -> list:
        try:
            tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for proc in tree:  # by pid: detached children (the SuperLink's SuperExec) have their own group
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        return tree

    # -- the Flower pieces -----------------------------------------------------------------------
    def superlink(self, *security: str) -> int:
        port = _free_port()
        self.start(
            "superlink",
            "flower-superlink",
            *security,
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        )
        self.wait_for("superlink", "Starting Flower SuperExec")
        return port

    def status_dir(self, name: str) -> Path:
        """Where SuperNode ``name``'s ClientApp writes ``round-NNNN.training`` / ``.replied``."""
        return self.root / f"status-{name}"

    def supernode(self, name: str, link_port: int, node_config: str, *security: str) -> subprocess.Popen:
        node_config += f" status-dir={json.dumps(str(self.status_dir(name)))}"
        return self.start(
            name,
            "flower-supernode",
            *security,
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--port",
            str(_free_port()),
            "--node-config",
            node_config,
        )

    def write_connection(self, name: str, connection: dict[str, str | bool]) -> None:
        """``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``, as a user adds a SuperLink to the CLI."""
        entries = "".join(f"{k} = {json.dumps(v)}\n" for k, v in connection.items())
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n{entries}'
        )

    def app(self, connection: dict[str, str | bool]) -> Path:
        """A copy of recipes/flower whose `local-deployment` federation is ``connection``; `flwr run`
        migrates it into this FLWR_HOME (and comments it out in the copy, never in the repository)."""
        app = self.root / "app"
        shutil.copytree(RECIPE, app, ignore=shutil.ignore_patterns("outputs", "__pycache__", "certificates"))
        text = (app / "pyproject.toml").read_text()
        section = "[tool.flwr.federations.local-deployment]\n"
        head, tail = text.split(section)
        entries = "".join(f"{k} = {json.dumps(v)}\n" for k, v in connection.items())
        (app / "pyproject.toml").write_text(head + section + entries + tail.split("\n\n", 1)[1])
        return app


@pytest.fixture
def deployment(tmp_path: Path):
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        killed = dep.stop_all()
        time.sleep(0.5)
        alive = []
        for proc in killed:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        assert not alive, f"still running after the test: {alive}"


def _run_config(tiny_model_dir: Path, shared_data: Path, out: Path, **extra) -> str:
    config = {
        "task": "sst2",
        "model": str(tiny_model_dir),
        "data-dir": str(shared_data / "glue" / "SST-2"),
        "num-server-rounds": 2,
        "client-ranks": "2,4,8",
        "train-examples-per-client": 16,
        "eval-examples": 32,
        "local-steps": 2,
        "batch-size": 8,
        "max-length": 32,
        "lr": 0.01,
        "output-dir": str(out),
        **extra,
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_deployment_survives_a_supernode_killed_mid_round(deployment, tiny_model_dir, shared_data) -> None:
    started = time.monotonic()
    port = deployment.superlink("--insecure")
    ranks = (2, 4, 8)
    for i, rank in enumerate(ranks):
        deployment.supernode(
            f"node{i}", port, f"partition-id={i} num-partitions=3 lora-rank={rank}", "--insecure"
        )
    app = deployment.app({"address": f"127.0.0.1:{port}", "insecure": True})
    out = deployment.root / "out"
    config = _run_config(
        tiny_model_dir,
        shared_data,
        out,
        **{
            "round-timeout": ROUND_TIMEOUT_S,
            "straggler-timeout": STRAGGLER_TIMEOUT_S,
            "min-train-replies": 2,
        },
    )
    # the ServerApp waits for the 3 SuperNodes (`wait-for-nodes` defaults to the number of client-ranks)
    run = deployment.start("flwr_run", "flwr", "run", str(app), "local-deployment", "--stream", "-c", config)
    # round 1 reached node1: its ClientApp has the round's message (it writes this file)
    status = deployment.wait_for_file(deployment.status_dir("node1") / "round-0001.received", timeout=180)
    assert not (out / "round-0001").exists()  # killed in the middle of round 1
    deployment.kill("node1")
    killed = time.monotonic()
    ids = {"node1": status["node_id"]}
    run.wait(400)
    log = deployment.log("flwr_run")
    assert run.returncode == 0, log[-4000:]
    assert f"node {ids['node1']} lost" in log, log[-4000:]  # the ServerApp logs the loss with the node id
    assert not (deployment.status_dir("node1") / "round-0001.replied").exists()  # killed before replying

    rows = {row["round"]: row for row in _rows(out)}
    assert sorted(rows) == [1, 2]
    assert rows[1]["clients-accepted"] == 2 and rows[1]["clients-lost"] == 1
    assert [d["client"] for d in rows[1]["dropped"]] == [ids["node1"]]
    reason = rows[1]["dropped"][0]["reason"]
    assert "straggler timeout" in reason or "Unavailable" in reason, reason
    assert rows[2]["clients-accepted"] == 2  # the next round went on with the two live nodes
    for row in rows.values():
        assert 0.0 <= row["eval-accuracy"] <= 1.0 and row["num-examples"] == 32

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from hf_fedlora import LoraAdapter

    for rnd in (0, 1, 2):
        adapter = LoraAdapter.from_pretrained(out / f"round-{rnd:04d}")
        assert set(adapter.ranks.values()) == {8}
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    PeftModel.from_pretrained(base, out / "round-0002")
    assert (
        "[tool.flwr.federations]" in (RECIPE / "pyproject.toml").read_text()
    )  # the repository's copy untouched
    print(
        f"deployment with a lost node: {time.monotonic() - started:.1f} s "
        f"({killed - started:.1f} s to the kill, rounds {[round(r['wall-time-s'], 1) for r in rows.values()]})"
    )


# -- TLS and SuperNode authentication ------------------------------------------------------------------


def _certificates(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, and two SuperNode key pairs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir()
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def cert(subject: str, key, issuer: str, issuer_key, *extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (folder / "ca.crt").write_bytes(
        cert(
            "hf_fedlora test CA",
            ca_key,
            "hf_fedlora test CA",
            ca_key,
            (x509.BasicConstraints(True, None), True),
        )
    )
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    (folder / "server.pem").write_bytes(
        cert(
            "localhost",
            server_key,
            "hf_fedlora test CA",
            ca_key,
            (x509.SubjectAlternativeName(names), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        )
    )
    pkcs8 = serialization.PrivateFormat.PKCS8
    pem, none = serialization.Encoding.PEM, serialization.NoEncryption()
    (folder / "server.key").write_bytes(server_key.private_bytes(pem, pkcs8, none))
    for name in ("registered", "stranger"):  # SuperNode keys: OpenSSH format, NIST P-384
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / name).write_bytes(key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, none))
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        (folder / f"{name}.pub").write_bytes(public)


def test_tls_and_supernode_authentication_refuse_an_unregistered_node(
    deployment, tiny_model_dir, shared_data
) -> None:
    started = time.monotonic()
    certs = deployment.root / "certificates"
    _certificates(certs)
    port = deployment.superlink(
        "--ssl-ca-certfile",
        str(certs / "ca.crt"),
        "--ssl-certfile",
        str(certs / "server.pem"),
        "--ssl-keyfile",
        str(certs / "server.key"),
        "--enable-supernode-auth",
    )
    connection = {"address": f"127.0.0.1:{port}", "root-certificates": str(certs / "ca.crt")}
    app = deployment.app(connection)
    deployment.write_connection(
        "local-deployment", connection
    )  # the CLI's own config, as on a user's machine
    register = subprocess.run(
        [str(BIN / "flwr"), "supernode", "register", str(certs / "registered.pub"), "local-deployment"],
        env=deployment.env,
        cwd=deployment.root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert register.returncode == 0 and "registered successfully" in register.stdout, (
        register.stdout + register.stderr
    )

    tls = ("--root-certificates", str(certs / "ca.crt"))
    for name in ("registered", "stranger"):
        deployment.supernode(
            name,
            port,
            "partition-id=0 num-partitions=1 lora-rank=4",
            *tls,
            "--auth-supernode-private-key",
            str(certs / name),
            "--max-retries",
            "2",
        )
    out = deployment.root / "out"
    config = _run_config(tiny_model_dir, shared_data, out, **{"num-server-rounds": 1, "client-ranks": "4"})
    run = deployment.start("flwr_run", "flwr", "run", str(app), "local-deployment", "--stream", "-c", config)
    stranger = deployment.procs["stranger"]
    stranger.wait(60)
    assert stranger.returncode != 0
    assert "Failed to activate SuperNode" in deployment.log("stranger"), deployment.log("stranger")[-2000:]
    run.wait(300)
    assert run.returncode == 0, deployment.log("flwr_run")[-4000:]
    registered_id = deployment.wait_for_file(deployment.status_dir("registered") / "round-0001.replied")[
        "node_id"
    ]
    assert not deployment.status_dir("stranger").exists()
    (row,) = _rows(out)
    assert row["round"] == 1 and row["clients-accepted"] == 1 and row["clients-lost"] == 0
    listed = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "local-deployment", "--format", "json"],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert str(registered_id) in listed.stdout and listed.stdout.count('"node-id"') <= 1, listed.stdout
    print(f"TLS + authentication deployment: {time.monotonic() - started:.1f} s")
