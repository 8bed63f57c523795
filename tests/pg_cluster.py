"""A throw-away PostgreSQL cluster for tests: initdb in a temp dir, listening only on a unix socket there.

No TCP port (nothing to clash with other test runs), trust authentication (only the socket's directory
reaches it), fsync off (a test cluster need not survive power loss). initdb and postgres refuse to run as
root, so under root the cluster runs as the `postgres` system user (Debian's package creates it), or as
`nobody`, through runuser; the directory is handed to that user. The tests connect as the cluster's
superuser role `openr2` over the socket, whoever they run as.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

SUPERUSER = "openr2"


def find_bin_dir() -> str | None:
    """The directory of PostgreSQL's initdb and pg_ctl (on PATH, or Debian's /usr/lib/postgresql/N/bin)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(versions[-1]) if versions else None


def _run_as() -> str | None:
    """The unprivileged user to run the cluster as when we are root (None: run it as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root with neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")


class Cluster:
    def __init__(self, bin_dir: str):
        self.bin_dir = bin_dir
        self.user = _run_as()
        # short and in /tmp: a unix socket path must fit in ~107 bytes
        self.dir = tempfile.mkdtemp(prefix="openr2-pg-", dir="/tmp")
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self._started = False

    def _cmd(self, *args: str) -> list[str]:
        cmd = [os.path.join(self.bin_dir, args[0]), *args[1:]]
        return ["runuser", "-u", self.user, "--", *cmd] if self.user else cmd

    def start(self) -> Cluster:
        def run(*args):
            proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, cwd=self.dir, timeout=120)
            if proc.returncode != 0:
                log = open(os.path.join(self.dir, "log")).read()[-2000:] if os.path.exists(
                    os.path.join(self.dir, "log")) else ""
                raise RuntimeError(f"{' '.join(args[:1])} failed: {proc.stderr[-2000:]}{proc.stdout[-500:]}{log}")

        run("initdb", "-D", self.data, "-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
        run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "60", "-o",
            f"-k {self.dir} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c max_connections=200",
            "start")
        self._started = True
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.dir}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._started:
            subprocess.run(self._cmd("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"),
                           capture_output=True, cwd=self.dir, timeout=60)
            self._started = False
        shutil.rmtree(self.dir, ignore_errors=True)
