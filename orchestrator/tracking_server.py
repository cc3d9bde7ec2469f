"""A tracking server for many concurrent trials: `mlflow server` over PostgreSQL (clusters) or sqlite (a laptop).

Workers on any node log over HTTP to one server, which alone touches the database: no trial ever writes an sqlite
file on a shared filesystem (the source of "database is locked" and corrupt stores in MLflow/Optuna issues).
Everything lives under one folder: ``DIR/postgres`` (data dir, log, a generated password), ``DIR/artifacts``
(served over HTTP with ``--serve-artifacts``, so workers elsewhere upload through the server) and the server's log.

The store is created and migrated by one process before the server starts: several processes creating an
MLflow store at once crash (see shared/docs/environment.md). Both daemons bind 127.0.0.1 unless told otherwise;
PostgreSQL takes TCP from 127.0.0.1 only, with a password, and no Unix socket (its path length limit would
depend on DIR). Processes are started in their own sessions and stopped by their ids, never by name.

    with TrackingServer("runs/tracking", store="postgres") as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
"""
from __future__ import annotations

import errno
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STORES = ("postgres", "sqlite")
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))  # Debian 12's postgresql package
PG_SUPERUSER = "postgres"  # the OS user PostgreSQL runs as when we are root (it refuses to run as root)
DB_NAME = DB_USER = "mlflow"
# One worker is enough for dozens of writers (a log_batch is one short transaction) and starts in ~9 s as
# 2 processes / ~0.5 GiB, against ~13 s and 15 processes / 3 GiB with MLflow's defaults (environment.md).
# The pool must cover every request thread (anyio's default limit: 40): with SQLAlchemy's default of 5 + 10, a busy
# server times requests out after 30 s waiting for a connection, and MLflow answers that with a 400 (BAD_REQUEST)
# that clients do not retry (measured: 23 lost batches in 32 writers x 60 s).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
              "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "40", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "10"}


