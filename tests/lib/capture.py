"""Record what crossed a link: tcpdump in a namespace, read back with scapy.

    with Capture(ns, "veth0", path) as cap:
        ...traffic...
    pkts = cap.packets()          # scapy packets, after the capture stopped

tcpdump (not tshark) captures because it starts in milliseconds; tshark is the
decoding oracle elsewhere. ``-U`` writes each packet as it arrives, so a
SIGINT loses nothing.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .topo import Netns


class Capture:
    def __init__(self, ns: Netns, ifname: str, path: Path, bpf_filter: str = "", direction: str = "inout") -> None:
        """``direction`` "out" records only what the interface sent: on ingress the kernel shows
        decapsulated packets (ESP tunnel mode, ipip) to taps a second time, in clear."""
        self.ns, self.ifname, self.path = ns, ifname, Path(path)
        self.filter = bpf_filter
        self.direction = direction
        self.proc: subprocess.Popen | None = None
        self._err = self.path.with_suffix(".stderr")

    def start(self) -> "Capture":
        argv = ["ip", "netns", "exec", self.ns.name, "tcpdump", "-i", self.ifname, "-n", "-U", "--immediate-mode", "-Z", "root", "-s", "2048",
                "-Q", self.direction, "-w", str(self.path)]
        if self.filter:
            argv.append(self.filter)
        err = open(self._err, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        err.close()
        deadline = time.monotonic() + 20
        while b"listening on" not in self._err.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tcpdump on {self.ns.name}/{self.ifname} did not start: "
                                   + self._err.read_text(errors="replace"))
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            time.sleep(0.1)    # let packets in flight reach the ring
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Capture":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def packets(self):
        import scapy.layers.inet  # noqa: F401  (registers Ether/IP/UDP for rdpcap)
        import scapy.layers.l2  # noqa: F401
        from scapy.utils import rdpcap
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        return list(rdpcap(str(self.path)))
