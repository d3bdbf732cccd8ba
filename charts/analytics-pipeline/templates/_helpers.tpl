{{/* Chart name, overridable. */}}
{{- define "ap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>" (or the release name if it already contains the chart name), max 40 characters
     so that "<fullname>-operator" and friends stay valid names. */}}
{{- define "ap.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels every object of the chart carries. */}}
{{- define "ap.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ap.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: analytics-pipeline
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the operator's pods (never change them: Deployment selectors are immutable). */}}
{{- define "ap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ap.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image reference for every role. */}}
{{- define "ap.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The operator's liveness URL inside the cluster (through its Service). */}}
{{- define "ap.healthURL" -}}
{{- printf "http://%s-operator.%s.svc:%d/healthz" (include "ap.fullname" .) .Release.Namespace (int .Values.operator.healthPort) -}}
{{- end -}}

{{/* The restrictive container securityContext shared by the operator and the test pod. */}}
{{- define "ap.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ap.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Sidecar injection webhook: the Secret with its serving certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "ap.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "ap.fullname" .) -}}
{{- end -}}

{{/* The DNS names the API server reaches the webhook by (the operator's Service). */}}
{{- define "ap.webhookDNSNames" -}}
{{- $service := printf "%s-operator" (include "ap.fullname" .) -}}
{{- $ns := .Release.Namespace -}}
{{- list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.cluster.local" $service $ns) | toJson -}}
{{- end -}}

{{/* native (an init container with restartPolicy: Always, Kubernetes >= 1.29) or container; "auto" picks by
     the cluster's version (`helm template` without --kube-version assumes Helm's built-in one). */}}
{{- define "ap.sidecarMode" -}}
{{- if eq .Values.webhook.sidecarMode "auto" -}}
{{- if semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version -}}native{{- else -}}container{{- end -}}
{{- else -}}
{{- .Values.webhook.sidecarMode -}}
{{- end -}}
{{- end -}}
