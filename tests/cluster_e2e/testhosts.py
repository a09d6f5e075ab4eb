"""Test hosts for ``ray up cluster-local.yaml``: network namespaces that each run their own sshd.

Ray's ``local`` provider reaches these hosts over SSH exactly as it reaches machines on a LAN.
They are not separate machines, though; what differs, and how each host is kept apart:

- Network: each host is a network namespace (``kd-e2e-1`` ...) with one veth link into a bridge
  in this machine's namespace, and an address in 198.18.42.0/24 (198.18.0.0/15 is reserved for
  network tests; the /24 is checked against this machine's addresses and routes first). A LAN
  machine has a default route, and Ray picks the head's address from it; here the default route
  leads to .254, an address nobody holds, so no packet leaves the bridge. /etc/resolv.conf names
  127.0.0.1, so a name lookup fails at once instead of waiting for an unreachable server.
- Processes: ``ray stop`` (the first start command of every node) kills every Ray process it can
  see, so each host has its own PID namespace: it sees only its own processes, and never this
  machine's other Ray clusters. sshd is the namespace's first process; killing it ends the host.
- Files: all hosts share this machine's disk. Node-local paths would collide: ``~/kd-venv``,
  ``~/kd-platform``, ``~/.bashrc``, ``~/mlflow.db`` and ``~/ray_bootstrap_key.pem`` in the SSH
  user's home, and ``/tmp/ray`` (Ray's sessions, the local provider's cluster state). So each
  host has its own mount namespace in which a per-host directory is mounted over the home of the
  SSH user (root) and over /tmp. The rest of the disk (/usr, the repository) stays shared.
- Shared storage: ``/mnt/shared/ray-results`` is one directory mounted on every host, as an NFS
  export at the same path would be on real machines (the ``--storage-path`` of docs/cluster.md).
- Python: a real machine builds ``~/kd-venv`` from scratch. Here the hosts have no route to a
  package index, and a fresh venv costs about 2.5 minutes and 6.5 GB per host, so the test's
  copy of the config adds ``--system-site-packages`` and the hosts' ``python3.11`` is the
  interpreter that runs this test (it holds the project's pinned dependencies; its directory is
  mounted read-only into the per-host home when it lives there). The setup commands still run as
  written: ``pip install`` finds torch satisfied and installs the project editable from each
  host's own ``~/kd-platform``. pip's index is this machine's local one (``file://`` URLs only).

``python tests/cluster_e2e/testhosts.py --clean`` removes what a killed run left behind (the
namespaces and the bridge named ``kd-e2e-*``).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NET = ipaddress.ip_network("198.18.42.0/24")
PREFIX = "kd-e2e"
BRIDGE = f"{PREFIX}-br"
GATEWAY = str(NET[254])  # held by nobody: the hosts' default route leads nowhere
SHARED = "/mnt/shared/ray-results"
SSH_USER = "root"
HOME = Path("/root")
REQUIRED = ("ip", "unshare", "ssh", "ssh-keygen", "rsync")
SSHD = "/usr/sbin/sshd"


def missing_requirements() -> str:
    """Why this machine cannot hold test hosts ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, mounts)"
    if sys.platform != "linux":
        return "needs Linux namespaces"
    absent = [c for c in REQUIRED if shutil.which(c) is None] + ([] if Path(SSHD).exists() else [SSHD])
    if absent:
        return "missing " + ", ".join(absent) + " (Debian: iproute2 openssh-server openssh-client rsync)"
    if sys.prefix != sys.base_prefix:
        return "the hosts' python3.11 is this interpreter, which must not be a virtualenv"
    return ""


def sh(*args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout, **kw)


def _taken_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for a in json.loads(sh("ip", "-4", "-j", "addr").stdout):
        for info in a.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for r in json.loads(sh("ip", "-4", "-j", "route").stdout):
        if r["dst"] != "default":
            nets.append(ipaddress.ip_network(r["dst"], strict=False))
    return nets


def leftovers() -> list[str]:
    """Namespaces and links of an earlier run of this test."""
    names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]
    links = [link["ifname"] for link in json.loads(sh("ip", "-j", "link").stdout)]
    return [n for n in names + links if n.startswith(PREFIX)]


