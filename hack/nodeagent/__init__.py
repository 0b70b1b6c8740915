"""The dev node agent: a tiny "kubelet without images" for the local cluster.

DEV/TEST INFRASTRUCTURE ONLY. Nothing here ships with the operator or runs in a real
cluster. It exists so that `make quickstart` and the end-to-end tests run a *real* pod
lifecycle (scheduler → binding → process → status → Job controller) on a machine that has
no container runtime, no images and no GPU.

It registers Node objects (a GPU-class node presented with GPU Feature Discovery labels
and a CPU-only node), keeps them Ready with Lease heartbeats, and runs every pod bound to
them as local processes of this checkout's Python environment: the container's command and
args, its env (values, Secret/ConfigMap/field references, envFrom), its volumes
bind-mounted at their mount paths inside a private mount namespace (the ServiceAccount
token comes from the TokenRequest API, bound to the pod), the termination message, pod
phase, conditions and container states, graceful deletion, and the kubelet's log endpoint
so `kubectl logs` works. See README.md in this folder.
"""
