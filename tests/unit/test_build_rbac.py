"""The trainer's ServiceAccount, Role and RoleBinding: only this job's status."""

from __future__ import annotations

from lora_operator.build import names, rbac

OWNER = names.Owner(name="bot", namespace="ml", uid="u-1")


def test_service_account_does_not_automount() -> None:
    sa = rbac.service_account(OWNER)
    assert sa["kind"] == "ServiceAccount"
    assert sa["metadata"]["name"] == "bot-trainer"
    assert sa["automountServiceAccountToken"] is False
    assert sa["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_role_is_status_of_this_job_only() -> None:
    role = rbac.role(OWNER)
    assert role["rules"] == [{"apiGroups": ["lorajob.dev"], "resources": ["lorajobs/status"],
                              "resourceNames": ["bot"], "verbs": ["get", "patch"]}]
    assert role["metadata"]["ownerReferences"][0]["controller"] is True


def test_role_binding_binds_role_to_service_account() -> None:
    rb = rbac.role_binding(OWNER)
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                             "name": "bot-trainer"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "bot-trainer", "namespace": "ml"}]
