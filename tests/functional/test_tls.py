"""TLS on the proxy listener, with real certificates (``openssl``, the
``tls_files`` fixture) and real clients over loopback: ``curl --cacert``,
aiohttp with an SSL context, raw TLS streams that read the peer's
certificate. Both request paths, WebSocket upgrades, a new certificate on
reload (peer certificate fingerprints compared), a bad pair refused,
plain HTTP sent to the TLS port, the handshake's deadline, ``gateway
check``'s problems, the drain and two workers of a real ``gateway run``.

The in-process gateways run on asyncio's loop, ``gateway run`` on uvloop:
their SSL transports are two implementations, both covered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import WSMsgType
from aiohttp.test_utils import TestServer

from gateway.config.model import TlsConfig
from gateway.config.tls import TlsPairError
from tests.conftest import (
    AIOHTTP,
    PLAIN,
    RedisServer,
    RequestPath,
    RunningGateway,
    StartGateway,
    TlsFiles,
    record_served,
)
from tests.functional.test_workers import children, only_serving, running_gateway
from tests.functional.test_workers import workers_config as workers_base_config
from tests.helpers import (
    GUARD_SECONDS,
    PROBLEM_LINE,
    GatewayProcess,
    base_url,
    bucket,
    build_request,
    free_port,
    gateway_run,
    poll,
    read_response,
    run_cli,
    tool,
    write_config,
)
from tests.upstream_app import HITS

# --------------------------------------------------------------------------- helpers


def _json(text: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(text)
    return body


def forwarded(body: dict[str, Any], name: str) -> list[str]:
    """The values of header ``name`` the upstream's echo saw."""
    return [value for key, value in body["headers"] if key.lower() == name.lower()]


async def curl(*args: str) -> tuple[int, str, str]:
    """``curl ARGS`` (async: the gateway under test runs in this loop)."""
    process = await asyncio.create_subprocess_exec(
        tool("curl"), "--silent", "--show-error", "--max-time", str(GUARD_SECONDS), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), GUARD_SECONDS + 5)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@contextlib.asynccontextmanager
