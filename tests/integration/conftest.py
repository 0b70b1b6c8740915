"""Integration-test fixtures: the real local cluster (hack/cluster), no mocks.

`local_cluster` (session scope) reuses a cluster that is already up (``make cluster-up``),
otherwise brings one up for the run and takes it down again at the end. The start/stop logic
is hack/cluster/localcluster.py (dev/test infrastructure), shared with up.sh and down.sh.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HACK = Path(__file__).resolve().parents[2] / "hack" / "cluster"
if str(_HACK) not in sys.path:
    sys.path.insert(0, str(_HACK))

import localcluster  # noqa: E402  (dev/test infrastructure, found through sys.path above)
from localcluster import ClusterInfo  # noqa: E402


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[ClusterInfo]:
    """The running local cluster: kubeconfig, kubectl, helm, S3 endpoint/keys/bucket.

    Attributes (see localcluster.ClusterInfo): state_dir, bin_dir, kubeconfig, kubectl, helm,
    api_server, s3_endpoint, s3_access_key, s3_secret_key, s3_region, s3_bucket, ports,
    env (dict of the .cluster/env exports), started_here, crd_error and
    kubectl_run(*args, check=True, input=None, timeout=60) -> CompletedProcess.
    Set LORA_KEEP_CLUSTER=1 to leave a cluster this run started running afterwards.
    """
    ci = localcluster.up(crds="record")  # a bad CRD fails its own tests, not all of them
    try:
        yield ci
    finally:
        if ci.started_here and not os.environ.get("LORA_KEEP_CLUSTER"):
            localcluster.stop()
