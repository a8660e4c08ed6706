"""A local Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes, the flwr CLI.

This is what the tests use (and what a user can use to try the deployment engine on one machine before
spreading it over several).  Every process is started in its own session (start_new_session=True) so
that stopping it by process group also stops the children Flower spawns (SuperExec, the per-run
ServerApp and per-message ClientApp processes).  Nothing here listens anywhere but 127.0.0.1.

All Flower state goes to a private FLWR_HOME; telemetry and update checks are off; runtime dependency
installation is off, so the app runs on the kseed already importable in this environment.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import kseed

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def flower_bin_dirs() -> list:
    """The program directories of the running interpreter's environment: the directory of
    sys.executable as invoked (a virtual environment's bin, not resolved through its symlink) and the
    install scheme's scripts directory.  Flower's programs (flower-superlink, flower-supernode, the
    flower-superexec they start, flwr-serverapp, flwr-clientapp, flwr-simulation, flwr) are taken
    from there, so an environment works without being activated."""
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    return list(dict.fromkeys(str(d) for d in dirs if d.is_dir()))


def _executable(name: str) -> str:
    """A Flower program from this interpreter's environment (flower_bin_dirs()), else from PATH."""
    for d in flower_bin_dirs():
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH: install the "
                                "Flower extra (pip install 'kseed[flower]')")
    return found


def _import_roots() -> list:
    """Directories that make `kseed` and `kseed_kernels` importable the way they are importable here."""
    roots = []
    import kseed_kernels
    for mod in (kseed, kseed_kernels):
        root = str(Path(list(mod.__path__)[0]).resolve().parent)
        if root not in roots:
            roots.append(root)
    return roots


def flower_env(flwr_home, extra: Optional[dict] = None) -> dict:
    """The environment for every Flower process of a deployment."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "COLUMNS": "200",
    })
    paths = _import_roots() + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # Flower starts its own programs by name (the SuperLink and SuperNodes start flower-superexec,
    # which starts flwr-serverapp / flwr-clientapp / flwr-simulation): find them in this environment.
    bins = flower_bin_dirs() + [p for p in env.get("PATH", "").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join(dict.fromkeys(bins))
    if extra:
        env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------- TLS and keys

@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path


def make_certificates(directory, host: str = HOST) -> Certificates:
    """A throw-away CA and a server certificate for `host` (SAN: IP and localhost), made with the
    openssl commands the README gives (or the cryptography package where openssl is missing)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    openssl = shutil.which("openssl")
    if openssl is None:
        return _make_certificates_py(d, host)

    def run(*args):
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=kseed-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", f"/CN={host}")
    (d / "server.ext").write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return Certificates(d / "ca.pem", d / "server.pem", d / "server.key")


def _make_certificates_py(d: Path, host: str) -> Certificates:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def key_pem(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kseed-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "ca.key").write_bytes(key_pem(ca_key))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key_pem(key))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Certificates(d / "ca.pem", d / "server.pem", d / "server.key")


def make_node_key(path) -> tuple:
    """An ECDSA P-384 key pair for SuperNode authentication, as `ssh-keygen -t ecdsa -b 384` makes it
    (or the cryptography package where ssh-keygen is missing): (private key path, public key path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pub = Path(str(path) + ".pub")
    keygen = shutil.which("ssh-keygen")
    if keygen is not None:
        subprocess.run([keygen, "-t", "ecdsa", "-b", "384", "-N", "", "-q", "-f", str(path)], check=True,
                       capture_output=True)
        return path, pub
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return path, pub


# ---------------------------------------------------------------------------------------------- processes

@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session=True: the process leads its own group

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _group_members(pgid: int) -> list:
    """Live (non-zombie) processes of a process group, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        state, pg = rest[0], int(rest[2])
        if pg == pgid and state != "Z":
            out.append(int(entry))
    return out


def marked_processes(flwr_home) -> list:
    """Live processes whose environment has FLWR_HOME=flwr_home: everything a deployment started,
    including what Flower detaches into new sessions (the SuperLink starts its SuperExec that way)."""
    marker = b"FLWR_HOME=" + os.fsencode(str(flwr_home)) + b"\0"
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2:].split()[0] != "Z" and (b"\0" + env).find(b"\0" + marker) >= 0:
            out.append(int(entry))
    return out


