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
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: soma
helm.sh/chart: {{ include "soma.chart" . }}
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
- apiGroups: [""]
  resources: ["serviceaccounts", "services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
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
{{- if or .Values.sidecar.prices .Values.signatures.keylessRootsPem -}}true{{- end -}}
{{- end }}
