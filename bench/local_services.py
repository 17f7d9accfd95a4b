"""Private stand-ins for a deployment's shared services, on this machine only: a PostgreSQL server
on a unix socket in a temp dir (the job queue) and moto's S3 server on a free 127.0.0.1 port (the
bucket). Used by bench/serve.py and by the tests (tests/conftest.py loads this file by path).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

# What the services' boto3 reads: moto takes any credentials.
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Unavailable(RuntimeError):
    """This machine cannot run the service (a missing package); the reason in one line."""


def _postgres_bin() -> str | None:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.isfile(os.path.join(folder, "initdb")):
            return folder
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@contextlib.contextmanager
def private_postgres() -> Iterator[str]:
    """A fresh PostgreSQL server (trust auth, no TCP), stopped and removed at the end; -> its URL."""
    bindir = _postgres_bin()
    if bindir is None:
        raise Unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="wan_rt_pg_"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            shutil.rmtree(root, ignore_errors=True)
            raise Unavailable("running as root and there is no 'postgres' user (or runuser) to start PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, log = root / "data", root / "log"
    try:
        subprocess.run([*as_user, f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync",
                        "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        options = f"-k {root} -c listen_addresses='' -F -p 5432"
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-o", options, "-l", str(log), "-w", "-t",
                        "60", "start"], check=True, capture_output=True, timeout=90)
        yield f"postgresql:///postgres?host={root}&port=5432&user=postgres"
    finally:
        if data.exists():
            subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "-t", "30",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def new_database(url: str, name: str) -> str:
    """A new, empty database on the server of `url` (postgresql:///postgres?...); -> its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.replace("postgresql:///postgres?", f"postgresql:///{name}?", 1)


@contextlib.contextmanager
def moto_s3(*buckets: str) -> Iterator[str]:
    """moto's S3 server on a free loopback port in this process, with `buckets` made; -> its
    endpoint URL. Clients need MOTO_ENV's credentials (any would do; boto3 wants some)."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise Unavailable("moto's S3 server needs boto3 and moto[server]: pip install boto3 'moto[server]'") from None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://127.0.0.1:%d" % server.get_host_and_port()[1]
        client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in MOTO_ENV.items()
                                                            if k != "AWS_DEFAULT_REGION"},
                              region_name=MOTO_ENV["AWS_DEFAULT_REGION"])
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
