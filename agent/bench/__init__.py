"""``mipmobike bench``: the kernel-path performance suite (issue 9).

Parts, each measured inside one run with its comparison side by side:

* ``handover`` (``agent.bench.handover``): the mobile node agent on the
  Figure-1 testbed moving through c -> f -> mc -> mc (into and out of a NAT)
  -> c, link up -> lease -> verdict -> data path ready -> first packet
  delivered, median and p95 per transition, with 0/20/50 ms of added
  round-trip time on the access link (netem); next to it strongSwan's own
  client (``tb.vpn_client()``) making the same untrusted -> untrusted moves;
  the agent's CPU time and resident memory, idle and during the moves.
* ``goodput`` (``agent.bench.goodput``): iperf3 TCP between the home address
  and the correspondent through the Mobile IP tunnel inside ESP (mode mc)
  against a plain strongSwan ESP tunnel on the same kernel, with a capture
  on the access link counting IP fragments.
* ``gate`` (``agent.bench.hostparts``): ``scripts/bench_gate.py`` (pps through
  a veth, gate open against no program).
* ``ha`` (``agent.bench.hostparts``): ``scripts/bench_ha.py``'s ``run_one``
  (i-HA registrations/s and memory per binding per data-plane backend).

Where this kernel lacks ESP, ipip or netem, the parts that need them run in
the VM (``scripts/vm/vmrun.sh``, QEMU TCG) and the rest on the host; every
result carries the kernel, CPU and whether TCG ran it. Reports:
``reports/bench-<stamp>.{md,json}`` and ``reports/bench-latest.{md,json}``;
``--publish`` also writes ``docs/bench/latest.{md,json}`` (commit by hand).
What cannot run is reported as "not measured: <reason>", never estimated.
"""
