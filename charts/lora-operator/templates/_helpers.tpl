{{/* Names and labels shared by every template. */}}
{{- define "lora-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lora-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "lora-operator.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "lora-operator.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "lora-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lora-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "lora-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: lora-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lora-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lora-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lora-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "lora-operator.trainerImage" -}}
{{- $t := .Values.config.trainerImage }}
{{- printf "%s:%s" $t.repository (default .Chart.AppVersion $t.tag) }}
{{- end }}

{{/* The kopf peering object's name (used only when replicaCount > 1). */}}
{{- define "lora-operator.peering" -}}
{{- include "lora-operator.fullname" . }}
{{- end }}

{{/* The operator's configuration file (operator/settings.py), rendered from .Values.config. */}}
{{- define "lora-operator.config" -}}
{{- $c := .Values.config -}}
vramClasses:
{{ toYaml $c.vramClasses }}
safetyMargin: {{ $c.safetyMargin }}
trainerImage: {{ include "lora-operator.trainerImage" . | quote }}
trainerCommand:
{{ toYaml $c.trainerCommand }}
trainerCpu: {{ $c.trainerCpu | quote }}
trainerMemory: {{ $c.trainerMemory | quote }}
preflightCpu: {{ $c.preflightCpu | quote }}
preflightMemory: {{ $c.preflightMemory | quote }}
preflightDeadlineSeconds: {{ $c.preflightDeadlineSeconds }}
trainerEphemeralStorage: {{ $c.trainerEphemeralStorage | quote }}
trainerShmSize: {{ $c.trainerShmSize | quote }}
{{- with $c.s3Endpoint }}
s3Endpoint: {{ . | quote }}
{{- end }}
s3Region: {{ $c.s3Region | quote }}
{{- with $c.s3CredentialsSecret }}
s3CredentialsSecret: {{ . | quote }}
{{- end }}
namespaces:
{{- if .Values.watchNamespaces }}
{{ toYaml .Values.watchNamespaces }}
{{- else }} []
{{- end }}
maxWorkers: {{ $c.maxWorkers }}
progressIntervalSeconds: {{ $c.progressIntervalSeconds }}
manifestVerifyTimeoutSeconds: {{ $c.manifestVerifyTimeoutSeconds }}
allowLocalUris: {{ $c.allowLocalUris }}
{{- if kindIs "slice" $c.signedEndpoints }}
signedEndpoints: {{ toJson $c.signedEndpoints }}
{{- end }}
storagePrefixes: {{ toJson ($c.storagePrefixes | default dict) }}
allowTrustRemoteCode: {{ $c.allowTrustRemoteCode | default false }}
{{- if kindIs "slice" $c.allowedTolerationKeys }}
allowedTolerationKeys: {{ toJson $c.allowedTolerationKeys }}
{{- end }}
{{- if kindIs "slice" $c.allowedPriorityClasses }}
allowedPriorityClasses: {{ toJson $c.allowedPriorityClasses }}
{{- end }}
{{- if kindIs "slice" $c.allowedSecrets }}
allowedSecrets: {{ toJson $c.allowedSecrets }}
{{- end }}
devMode: {{ $c.devMode | default false }}
{{- end }}

{{/* RBAC rules on namespaced objects: in a ClusterRole (all namespaces) or a Role per
watched namespace. Exactly what the operator calls (operator/reconcile/kube.py) plus what
kopf needs, nothing more:
- lorajobs: list/watch (kopf's index and event handlers), get (fresh read before a status
  patch), delete (ttlSecondsAfterFinished). kopf writes nothing into them: the handlers are
  on.event + indexes only (no finalizer, no annotations), so no patch/update.
- lorajobs/status: patch (the controller's status); get+patch is also what lets the
  operator create each job's Role, which grants exactly that (RBAC escalation check).
- lorajobs: create (a LoRASweep's trials, by name; 409 adopts only a trial this sweep
  controls); delete also stops an early-stopped trial. lorasweeps: list/watch (kopf), get
  (fresh read after a refused status patch); lorasweeps/status: patch. No patch/update of
  a LoRASweep itself and no finalizer (trials are owned: the garbage collector removes them).
- jobs: list/watch (kopf), create, get (adopt on 409), patch (runPolicy.suspend, and the
  operator's record of a verified success), delete (a Failed LoRAJob's unfinished Job, so
  no GPU keeps burning).
- configmaps: create, get (on 409: adopt only what this LoRAJob controls), patch (refresh
  an adopted ConfigMap's data). serviceaccounts, roles, rolebindings: create, get (the same
  ownership check on 409; an object of someone else is never adopted; the garbage
  collector deletes ours through their ownerReferences).
- pods: list/watch (kopf). events: create (kopf posts core/v1 Events, never patches). */}}
{{- define "lora-operator.namespacedRules" -}}
- apiGroups: [lorajob.dev]
  resources: [lorajobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [lorajob.dev]
  resources: [lorajobs/status]
  verbs: [patch]
- apiGroups: [lorajob.dev]
  resources: [lorasweeps]
  verbs: [get, list, watch]
- apiGroups: [lorajob.dev]
  resources: [lorasweeps/status]
  verbs: [patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}
