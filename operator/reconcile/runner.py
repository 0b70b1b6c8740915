"""Start the operator: settings, logging, metrics, kopf (peering, namespaces, liveness).

`lora-operator run` (operator/cli.py) calls `run_operator(args)` with: config,
namespace (list), all_namespaces, peering, standalone, metrics_port, liveness, and
optionally log_format / verbose / priority / instance. Environment: $LORA_OPERATOR_LOG_FORMAT
(json | plain | full), $LORA_OPERATOR_PRIORITY (peering priority), $LORA_OPERATOR_INSTANCE
(handle only LoRAJobs labelled `lorajob.dev/operator-instance=<it>`: several installations,
or tests, share a cluster without acting on each other's jobs).

High availability: run several replicas with the same `--peering` name and distinct
priorities (each replica picks a random one unless $LORA_OPERATOR_PRIORITY is set); kopf
pauses every replica but the highest, which is the only one that acts. The peering CRDs
(`peering.PEERING_CRDS`) must be installed for that; `--standalone` turns peering off.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import secrets
from typing import TYPE_CHECKING, Any

import kopf

from lora_operator import metrics
from lora_operator.settings import Settings, load_settings

if TYPE_CHECKING:
    from lora_operator.reconcile.kube import ApiClient

log = logging.getLogger("lora_operator.runner")
ANNOTATION_PREFIX = "lorajob.dev"
LOG_FORMAT_ENV = "LORA_OPERATOR_LOG_FORMAT"
PRIORITY_ENV = "LORA_OPERATOR_PRIORITY"
INSTANCE_ENV = "LORA_OPERATOR_INSTANCE"


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: the handlers are `on.event` (level-triggered, they read the whole
    object), so nothing reads kopf's old/new/diff, and the default storage deep-copies and
    serialises every body to build one."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def configure_kopf(kopf_settings: Any, settings: Settings) -> None:
    """kopf settings: state in lorajob.dev annotations (if kopf ever needs any), Events
    from INFO up, long server-side watches, concurrency from the operator's settings."""
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX)
    kopf_settings.persistence.diffbase_storage = NoDiffBase()
    kopf_settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    kopf_settings.posting.level = logging.INFO
    kopf_settings.posting.reporting_component = "lora-operator"
    kopf_settings.posting.event_name_prefix = "lora-operator-"
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.watching.connect_timeout = 30
    kopf_settings.networking.request_timeout = 60
    kopf_settings.execution.max_workers = settings.max_workers


def _log_format(args: argparse.Namespace) -> Any:
    chosen = (getattr(args, "log_format", None) or os.environ.get(LOG_FORMAT_ENV) or "full")
    return {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN}.get(
        str(chosen).lower(), kopf.LogFormat.FULL)


def _priority(args: argparse.Namespace) -> int:
    explicit = getattr(args, "priority", None) or os.environ.get(PRIORITY_ENV)
    if explicit:
        return int(explicit)
    return 1 + secrets.randbelow(1_000_000)  # distinct per replica: equal ones all pause


def _share_credentials(client: ApiClient) -> None:
    """kopf's watches log in as the operator's own calls do (`kube.login`: the service
    account in a pod, at $KUBERNETES_SERVICE_HOST, else the kubeconfig), and the API
    client's connections are closed when kopf stops (its loop still running)."""
    from lora_operator.reconcile.kube import login

    @kopf.on.login(id="lora-operator-login")
    def login_like_the_operator(**_: Any) -> kopf.ConnectionInfo:
        return login()

    @kopf.on.cleanup(id="close-api-client")
    async def close_api_client(**_: Any) -> None:
        await client.close()


def run_operator(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit status."""
    from lora_operator.reconcile import handlers, projection, sweep_handlers
    from lora_operator.reconcile.controller import Controller
    from lora_operator.reconcile.kube import ApiClient, Kube
    from lora_operator.reconcile.sweep_controller import SweepController, SweepKube

    projection.install()  # kopf's watch streams decoded with orjson, every object trimmed
    verbose = bool(getattr(args, "verbose", False))
    kopf.configure(verbose=verbose, log_format=_log_format(args))
    if not verbose:  # "Handler 'pod_event' succeeded." for every watch event is noise
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings = load_settings(getattr(args, "config", None))
    # One connection per reconcile worker, a few spare for the sweeps' (kopf has its own).
    client = ApiClient(connections=settings.max_workers + 4)
    _share_credentials(client)
    executor = concurrent.futures.ThreadPoolExecutor(  # planning, storage and DNS checks
        max_workers=settings.max_workers, thread_name_prefix="lora-reconcile")
    instance = getattr(args, "instance", None) or os.environ.get(INSTANCE_ENV) or None
    handlers.install(Controller(settings, Kube(client), executor), instance=instance)
    sweep_handlers.install(SweepController(SweepKube(client), executor,  # LoRASweeps
                                           workers=settings.max_workers))

    port = int(getattr(args, "metrics_port", 0) or 0)
    metrics.track_gc()
    metrics.serve(port)
    namespaces = list(getattr(args, "namespace", None) or settings.namespaces)
    clusterwide = bool(getattr(args, "all_namespaces", False)) or not namespaces
    standalone = bool(getattr(args, "standalone", False))
    peering = getattr(args, "peering", None)
    log.info("watching %s%s; peering %s; metrics on :%s",
             "all namespaces" if clusterwide else ", ".join(namespaces),
             f" (LoRAJobs labelled instance {instance})" if instance else "",
             "off" if standalone else (peering or "default (if installed)"), port or "off")
    kopf.run(
        standalone=standalone,
        peering_name=None if standalone else peering,
        priority=_priority(args),
        liveness_endpoint=getattr(args, "liveness", None),
        clusterwide=clusterwide,
        namespaces=[] if clusterwide else namespaces,
    )
    executor.shutdown(wait=False, cancel_futures=True)
    return 0
