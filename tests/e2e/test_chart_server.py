"""The Helm chart rendered with several value sets is valid for a real API server
(`kubectl apply --dry-run=server`): schemas, RBAC rules, kopf peering objects."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import kubectl
from tests.unit.test_chart import VALUE_SETS
from tests.unit.test_chart_helpers import CHART, KUBE_VERSION

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_chart_passes_server_side_dry_run(cluster: Any, name: str) -> None:
    kubectl(cluster, "apply", "--server-side", "-f", str(CHART / "crds" / "kopf-peering.yaml"))
    values = VALUE_SETS[name]
    for ns in ["lora-system", *values.get("watchNamespaces", [])]:
        kubectl(cluster, "create", "namespace", ns, check=False)
    rendered = subprocess.run(
        [str(cluster.helm), "template", "lora", str(CHART), "-n", "lora-system",
         "--kube-version", KUBE_VERSION, "-f", "-"],
        input=yaml.safe_dump(values), capture_output=True, text=True, check=True).stdout
    out = kubectl(cluster, "apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert out.returncode == 0, out.stderr
    assert "(server dry run)" in out.stdout
