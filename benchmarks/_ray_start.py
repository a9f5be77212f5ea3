"""``ray start`` for a worker node of a cluster that lives on 127.0.0.1 alone.

Ray's command line refuses to add a worker node while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
is 0, the switch that keeps a node's servers on loopback (``cxrtune.search.ray_environment``),
and with the switch at 1 it replaces ``--node-ip-address=127.0.0.1`` by the machine's
outward address, where the node's servers then listen. This runs Ray's own ``ray start``
with the refusal lifted and the address kept as given, in this process only: the
node's servers, its child processes, read the switch at 0 from the environment.
Both are private names of Ray; ``tests/benchmarks/test_cluster_scale.py`` checks that the
nodes listen on loopback only, so a Ray release that moves them fails there.
"""

from ray._private import ray_constants, services

ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host

from ray.scripts.scripts import main  # noqa: E402

main()