@dataclass
class Host:
    index: int
    ip: str
    root: Path  # its private directories
    proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"{PREFIX}-{self.index}"

    @property
    def home(self) -> Path:
        return self.root / "home"

    def pids(self) -> list[int]:
        """Every process in the host's network namespace (all of them started by this test)."""
        out = sh("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def processes(self, *words: str) -> list[str]:
        """Command lines of the host's processes that contain one of ``words``."""
        found = []
        for pid in self.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(word in cmd for word in words):
                found.append(f"{pid}: {cmd[:160]}")
        return found

    def ray_processes(self) -> list[str]:
        return self.processes("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/autoscaler", "log_monitor",
                              "runtime_env", "ray/_private")


class Lab:
    """``n`` test hosts (the first is the head), removed again on exit, whatever the exit."""

    def __init__(self, n: int = 3, keep: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/var/tmp"))
        self.keep = keep
        self.key = self.dir / "id_ed25519"
        self.hosts = [Host(i, str(NET[10 + i]), self.dir / f"host-{i}") for i in range(1, n + 1)]

    # -- setup ---------------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        try:
            self._check_free()
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", PREFIX, "-f", str(self.key))
            (self.dir / "shared").mkdir()
            (self.dir / "laptop-tmp").mkdir()
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            sh("ip", "addr", "add", f"{NET[1]}/{NET.prefixlen}", "dev", BRIDGE)
            sh("ip", "link", "set", BRIDGE, "up")
            for h in self.hosts:
                self._start(h)
            for h in self.hosts:
                self._wait_for_ssh(h)
        except BaseException:
            self.close()
            raise
        return self

    def _check_free(self) -> None:
        left = leftovers()
        if left:
            raise RuntimeError(f"left over from an earlier run: {', '.join(left)}; "
                               "remove them with: python tests/cluster_e2e/testhosts.py --clean")
        clash = [str(n) for n in _taken_networks() if n.overlaps(NET)]
        if clash:
            raise RuntimeError(f"{NET} overlaps this machine's {', '.join(clash)}")

    def _prepare_home(self, h: Host) -> None:
        home, python_dir = h.home, Path(sys.base_prefix)
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        (home / ".ssh/authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (home / ".ssh/authorized_keys").chmod(0o600)
        for f in (".profile", ".bashrc"):
            shutil.copy(f"/etc/skel/{f}", home / f)
        with open(home / ".bashrc", "a") as f:
            # What the machine's owner set up: python3.11 on PATH, no usage reports to Ray's servers.
            f.write(f'\nexport PATH="{python_dir}/bin:$PATH"\nexport RAY_USAGE_STATS_ENABLED=0\n')
        (home / ".config/pip").mkdir(parents=True)
        index = [u for u in sh(sys.executable, "-m", "pip", "config", "get", "global.extra-index-url",
                               check=False).stdout.split() if u.startswith("file:")]
        # Only this machine's local (file://) indexes: the hosts reach no package index over the network.
        # Without one, the project's build takes setuptools from the interpreter instead of an index.
        conf = "[global]\nno-index = true\nno-build-isolation = true\n" if not index else \
            f"[global]\nindex-url = {index[0]}\nextra-index-url = {' '.join(index[1:])}\n"
        (home / ".config/pip/pip.conf").write_text(conf)
        (h.root / "tmp").mkdir(mode=0o1777)
        (h.root / "tmp").chmod(0o1777)
        (h.root / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    def _sshd_config(self, h: Host) -> Path:
        key = h.root / "ssh_host_ed25519_key"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        conf = h.root / "sshd_config"
        conf.write_text("\n".join([
            f"ListenAddress {h.ip}:22", f"HostKey {key}", "PidFile none", "UsePAM no",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "AuthorizedKeysFile .ssh/authorized_keys", "PrintMotd no", "AcceptEnv none",
            "MaxStartups 50", "MaxSessions 50", "Subsystem sftp internal-sftp", ""]))
        return conf

    def _start(self, h: Host) -> None:
        self._prepare_home(h)
        conf = self._sshd_config(h)
        inside = f"{PREFIX}-if"
        sh("ip", "netns", "add", h.name)
        sh("ip", "link", "add", f"{PREFIX}{h.index}", "type", "veth", "peer", "name", inside, "netns", h.name)
        sh("ip", "link", "set", f"{PREFIX}{h.index}", "master", BRIDGE, "up")
        for cmd in (["addr", "add", f"{h.ip}/{NET.prefixlen}", "dev", inside], ["link", "set", inside, "up"],
                    ["link", "set", "lo", "up"], ["route", "add", "default", "via", GATEWAY]):
            sh("ip", "-n", h.name, *cmd)
        python_dir = Path(sys.base_prefix)
        mounts = []
        if python_dir.is_relative_to(HOME):  # it would vanish under the per-host home: mount it back
            target = h.home / python_dir.relative_to(HOME)
            target.mkdir(parents=True)
            mounts.append(f"mount --bind {python_dir} {target} && mount -o remount,bind,ro {target}")
        shared = self.dir / "shared"
        mounts += [f"mount --rbind {h.home} {HOME}", f"mount --bind {h.root / 'tmp'} /tmp",
                   "mount -t tmpfs -o size=1m,mode=755 kd-e2e-mnt /mnt", f"mkdir -p {SHARED}",
                   f"mount --bind {shared} {SHARED}", f"mount --bind {h.root / 'resolv.conf'} /etc/resolv.conf",
                   f"exec {SSHD} -D -e -f {conf}"]
        log = open(h.root / "sshd.log", "w")
        # Its own session: a Ctrl-C reaches the test, which then takes the hosts down in order.
        h.proc = subprocess.Popen(
            ["ip", "netns", "exec", h.name, "unshare", "--mount", "--propagation", "private", "--pid", "--kill-child",
             "--mount-proc", "sh", "-ec", " && ".join(mounts)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def ssh_args(self) -> list[str]:
        return ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"]

    def _wait_for_ssh(self, h: Host, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while True:
            r = sh(*self.ssh_args(), f"{SSH_USER}@{h.ip}", "true", check=False)
            if r.returncode == 0:
                return
            if h.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"sshd on {h.name} ({h.ip}) did not answer: {r.stderr.strip()}\n"
                                   f"{(h.root / 'sshd.log').read_text()}")
            time.sleep(0.5)

    # -- the user's side ------------------------------------------------------------------------
    def ray(self, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """A ``ray`` command of "your computer": this machine, with its own /tmp (Ray keeps the local
        provider's cluster state and its SSH control sockets there) and its own PID namespace, so
        that the SSH connections it leaves open end with it."""
        ray = str(Path(sys.executable).parent / "ray")
        tmp = self.dir / "laptop-tmp"
        script = f'mount --bind {tmp} /tmp && exec "$@"'
        here = Path(cwd).resolve()
        if here.is_relative_to("/tmp"):  # a checkout under /tmp would vanish under the private /tmp: carry it over
            inside = tmp / here.relative_to("/tmp")
            inside.mkdir(parents=True, exist_ok=True)
            script = f'mount --bind {here} {inside} && mount --rbind {tmp} /tmp && exec "$@"'
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--kill-child", "--mount-proc",
             "sh", "-ec", script, "sh", ray, *args],
            cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})

    def in_host(self, h: Host, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A command in the host's network namespace only (for the test's own checks)."""
        return sh("ip", "netns", "exec", h.name, *cmd, timeout=timeout, check=False)

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        try:
            for h in self.hosts:
                _end_host(h)
            sh("ip", "link", "del", BRIDGE, check=False)
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)

    def __exit__(self, *exc) -> None:
        self.close()


def _end_host(h: Host) -> None:
    """Kills every process in the host's namespaces (killing the PID namespace's first process ends
    the rest), then removes the network namespace, which also removes its veth pair."""
    for _ in range(50):
        pids = h.pids()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    if h.proc is not None:
        if h.proc.poll() is None:
            h.proc.kill()
        h.proc.wait(timeout=30)
    sh("ip", "netns", "del", h.name, check=False)


def clean() -> None:
    """Removes the namespaces and links a killed run left behind (only names made by this test)."""
    namespaces = sh("ip", "netns", "list").stdout.split()
    for name in leftovers():
        suffix = name.rsplit("-", 1)[-1]
        if name in namespaces and suffix.isdigit():
            _end_host(Host(int(suffix), "", Path(os.devnull)))
        else:
            sh("ip", "link", "del", name, check=False)
    print("left over:", ", ".join(leftovers()) or "nothing")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clean", action="store_true", help="remove what a killed run left behind")
    if p.parse_args().clean:
        clean()
