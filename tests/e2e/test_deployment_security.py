"""Deployment Engine on loopback with TLS and SuperNode authentication (Flower 1.42).

The SuperLink serves its one HTTP port (Fleet, Control and Runtime APIs) over TLS with a
CA and a server certificate made here; SuperNodes and ``flwr`` trust that CA. Nodes that
do not trust it (no ``--root-certificates``) or do not speak TLS (``--insecure``) must
never join. With ``--enable-supernode-auth`` only SuperNodes whose public keys were
registered with ``flwr supernode register`` may join; one with another key, or with none,
must be refused. Each test runs the quick preset for one round on two SuperNodes.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flower_app.cli.local_superlink import (
    LocalSuperLink,
    TlsFiles,
    flower_executable,
    free_port,
    pids_with_env,
    wait_until_gone,
)
from tests.conftest import ROOT

NUM_NODES = 2
CONNECTION = "secure"
REFUSED_WITHIN_S = 60.0  # a refused SuperNode shows its refusal in its log within this


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A one-day certificate for ``subject``; self-signed when ``issuer`` is None."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signing_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def write_tls_files(folder: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by it.

    The IP SAN matters: SuperNodes, ``flwr`` and the ServerApp's SuperExec all dial
    127.0.0.1, and TLS clients check the address against the SANs, not the CN.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("test CA", ca_key, None, [(x509.BasicConstraints(True, None), True)])
    key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    server = _certificate(
        "127.0.0.1",
        key,
        (ca.subject, ca_key),
        [(x509.BasicConstraints(False, None), True), (san, False)],
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return TlsFiles(
        ca_cert=_write_pem(folder / "ca.crt", ca.public_bytes(pem)),
        cert=_write_pem(folder / "server.pem", server.public_bytes(pem)),
        key=_write_pem(folder / "server.key", key_pem),
    )


def write_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA SECP384R1 key pair in OpenSSH format: (private key, public key).

    ``flower-supernode --auth-supernode-private-key`` reads an OpenSSH private key and
    ``flwr supernode register`` an OpenSSH public key of a NIST curve (1.42 source).
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return _write_pem(folder / name, private), _write_pem(folder / f"{name}.pub", public)


def write_node_data(link: LocalSuperLink, out: Path) -> list[Path]:
    """Each SuperNode's private shard of the quick preset (tiny: 20 images per class)."""
    subprocess.run(
        [
            *(sys.executable, "-m", "flower_app.data.node_data", "--out", str(out)),
            *("--run-config", str(ROOT / "configs" / "quick.toml")),
            *(f"num-clients={NUM_NODES}", "synthetic-train-per-class=20"),
        ],
        check=True,
        cwd=ROOT,
        env=link.env,
        timeout=300,
    )
    return [out / f"partition-{i}" for i in range(NUM_NODES)]


def node_config(index: int, data_dir: Path) -> str:
    return f'partition-id={index} num-partitions={NUM_NODES} data-dir="{data_dir}"'


def write_run_config(tmp_path: Path) -> Path:
    """The quick preset, one round on NUM_NODES nodes with the tiny data of the shards."""
    with open(ROOT / "configs" / "quick.toml", "rb") as f:
        config = tomllib.load(f) | {
            "num-clients": NUM_NODES,
            "fraction-train": 1.0,
            "synthetic-train-per-class": 20,
            "synthetic-test-per-class": 10,
            "num-server-rounds": 1,
            "local-steps": 2,
            "eval-every": 1,
            "round-timeout": 180.0,
            "node-wait-timeout": 60.0,
            "output-dir": str(tmp_path / "results"),
            "run-name": "secure",
        }
    path = tmp_path / "run-config.toml"
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()))
    return path


def wait_for_online(link: LocalSuperLink, expected: int, timeout: float = 120) -> list[dict]:
    """The SuperLink's node list once ``expected`` nodes are online (the run needs them all).

    Polls ``flwr supernode ls`` over the TLS Control API, so it also checks that ``flwr``
    trusts the CA through the connection's ``root-certificates``.
    """
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        nodes = link.supernode_list(CONNECTION)
        if sum(node["status"] == "online" for node in nodes) >= expected:
            return nodes
        time.sleep(2)
    raise AssertionError(f"{expected} SuperNodes not online in {timeout} s: {nodes}")


def wait_for_log(link: LocalSuperLink, index: int, needle: str, exits: bool) -> str:
    """SuperNode ``index``'s log once it holds ``needle`` (and, if ``exits``, it exited).

    Refused SuperNodes either give up (flwr_exit) or retry forever; both show in the log.
    """
    process = link.supernodes[index]
    deadline = time.monotonic() + REFUSED_WITHIN_S
    while time.monotonic() < deadline:
        log = link.supernode_log(index)
        if needle in log and (not exits or process.poll() is not None):
            return log
        time.sleep(1)
    raise AssertionError(
        f"SuperNode {index} (exit code {process.poll()}): no {needle!r} "
        f"in {REFUSED_WITHIN_S} s: {link.supernode_log(index)[-3000:]}"
    )


