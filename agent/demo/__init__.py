"""The roaming demo (``mipmobike demo``) and the pieces the end-to-end suite shares with it.

* ``cli``: the demo itself (``add_arguments``/``run``; re-runs itself in the VM runner where needed);
* ``roam``: ``Roamer`` moves the node around a testbed and records each handover, its traffic and
  what crossed the access link; ``agent_config``, ``vpn_available``, ``warm_gate_cache``;
* ``flow``: a UDP echo and a TCP stream between the home address and the correspondent;
* ``capture``: tcpdump on the access link, a small pcap reader, the detection-traffic classifier.
"""