async def tls_stream(
    port: int, context: ssl.SSLContext
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TLS connection to 127.0.0.1:``port``, closed on exit."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context), GUARD_SECONDS
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def peer_fingerprint(writer: asyncio.StreamWriter) -> str:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


async def new_connection_fingerprint(port: int, tls_files: TlsFiles) -> str:
    """The certificate a new connection is served."""
    async with tls_stream(port, tls_files.client_context()) as (_reader, writer):
        return peer_fingerprint(writer)


async def get_on(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str
) -> int:
    """One GET on an open connection, kept alive; its status."""
    writer.write(build_request("GET", target))
    await writer.drain()
    async with asyncio.timeout(GUARD_SECONDS):
        response = await read_response(reader)
    assert response.complete
    return response.status


def noisy(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records a refused connection must not cause: warnings and errors,
    and anything with a traceback (asyncio's loop exception handler too)."""
    return [
        f"{r.name} {r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING or r.exc_info
    ]


def alpn_client(tls_files: TlsFiles) -> ssl.SSLContext:
    """A client that offers h2 first, as browsers and curl do."""
    context = tls_files.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


# --------------------------------------------------------------------------- serving


async def test_curl_is_served_on_both_paths_with_x_forwarded_proto_https(
    start_gateway: StartGateway, tls_files: TlsFiles
) -> None:
    gw = await start_gateway(tls=tls_files.config())
    served = record_served(gw)
    common = ("--cacert", str(tls_files.ca), "--verbose")

    code, out, err = await curl(*common, f"https://localhost:{gw.server.proxy_port}/get?a=1")
    assert code == 0, err
    assert "ALPN: server accepted http/1.1" in err  # curl offered h2 first
    assert "SSL connection using TLSv1.3" in err
    assert forwarded(_json(out), "X-Forwarded-Proto") == ["https"]
    assert forwarded(_json(out), "X-Forwarded-For") == ["127.0.0.1"]

    code, out, err = await curl(*common, "--data-binary", "xyz", f"{gw.url}/post")
    assert code == 0, err
    body = _json(out)
    assert body["method"] == "POST"
    assert body["body_sha256"] == hashlib.sha256(b"xyz").hexdigest()
    assert forwarded(body, "X-Forwarded-Proto") == ["https"]
    assert [path for path, _m, _t in served] == [PLAIN, AIOHTTP]

    # TLS 1.2 is served too; 1.1 is not.
    code, out, err = await curl(*common, "--tls-max", "1.2", f"{gw.url}/get")
    assert code == 0, err
    assert "SSL connection using TLSv1.2" in err
    code, _out, err = await curl(*common, "--tls-max", "1.1", f"{gw.url}/get")
    assert code != 0, err


async def test_aiohttp_client_on_each_path(
    start_gateway: StartGateway, tls_files: TlsFiles, request_path: RequestPath
) -> None:
    """GETs on one kept-alive connection; on the aiohttp path a streamed
    body too (on the plain path a body would hand the connection over)."""
    gw = await start_gateway(tls=tls_files.config())
    session = await request_path.client(gw)
    context = tls_files.client_context()
    for i in range(3):
        async with session.get(f"{gw.url}/get/{i}", ssl=context) as response:
            assert response.status == 200
            assert response.headers["RateLimit-Policy"] == '"default";q=100;w=360000'
            body = await response.json()
        assert forwarded(body, "X-Forwarded-Proto") == ["https"]
        assert forwarded(body, "X-Forwarded-For") == ["127.0.0.1"]
    if request_path.name == AIOHTTP:
        async with session.put(f"{gw.url}/put", data=b"x" * 100_000, ssl=context) as response:
            assert response.status == 200
            body = await response.json()
        assert body["body_length"] == 100_000
        assert forwarded(body, "X-Forwarded-Proto") == ["https"]
    records = 4 if request_path.name == AIOHTTP else 3
    await poll(lambda: len(gw.access_records()) == records, "access records", attempts=100)
    assert {r["client"] for r in gw.access_records()} == {"127.0.0.1"}  # the peer, over TLS


async def test_a_tls_connection_is_handed_over_between_requests(
    start_gateway: StartGateway, tls_files: TlsFiles
) -> None:
    """GET, then a body on the same TLS connection: front.py serves the
    first and hands the connection (the SSL transport) to aiohttp."""
    gw = await start_gateway(tls=tls_files.config())
    served = record_served(gw)
    context = tls_files.client_context()
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for method, data in (("GET", None), ("POST", b"body"), ("GET", None)):
            async with session.request(method, f"{gw.url}/m", data=data, ssl=context) as r:
                assert r.status == 200
                assert forwarded(await r.json(), "X-Forwarded-Proto") == ["https"]
        # 4 MiB through the SSL transport's flow control, on the handed-over connection.
        async with session.get(f"{gw.url}/download?size={4 << 20}", ssl=context) as r:
            assert len(await r.read()) == 4 << 20
    assert [path for path, _m, _t in served] == [PLAIN, AIOHTTP, AIOHTTP, AIOHTTP]


async def test_a_large_download_streams_over_tls(
    start_gateway: StartGateway, tls_files: TlsFiles, request_path: RequestPath
) -> None:
    """8 MiB: far past the SSL transport's write buffer, so its flow
    control (pause_writing/resume_writing) reaches the relay."""
    gw = await start_gateway(tls=tls_files.config())
    session = await request_path.client(gw)
    size = 8 << 20
    url = f"{gw.url}/download?size={size}"
    async with session.get(url, ssl=tls_files.client_context()) as response:
        assert response.status == 200
        assert len(await response.read()) == size


async def test_a_plain_gateway_still_says_http(
    start_gateway: StartGateway, request_path: RequestPath
) -> None:
    gw = await start_gateway()
    session = await request_path.client(gw)
    async with session.get(f"{gw.url}/get") as response:
        assert forwarded(await response.json(), "X-Forwarded-Proto") == ["http"]


async def test_websocket_over_tls(start_gateway: StartGateway, tls_files: TlsFiles) -> None:
    gw = await start_gateway(tls=tls_files.config())
    wss = f"wss://127.0.0.1:{gw.server.proxy_port}/ws"
    async with (
        asyncio.timeout(GUARD_SECONDS),
        aiohttp.ClientSession() as session,
        session.ws_connect(wss, protocols=("chat",), ssl=tls_files.client_context()) as ws,
    ):
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert await ws.receive_str() == "echo:hello"
        await ws.send_bytes(b"\x00tls")
        assert await ws.receive_bytes() == b"slt\x00"
        await ws.send_str("close")
        message = await ws.receive()
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 4001, "bye")


# --------------------------------------------------------------------------- reload


def serve_pair(tls_files: TlsFiles, config_dir: Path, name: str) -> dict[str, str]:
    """Copy pair ``name`` to fixed names in ``config_dir`` (as a renewed
    certificate lands: same paths, new files); the ``tls`` section for them."""
    cert, key = config_dir / "live.crt", config_dir / "live.key"
    shutil.copyfile(tls_files.cert(name), cert)
    shutil.copyfile(tls_files.key(name), key)
    return {"cert": str(cert), "key": str(key)}


def rewrite(gw: RunningGateway, **overrides: Any) -> None:
    """The running in-process gateway's file, with ``overrides`` at the top
    (None: the key removed)."""
    assert gw.config_path is not None
    config = yaml.safe_load(gw.config_path.read_text())
    config.update(overrides)
    for key in [key for key, value in overrides.items() if value is None]:
        del config[key]
    gw.config_path.write_text(yaml.safe_dump(config))


async def test_reload_serves_the_new_certificate_to_new_connections_only(
    start_gateway: StartGateway, tls_files: TlsFiles, tmp_path: Path
) -> None:
    gw = await start_gateway(tls=serve_pair(tls_files, tmp_path, "a"))
    port = gw.server.proxy_port
    async with tls_stream(port, alpn_client(tls_files)) as (reader, writer):
        assert peer_fingerprint(writer) == tls_files.fingerprint("a")
        assert await get_on(reader, writer, "/before") == 200

        serve_pair(tls_files, tmp_path, "b")  # the same paths, read again
        assert gw.server.reload() is True

        async with tls_stream(port, alpn_client(tls_files)) as (new_reader, new_writer):
            assert peer_fingerprint(new_writer) == tls_files.fingerprint("b")
            assert new_writer.get_extra_info("ssl_object").selected_alpn_protocol() == (
                "http/1.1"
            )
            assert await get_on(new_reader, new_writer, "/new") == 200
        # The connection opened before keeps its certificate and serves on.
        assert await get_on(reader, writer, "/after") == 200
        assert await get_on(reader, writer, "/after") == 200  # still alive
        assert peer_fingerprint(writer) == tls_files.fingerprint("a")
    assert gw.metric("gateway_config_reloads_total", {"result": "success"}) == 1
    assert gw.metric("gateway_config_reloads_total", {"result": "failure"}) == 0

    # New paths in the file are followed too.
    rewrite(gw, tls=tls_files.config("a"))
    assert gw.server.reload() is True
    assert await new_connection_fingerprint(port, tls_files) == tls_files.fingerprint("a")


async def test_a_bad_pair_on_reload_is_refused_and_the_old_one_serves(
    start_gateway: StartGateway,
    tls_files: TlsFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await start_gateway(tls=serve_pair(tls_files, tmp_path, "a"))
    port = gw.server.proxy_port
    shutil.copyfile(tls_files.key("b"), tmp_path / "live.key")  # not a.crt's key
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert gw.server.reload() is False
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refused) == 1, refused
    assert refused[0].startswith(f"reload rejected: {gw.config_path}:")
    assert "tls.key: " in refused[0]
    assert "is not the private key of the certificate in" in refused[0]
    assert gw.metric("gateway_config_reloads_total", {"result": "failure"}) == 1
    assert gw.metric("gateway_config_reloads_total", {"result": "success"}) == 0
    assert await new_connection_fingerprint(port, tls_files) == tls_files.fingerprint("a")

    # Files that change between the check and the load: the listener's own
    # reload refuses them and nothing changes either.
    assert gw.server.tls is not None
    with pytest.raises(TlsPairError):
        gw.server.tls.reload(TlsConfig(str(tls_files.cert("a")), str(tls_files.key("b"))))
    assert await new_connection_fingerprint(port, tls_files) == tls_files.fingerprint("a")
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + "/x", ssl=tls_files.client_context()) as response,
    ):
        assert response.status == 200


