"""A real S3-protocol server for the tests: moto in server mode on 127.0.0.1,
spoken to over HTTP, with IAM authentication on (so wrong credentials are
rejected as AWS would), and a TCP relay in front of it that a test can cut
mid-upload (the endpoint dying while an object is being written)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

POLICY = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str
    proc: subprocess.Popen

    def store(self, **over) -> dict:
        """A ``store`` config for gdm-ray pointing at this server."""
        return {
            "endpoint_url": self.endpoint,
            "region": "us-east-1",
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "connect_timeout": 2,
            "read_timeout": 10,
            "retries": 0,
            **over,
        }

    def overrides(self, endpoint: str | None = None) -> list[str]:
        s = self.store()
        return [
            f"store.endpoint_url={endpoint or self.endpoint}",
            "store.region=us-east-1",
            f"store.access_key_id={s['access_key_id']}",
            f"store.secret_access_key={s['secret_access_key']}",
            "store.retries=0",
            "store.connect_timeout=2",
        ]

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def upload_tree(self, folder: Path, url: str) -> None:
        """Every file under ``folder`` to ``url`` (s3://bucket/prefix), keyed by its relative path, through gdm-ray's client."""
        from gdm_ray.store.s3 import S3

        s3 = S3(self.store())
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                s3.put_file(f"{url.rstrip('/')}/{p.relative_to(folder).as_posix()}", p)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_s3_server(log: Path) -> S3Server:
    """Start moto_server; the first 3 requests (IAM user, its policy, its key) go
    unauthenticated, everything after must be signed with that key."""
    import boto3

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start; see {log}") from None
            time.sleep(0.2)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="gdm")
    iam.put_user_policy(UserName="gdm", PolicyName="all", PolicyDocument=POLICY)
    key = iam.create_access_key(UserName="gdm")["AccessKey"]
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], proc)


class Relay:
    """A TCP relay to ``target_port``; ``cut_after(n)`` drops every connection
    (and stops listening) once n more bytes have gone client -> server."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.budget: int | None = None
        self.cut = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, nbytes: int) -> None:
        self.budget = nbytes

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while not self.cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if upload and self.budget is not None:
                    self.budget -= len(data)
                    if self.budget <= 0:
                        self.close()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """The endpoint goes away: live connections reset, new ones refused."""
        self.cut.set()
        with self.lock:
            for s in [self.sock, *self.conns]:
                try:
                    s.close()
                except OSError:
                    pass
