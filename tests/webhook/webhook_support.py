"""Helpers of the webhook tests: a test CA made with `cryptography`, AdmissionReview requests as the API
server sends them (admission.k8s.io/v1, JSON over HTTPS), and reading the answer's JSONPatch."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import ssl
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestPKI:
    """A CA and the certificates it signs; ``issue`` (re)writes ``tls.crt``/``tls.key`` in ``directory``."""

    __test__ = False  # not a test class

    def __init__(self, directory: Path, ca_name: str = "analytics-pipeline test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.ca_key, hashes.SHA256()))
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        self.cert_file, self.key_file = directory / "tls.crt", directory / "tls.key"
        self.serial = self.issue()

    def issue(self, *, write_key: bool = True) -> int:
        """Sign a new serving certificate for localhost/127.0.0.1, write it (and its key); return its serial."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder().subject_name(_name("analytics-pipeline-webhook"))
            .issuer_name(self.ca_cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.ca_key, hashes.SHA256()))
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        if write_key:
            self.key_file.write_bytes(key_pem)
        else:
            self.pending_key = key_pem
        return serial

    def client_context(self) -> ssl.SSLContext:
        """What the API server does: trust only the CA bundle (caBundle) and check the host name."""
        return ssl.create_default_context(cafile=str(self.ca_file))


async def peer_serial(port: int, context: ssl.SSLContext) -> int:
    """Open a NEW TLS connection to 127.0.0.1:port and return the serial number of the certificate it presents."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    return x509.load_der_x509_certificate(der).serial_number


def admission_review(pod: dict[str, Any], namespace: str, *, operation: str = "CREATE",
                     dry_run: bool = False) -> dict[str, Any]:
    """An AdmissionReview request for a pod, shaped like the one kube-apiserver sends (admission.k8s.io/v1)."""
    gvk, gvr = ({"group": "", "version": "v1", "kind": "Pod"}, {"group": "", "version": "v1", "resource": "pods"})
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
            "name": pod.get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "6a2e3c4d-0000-4000-8000-000000000001",
                         "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system",
                                    "system:authenticated"]},
            "object": pod,
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


async def send_review(url: str, context: ssl.SSLContext, review: dict[str, Any]) -> dict[str, Any]:
    """POST the review over HTTPS and return the AdmissionReview answer; checks its envelope."""
    async with aiohttp.ClientSession() as session, session.post(
            url, data=json.dumps(review), headers={"Content-Type": "application/json"}, ssl=context) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review["request"]["uid"]
    return answer["response"]


def patched(pod: dict[str, Any], response: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Apply the response's base64 JSONPatch to the pod, as the API server does: (new pod, the operations)."""
    if "patch" not in response:
        return pod, []
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, operations), operations


async def wait_for_port(port: int, context: ssl.SSLContext, within: float = 15.0) -> None:
    """Wait until something answers TLS on 127.0.0.1:port."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await peer_serial(port, context)
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