class TrackingServerError(RuntimeError):
    """The server or its database could not be started; the message says why and where the log is."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cannot_listen(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port (a port in use, an unknown host), or None if it can."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as err:
            return f"--host {host!r}: not a known host or address ({err.strerror})"
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use; choose another with --port"
            return f"cannot listen on {host}:{port} ({err.strerror})"
    return None


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Signal the process group we created for ``proc`` (by its id), then SIGKILL what is left after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True: the group id is the pid we started
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class PostgresDatabase:
    """A private PostgreSQL cluster in ``folder`` (initdb on first use), one database and role for MLflow."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = Path(folder).resolve()
        self.data = self.folder / "data"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.user = PG_SUPERUSER if os.geteuid() == 0 else None  # None: run as ourselves

    @property
    def uri(self) -> str:
        """No password in it (command lines are world-readable): clients read ``pgpass`` via PGPASSFILE."""
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    @property
    def client_env(self) -> dict[str, str]:
        return {"PGPASSFILE": str(self.folder / "mlflow.pgpass")}

    def password(self) -> str:
        return (self.folder / "password").read_text().strip()

    def mlflow_password(self) -> str:
        return (self.folder / "mlflow.pgpass").read_text().strip().rsplit(":", 1)[1]

    def start(self, timeout: float = 60.0) -> None:
        if not (PG_BIN / "postgres").is_file():
            raise TrackingServerError(f"PostgreSQL not found in {PG_BIN} (apt-get install postgresql, or set PG_BIN)")
        self._prepare_folder()
        fresh = not (self.data / "PG_VERSION").is_file()
        if fresh:
            self._initdb()
        log = open(self.folder / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(self.data), "-c", "listen_addresses=127.0.0.1",
             "-c", f"port={self.port}", "-c", "unix_socket_directories=", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as_owner())
        log.close()
        self._wait_ready(timeout)
        self._create_database()

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)  # SIGINT is PostgreSQL's "fast" shutdown: clean, no recovery
        self.proc = None

    def _as_owner(self) -> dict:
        return {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}

    def _prepare_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        if self.user:
            server_dir = self.folder.parent  # ours (the server's own folder): let postgres pass through, not list
            if server_dir.stat().st_uid == os.geteuid():
                server_dir.chmod(server_dir.stat().st_mode | 0o001)
            owner = pwd.getpwnam(self.user)
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._check_reachable(owner)
        password, pgpass = self.folder / "password", self.folder / "mlflow.pgpass"
        if not password.exists():  # the superuser's, for initdb and creating the mlflow role
            password.write_text(secrets.token_hex(16) + "\n")
        if not pgpass.exists():  # the mlflow role's, in libpq's password-file format
            pgpass.write_text(f"127.0.0.1:*:{DB_NAME}:{DB_USER}:{secrets.token_hex(16)}\n")
        for path in (password, pgpass):
            path.chmod(0o600)
        if self.user:
            os.chown(password, owner.pw_uid, owner.pw_gid)

    def _check_reachable(self, owner: pwd.struct_passwd) -> None:
        """The data dir's parents must be enterable by the postgres user; say which one is not."""
        for parent in reversed(self.folder.parents):
            st = parent.stat()
            if not st.st_mode & 0o001 and st.st_uid != owner.pw_uid:
                raise TrackingServerError(
                    f"PostgreSQL runs as user {self.user!r}, which cannot enter {parent} (mode "
                    f"{oct(st.st_mode & 0o777)}); choose a --dir under a folder it can enter, e.g. /var/tmp/...")

    def _initdb(self) -> None:
        result = subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
             f"--pwfile={self.folder / 'password'}", "--encoding=UTF8", "--locale=C.UTF-8"],
            capture_output=True, text=True, **self._as_owner())
        if result.returncode:
            raise TrackingServerError(f"initdb failed: {result.stderr.strip()[-2000:]}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TrackingServerError(f"PostgreSQL exited with code {self.proc.returncode}; "
                                          f"see {self.folder / 'postgres.log'}")
            ready = subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)])
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        self.stop()
        raise TrackingServerError(f"PostgreSQL not ready after {timeout:.0f} s; see {self.folder / 'postgres.log'}")

    def _psql(self, sql: str) -> str:
        result = subprocess.run([str(PG_BIN / "psql"), "-v", "ON_ERROR_STOP=1", "-qtA", "-h", "127.0.0.1",
                                 "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c", sql],
                                capture_output=True, text=True, env={**os.environ, "PGPASSWORD": self.password()})
        if result.returncode:
            raise TrackingServerError(f"PostgreSQL: {sql.split(' PASSWORD')[0]!r} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _create_database(self) -> None:
        """Idempotent, so a start that died half-way is completed by the next one."""
        if not self._psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}'"):
            self._psql(f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{self.mlflow_password()}'")
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"):
            self._psql(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")


def local_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host`` (every interface: the loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def wait_healthy(proc: subprocess.Popen, host: str, port: int, timeout: float) -> str | None:
    """Wait until the mlflow server ``proc`` answers /health on host:port; else say why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode} before answering"
        try:
            with urllib.request.urlopen(f"http://{local_host(host)}:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return f"did not answer on {host}:{port} within {timeout:.0f} s"


class TrackingServer:
    """`mlflow server` with a PostgreSQL or sqlite store under ``folder``. ``port=0`` picks a free port."""

    def __init__(self, folder: str | Path, store: str = "postgres", host: str = "127.0.0.1", port: int = 5000,
                 workers: int = 1, start_timeout: float = 120.0):
        if store not in STORES:
            raise ValueError(f"store: {store!r} is not one of {', '.join(STORES)}")
        self.folder = Path(folder).resolve()
        self.store, self.host, self.workers, self.start_timeout = store, host, workers, start_timeout
        self.port = port or free_port()
        self.database = PostgresDatabase(self.folder / "postgres") if store == "postgres" else None
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """What workers export as MLFLOW_TRACKING_URI (a wildcard bind is reached by this host's name)."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def backend_uri(self) -> str:
        return self.database.uri if self.database else f"sqlite:///{self.folder / 'mlflow.db'}"

    @property
    def env(self) -> dict[str, str]:
        """The environment the server (and anything opening ``backend_uri`` directly) needs."""
        return {**os.environ, **SERVER_ENV, **(self.database.client_env if self.database else {})}

    @property
    def log_path(self) -> Path:
        return self.folder / "mlflow-server.log"

    def start(self) -> "TrackingServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        problem = cannot_listen(self.host, self.port)
        if problem:
            raise TrackingServerError(problem)
        try:
            if self.database:
                self.database.start()
            self.migrate()
            self.start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def migrate(self) -> None:
        """Create or upgrade the store's schema in one process, before any server worker or client opens it."""
        code = ("import sys; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as S; "
                "S(sys.argv[1], sys.argv[2]).engine.dispose()")
        result = subprocess.run([sys.executable, "-c", code, self.backend_uri, "mlflow-artifacts:/"],
                                capture_output=True, text=True, env=self.env)
        if result.returncode:
            raise TrackingServerError(f"migrating the MLflow store failed: {result.stderr.strip()[-2000:]}")

    def start_server(self) -> None:
        artifacts = self.folder / "artifacts"
        artifacts.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                   "--serve-artifacts", "--artifacts-destination", str(artifacts),
                   "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env, cwd=self.folder)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        why_not = wait_healthy(self.proc, self.host, self.port, self.start_timeout)
        if why_not:
            raise TrackingServerError(f"mlflow server {why_not}; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and \
            (self.database is None or (self.database.proc is not None and self.database.proc.poll() is None))

    def pids(self) -> list[int]:
        return [p.pid for p in (self.proc, self.database and self.database.proc) if p is not None]

    def stop_server(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def restart(self, database: bool = False) -> None:
        """Stop and start the server (and PostgreSQL with ``database=True``) on the same port and store."""
        self.stop_server()
        if database and self.database:
            self.database.stop()
            self.database.start()
        self.start_server()

    def stop(self) -> None:
        self.stop_server()
        if self.database:
            self.database.stop()

    def __enter__(self) -> "TrackingServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
