"""Certificates and the `server` / `site` / `certs` commands (fast: no process is started)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.federated.certs import CertFiles, make_certs

runner = CliRunner()


def test_certs_chain_san_and_site_keys(tmp_path: Path) -> None:
    files = make_certs(tmp_path / "c", ["site-0", "site-1"], hosts=["fl.example.org"])
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"localhost", "fl.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    for site in ("site-0", "site-1"):
        key = load_ssh_private_key(files.site_key(site).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        pub = load_ssh_public_key(files.site_pub(site).read_bytes())
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert files.site_key(site).stat().st_mode & 0o077 == 0  # private: owner only
    assert set(files.site_public_keys()) == {"site-0", "site-1"}


def test_cli_commands_are_registered() -> None:
    out = runner.invoke(app, ["--help"]).output
    assert all(cmd in out for cmd in ("server", "site", "certs"))


def test_certs_command_and_refusal_to_overwrite(tmp_path: Path) -> None:
    res = runner.invoke(app, ["certs", str(tmp_path / "c"), "--sites", "2"])
    assert res.exit_code == 0, res.output
    assert set(CertFiles(tmp_path / "c").site_public_keys()) == {"site-0", "site-1"}
    again = runner.invoke(app, ["certs", str(tmp_path / "c")])
    assert again.exit_code == 2 and "exists" in again.output


def test_server_without_certs_is_a_user_error(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["server", "--out", str(tmp_path / "run"), "--certs", str(tmp_path / "none")]
    )
    assert res.exit_code == 2 and "privseg certs" in res.output


def test_site_without_data_is_a_user_error(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "site",
            "--data",
            str(tmp_path / "nodata"),
            "--site",
            "site-0",
            "--server",
            "127.0.0.1:1",
            "--certs",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 2 and "not a prepared slice cache" in res.output


def test_server_and_site_folders_are_claimed(tmp_path: Path, phantom_cache) -> None:
    """A folder privseg did not create is refused before anything starts; nothing is added."""
    files = make_certs(tmp_path / "certs", ["site-0", "site-1"])
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "draft.txt").write_text("mine")
    server = ["server", "--out", str(foreign), "--certs", str(files.root)]
    res = runner.invoke(app, server)
    assert res.exit_code == 2 and "privseg did not create it" in res.output
    site = ["site", "--data", str(phantom_cache.root), "--site", "site-0", "--budget", "5"]
    site += ["--server", "127.0.0.1:1", "--certs", str(files.root)]
    res = runner.invoke(app, [*site, "--out", str(foreign)])
    assert res.exit_code == 2 and "privseg did not create it" in res.output
    assert sorted(p.name for p in foreign.iterdir()) == ["draft.txt"]
    res = runner.invoke(app, [*site, "--out", str(phantom_cache.root)])  # an input
    assert res.exit_code == 2 and "would replace the input" in res.output