def stop_marked(flwr_home, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every live process started with FLWR_HOME=flwr_home (marked_processes):
    what is left of a deployment after its own process groups are stopped, or of a
    `python -m kseed.flower local/simulation --workdir DIR` that was killed (FLWR_HOME = DIR/flwr-home)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked_processes(flwr_home)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + timeout
        while pids and time.monotonic() < end:
            time.sleep(0.1)
            pids = marked_processes(flwr_home)
        if not pids:
            return


def group_processes(pgid: int, pattern: str) -> list:
    """Pids in a process group whose command line contains `pattern`."""
    found = []
    for pid in _group_members(pgid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern in cmd:
            found.append(pid)
    return found


def stop_group(proc: Proc, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left; reap the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pgid, sig)
        except ProcessLookupError:
            pass
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.popen.poll() is not None and not _group_members(proc.pgid):
                return
            time.sleep(0.1)
    proc.popen.wait(timeout=timeout)


@dataclass
class Deployment:
    """One SuperLink and its SuperNodes on 127.0.0.1, with a private FLWR_HOME."""
    workdir: Path
    tls: Optional[Certificates] = None
    supernode_auth: bool = False
    simulation: bool = False  # a SuperLink that runs each run on Flower's simulation engine (no SuperNodes)
    connection: str = "kseed-local"
    port: int = 0
    procs: list = field(default_factory=list)
    supernodes: dict = field(default_factory=dict)
    may_exit: set = field(default_factory=set)  # SuperNodes expected to be refused

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.flwr_home)
        self.port = self.port or free_port()
        self.address = f"{HOST}:{self.port}"
        self._write_cli_config()

    # -- configuration -------------------------------------------------------------------------------
    def _write_cli_config(self) -> None:
        lines = ["[superlink]", f'default = "{self.connection}"', "",
                 f"[superlink.{self.connection}]", f'address = "{self.address}"']
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls.ca}"')
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: Sequence[str], env: Optional[dict] = None) -> Proc:
        log = self.logs / f"{name}.log"
        fh = open(log, "wb")
        try:
            popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(self.env, **(env or {})), cwd=self.workdir,
                                     start_new_session=True)
        finally:
            fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    # -- SuperLink -----------------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> Proc:
        argv = [_executable("flower-superlink"), "--host", HOST, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.server_cert),
                     "--ssl-keyfile", str(self.tls.server_key)]
        if self.supernode_auth:
            argv.append("--enable-supernode-auth")
        if self.simulation:
            argv.append("--simulation")
        proc = self._spawn("superlink", argv)
        self._wait_health(proc, timeout)
        return proc

    def _wait_health(self, proc: Proc, timeout: float) -> None:
        scheme = "http" if self.tls is None else "https"
        ctx = None if self.tls is None else ssl.create_default_context(cafile=str(self.tls.ca))
        url = f"{scheme}://{self.address}/health"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"SuperLink exited with {proc.popen.returncode}:\n{proc.text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"SuperLink not healthy after {timeout}s:\n{proc.text()[-3000:]}")

    # -- SuperNodes ----------------------------------------------------------------------------------
    def start_supernode(self, partition_id: int, num_partitions: int, *, name: Optional[str] = None,
                        private_key=None, max_wait_time: float = 60.0, node_config: str = "",
                        threads: Optional[int] = None, may_exit: bool = False) -> Proc:
        """Start a SuperNode holding `partition_id` of `num_partitions`; `threads`: its ClientApps'
        thread budget (node config num-threads, and OMP/MKL_NUM_THREADS in its environment; None:
        torch's and OpenMP's defaults); `may_exit`: it is expected to be refused (wait_nodes does not
        fail when it exits)."""
        name = name or f"supernode-{partition_id}"
        if may_exit:
            self.may_exit.add(name)
        conf = f"partition-id={partition_id} num-partitions={num_partitions}"
        env = None
        if threads is not None:
            from .client_app import THREADS_KEY, thread_env

            conf += f" {THREADS_KEY}={int(threads)}"
            env = thread_env(int(threads))
        argv = [_executable("flower-supernode"), "--superlink", self.address,
                "--host", HOST, "--port", str(free_port()), "--max-wait-time", str(max_wait_time),
                "--node-config", f"{conf} {node_config}".strip()]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.tls.ca)]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        proc = self._spawn(name, argv, env)
        self.supernodes[name] = proc
        return proc

    def online_nodes(self) -> list:
        """Node ids the SuperLink lists as online."""
        res = self.flwr_json("supernode", "ls", self.connection)
        return [n["node-id"] for n in res.get("nodes", []) if n.get("status") == "online"]

    def wait_nodes(self, count: int, timeout: float = 90.0) -> list:
        end = time.monotonic() + timeout
        nodes = []
        while time.monotonic() < end:
            for name, proc in self.supernodes.items():
                if proc.popen.poll() is not None and name not in self.may_exit:
                    raise RuntimeError(f"{name} exited with {proc.popen.returncode}:\n{proc.text()[-3000:]}")
            nodes = self.online_nodes()
            if len(nodes) >= count:
                return nodes
            time.sleep(1.0)
        raise TimeoutError(f"only {len(nodes)} of {count} SuperNodes online after {timeout}s")

    def register_node(self, public_key) -> dict:
        return self.flwr_json("supernode", "register", str(public_key), self.connection)

    # -- flwr CLI ------------------------------------------------------------------------------------
    def flwr(self, *args, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([_executable("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                             text=True, timeout=timeout, start_new_session=True)
        if check and res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} exited with {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def flwr_json(self, *args, timeout: float = 120.0) -> dict:
        res = self.flwr(*args, "--format", "json", timeout=timeout, check=False)
        try:
            return json.loads(res.stdout[res.stdout.find("{"):])
        except ValueError:
            raise RuntimeError(f"flwr {' '.join(args)}: no JSON in output:\n{res.stdout}\n{res.stderr}") from None

    def start_run(self, app_dir, run_config: Optional[dict] = None,
                  federation_config: Optional[dict] = None) -> int:
        """`flwr run` (not streamed): submit the run, return its run id.  `federation_config`: the
        simulation engine's settings (num-supernodes, client-resources-num-cpus, ...-num-gpus, ...)."""
        args = ["run", str(app_dir), self.connection]
        if run_config:
            args += ["--run-config", format_run_config(run_config)]
        if federation_config:
            args += ["--federation-config", format_run_config(federation_config)]
        res = self.flwr_json(*args)
        if not res.get("success"):
            raise RuntimeError(f"flwr run failed: {res}")
        return int(res["run-id"])

    def run_status(self, run_id: int) -> dict:
        res = self.flwr_json("ls", self.connection, "--run-id", str(run_id))
        runs = res.get("runs") or []
        if not res.get("success") or not runs:
            raise RuntimeError(f"flwr ls failed: {res}")
        return runs[0]

    def wait_run(self, run_id: int, timeout: float = 600.0, poll: float = 2.0) -> dict:
        """Poll `flwr ls` until the run is finished; return its record (status e.g. finished:completed)."""
        end = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < end:
            info = self.run_status(run_id)
            if str(info.get("status", "")).startswith("finished"):
                return info
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} not finished after {timeout}s: {info}")

    def run_log(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), self.connection, "--show", check=False, timeout=60).stdout

    # -- teardown ------------------------------------------------------------------------------------
    def stop(self, proc: Proc) -> None:
        stop_group(proc)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every process: each one's process group, then anything else started with this
        deployment's FLWR_HOME (detached children), by pid."""
        for proc in reversed(self.procs):
            stop_group(proc)
        stop_marked(self.flwr_home, timeout)

    def leftover(self) -> list:
        """Live processes left behind: in this deployment's process groups or carrying its FLWR_HOME."""
        pids = {pid for proc in self.procs for pid in _group_members(proc.pgid)}
        return sorted(pids | set(marked_processes(self.flwr_home)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_run_config(config: dict) -> str:
    """A --run-config string: TOML values, strings quoted."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            v = "true" if value else "false"
        elif isinstance(value, (int, float)):
            v = repr(value)
        else:
            v = json.dumps(str(value))
        parts.append(f"{key}={v}")
    return " ".join(parts)
