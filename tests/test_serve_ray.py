"""`mtlm serve --ray`: a real Ray Serve app on 127.0.0.1 (2 replicas of the tiny bundle) answers like `mtlm serve`
(scores within 1e-5, the same 4xx), answers 429 (never 5xx) at 2x its capacity, and leaves no process behind.
`mtlm serve` without --ray never imports ray; --ray without ray installed is a clear error.

The Ray tests skip when ray[serve] is not installed (pip install 'mtlm[ray]')."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import httpx
import pytest

from servers import running_server
from test_serve import TEXTS, bundle  # noqa: F401  (the session's tiny bundle fixture)

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
REPLICAS, MAX_ONGOING = 2, 4
REQUESTS = [
    {"inputs": TEXTS},
    {"inputs": TEXTS[:3], "tasks": ["topic", "sentiment"]},
    {"inputs": [{"text": "the movie was great", "text_pair": "the film was good"}]},
]
BAD = [   # (path, body or raw bytes) that `mtlm serve` refuses with a 4xx
    ("/v1/predict", {"inputs": []}),
    ("/v1/predict", {"inputs": ["fine"], "tasks": ["no-such-task"]}),
    ("/v1/predict", {"inputs": [""]}),
    ("/v1/predict", {"inputs": [3]}),
    ("/v1/predict", {"inputs": ["x"] * 257, "timeout_ms": 600000}),   # a deadline no floor is above, loaded or not
    ("/v1/predict", {"inputs": ["fine"], "timeout_ms": 1}),
    ("/v1/predict", b"{not json"),
    ("/v1/predict", b"x" * (1 << 20 + 1)),
    ("/v1/tasks/no-such-task/predict", {"inputs": ["fine"]}),
    ("/v1/nothing-here", {"inputs": ["fine"]}),
]


def _post(client: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


def _scores(a, b, where: str = "") -> None:
    """Every number in two JSON predictions equal within 1e-5, everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _scores(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _scores(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-5, (where, a, b)
    else:
        assert a == b, (where, a, b)


def _same(detail: str) -> str:
    """A 4xx reason without what each server measures itself (the deadline floors: numbers and tiers)."""
    if detail.startswith("timeout_ms:"):
        detail = detail.split(";")[0]
    return re.sub(r"\d+(\.\d+)?", "N", detail)


def test_serve_without_ray_never_imports_it(bundle):
    """`mtlm serve` (the CLI, the app and a request through it) runs with ray made unimportable."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import asyncio, httpx\n"
            "from mtlm.cli import build_parser\n"
            "from mtlm.serve.process import serve\n"
            "from mtlm.serve import create_app\n"
            f"args = build_parser().parse_args(['serve', {str(bundle)!r}])\n"
            "assert args.ray is False and args.replicas is None\n"
            f"app = create_app({str(bundle)!r})\n"
            "async def main():\n"
            "    async with app.router.lifespan_context(app):\n"
            "        await app.state.service.wait_ready(60)\n"
            "        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url='http://t') as c:\n"
            "            r = await c.post('/v1/predict', json={'inputs': ['fine']})\n"
            "            assert r.status_code == 200, r.text\n"
            "asyncio.run(main())\n"
            "assert 'ray' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr


def test_ray_flag_without_ray_installed_is_a_clear_error(bundle):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from mtlm.cli import main\n"
            f"sys.exit(main(['serve', {str(bundle)!r}, '--ray', '--replicas', '2']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    assert "needs Ray Serve: pip install 'mtlm[ray]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_ray_node_that_fails_to_start_is_a_clear_error(bundle, monkeypatch, capsys):
    """A fresh user's `mtlm serve RUN --ray` on a busy CPU: Ray's local node timed out during startup and the
    command died with Ray's traceback. It is now exit 2 with Ray's reason and what to do."""
    ray = pytest.importorskip("ray")
    from mtlm.cli import main

    def timed_out(*args, **kwargs):
        raise Exception("The current node timed out during startup.")
    monkeypatch.setattr(ray, "init", timed_out)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", str(bundle), "--ray"]) == 2
    err = capsys.readouterr().err
    assert "a local Ray node (127.0.0.1) failed to start: Exception: The current node timed out" in err
    assert "ray start --head" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "2"], "--replicas: Ray Serve flags, add --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], "--replicas and --autoscale: give one"),
    (["--ray", "--workers", "2"], "with --ray use --replicas N"),
])
def test_ray_flags_are_checked(bundle, flags, message):
    from mtlm.cli import main
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["serve", str(bundle), *flags]) == 2
    assert message in err.getvalue()


def test_autoscale_flag_needs_min_max(bundle, capsys):
    from mtlm.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", str(bundle), "--ray", "--autoscale", "3:1"])
    assert "want 0 <= MIN <= MAX" in capsys.readouterr().err


@pytest.fixture(scope="module")
def servers(bundle, tmp_path_factory):
    """{"plain": base URL of `mtlm serve`, "ray": of `mtlm serve --ray` with 2 replicas, "tree": the Ray
    server's processes seen while it ran, "stop": stops both servers}. The batchers wait 300 ms for company,
    so concurrent requests pile up."""
    pytest.importorskip("ray.serve")
    flags = ["--max-wait-ms", "300", "--max-queue", "64"]
    d = tmp_path_factory.mktemp("serve-ray")
    (d / "plain").mkdir()
    (d / "ray").mkdir()
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(running_server(bundle, d / "plain", *flags))
        ray_base = stack.enter_context(running_server(bundle, d / "ray", "--ray", "--replicas", str(REPLICAS),
                                                      "--max-ongoing", str(MAX_ONGOING), *flags, env=RAY_ENV,
                                                      ready_timeout_s=900))    # a local Ray at `nice` under load: minutes
        yield {"plain": plain, "ray": ray_base, "tree": _ray_tree(ray_base), "stop": stack.close,
               "log": d / "ray" / "serve.log"}


def _ray_tree(base: str) -> list:
    """Every process of the server listening at `base` and its descendants (raylet, GCS, workers)."""
    import psutil
    port = int(base.rsplit(":", 1)[1])
    owner = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                 and c.status == psutil.CONN_LISTEN)
    proc = psutil.Process(owner)
    while proc.parent() is not None and "mtlm.cli" not in " ".join(proc.parent().cmdline()):
        proc = proc.parent()
    root = proc.parent() if proc.parent() is not None else proc
    return [root, *root.children(recursive=True)]


def test_ray_answers_like_mtlm_serve(servers):
    plain, ray_base = servers["plain"], servers["ray"]
    with httpx.Client(base_url=plain, timeout=60) as a, httpx.Client(base_url=ray_base, timeout=60) as b:
        for body in REQUESTS:
            ra, rb = a.post("/v1/predict", json=body), b.post("/v1/predict", json=body)
            assert ra.status_code == rb.status_code == 200, rb.text
            _scores(ra.json()["predictions"], rb.json()["predictions"])
        ra, rb = a.post("/v1/tasks/topic/predict", json={"inputs": TEXTS}), b.post("/v1/tasks/topic/predict",
                                                                                   json={"inputs": TEXTS})
        _scores(ra.json()["predictions"], rb.json()["predictions"])
        assert a.get("/v1/tasks").json() == b.get("/v1/tasks").json()
        assert b.get("/ready").status_code == 200
        assert b.post("/v1/predict", json=REQUESTS[0]).json()["timing"]["batch_size"] >= 1


def test_ray_refuses_bad_requests_like_mtlm_serve(servers):
    plain, ray_base = servers["plain"], servers["ray"]
    with httpx.Client(base_url=plain, timeout=60) as a, httpx.Client(base_url=ray_base, timeout=60) as b:
        for path, body in BAD:
            ra, rb = _post(a, path, body), _post(b, path, body)
            assert 400 <= ra.status_code < 500, (path, ra.status_code)
            assert rb.status_code == ra.status_code, (path, body if not isinstance(body, bytes) else body[:20], rb.text)
            assert _same(rb.json()["detail"]) == _same(ra.json()["detail"]), path


def test_ray_answers_429_never_5xx_at_twice_its_capacity(servers):
    """2 x (replicas x max_ongoing) concurrent requests while the batchers wait 300 ms: every answer is 200
    or 429 with Retry-After, and at least the excess over the capacity is refused."""
    ray_base = servers["ray"]
    n = 2 * REPLICAS * MAX_ONGOING

    async def main():
        async with httpx.AsyncClient(base_url=ray_base, timeout=60,
                                     limits=httpx.Limits(max_connections=n)) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json={"inputs": [t]})
                                          for t in (TEXTS * n)[:n]))
    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= n - REPLICAS * MAX_ONGOING, codes
    assert codes.count(200) >= 1, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)


def test_ray_server_stops_every_process_it_started(servers):
    """Runs last in this module (pytest keeps file order): SIGTERM the Ray server, then no process of its
    tree (driver, raylet, GCS, proxy, replicas) is alive."""
    import psutil
    tree = servers["tree"]
    assert len(tree) >= 4, tree           # driver + raylet + GCS + replica workers at least
    servers["stop"]()
    gone, alive = psutil.wait_procs(tree, timeout=30)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, " ".join(p.cmdline())[:120]) for p in alive]


def test_deployment_checks_its_arguments(bundle, tmp_path):
    pytest.importorskip("ray.serve")
    from mtlm.checkpoint import BundleError
    from mtlm.serve.ray import deployment
    with pytest.raises(ValueError, match="autoscale: want MIN:MAX"):
        deployment(bundle, autoscale=(3, 1))
    with pytest.raises(ValueError, match="replicas: want at least 1"):
        deployment(bundle, replicas=0)
    with pytest.raises(BundleError):
        deployment(tmp_path)
    app = deployment(bundle, autoscale=(1, 3))        # a bound application, for serve.run or a Serve config
    assert type(app).__name__ == "Application"


def test_health_check_fails_a_replica_whose_model_failed():
    """Ray calls check_health every 2 s and replaces a replica that raises: one whose model failed to load
    (or whose batching loop died: the same `failed` state) raises with the reason; a ready one does not."""
    pytest.importorskip("ray.serve")
    from mtlm.serve.ray import MtlmReplica
    from mtlm.serve.schemas import ServeSettings
    from mtlm.serve.service import Service

    def broken():
        raise OSError("disk gone")

    async def main():
        service = Service(broken, ServeSettings())
        await service.start()
        await asyncio.wait_for(asyncio.shield(service._load_task), 10)
        return service
    replica = types.SimpleNamespace(service=asyncio.run(main()))    # the replica's state, without Ray's actor
    check_health = MtlmReplica.func_or_class.check_health
    with pytest.raises(RuntimeError, match="disk gone"):
        check_health(replica)
    replica.service.state = "ready"
    check_health(replica)
