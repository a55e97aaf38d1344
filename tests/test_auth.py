"""Who may call the server (issue 16): API keys and TLS, in-process and on a real HTTPS server with two
workers."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
from argparse import Namespace
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from servers import fit_bundle, metric, running_server

from mtlm.serve.app import create_app
from mtlm.serve.auth import ENV_AUTH, AccessConfigError, APIKeys, read_keys
from mtlm.serve.schemas import ServeSettings

TEXTS = ["the movie was great fun", "john smith went to paris", "stock market shares rose"]


@pytest.fixture(scope="module")
def bundle(tiny_backbone, toy_data, tmp_path_factory) -> Path:
    data = lambda name: {"train": str(toy_data / name)}  # noqa: E731
    return fit_bundle(tmp_path_factory.mktemp("auth"), tiny_backbone, {
        "sentiment": {"type": "classification", "data": data("sentiment.csv")},
        "ner": {"type": "token_classification", "data": data("ner.jsonl")}})


@asynccontextmanager
async def client_for(bundle: Path, api_keys: APIKeys | None):
    app = create_app(str(bundle), ServeSettings(), api_keys=api_keys)
    async with app.router.lifespan_context(app):
        await app.state.service.wait_ready(30)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_cli_reports_a_bad_key_file_in_one_line(tmp_path, capsys):
    from mtlm.cli import main
    assert main(["serve", str(tmp_path), "--api-key-file", str(tmp_path / "gone.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --api-key-file") and "gone.txt: cannot read" in err and "Traceback" not in err


def test_keys_come_from_flags_file_and_environment(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\n\nfile-key-1\n   file-key-2  \nflag-key\n")
    got = read_keys(["flag-key"], keys, {"MTLM_API_KEYS": " env-key-1,env-key-2,, file-key-1"})
    assert got == ["flag-key", "file-key-1", "file-key-2", "env-key-1", "env-key-2"]
    assert read_keys(None, None, {}) == []

    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(AccessConfigError, match="empty.txt: no keys"):
        read_keys(None, tmp_path / "empty.txt", {})
    with pytest.raises(AccessConfigError, match="missing.txt: cannot read"):
        read_keys(None, tmp_path / "missing.txt", {})
    (tmp_path / "bad.txt").write_text("good-key\n\nsecret with-space\n")
    with pytest.raises(AccessConfigError, match=r"bad.txt, line 3: an API key may hold only") as e:
        read_keys(None, tmp_path / "bad.txt", {})
    assert "secret" not in str(e.value)                          # the message never shows a key
    with pytest.raises(AccessConfigError, match=r"MTLM_API_KEYS \(key 2\)"):
        read_keys(None, None, {"MTLM_API_KEYS": "ok,caf\u00e9"})


def test_every_route_but_health_and_ready_needs_a_key(bundle):
    keys = APIKeys.from_keys(["key-one", "key-two"])
    body = {"inputs": TEXTS}

    async def main():
        async with client_for(bundle, None) as open_client:
            want = (await open_client.post("/v1/predict", json=body)).json()["predictions"]
        async with client_for(bundle, keys) as client:
            for headers, reason in (({}, "missing"), ({"Authorization": "Basic a2V5LW9uZQ=="}, "malformed"),
                                    ({"Authorization": "Bearer"}, "malformed"), (bearer("key-three"), "invalid"),
                                    (bearer("key-on"), "invalid"), (bearer("KEY-ONE"), "invalid")):
                r = await client.post("/v1/predict", json=body, headers=headers)
                assert r.status_code == 401, (headers, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert ("error=" in r.headers["www-authenticate"]) == (reason != "missing")
                assert "key-one" not in r.text and "key-two" not in r.text
                assert r.json()["request_id"] == r.headers["x-request-id"]
            for path in ("/v1/tasks", "/metrics", "/docs", "/openapi.json", "/no/such/path"):
                assert (await client.get(path)).status_code == 401, path
            assert (await client.post("/v1/tasks/ner/predict", json=body)).status_code == 401
            for path in ("/health", "/ready"):
                assert (await client.get(path)).status_code == 200, path

            for key in ("key-one", "key-two"):
                r = await client.post("/v1/predict", json=body, headers=bearer(key))
                assert r.status_code == 200, r.text
                assert r.json()["predictions"] == want           # the same model, the same answers
            r = await client.post("/v1/predict", json=body, headers={"authorization": "bearer  key-two"})
            assert r.status_code == 200                          # scheme case-insensitive (RFC 7235)
            assert (await client.get("/v1/tasks", headers=bearer("key-one"))).status_code == 200
            doc = (await client.get("/openapi.json", headers=bearer("key-one"))).json()
            assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
            assert "401" in doc["paths"]["/v1/predict"]["post"]["responses"]
            m = (await client.get("/metrics", headers=bearer("key-one"))).text
            assert "key-one" not in m and "key-two" not in m
            counts = {r: metric(m, "mtlm_auth_rejected_total", reason=r) for r in ("missing", "malformed", "invalid")}
            assert counts == {"missing": 7, "malformed": 2, "invalid": 3}

    asyncio.run(main())


def test_open_metrics_and_docs(bundle):
    async def main():
        async with client_for(bundle, APIKeys.from_keys(["k"], open_metrics=True, open_docs=True)) as client:
            for path in ("/metrics", "/docs", "/openapi.json"):
                assert (await client.get(path)).status_code == 200, path
            assert (await client.get("/v1/tasks")).status_code == 401
            doc = (await client.get("/openapi.json")).json()
            assert "security" not in doc["paths"]["/metrics"]["get"]
            assert doc["paths"]["/v1/tasks"]["get"]["security"] == [{"bearer": []}]

    asyncio.run(main())


def _args(bundle, **kw) -> Namespace:
    base = dict(run=str(bundle), host="127.0.0.1", port=8123, workers=1, api_keys=None, api_key_file=None,
                open_metrics=False, open_docs=False, ssl_certfile=None, ssl_keyfile=None, verbose=False)
    return Namespace(**{**base, **kw})


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_serve_hands_uvicorn_the_tls_files_and_workers_only_key_digests(bundle, tmp_path, monkeypatch, caplog):
    import uvicorn

    from mtlm.serve.process import serve
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.delenv("MTLM_API_KEYS", raising=False)
    from mtlm.serve.process import ENV_BUNDLE, ENV_SETTINGS
    for name in (ENV_AUTH, ENV_BUNDLE, ENV_SETTINGS):       # serve() sets them for its workers: restore after
        monkeypatch.setenv(name, "")
    cert, key = self_signed(tmp_path)
    with caplog.at_level(logging.INFO, logger="mtlm.serve"):
        serve(_args(bundle, api_keys=["s3cret-key"], ssl_certfile=str(cert), ssl_keyfile=str(key)))
    assert calls[-1]["ssl_certfile"] == str(cert) and calls[-1]["ssl_keyfile"] == str(key)
    env = os.environ[ENV_AUTH]
    assert "s3cret-key" not in env and hashlib.sha256(b"s3cret-key").hexdigest() in env
    assert "s3cret-key" not in caplog.text and "https://" in caplog.text
    assert "without API keys" not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtlm.serve"):
        serve(_args(bundle, host="0.0.0.0"))                     # beyond loopback, no keys: a warning
    assert ENV_AUTH not in os.environ
    assert any(r.levelno == logging.WARNING and "--api-key-file" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtlm.serve"):
        serve(_args(bundle, host="::1"))
    assert "without API keys" not in caplog.text

    with pytest.raises(AccessConfigError, match="--ssl-keyfile needs --ssl-certfile"):
        serve(_args(bundle, ssl_keyfile=str(key)))
    with pytest.raises(AccessConfigError, match="nope.pem: no such file"):
        serve(_args(bundle, ssl_certfile=str(tmp_path / "nope.pem")))
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")
    with pytest.raises(AccessConfigError, match="cannot load the certificate and key"):
        serve(_args(bundle, ssl_certfile=str(other_cert), ssl_keyfile=str(key)))   # key of another cert
    assert len(calls) == 3


def test_https_server_with_two_workers_enforces_keys_and_never_logs_them(bundle, tmp_path):
    """`mtlm -v serve --workers 2 --api-key-file ... --ssl-certfile ... --ssl-keyfile ...` with one more key
    in MTLM_API_KEYS: over HTTPS, no key / a wrong key -> 401, either key -> 200 from either worker, /health
    open; nothing in the debug-level log shows a key."""
    cert, key = self_signed(tmp_path)
    file_key, env_key = "file-key-Zq81", "env-key-Xw27"
    (tmp_path / "keys.txt").write_text(f"# keys\n{file_key}\n")
    tls = ssl.create_default_context(cafile=str(cert))
    args = ["--workers", "2", "--api-key-file", str(tmp_path / "keys.txt"), "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key)]
    with running_server(bundle, tmp_path, *args, verbose=True, env={"MTLM_API_KEYS": env_key}, scheme="https",
                        verify=tls, headers=bearer(file_key)) as base:
        assert base.startswith("https://")
        with httpx.Client(base_url=base, verify=tls, timeout=30) as client:
            assert client.get("/health").status_code == 200
            assert client.post("/v1/predict", json={"inputs": TEXTS}).status_code == 401
            assert client.post("/v1/predict", json={"inputs": TEXTS}, headers=bearer("nope")).status_code == 401
            answers = set()
            for i in range(8):                          # new connections: both workers answer some
                with httpx.Client(base_url=base, verify=tls, timeout=30) as fresh:
                    r = fresh.post("/v1/predict", json={"inputs": TEXTS}, headers=bearer([file_key, env_key][i % 2]))
                    assert r.status_code == 200, r.text
                    answers.add(str(r.json()["predictions"]))
            assert len(answers) == 1
            assert client.get("/metrics", headers=bearer(file_key)).status_code == 200
        with pytest.raises(httpx.TransportError):        # plain HTTP to the TLS port is not served
            httpx.post(base.replace("https", "http") + "/v1/predict", json={"inputs": TEXTS},
                       headers=bearer(file_key), timeout=5).raise_for_status()
    log = (tmp_path / "serve.log").read_text()
    assert "POST /v1/predict" in log                     # access log on (verbose)
    assert log.count("Started server process") == 2, log  # two worker processes, each with the keys
    for secret in (file_key, env_key):
        assert secret not in log and hashlib.sha256(secret.encode()).hexdigest() not in log