def stop_everything(links: list[LocalSuperLink], home: Path) -> None:
    """Stop the SuperLinks, then SIGKILL anything still carrying this FLWR_HOME.

    ``LocalSuperLink.stop`` ends its process group and every process with its FLWR_HOME
    (SuperNodes, ClientApps, the ServerApp); the sweep covers a start that failed midway.
    """
    for link in links:
        link.stop()
    marker = f"FLWR_HOME={home}".encode()
    for pid in pids_with_env(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert wait_until_gone(marker, 10), "processes left behind"


@pytest.fixture
def start_link(tmp_path: Path) -> Iterator[Callable[..., LocalSuperLink]]:
    """Starts a Deployment Engine SuperLink on a per-test FLWR_HOME; stops all by PID."""
    home = tmp_path / "flwr-home"
    links: list[LocalSuperLink] = []

    def start(**kwargs: object) -> LocalSuperLink:
        links.append(LocalSuperLink.start(home, simulation=False, **kwargs))
        return links[-1]

    try:
        yield start
    finally:
        stop_everything(links, home)


def assert_run_completes(link: LocalSuperLink, tmp_path: Path) -> None:
    run = link.run_to_end(ROOT, write_run_config(tmp_path), connection=CONNECTION, timeout=300)
    assert run.completed, (run.run_id, run.status, run.log[-3000:], link.log()[-3000:])
    summary = json.loads((tmp_path / "results" / "secure" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 1


def activated_node_ids(link: LocalSuperLink) -> set[int]:
    """Node ids the SuperLink activated (its log), to compare with who should have joined."""
    return {int(n) for n in re.findall(r"Activated node_id=(\d+)", link.log())}


def ids(nodes: list[dict]) -> set[int]:
    return {int(node["node-id"]) for node in nodes}


def assert_served_and_refused(link: LocalSuperLink, refused: list[int]) -> None:
    """The first NUM_NODES SuperNodes got an id and trained; the refused ones neither."""
    for i in range(NUM_NODES):
        log = link.supernode_log(i)
        assert "SuperNode ID:" in log and "Receiving: train message" in log, log[-3000:]
    for i in refused:
        log = link.supernode_log(i)
        assert "SuperNode ID:" not in log and "Receiving:" not in log, log[-3000:]


def test_tls_and_supernode_auth_admit_only_trusting_registered_nodes(start_link, tmp_path):
    """One TLS SuperLink with SuperNode authentication (one run keeps the suite short): the
    registered nodes join and train; a node with an unregistered key, one without a key,
    one without the CA and one speaking plain HTTP never join."""
    link = start_link(tls=write_tls_files(tmp_path / "certs"), supernode_auth=True)
    with pytest.raises(OSError):  # the one port speaks TLS only
        urllib.request.urlopen(f"http://127.0.0.1:{link.port}/health", timeout=5)
    link.add_connection(CONNECTION)
    keys = [write_node_keys(tmp_path / "keys", f"node-{i}") for i in range(NUM_NODES + 1)]
    registered = {link.register_supernode(public, CONNECTION) for _, public in keys[:NUM_NODES]}
    listed = link.supernode_list(CONNECTION)
    assert ids(listed) == registered and {n["status"] for n in listed} == {"registered"}, listed

    for i, data_dir in enumerate(write_node_data(link, tmp_path / "node-data")):
        link.start_supernode(node_config(i, data_dir), auth_private_key=keys[i][0])
    refused = {  # supernode_log index -> the node
        2: link.start_supernode(node_config(0, tmp_path), auth_private_key=keys[-1][0]),
        3: link.start_supernode(node_config(1, tmp_path)),  # no key: self-registration is off
        4: link.start_supernode(node_config(0, tmp_path), connection_args=[]),  # no CA
        5: link.start_supernode(node_config(1, tmp_path), connection_args=["--insecure"]),
    }
    wait_for_log(link, 2, "[code: 2004] Failed to activate SuperNode", exits=True)
    wait_for_log(link, 3, "[code: 2001] SuperNode authentication is enabled", exits=True)
    no_ca_log = wait_for_log(link, 4, "SSL/TLS handshake error", exits=True)
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca_log, no_ca_log
    wait_for_log(link, 5, "Connection attempt failed", exits=False)  # retries forever
    assert all(refused[i].returncode != 0 for i in (2, 3, 4))
    nodes = wait_for_online(link, NUM_NODES)
    assert ids(nodes) == registered == activated_node_ids(link), nodes

    assert_run_completes(link, tmp_path)  # the ServerApp also fails on more than NUM_NODES
    assert ids(link.supernode_list(CONNECTION)) == registered
    assert refused[5].poll() is None, "the --insecure SuperNode was expected to keep retrying"
    assert_served_and_refused(link, refused=[2, 3, 4, 5])


def test_supernode_auth_requires_tls(tmp_path):
    """Flower 1.42 refuses ``--enable-supernode-auth`` with ``--insecure`` (exits at once)."""
    with pytest.raises(ValueError, match="without TLS"):
        LocalSuperLink.start(tmp_path / "home", simulation=False, supernode_auth=True)
    out = subprocess.run(
        [
            *(flower_executable("flower-superlink"), "--insecure", "--enable-supernode-auth"),
            *("--port", str(free_port()), "--database", str(tmp_path / "state.db")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=os.environ | {"FLWR_HOME": str(tmp_path), "FLWR_DISABLE_UPDATE_CHECK": "1"},
    )
    assert out.returncode != 0, out.stdout + out.stderr
    assert "requires encrypted TLS" in out.stdout + out.stderr, out.stdout + out.stderr
