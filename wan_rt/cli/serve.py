"""`wan-rt serve`: the OpenAI-compatible video API, a durable job queue and a web page."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket

from wan_rt.cli.plan_flags import add_plan_arguments, plan_from_args

DEFAULT_DATA_DIR = "serve-data"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible video API and web page")
    p.add_argument("--model", default=None,
                   help="checkpoint folder or preset name; default: the model of --engines-dir, else ./engines "
                        "if built, else the embedded tiny preset")
    p.add_argument("--engines-dir", default=None, help="serve the engines built there by `wan-rt build`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback needs --api-key")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="job store (SQLite), uploads and videos")
    p.add_argument("--devices", default="cpu",
                   help="one worker process per entry: cpu, or cuda:0,cuda:1,... (cpu,cpu: two CPU workers); "
                        "with a parallel plan, one worker group per plan-size entries")
    p.add_argument("--max-queue", type=int, default=64, help="waiting jobs before new ones get 429")
    p.add_argument("--api-key", default=None,  # not the key itself: --help prints defaults
                   help="clients must send 'Authorization: Bearer KEY'; default: $WAN_RT_API_KEY, else none")
    p.add_argument("--store", default=None,
                   help="postgresql://... to share one queue between services (default: SQLite in --data-dir)")
    p.add_argument("--storage", default=None, metavar="s3://BUCKET/PREFIX",
                   help="keep uploads and videos in this S3-compatible bucket, so services on one --store serve "
                        "each other's videos (credentials: the usual AWS_* variables; default: --data-dir)")
    p.add_argument("--s3-endpoint-url", default=None,
                   help="the S3 API's address for MinIO, R2, GCS... (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--presign", action="store_true",
                   help="answer a content request with a redirect to a presigned bucket URL instead of streaming it")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="on SIGTERM/SIGINT, let a running job finish for this long before handing it back to the "
                        "queue (a second signal stops at once)")
    p.add_argument("--lease-timeout", type=float, default=30.0, metavar="S",
                   help="a running job whose worker has not renewed its lease for this long (its machine died) "
                        "goes back to the queue")
    p.add_argument("--retention-hours", type=float, default=24.0,
                   help="remove a video's files this long after it finished (0: keep them)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="runs of a job whose worker died before the job fails")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (image upload)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (info: one line per request)")
    par = add_plan_arguments(p, "worker groups (each job over several devices; README \"Multi-GPU\")")
    par.add_argument("--group-timeout", type=float, default=None, metavar="S",
                     help="seconds a worker group's collective may wait for a slow rank before the group counts "
                          "as hung and restarts (None: the service's 300)")


def run(args: argparse.Namespace) -> int:
    from wan_rt.cli import UsageError

    devices = _parse_devices(args.devices, UsageError)
    if args.api_key is None:
        args.api_key = os.environ.get("WAN_RT_API_KEY") or None
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty")
    if not _is_loopback(args.host) and not args.api_key:
        raise UsageError(f"refusing to serve on {args.host} without an API key: pass --api-key or set "
                         "WAN_RT_API_KEY (or listen on 127.0.0.1)")
    for flag, value, least in (("--max-queue", args.max_queue, 1), ("--max-attempts", args.max_attempts, 1)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}; got {value}")
    if args.max_upload_mb <= 0:
        raise UsageError(f"--max-upload-mb must be > 0; got {args.max_upload_mb:g}")
    if args.group_timeout is not None and args.group_timeout <= 0:
        raise UsageError(f"--group-timeout must be > 0; got {args.group_timeout:g}")
    if args.drain_timeout < 0:
        raise UsageError(f"--drain-timeout must be >= 0; got {args.drain_timeout:g}")
    if args.lease_timeout <= 0:
        raise UsageError(f"--lease-timeout must be > 0; got {args.lease_timeout:g}")
    storage = _storage_config(args, UsageError)

    import uvicorn

    from wan_rt.cli.build import built_default_engines
    from wan_rt.service.http import create_app
    from wan_rt.service.server import DrainingServer
    from wan_rt.service.service import DataDirBusy, VideoService
    from wan_rt.service.storage import StorageError

    retention = args.retention_hours * 3600 if args.retention_hours > 0 else None
    plan = plan_from_args(args)
    if plan is not None and args.group_timeout is not None:
        plan = dataclasses.replace(plan, timeout_s=args.group_timeout)
    engines_dir = args.engines_dir or (built_default_engines() if args.model is None else None)
    # Checks the model and the parallel plan against the devices; starts nothing yet.
    service = VideoService(args.model, engines_dir=engines_dir, devices=devices, data_dir=args.data_dir,
                           store=args.store, max_queue=args.max_queue, retention_s=retention,
                           max_attempts=args.max_attempts, lease_s=args.lease_timeout, parallel=plan,
                           storage=storage)
    try:  # listen before the workers start: a port in use is reported before any model loads
        sock = _listen(args.host, args.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    try:
        service.start()
    except (DataDirBusy, ConnectionError, StorageError) as exc:
        sock.close()
        raise UsageError(str(exc)) from None
    try:
        app = create_app(service, api_key=args.api_key, max_upload_bytes=int(args.max_upload_mb * 2**20))
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        workers = (f"{len(devices)} worker(s)" if service.plan is None
                   else f"{len(service.groups)} worker group(s) of {service.plan.describe()}")
        videos = f"; videos in {args.storage}" if args.storage else ""
        print(f"wan-rt serve: {service.model.id} ({service.model.backend}) on {url} with {workers} on "
              f"{','.join(devices)}; data in {args.data_dir}{videos}", flush=True)
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        DrainingServer(config, service, args.drain_timeout).run(sockets=[sock])
    finally:
        service.close()
    return 0


def _storage_config(args: argparse.Namespace, error):
    from wan_rt.service.storage import StorageConfig

    if args.storage is None:
        for flag, given in (("--s3-endpoint-url", args.s3_endpoint_url), ("--presign", args.presign)):
            if given:
                raise error(f"{flag} needs --storage s3://bucket/prefix")
        return None
    try:
        return StorageConfig(args.storage, endpoint_url=args.s3_endpoint_url, presign=args.presign)
    except ValueError as exc:
        raise error(f"--storage: {exc}") from None


def _parse_devices(text: str, error) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise error("--devices is empty; e.g. cpu or cuda:0,cuda:1")
    for device in devices:
        if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
            raise error(f"--devices: {device!r} is not cpu, cuda or cuda:N")
    if any(d.startswith("cuda") for d in devices):
        import torch

        if not torch.cuda.is_available():
            raise error("--devices asks for CUDA but torch sees no CUDA device")
        count = torch.cuda.device_count()
        for device in devices:
            if device.startswith("cuda:") and int(device[5:]) >= count:
                raise error(f"--devices: {device} does not exist ({count} CUDA device(s))")
    return devices


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose protocol is IPPROTO_TCP: asyncio sets TCP_NODELAY only on
    connections from such a socket (socket.create_server's protocol 0 would leave Nagle on, and
    every keep-alive response would wait ~40 ms for the client's delayed ACK)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