@pytest.mark.parametrize("started_with_tls", [True, False], ids=["tls-off", "tls-on"])
async def test_turning_tls_on_or_off_by_reload_needs_a_restart(
    start_gateway: StartGateway,
    tls_files: TlsFiles,
    caplog: pytest.LogCaptureFixture,
    started_with_tls: bool,
) -> None:
    gw = await start_gateway(**({"tls": tls_files.config()} if started_with_tls else {}))
    rewrite(gw, tls=None if started_with_tls else tls_files.config())
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert gw.server.reload() is True
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    change = "removed" if started_with_tls else "added"
    assert warned == [
        f"reload: tls {change}; turning TLS on or off takes effect only after a restart"
    ]
    # Still served as it was started.
    scheme = "https" if started_with_tls else "http"
    async with aiohttp.ClientSession() as session:
        url = f"{scheme}://127.0.0.1:{gw.server.proxy_port}/x"
        context = tls_files.client_context() if started_with_tls else None
        async with session.get(url, ssl=context or True) as response:
            assert response.status == 200
    # A later reload of the same file does not touch TLS either.
    assert gw.server.reload() is True


# --------------------------------------------------------------------------- refused


async def test_plain_http_and_failed_handshakes_are_closed_quietly_and_counted(
    start_gateway: StartGateway, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(tls=tls_files.config())
    port = gw.server.proxy_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(build_request("GET", "/"))
    async with asyncio.timeout(GUARD_SECONDS):
        assert await reader.read() == b""  # closed, nothing answered
    writer.close()

    # A client that does not trust the certificate, one that speaks TLS 1.1 at most.
    code, _out, err = await curl(f"https://127.0.0.1:{port}/")
    assert code != 0
    assert "certificate" in err
    code, _out, err = await curl("--insecure", "--tls-max", "1.1", f"https://127.0.0.1:{port}/")
    assert code != 0

    # A client that connects and leaves (a TCP health check): not a failure.
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    await writer.wait_closed()

    rejected = "gateway_rejected_requests_total"
    await poll(
        lambda: gw.metric(rejected, {"reason": "tls_handshake"}) == 2,
        lambda: f"tls_handshake: {gw.metric(rejected, {'reason': 'tls_handshake'})}",
        attempts=100,
    )
    assert gw.metric(rejected, {"reason": "plain_http"}) == 1
    assert noisy(caplog) == []
    said = [r.getMessage() for r in caplog.records if r.name == "gateway.connection"]
    assert "TLS handshake failed: HTTP_REQUEST (plain HTTP sent to the TLS port)" in said
    # A request over TLS afterwards is not affected.
    code, _out, err = await curl("--cacert", str(tls_files.ca), f"{gw.url}/x")
    assert code == 0, err
    assert gw.metric("gateway_requests_total", {"route": "default", "decision": "allowed"}) == 1
    # Still 2 (no count for the connection that left), and nothing logged.
    assert gw.metric(rejected, {"reason": "tls_handshake"}) == 2
    assert noisy(caplog) == []


def _send_a_forged_record(port: int, context: ssl.SSLContext) -> bytes:
    """Handshake, then a record that is not the session's (written under the
    TLS layer): what the client reads before the gateway closes."""
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=GUARD_SECONDS) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        socket.socket.sendall(tls, b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        try:
            return tls.recv(1024)
        except (ssl.SSLError, OSError):
            return b""


async def test_a_forged_record_after_the_handshake_closes_quietly(
    start_gateway: StartGateway, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(tls=tls_files.config())
    port = gw.server.proxy_port
    read = await asyncio.to_thread(_send_a_forged_record, port, tls_files.client_context())
    assert read == b""
    assert noisy(caplog) == []
    code, _out, err = await curl("--cacert", str(tls_files.ca), f"{gw.url}/x")
    assert code == 0, err


async def test_the_handshake_is_bounded_by_header_timeout(
    start_gateway: StartGateway, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """The default (asyncio's 60 s) would outlast GUARD_SECONDS."""
    gw = await start_gateway(tls=tls_files.config(), server={"header_timeout": "200ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.proxy_port)
    writer.write(b"\x16\x03\x01")  # the start of a ClientHello, never finished
    async with asyncio.timeout(GUARD_SECONDS):
        assert await reader.read() == b""
    writer.close()
    assert noisy(caplog) == []


# --------------------------------------------------------------------------- gateway check


@pytest.mark.parametrize(
    ("cert", "key", "problems"),
    [
        pytest.param(
            "missing.crt", "a.key",
            [("tls.cert", 3, "cannot read {dir}/missing.crt: No such file or directory")],
            id="missing-file",
        ),
        pytest.param(
            "garbage.pem", "a.key",
            [("tls.cert", 3, "{dir}/garbage.pem holds no PEM certificate "
              "(-----BEGIN CERTIFICATE-----)")],
            id="bad-pem",
        ),
        pytest.param(
            "a.crt", "b.key",
            [("tls.key", 4, "{dir}/b.key is not the private key of the certificate in "
              "{dir}/a.crt")],
            id="mismatched-key",
        ),
        pytest.param(
            "a.key", "a.crt",
            [("tls.cert", 3, "{dir}/a.key holds a private key, not a PEM certificate "
              "(-----BEGIN CERTIFICATE-----)"),
             ("tls.key", 4, "{dir}/a.crt holds a certificate, not a PEM private key "
              "(-----BEGIN PRIVATE KEY-----)")],
            id="swapped",
        ),
        pytest.param(
            "cut.crt", "a.key",
            [("tls.cert", 3, "certificate 1 of 1 in {dir}/cut.crt is cut short "
              "(no -----END CERTIFICATE----- line)")],
            id="cut-short",
        ),
        pytest.param(
            "a.crt", "encrypted.key",
            [("tls.key", 4, "{dir}/encrypted.key is encrypted; the gateway reads "
              "unencrypted keys only (openssl pkey -in {dir}/encrypted.key -out plain.key, "
              "then restrict who reads it)")],
            id="encrypted-key",
        ),
    ],
)  # fmt: skip
def test_check_reports_each_problem_of_the_pair_at_its_key(
    tmp_path: Path, tls_files: TlsFiles, cert: str, key: str, problems: list[Any]
) -> None:
    for name in ("a", "b"):
        shutil.copyfile(tls_files.cert(name), tmp_path / f"{name}.crt")
        shutil.copyfile(tls_files.key(name), tmp_path / f"{name}.key")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "cut.crt").write_text(tls_files.cert().read_text()[:300])
    encrypted = tmp_path / "encrypted.key"
    result = run_cli_tool(
        "openssl", "pkey", "-in", str(tmp_path / "a.key"), "-aes256",
        "-passout", "pass:secret", "-out", str(encrypted),
    )  # fmt: skip
    assert result == 0
    # Relative names: read from the config file's directory, wherever check runs.
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(
        f'upstream: {{url: "http://127.0.0.1:8000"}}\ntls:\n  cert: {cert}\n  key: {key}\n'
    )
    result_ = run_cli("check", "--config", str(config_path))
    assert result_.returncode == 2, result_.stdout + result_.stderr
    assert "Traceback" not in result_.stderr
    lines = [PROBLEM_LINE.match(line) for line in result_.stderr.splitlines()[:-1]]
    found = [
        (m["key"], int(m["line"]), int(m["col"]), m["msg"]) for m in lines if m is not None
    ]
    expected = [
        # The value's place: after "  cert: " and "  key: ".
        (k, line, 9 if k == "tls.cert" else 8, message.format(dir=tmp_path))
        for k, line, message in problems
    ]
    assert found == expected, result_.stderr
    assert all(m is not None and m["path"] == str(config_path) for m in lines)


def run_cli_tool(name: str, *args: str) -> int:
    return subprocess.run([tool(name), *args], capture_output=True, timeout=30).returncode


def test_check_accepts_a_good_pair_and_run_refuses_a_bad_one(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "upstream": {"url": "http://127.0.0.1:8000"},
        "tls": tls_files.config(),
    }
    config_path = write_config(tmp_path / "good.yaml", config)
    result = run_cli("check", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    write_config(config_path, {**config, "tls": {"cert": str(tls_files.cert()), "kee": "x"}})
    result = run_cli("run", "--config", str(config_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    keys = [m["key"] for line in result.stderr.splitlines() if (m := PROBLEM_LINE.match(line))]
    assert keys == ["tls.key", "tls.kee"]


# ------------------------------------------------------------------ gateway run (uvloop)


@contextlib.asynccontextmanager
async def tls_gateway_process(
    tmp_path: Path, upstream: TestServer, tls: dict[str, str]
) -> AsyncIterator[GatewayProcess]:
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "upstream": {"url": base_url(upstream), "read_timeout": "10s"},
        "limits": {"default": bucket(100)},
        "access_log": {"path": str(tmp_path / "access.log")},
        "drain_timeout": "5s",
        "tls": tls,
    }
    config_path = write_config(tmp_path / "gateway.yaml", config)
    output_path = tmp_path / "gateway.out"
    with output_path.open("wb") as output:
        async with gateway_run(config_path, stdout=output, stderr=output) as process:
            gw = GatewayProcess.of(process, config_path, config, output_path)

            async def healthy() -> bool:
                assert process.returncode is None, gw.output()
                return await gw.status("/readyz") == 200

            await poll(healthy, "never ready", seconds=GUARD_SECONDS)
            yield gw


async def test_gateway_run_serves_tls_reloads_and_drains(
    tmp_path: Path, upstream: TestServer, tls_files: TlsFiles
) -> None:
    async with tls_gateway_process(
        tmp_path, upstream, serve_pair(tls_files, tmp_path, "a")
    ) as gw:
        https = gw.proxy.replace("http://", "https://")
        port = int(gw.config["listen"].rpartition(":")[2])
        code, out, err = await curl("--cacert", str(tls_files.ca), f"{https}/get")
        assert code == 0, err
        assert forwarded(_json(out), "X-Forwarded-Proto") == ["https"]
        code, out, err = await curl("--cacert", str(tls_files.ca), "-d", "a=1", f"{https}/p")
        assert code == 0, err
        assert forwarded(_json(out), "X-Forwarded-Proto") == ["https"]
        # Plain HTTP to the TLS port: closed, counted, not logged.
        code, _out, _err = await curl(f"{gw.proxy}/plain")
        assert code == 52  # curl: empty reply from server

        async with tls_stream(port, tls_files.client_context()) as (reader, writer):
            assert peer_fingerprint(writer) == tls_files.fingerprint("a")
            serve_pair(tls_files, tmp_path, "b")
            gw.process.send_signal(signal.SIGHUP)
            await poll(
                lambda: "reload: new TLS connections get" in gw.output(),
                lambda: f"no reload:\n{gw.output()}",
                seconds=GUARD_SECONDS,
            )
            assert await new_connection_fingerprint(port, tls_files) == tls_files.fingerprint(
                "b"
            )
            assert await get_on(reader, writer, "/kept") == 200

            # A slow request in flight over TLS when SIGTERM comes: it finishes.
            async with aiohttp.ClientSession() as session:
                slow = asyncio.create_task(
                    fetch_text(session, f"{https}/slow?delay=0.5", tls_files)
                )
                await poll(
                    lambda: "/slow?delay=0.5" in upstream.app[HITS],
                    "the slow request never reached the upstream",
                    seconds=GUARD_SECONDS,
                )
                gw.process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(slow, GUARD_SECONDS) == (200, "slow")
            async with asyncio.timeout(GUARD_SECONDS):
                assert await reader.read() == b""  # the idle connection was closed
        assert await asyncio.wait_for(gw.process.wait(), GUARD_SECONDS) == 0
    output = gw.output()
    assert "Traceback" not in output
    assert " ERROR " not in output, output
    assert " WARNING " not in output, output
    assert "drain" in output


async def fetch_text(
    session: aiohttp.ClientSession, url: str, tls_files: TlsFiles
) -> tuple[int, str]:
    async with session.get(url, ssl=tls_files.client_context()) as response:
        return response.status, await response.text()


async def test_two_workers_serve_tls_and_both_reload_the_certificate(
    tmp_path: Path, upstream: TestServer, redis_server: RedisServer, tls_files: TlsFiles
) -> None:
    config = workers_base_config(
        upstream, redis_server, tmp_path, tls=serve_pair(tls_files, tmp_path, "a")
    )
    port = int(config["listen"].rpartition(":")[2])
    async with running_gateway(tmp_path, config) as gw:
        workers = children(gw.process.pid)
        assert len(workers) == 2
        for worker in sorted(workers):
            with only_serving(gw.process.pid, worker, workers):
                fingerprint = await new_connection_fingerprint(port, tls_files)
                assert fingerprint == tls_files.fingerprint("a")
        serve_pair(tls_files, tmp_path, "b")
        gw.process.send_signal(signal.SIGHUP)
        await poll(
            lambda: gw.output().count("reload: new TLS connections get") == 2,
            lambda: f"not both workers reloaded:\n{gw.output()}",
            seconds=GUARD_SECONDS,
        )
        for worker in sorted(workers):
            with only_serving(gw.process.pid, worker, workers):
                fingerprint = await new_connection_fingerprint(port, tls_files)
                assert fingerprint == tls_files.fingerprint("b")
                code, out, err = await curl(
                    "--cacert", str(tls_files.ca), f"https://127.0.0.1:{port}/w"
                )
                assert code == 0, err
                assert forwarded(_json(out), "X-Forwarded-Proto") == ["https"]
        # Plain HTTP to the shared TLS port: counted in the supervisor's sum.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(build_request("GET", "/"))
        async with asyncio.timeout(GUARD_SECONDS):
            assert await reader.read() == b""
        writer.close()

        # (workers copy their request counts into the summed files once a second)
        async def counted() -> bool:
            return await gw.metric("gateway_rejected_requests_total", reason="plain_http") == 1

        await poll(counted, "plain HTTP not counted in the supervisor's sum", seconds=5)
        assert await gw.metric("gateway_config_reloads_total", result="success") == 1
    assert "Traceback" not in gw.output()
