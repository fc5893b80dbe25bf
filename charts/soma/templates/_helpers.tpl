{{/* Chart name, overridable. */}}
{{- define "soma.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-soma, or the release name alone when it already says soma. */}}
{{- define "soma.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "soma.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the operator pods; never change them between releases. */}}
{{- define "soma.selectorLabels" -}}
app.kubernetes.io/name: {{ include "soma.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "soma.labels" -}}
{{ include "soma.selectorLabels" . }}
{{ include "soma.commonLabels" . }}
{{- end -}}

{{- define "soma.commonLabels" -}}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: soma
helm.sh/chart: {{ include "soma.chart" . }}
{{- end -}}

{{/* Labels that select the ledger's PostgreSQL pod (component ledger, never the operator's). */}}
{{- define "soma.ledgerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "soma.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ledger
{{- end -}}

{{- define "soma.ledgerLabels" -}}
{{ include "soma.ledgerSelectorLabels" . }}
{{ include "soma.commonLabels" . }}
{{- end -}}

{{- define "soma.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "soma.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "soma.image" -}}
{{- $img := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The rules the operator needs wherever it reconciles Soma resources. Shared by the
ClusterRole (cluster-wide mode) and the per-namespace Roles (namespaced mode), so the
two modes cannot drift apart. docs/rbac.md explains each rule.
*/}}
{{- define "soma.rules" -}}
- apiGroups: ["soma.dev"]
  resources: ["agents", "budgets", "capsules", "jobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["soma.dev"]
  resources: ["agents/status", "budgets/status", "capsules/status", "jobs/status"]
  verbs: ["get", "patch", "update"]
# A finished Job is deleted once its ttlSecondsAfterFinished has passed.
- apiGroups: ["soma.dev"]
  resources: ["jobs"]
  verbs: ["delete"]
- apiGroups: [""]
  resources: ["serviceaccounts", "services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# The Secrets carrying the ledger's URL to a sidecar (`<agent>-ledger`, `sjob-<job>-ledger`)
# or a drill (`sjob-<job>-ledger`). With a ledger: read before they are applied (get), applied
# by server-side apply (create, patch), and deleted (delete). Without one the operator reads
# only the Secrets a DR drill Job names, to say which is missing before it starts the drill
# (get), and deletes `<agent>-ledger` once, when the Deployment it replaces still referenced it
# (the ledger was turned off). Never list or watch. docs/rbac.md explains each verb.
- apiGroups: [""]
  resources: ["secrets"]
  {{- if .Values.ledger.enabled }}
  verbs: ["get", "create", "patch", "delete"]
  {{- else }}
  verbs: ["get", "delete"]
  {{- end }}
# A Job runs as a batch/v1 Job it owns, a scheduled drill as a CronJob; both are written by
# server-side apply and deleted by the garbage collector with their Job.
- apiGroups: ["batch"]
  resources: ["jobs", "cronjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The result of a run is its pod's termination message.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* Name of the operator's Deployment, ServiceAccount and RBAC objects: <fullname>-operator. */}}
{{- define "soma.operatorName" -}}
{{- printf "%s-operator" (include "soma.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The webhook's Service, certificate Secret and (cluster-scoped) ValidatingWebhookConfiguration. */}}
{{- define "soma.webhookService" -}}
{{- printf "%s-webhook" (include "soma.operatorName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "soma.webhookSecret" -}}
{{- printf "%s-webhook-cert" (include "soma.operatorName" .) | trunc 253 | trimSuffix "-" -}}
{{- end -}}
{{- define "soma.webhookConfiguration" -}}
{{- printf "%s.%s" (include "soma.operatorName" .) .Release.Namespace | trunc 253 | trimSuffix "-" -}}
{{- end -}}

{{/* Non-empty when the operator needs its settings ConfigMap. */}}
{{- define "soma.hasSettings" -}}
{{- if or .Values.sidecar.prices .Values.signatures.keylessRootsPem .Values.vault.caBundle -}}true{{- end -}}
{{- end }}

{{/*
The usage ledger. soma.ledgerName: the in-chart PostgreSQL's StatefulSet, Service and Secret
(at most 52 characters, so the StatefulSet's pod names and revision labels stay valid).
soma.ledgerInChart: non-empty when the chart runs that PostgreSQL. soma.ledgerUrlSecret: the
Secret whose `database-url` the operator reads.
*/}}
{{- define "soma.ledgerName" -}}
{{- printf "%s-ledger" (include "soma.fullname" . | trunc 45 | trimSuffix "-") -}}
{{- end -}}
{{- define "soma.ledgerInChart" -}}
{{- if and .Values.ledger.enabled (not .Values.ledger.existingSecret) -}}true{{- end -}}
{{- end -}}
{{- define "soma.ledgerUrlSecret" -}}
{{- default (include "soma.ledgerName" .) .Values.ledger.existingSecret -}}
{{- end -}}

{{/* sidecar.egressNamespaces, plus the release namespace when the chart runs the ledger's
PostgreSQL there; without duplicates, comma-separated. */}}
{{- define "soma.egressNamespaces" -}}
{{- $namespaces := .Values.sidecar.egressNamespaces | default list -}}
{{- if include "soma.ledgerInChart" . -}}
{{- $namespaces = append $namespaces .Release.Namespace -}}
{{- end -}}
{{- $namespaces | uniq | join "," -}}
{{- end -}}
